//! The container an instance runs in, as the engine's create request: decided from the start
//! spec alone (pure, unit-tested without an engine).

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};

use super::{CONTAINER_INSTANCE_DIR, MANAGED_LABEL};
use crate::runtime::{
    DEFAULT_WORKSPACE_DIR, ENV_DEFAULT_WORKSPACE, ENV_SDK_SOCKET, SDK_SOCKET_FILE, StartSpec,
};

/// The container of one instance: no privilege, every capability dropped, no network, the
/// instance directory at `/evp`, running as the instance's uid, its log bounded; what the
/// manifest's container options add (a network, limits, capabilities to keep).
pub(super) fn container_body(
    spec: &StartSpec,
    image: &str,
    log_max_bytes: u64,
) -> ContainerCreateBody {
    let asked = &spec.container;
    let dir = CONTAINER_INSTANCE_DIR;
    let mut binds = vec![format!("{}:{dir}", spec.instance_dir.display())];
    // sdk-broker's socket lives elsewhere (`<run_dir>/sdk/<name>.sock`): bound onto the
    // default path, unless it already is the instance directory's own `sdk.sock`.
    if spec.sdk_socket != spec.instance_dir.join(SDK_SOCKET_FILE) {
        binds.push(format!(
            "{}:{dir}/{SDK_SOCKET_FILE}",
            spec.sdk_socket.display()
        ));
    }
    let mut env: Vec<String> = spec
        .env
        .iter()
        .filter(|(k, _)| *k != ENV_SDK_SOCKET && *k != ENV_DEFAULT_WORKSPACE)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push(format!("{ENV_SDK_SOCKET}={dir}/{SDK_SOCKET_FILE}"));
    env.push(format!(
        "{ENV_DEFAULT_WORKSPACE}={dir}/{DEFAULT_WORKSPACE_DIR}"
    ));
    let uid = spec.uid.unwrap_or_else(crate::runtime::own_uid);
    // The engine keeps the output too (for `docker logs`): as bounded as the relay's files.
    let half = (log_max_bytes / 2).max(1);
    ContainerCreateBody {
        image: Some(image.to_owned()),
        env: Some(env),
        user: Some(format!("{uid}:{uid}")),
        // As EVP: output through a terminal, so a module's stdio is line-buffered.
        tty: Some(true),
        labels: Some(HashMap::from([(
            MANAGED_LABEL.to_owned(),
            spec.instance.clone(),
        )])),
        host_config: Some(HostConfig {
            binds: Some(binds),
            network_mode: Some(asked.network.clone().unwrap_or_else(|| "none".into())),
            memory: asked.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            // No swap beyond the limit: a limit that swaps is no limit on a gateway's flash.
            memory_swap: asked.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            nano_cpus: asked.nano_cpus.and_then(|n| i64::try_from(n).ok()),
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: (!asked.cap_add.is_empty()).then(|| asked.cap_add.clone()),
            security_opt: Some(vec!["no-new-privileges".into()]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), half.to_string()),
                    ("max-file".to_owned(), "2".to_owned()),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Instance `cam` of image `cam:1` as uid 61234, its socket in its own directory.
    fn spec() -> StartSpec {
        let dir = Path::new("/data/instances/cam");
        StartSpec {
            instance: "cam".into(),
            module_location: "cam:1".into(),
            instance_dir: dir.into(),
            workspace: dir.join(DEFAULT_WORKSPACE_DIR),
            sdk_socket: dir.join(SDK_SOCKET_FILE),
            env: Default::default(),
            entry_point: None,
            uid: Some(61234),
            container: Default::default(),
        }
    }

    #[test]
    fn the_container_is_locked_down_and_sees_evps_paths() {
        let spec = StartSpec {
            sdk_socket: "/run/evp/sdk/cam.sock".into(),
            env: [("A".to_owned(), "1".to_owned())].into(),
            ..spec()
        };
        let body = container_body(&spec, "cam:1", 1024);
        let host = body.host_config.unwrap();
        assert_eq!(
            host.binds.unwrap(),
            [
                "/data/instances/cam:/evp",
                "/run/evp/sdk/cam.sock:/evp/sdk.sock"
            ]
        );
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(host.security_opt.unwrap(), ["no-new-privileges"]);
        assert_eq!(body.user.as_deref(), Some("61234:61234"));
        assert_eq!(
            body.env.unwrap(),
            [
                "A=1",
                "EVP_MODULE_SDK_SOCKET_PATH=/evp/sdk.sock",
                "EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH=/evp/default_workspace"
            ]
        );
        assert_eq!(body.labels.unwrap()[MANAGED_LABEL], "cam");
        assert_eq!(
            (host.memory, host.nano_cpus, host.cap_add),
            (None, None, None)
        );
    }

    #[test]
    fn the_manifest_adds_a_network_limits_and_capabilities() {
        let spec = StartSpec {
            container: evp_schemas::ContainerOptions {
                network: Some("bridge".into()),
                memory_bytes: Some(64 << 20),
                nano_cpus: Some(500_000_000),
                cap_add: vec!["NET_BIND_SERVICE".into()],
            },
            ..spec()
        };
        let body = container_body(&spec, "cam:1", 1024);
        let host = body.host_config.unwrap();
        // The socket already is the instance directory's own: one bind.
        assert_eq!(host.binds.unwrap(), ["/data/instances/cam:/evp"]);
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(host.cap_add.unwrap(), ["NET_BIND_SERVICE"]);
    }
}
