//! Registry credentials for image pulls: registry domain → `X-Registry-Auth` value (base64 of
//! the credentials' JSON), as EVP's `registry-auth` map holds them. hubd holds the map in
//! effect (the hub's device configuration `configuration/$agent/registry-auth`, else its
//! `EVP_REGISTRY_AUTH`) and answers `Hub1.RegistryAuth`, asked at each pull so a change from
//! the hub applies to the next one; this daemon's own `EVP_REGISTRY_AUTH` serves the registries
//! hubd names none for, and all of them when hubd cannot answer.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use evp_schemas::dbus::Hub1Proxy;
use tracing::{debug, warn};

/// How long a pull waits for hubd's answer before using the local map: hubd answers from
/// memory, so more than this means it is stuck or restarting.
const HUB_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Where pulls find their credentials.
#[derive(Debug, Default)]
pub struct RegistryAuth {
    /// This daemon's `EVP_REGISTRY_AUTH`.
    local: HashMap<String, String>,
    /// The bus hubd is asked on, while the daemon serves (held here, the connection would
    /// outlive the daemon's run and keep its bus name).
    bus: Mutex<Option<zbus::Connection>>,
}

impl RegistryAuth {
    /// Credentials from `local` until [`RegistryAuth::ask_hubd_on`] is called.
    pub fn new(local: HashMap<String, String>) -> RegistryAuth {
        RegistryAuth {
            local,
            bus: Mutex::new(None),
        }
    }

    /// From now on, hubd is asked on `conn` first.
    pub fn ask_hubd_on(&self, conn: zbus::Connection) {
        *self.bus.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
    }

    /// From now on, only the local map serves (the daemon stops serving).
    pub fn stop_asking_hubd(&self) {
        self.bus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// The map in effect: hubd's entries over the local ones.
    async fn current(&self) -> HashMap<String, String> {
        let mut map = self.local.clone();
        let conn = self
            .bus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(conn) = conn else {
            return map;
        };
        let asked = async {
            Hub1Proxy::builder(&conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?
                .registry_auth()
                .await
        };
        match tokio::time::timeout(HUB_ANSWER_WAIT, asked).await {
            Ok(Ok(hub)) => map.extend(hub),
            Ok(Err(e)) => debug!("hubd's registry credentials not available: {e}"),
            Err(_) => {
                warn!("hubd did not give its registry credentials within {HUB_ANSWER_WAIT:?}")
            }
        }
        map
    }

    /// The credentials of the registry `reference` names, if any are configured.
    pub async fn credentials_for(&self, reference: &str) -> Option<DockerCredentials> {
        let map = self.current().await;
        let value = map.get(registry_domain(reference))?;
        match decode_registry_auth(value) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(
                    reference,
                    "the registry-auth entry of its registry is not usable: {e}"
                );
                None
            }
        }
    }
}

/// The registry an image reference names: its first component when that has a `.` or `:` or
/// is `localhost` (Docker's rule), else Docker Hub.
fn registry_domain(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// An `X-Registry-Auth` value (base64, standard or URL-safe, of the credentials' JSON) as
/// bollard's credentials, which it encodes again.
fn decode_registry_auth(value: &str) -> Result<DockerCredentials, String> {
    use base64::Engine as _;
    let trimmed = value.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|e| format!("not base64: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not the JSON of registry credentials: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_of_a_reference_follows_dockers_rule() {
        fn check(reference: &str, expect: &str) {
            assert_eq!(registry_domain(reference), expect, "{reference}");
        }
        check("ghcr.io/acme/cam:1", "ghcr.io");
        check("localhost:5000/cam", "localhost:5000");
        check("localhost/cam", "localhost");
        check("acme/cam:1", "docker.io");
        check("busybox", "docker.io");
    }

    #[test]
    fn registry_auth_values_decode_in_either_base64_alphabet() {
        use base64::Engine as _;
        let json = r#"{"username":"u","password":"p?>"}"#;
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ] {
            let c = decode_registry_auth(&engine.encode(json)).unwrap();
            assert_eq!(c.username.as_deref(), Some("u"));
            assert_eq!(c.password.as_deref(), Some("p?>"));
        }
        assert!(decode_registry_auth("not base64!").is_err());
        assert!(decode_registry_auth("bm90IGpzb24").is_err());
    }

    #[tokio::test]
    async fn without_hubd_the_local_map_serves() {
        use base64::Engine as _;
        let creds = base64::engine::general_purpose::STANDARD.encode(r#"{"username":"u"}"#);
        let auth = RegistryAuth::new([("ghcr.io".to_owned(), creds)].into());
        let c = auth.credentials_for("ghcr.io/acme/cam:1").await.unwrap();
        assert_eq!(c.username.as_deref(), Some("u"));
        assert!(auth.credentials_for("acme/cam:1").await.is_none());
    }
}
