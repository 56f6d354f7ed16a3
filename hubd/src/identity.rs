//! The device's permanent identity: a random UUID (version 4) made on first start and kept in
//! `<data_dir>/hub/device-id`, written atomically, so a device keeps one globally unique id for
//! its life, as Pallas registers devices. It is `Hub1.DeviceId` and `systemInfo.deviceId`
//! unless `device_id` is configured, and the MQTT client id unless one is configured (a TLS
//! client certificate's CN still wins).

use std::path::{Path, PathBuf};

/// The file, in hubd's state directory.
const FILE: &str = "device-id";

/// Why the identity cannot be had; hubd does not start without one.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but does not hold an id: it is not replaced, since the device's
    /// identity must never change by itself.
    #[error(
        "{} holds {found:?}, not a device id; restore it, or remove it to give this device a \
         new identity",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it holds (bounded).
        found: String,
    },
    /// Reading or writing it failed.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What hubd was doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        error: String,
    },
}

/// The id kept in `dir`, made (and kept) when there is none yet.
pub fn load_or_create(dir: &Path) -> Result<String, IdentityError> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if is_device_id(id) {
                Ok(id.to_owned())
            } else {
                Err(IdentityError::Corrupt {
                    path,
                    found: evp_schemas::text::shorten(id, 64).into_owned(),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_id(rand::random());
            evp_daemon::write_atomic(&path, format!("{id}\n").as_bytes(), 0o644, None).map_err(
                |e| IdentityError::Io {
                    action: "writing",
                    path: path.clone(),
                    error: e.to_string(),
                },
            )?;
            tracing::info!(
                "this device's permanent id is {id} (kept in {})",
                path.display()
            );
            Ok(id)
        }
        Err(e) => Err(IdentityError::Io {
            action: "reading",
            path,
            error: e.to_string(),
        }),
    }
}

/// A version 4 UUID, hyphenated, from 16 random bytes.
fn new_id(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Whether `id` is a hyphenated UUID in lowercase hex, as [`new_id`] makes them.
fn is_device_id(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_4_uuids() {
        let id = new_id([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert!(is_device_id(&id));
        for bad in [
            "",
            "x",
            "FFFFFFFF-FFFF-4FFF-BFFF-FFFFFFFFFFFF",
            &id[1..],
            "ffffffff_ffff-4fff-bfff-ffffffffffff",
        ] {
            assert!(!is_device_id(bad), "{bad}");
        }
        assert_ne!(new_id(rand::random()), new_id(rand::random()));
    }

    #[test]
    fn the_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert!(is_device_id(&first));
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        let on_disk = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(on_disk.trim(), first);
    }

    #[test]
    fn a_damaged_file_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "not-an-id").unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not-an-id") && e.contains("remove it"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE)).unwrap(),
            "not-an-id"
        );
    }
}
