//! The packaged `/etc/evp/agent.toml` (`packaging/agent.toml`) shows every setting commented
//! out with its default. These helpers let each daemon's tests hold it to that: the keys a
//! section shows are exactly the fields its settings type reads ([`fields_of`]), and the file
//! with every setting uncommented ([`uncommented`]) parses into them.

use serde::Deserialize;
use serde::de::{self, Visitor};

/// The packaged file.
pub const PACKAGED: &str = include_str!("../../packaging/agent.toml");

/// `text` with every commented setting (`# key = value`) uncommented; prose comments stay.
pub fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match setting_of(line) {
            Some(_) => line.trim_start_matches('#').trim_start(),
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The key of a commented setting line (`# key = value`, the key in lower case and `_`).
fn setting_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("# ")?;
    let (key, _) = rest.split_once(" = ")?;
    key.chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(key)
}

/// The keys `text` shows (commented) at the top level (`section` "") or in `[section]`.
pub fn shown_keys<'a>(text: &'a str, section: &str) -> Vec<&'a str> {
    let mut current = "";
    let mut keys = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name;
        } else if current == section
            && let Some(key) = setting_of(line)
        {
            keys.push(key);
        }
    }
    keys.sort_unstable();
    keys
}

/// The field names `T` reads (serde's list for a struct: `#[serde(skip)]` ones are not in it),
/// sorted.
pub fn fields_of<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
    let mut fields = Vec::new();
    let _ = T::deserialize(FieldNames(&mut fields));
    fields.sort_unstable();
    fields
}

/// A deserializer that only notes the fields a struct asks for, then stops.
struct FieldNames<'a>(&'a mut Vec<&'static str>);

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field names noted")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.0.extend_from_slice(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_level_settings_are_all_shown_and_parse() {
        assert_eq!(shown_keys(PACKAGED, ""), fields_of::<crate::CommonConfig>());
        let config = crate::AgentConfig::parse(&uncommented(PACKAGED)).unwrap();
        assert_eq!(
            config.common.data_dir,
            std::path::Path::new(crate::DEFAULT_DATA_DIR)
        );
        // The file as shipped sets nothing: the daemons run on their defaults.
        let shipped = crate::AgentConfig::parse(PACKAGED).unwrap();
        assert_eq!(
            shipped.common.run_dir,
            std::path::Path::new(crate::DEFAULT_RUN_DIR)
        );
    }

    #[test]
    fn prose_stays_a_comment() {
        let text = "# Say what it is.\n# key_a = 1\n[s]\n# Not: a = b\n# key_b = \"x\"\n";
        assert_eq!(
            uncommented(text),
            "# Say what it is.\nkey_a = 1\n[s]\n# Not: a = b\nkey_b = \"x\""
        );
        assert_eq!(shown_keys(text, "s"), ["key_b"]);
    }
}
