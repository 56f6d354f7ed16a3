//! Strings from outside that are to cross D-Bus as `s`: dbus-daemon disconnects a sender whose
//! string holds a NUL, so every daemon checks them where they enter. Free of zbus, so the SDK
//! side of `schemas` has it too.

/// A string from outside that cannot become a D-Bus `s`: dbus-daemon disconnects a sender
/// whose string holds a NUL (Rust strings are always valid UTF-8, the other rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} contains a NUL byte (at byte {at}), which D-Bus cannot carry")]
pub struct BusStringError {
    /// What the string is (`state topic`, `deployment.modules.cam.entryPoint`), escaped.
    pub field: String,
    /// Offset of the first NUL.
    pub at: usize,
}

/// Checks that `value` can be sent as a D-Bus string; `field` names it in the error. Every
/// daemon calls this where a string enters from outside (the hub, a module), so that no
/// outside byte can make dbus-daemon close the daemon's connection.
pub fn check_bus_string(field: &str, value: &str) -> Result<(), BusStringError> {
    match value.find('\0') {
        None => Ok(()),
        Some(at) => Err(BusStringError {
            field: escape_nul(field).into_owned(),
            at,
        }),
    }
}

/// `text` with every NUL written as `\0`, for error messages and paths that quote outside
/// input and travel over D-Bus themselves.
pub fn escape_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\\0").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_is_found_and_escaped() {
        assert!(check_bus_string("x", "plain").is_ok());
        let e = check_bus_string("a\0b", "ab\0").unwrap_err();
        assert_eq!((e.field.as_str(), e.at), ("a\\0b", 2));
        assert_eq!(escape_nul("a\0"), "a\\0");
    }
}
