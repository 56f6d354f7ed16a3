//! The message routing table that reconcilerd hands to sdk-broker (`SdkBroker1.SetRouting`):
//! per instance, publish alias → topic and subscribe alias → topic, resolved from the
//! deployment's `publishTopics`/`subscribeTopics` of type `local`.
//!
//! JSON form: `{"instances": {"sender-1": {"publish": {"out": "salute"}, "subscribe": {}},
//! "receiver-1": {"publish": {}, "subscribe": {"in": "salute"}}}}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deployment::Deployment;

/// The only topic type EVP routes: between instances on this device.
pub const LOCAL_TOPIC_TYPE: &str = "local";

/// Every instance's message routes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Instance name → its routes.
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceRoutes>,
}

/// One instance's routes, with topic names already resolved to topic strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRoutes {
    /// Publish alias (what the module passes to `EVP_sendMessage`) → topic.
    #[serde(default)]
    pub publish: BTreeMap<String, String>,
    /// Subscribe alias (what the module receives as the message topic) → topic.
    #[serde(default)]
    pub subscribe: BTreeMap<String, String>,
}

/// Why a routing document was refused.
#[derive(Debug, thiserror::Error)]
#[error("routing JSON is invalid: {0}")]
pub struct RoutingError(#[from] serde_json::Error);

impl Routing {
    /// Resolves every instance's aliases through the deployment's topic tables. Aliases naming
    /// a topic that is missing or not of type `local` are left out: EVP never routes them, so a
    /// message sent on such an alias reaches nobody (the sender's callback says `ERROR`).
    pub fn from_deployment(deployment: &Deployment) -> Routing {
        let resolve = |aliases: &BTreeMap<String, String>,
                       topics: &BTreeMap<String, crate::deployment::Topic>| {
            aliases
                .iter()
                .filter_map(|(alias, name)| {
                    let t = topics.get(name)?;
                    (t.kind == LOCAL_TOPIC_TYPE).then(|| (alias.clone(), t.topic.clone()))
                })
                .collect()
        };
        Routing {
            instances: deployment
                .instance_specs
                .iter()
                .map(|(name, spec)| {
                    (
                        name.clone(),
                        InstanceRoutes {
                            publish: resolve(&spec.publish, &deployment.publish_topics),
                            subscribe: resolve(&spec.subscribe, &deployment.subscribe_topics),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Parses the JSON that crosses the bus.
    pub fn from_json(text: &str) -> Result<Routing, RoutingError> {
        Ok(serde_json::from_str(text)?)
    }

    /// The JSON that crosses the bus.
    pub fn to_json(&self) -> String {
        // Maps of strings always serialize.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// The topic that `instance` publishes to with `alias`, if routed.
    pub fn publish_topic(&self, instance: &str, alias: &str) -> Option<&str> {
        self.instances
            .get(instance)?
            .publish
            .get(alias)
            .map(String::as_str)
    }

    /// Every `(instance, subscribe alias)` that receives messages on `topic`, in name order.
    pub fn subscribers<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.instances.iter().flat_map(move |(name, routes)| {
            routes
                .subscribe
                .iter()
                .filter(move |(_, t)| t.as_str() == topic)
                .map(move |(alias, _)| (name.as_str(), alias.as_str()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "instanceSpecs": {
                "sender-1": {"moduleId": "m", "publish": {"out": "pub-salute", "far": "pub-cloud"}, "subscribe": {}},
                "receiver-1": {"moduleId": "m", "publish": {}, "subscribe": {"in": "sub-salute", "again": "sub-salute"}},
                "receiver-2": {"moduleId": "m", "publish": {}, "subscribe": {"x": "sub-salute", "y": "sub-missing"}}
            },
            "modules": {"m": {"moduleImpl": "spawn", "entryPoint": "main"}},
            "publishTopics": {
                "pub-salute": {"type": "local", "topic": "salute"},
                "pub-cloud": {"type": "cloud", "topic": "salute"}
            },
            "subscribeTopics": {"sub-salute": {"type": "local", "topic": "salute"}}
        }))
        .unwrap()
    }

    #[test]
    fn resolves_local_topics_only() {
        let r = Routing::from_deployment(&deployment());
        assert_eq!(r.publish_topic("sender-1", "out"), Some("salute"));
        assert_eq!(r.publish_topic("sender-1", "far"), None);
        assert_eq!(r.publish_topic("nobody", "out"), None);
        let subs: Vec<_> = r.subscribers("salute").collect();
        assert_eq!(
            subs,
            [
                ("receiver-1", "again"),
                ("receiver-1", "in"),
                ("receiver-2", "x")
            ]
        );
        assert!(!r.instances["receiver-2"].subscribe.contains_key("y"));
    }

    #[test]
    fn json_round_trips_and_refuses_unknown_fields() {
        let r = Routing::from_deployment(&deployment());
        assert_eq!(Routing::from_json(&r.to_json()).unwrap(), r);
        assert!(Routing::from_json("{\"instance\": {}}").is_err());
        assert_eq!(Routing::from_json("{}").unwrap(), Routing::default());
    }
}
