//! Instance directories: creating them with the right owner and modes, choosing an instance's
//! uid, and purging them.

use std::path::Path;

use evp_schemas::dbus::EvpError;
use evp_schemas::deployment::validate_instance_name;
use tracing::info;

use super::{
    DEFAULT_WORKSPACE_DIR, Instance, InstanceOptions, SDK_SOCKET_FILE, StartSpec, Supervisor,
};
use crate::identity;

impl Supervisor {
    /// Uids in `min..=max` that `instance` must not get: those of live processes, and the
    /// owners of the other instances' workspaces (a stopped instance's files stay its own
    /// until its directory is purged).
    pub(super) fn uids_in_use_outside(
        &self,
        instance: &str,
        min: u32,
        max: u32,
    ) -> std::collections::HashSet<u32> {
        let mut used = identity::used_by_processes(min, max);
        if let Ok(entries) = std::fs::read_dir(&self.instances_dir) {
            used.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_str() != Some(instance))
                    .filter_map(|e| identity::owner(&e.path().join(DEFAULT_WORKSPACE_DIR)))
                    .filter(|u| (min..=max).contains(u)),
            );
        }
        used
    }

    /// Creates the instance directory and workspace and resolves the start options. With a
    /// uid of its own, the workspace is the instance's alone (owned by it, 0700) and the
    /// directories above it let it through without listing them (0711); otherwise all are
    /// 0700.
    pub(super) fn prepare(
        &self,
        instance: &str,
        module_location: String,
        options: InstanceOptions,
        uid: Option<u32>,
    ) -> Result<StartSpec, String> {
        let instance_dir = self.instances_dir.join(instance);
        let workspace = instance_dir.join(DEFAULT_WORKSPACE_DIR);
        let dir_mode = if uid.is_some() { 0o711 } else { 0o700 };
        create_private_dir(&self.instances_dir, dir_mode)?;
        create_private_dir(&instance_dir, dir_mode)?;
        match (uid, identity::owner(&workspace)) {
            // Already the instance's: how it keeps its own files is its business.
            (Some(uid), Some(owner)) if owner == uid => refuse_non_dir(&workspace)?,
            (Some(uid), owner) => {
                // Another uid's (the instance had another one last time): taken back first,
                // since the runtime may not read into it.
                if owner.is_some_and(|o| o != own_uid()) {
                    refuse_non_dir(&workspace)?;
                    identity::take_tree(&workspace, own_uid())
                        .map_err(|e| format!("taking back {}: {e}", workspace.display()))?;
                }
                create_private_dir(&workspace, 0o700)?;
                identity::chown_tree(&workspace, uid)
                    .map_err(|e| format!("giving {} to uid {uid}: {e}", workspace.display()))?;
            }
            (None, _) => create_private_dir(&workspace, 0o700)?,
        }
        let sdk_socket = options
            .sdk_socket
            .unwrap_or_else(|| instance_dir.join(SDK_SOCKET_FILE));
        Ok(StartSpec {
            instance: instance.to_owned(),
            module_location,
            instance_dir,
            workspace,
            sdk_socket,
            env: options.env,
            entry_point: options.entry_point,
            container: options.container,
            uid,
        })
    }

    /// Removes `<instances dir>/<instance>`; refused while the instance runs, fine if absent.
    pub async fn purge_instance(&self, instance: &str) -> Result<(), EvpError> {
        validate_instance_name(instance)
            .map_err(|m| EvpError::InvalidArgument(format!("instance {instance:?}: {m}")))?;
        if self
            .lock()
            .instances
            .get(instance)
            .is_some_and(Instance::is_active)
        {
            return Err(EvpError::Busy(format!(
                "instance {instance} is running; stop it before purging its directory"
            )));
        }
        // The name is one path component (no '/', not '.' or '..'), so this stays inside.
        let dir = self.instances_dir.join(instance);
        let meta = match tokio::fs::symlink_metadata(&dir).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("inspecting", &dir, e)),
        };
        // What an instance under a uid of its own wrote is the runtime's again first, so it
        // can be removed without CAP_DAC_OVERRIDE.
        if meta.is_dir() && self.identities.per_instance() {
            let dir = dir.clone();
            let own = own_uid();
            tokio::task::spawn_blocking(move || identity::take_tree(&dir, own))
                .await
                .map_err(|e| EvpError::Io(format!("taking back {instance}'s directory: {e}")))?
                .map_err(|e| io_error("taking back", &self.instances_dir.join(instance), e))?;
        }
        // A symlink or file in its place is removed itself; nothing it points to is touched.
        let removed = if meta.is_dir() {
            tokio::fs::remove_dir_all(&dir).await
        } else {
            tokio::fs::remove_file(&dir).await
        };
        match removed {
            Ok(()) => {
                info!(instance, dir = %dir.display(), "instance directory purged");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing", &dir, e)),
        }
    }
}

fn io_error(doing: &str, path: &Path, e: std::io::Error) -> EvpError {
    EvpError::Io(format!("{doing} {}: {e}", path.display()))
}

/// The runtime's own uid: what an instance without a uid of its own runs as.
pub(crate) fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Refuses a symlink or a file where the directory `dir` should be (if it exists), so an
/// instance never writes outside the instances directory.
fn refuse_non_dir(dir: &Path) -> Result<(), String> {
    evp_daemon::fs::refuse_non_dir(dir)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Creates `dir` if missing and gives it `mode` (0700, or 0711 to let instances through),
/// refusing a symlink in its place so an instance never writes outside the instances
/// directory.
fn create_private_dir(dir: &Path, mode: u32) -> Result<(), String> {
    evp_daemon::create_private_dir(dir, mode).map_err(|e| e.to_string())
}
