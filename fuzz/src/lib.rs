//! What the fuzz targets hold true of every decoder, beyond not crashing: errors that quote
//! outside input are bounded and carry no NUL (they travel over D-Bus and into hub reports),
//! and strings that a decoder lets through to D-Bus carry no NUL either.

use evp_schemas::ValidationError;
use evp_schemas::deployment::{MAX_ERROR_MESSAGE, MAX_ERROR_PATH};

/// A refusal names its field and says why, bounded, with every NUL written `\0`.
pub fn check_validation_error(e: &ValidationError) {
    assert!(
        e.path.len() <= MAX_ERROR_PATH,
        "path of {} bytes: {:?}",
        e.path.len(),
        e.path
    );
    assert!(
        e.message.len() <= MAX_ERROR_MESSAGE,
        "message of {} bytes: {:?}",
        e.message.len(),
        e.message
    );
    assert!(!e.path.is_empty(), "an error without a path: {e:?}");
    bus_safe("an error's path", &e.path);
    bus_safe("an error's message", &e.message);
}

/// `value` may become a D-Bus string: dbus-daemon disconnects a sender whose string holds a NUL.
pub fn bus_safe(what: &str, value: &str) {
    assert!(!value.contains('\0'), "{what} holds a NUL: {value:?}");
}

/// `file`, which `sdk_broker::blob::confine` answered for a module's file name, is a path
/// below `workspace`: relative, plain names only, not empty.
pub fn confined(file: &std::path::Path, workspace: &std::path::Path) {
    use std::path::Component;
    assert!(file.is_relative(), "{file:?}");
    assert!(file.components().next().is_some(), "an empty file name");
    assert!(
        file.components().all(|c| matches!(c, Component::Normal(_))),
        "{file:?}"
    );
    assert!(workspace.join(file).starts_with(workspace), "{file:?}");
}
