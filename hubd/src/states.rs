//! The instance-state report split across MQTT messages. EVP2 sends it as shared attributes,
//! which the hub merges key by key, so a report too big for one message goes out as several
//! flat objects; no state is held back because others are big. An entry too big for any
//! message cannot come from sdk-broker (it refuses such a state with `EVP_TOOBIG`); if one
//! does, it alone is left out, and said so.

use serde_json::{Map, Value};

/// The report `states` (one flat JSON object) as payloads of at most `max_payload` bytes each,
/// in key order, and the keys of the entries left out because they alone do not fit.
pub fn split(states: &Map<String, Value>, max_payload: usize) -> (Vec<String>, Vec<String>) {
    let mut messages = Vec::new();
    let mut left_out = Vec::new();
    let mut current = String::new();
    for (key, value) in states {
        // Serializing a string key and a JSON value cannot fail.
        let entry = format!(
            "{}:{}",
            Value::String(key.clone()),
            serde_json::to_string(value).unwrap_or_default()
        );
        // `{` or `,` before it, and the closing `}`.
        if entry.len() + 2 > max_payload {
            left_out.push(key.clone());
            continue;
        }
        if !current.is_empty() && current.len() + 1 + entry.len() + 1 > max_payload {
            current.push('}');
            messages.push(std::mem::take(&mut current));
        }
        current.push(if current.is_empty() { '{' } else { ',' });
        current.push_str(&entry);
    }
    if !current.is_empty() {
        current.push('}');
        messages.push(current);
    }
    if messages.is_empty() {
        // A report with nothing in it still says so (every state of every instance is gone).
        messages.push("{}".to_owned());
    }
    (messages, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_big_state_goes_alone_and_the_others_still_go() {
        let big = "b".repeat(60);
        let states = object(json!({"state/a/x": "1", "state/big/s": big, "state/z/y": "2"}));
        let (messages, left_out) = split(&states, 80);
        assert!(left_out.is_empty());
        let mut merged = Map::new();
        for m in &messages {
            assert!(m.len() <= 80, "{m}");
            merged.extend(object(serde_json::from_str(m).unwrap()));
        }
        assert_eq!(
            merged, states,
            "the hub merges them back to the whole report"
        );
        assert!(messages.len() >= 2);
    }

    #[test]
    fn one_message_when_it_fits_and_an_entry_too_big_is_named() {
        let states = object(json!({"state/a/x": "1", "state/a/y": "2"}));
        assert_eq!(
            split(&states, 1000),
            (
                vec![r#"{"state/a/x":"1","state/a/y":"2"}"#.to_owned()],
                vec![]
            )
        );
        let states = object(json!({"state/a/x": "1", "state/h/h": "h".repeat(100)}));
        let (messages, left_out) = split(&states, 50);
        assert_eq!(messages, vec![r#"{"state/a/x":"1"}"#.to_owned()]);
        assert_eq!(left_out, vec!["state/h/h".to_owned()]);
        assert_eq!(split(&Map::new(), 50), (vec!["{}".to_owned()], vec![]));
    }
}
