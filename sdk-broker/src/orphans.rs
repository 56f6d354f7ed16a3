//! Which kept configurations are collected. sdk-broker keeps every configuration the hub
//! sends, per instance, on disk; one for an instance that is not deployed (never, or no longer)
//! would be kept forever. An instance's configuration is collected once the instance has been
//! out of the deployment for a grace period, counted from the later of the `SetRouting` that
//! left it out and the last configuration received for it: EVP hubs often send an instance's
//! configuration before (or with) its deployment, and that one must survive until the
//! deployment arrives. Nothing is collected before the first `SetRouting` (sdk-broker just
//! started and does not know the deployment yet), nor while the instance is open.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The collection's bookkeeping; it reads no clock (`now` comes in).
#[derive(Debug)]
pub(crate) struct Orphans {
    grace: Duration,
    /// The instances of the last `SetRouting` (every instance of the deployment); `None`
    /// before the first.
    deployed: Option<BTreeSet<String>>,
    /// Instances with a configuration and out of the deployment, since when.
    since: HashMap<String, Instant>,
}

impl Orphans {
    /// Configurations are collected `grace` after their instance left the deployment.
    pub(crate) fn new(grace: Duration) -> Orphans {
        Orphans {
            grace,
            deployed: None,
            since: HashMap::new(),
        }
    }

    /// A new `SetRouting` names the `deployed` instances; `kept` are the instances that have a
    /// configuration. Those not deployed start their grace now (or keep the one they run).
    pub(crate) fn deployment<'a>(
        &mut self,
        deployed: BTreeSet<String>,
        kept: impl Iterator<Item = &'a str>,
        now: Instant,
    ) {
        self.since.retain(|name, _| !deployed.contains(name));
        for name in kept.filter(|n| !deployed.contains(*n)) {
            self.since.entry(name.to_owned()).or_insert(now);
        }
        self.deployed = Some(deployed);
    }

    /// A configuration arrived for `instance`: when it is not deployed, its grace starts again.
    pub(crate) fn configured(&mut self, instance: &str, now: Instant) {
        if self
            .deployed
            .as_ref()
            .is_some_and(|d| !d.contains(instance))
        {
            self.since.insert(instance.to_owned(), now);
        }
    }

    /// The instances whose configuration is collected at `now` (forgotten here); an instance
    /// that `is_open` is kept until it is closed.
    pub(crate) fn due(&mut self, now: Instant, is_open: impl Fn(&str) -> bool) -> Vec<String> {
        let grace = self.grace;
        let due: Vec<String> = self
            .since
            .iter()
            .filter(|(name, since)| {
                now.saturating_duration_since(**since) >= grace && !is_open(name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &due {
            self.since.remove(name);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_configuration_is_collected_a_grace_after_its_instance_left_the_deployment() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut o = Orphans::new(s(60));
        let closed = |_: &str| false;
        // Before the first SetRouting nothing is known, so nothing goes.
        o.configured("early", t0);
        assert!(o.due(t0 + s(3600), closed).is_empty());
        // The deployment then names `early` (its configuration came first): kept.
        o.deployment(
            set(&["early", "a"]),
            ["early", "a", "stale"].into_iter(),
            t0 + s(10),
        );
        assert!(o.due(t0 + s(69), closed).is_empty());
        assert_eq!(o.due(t0 + s(70), closed), ["stale"]);
        assert!(o.due(t0 + s(1000), closed).is_empty(), "collected once");
        // `a` leaves the deployment; a configuration that arrives for it meanwhile (or for an
        // instance the hub is about to deploy) starts its grace again.
        o.deployment(set(&["early"]), ["early", "a"].into_iter(), t0 + s(100));
        o.configured("a", t0 + s(150));
        o.configured("next", t0 + s(150));
        assert!(o.due(t0 + s(209), closed).is_empty());
        // An instance still open (stopping) is kept until it is closed.
        let a_open = |n: &str| n == "a";
        assert_eq!(o.due(t0 + s(210), a_open), ["next"]);
        assert_eq!(o.due(t0 + s(211), closed), ["a"]);
        // Back in a deployment before its grace ran out: kept.
        o.configured("back", t0 + s(300));
        o.deployment(
            set(&["early", "back"]),
            ["early", "back"].into_iter(),
            t0 + s(330),
        );
        assert!(o.due(t0 + s(10_000), closed).is_empty());
    }
}
