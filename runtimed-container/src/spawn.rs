//! The `spawn` kind: the module file is an executable, run as a process in its own process group
//! with a minimal environment, its output piped to its log relay (which keeps it in files of its
//! instance directory and logs it line by line); after a restart of the daemon, still running
//! processes are re-adopted through a pidfd.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;

use evp_schemas::ModuleImpl;
use evp_schemas::dbus::EvpError;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tracing::{info, warn};

use crate::logs::{self, LogPolicy};
use crate::process::{self, PidFd};
use crate::record::ProcessHandle;
use crate::runtime::{
    AdoptSpec, Adoption, DEFAULT_WORKSPACE_DIR, ENV_DEFAULT_WORKSPACE, ENV_SDK_SOCKET, Exit,
    Runtime, StartSpec, Started, Workload,
};
use crate::tree::{self, Scope};

/// The kind name, as EVP's `moduleImpl`.
pub const KIND: &str = ModuleImpl::Spawn.as_str();
/// Read size while hashing a module file: large enough for few syscalls, small enough to stream.
const HASH_CHUNK: usize = 64 * 1024;
/// The instance's own copy of its module file, run when the instance has a uid of its own: the
/// module cache is readable by the runtimes' group only, which such an instance is not in.
const MODULE_COPY: &str = "module";
/// Mode of that copy: the instance (its owner) may read and run it, nobody else.
const MODULE_COPY_MODE: u32 = 0o500;

/// Runs `spawn` modules.
#[derive(Debug, Default)]
pub struct SpawnRuntime {
    logs: LogPolicy,
}

impl SpawnRuntime {
    /// A runtime keeping instance output files as `logs` says.
    pub fn new(logs: LogPolicy) -> SpawnRuntime {
        SpawnRuntime { logs }
    }
}

impl Runtime for SpawnRuntime {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn load<'a>(
        &'a self,
        module_id: &'a str,
        location: &'a str,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<(), EvpError>> {
        verify_module_file(module_id, location, sha256, executable).boxed()
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, String>> {
        async move {
            let program = module_for(&spec)?;
            // EVP runs spawn modules with argc 0; Rust cannot, so argv[0] names the instance
            // for `ps`.
            let launch = Launch {
                program,
                arg0: spec.instance.clone(),
                args: Vec::new(),
                env: Vec::new(),
            };
            spawn(spec, &self.logs, launch)
        }
        .boxed()
    }

    fn adopt(&self, spec: AdoptSpec) -> BoxFuture<'_, Result<Adoption, String>> {
        std::future::ready(adopt(spec)).boxed()
    }
}

/// What a kind checks of its module file beyond its hash: `(module_id, path, file, metadata)`.
pub(crate) type FileCheck =
    fn(&str, &str, &mut std::fs::File, &std::fs::Metadata) -> Result<(), EvpError>;

/// A spawn module file needs an execute bit.
fn executable(
    module_id: &str,
    path: &str,
    _: &mut std::fs::File,
    meta: &std::fs::Metadata,
) -> Result<(), EvpError> {
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(EvpError::InvalidArgument(format!(
            "module {module_id}: {path} is not executable (mode {:04o}); a spawn module file \
             needs an execute bit",
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Verifies a module file before it is remembered: an absolute path to a regular file that
/// passes `check` and whose SHA-256 is `sha256`.
pub(crate) async fn verify_module_file(
    module_id: &str,
    location: &str,
    sha256: &str,
    check: FileCheck,
) -> Result<(), EvpError> {
    if !location.starts_with('/') {
        return Err(EvpError::InvalidArgument(format!(
            "module {module_id}: path {location:?} is not absolute"
        )));
    }
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(EvpError::InvalidArgument(format!(
            "module {module_id}: sha256 {sha256:?} is not 64 hex digits"
        )));
    }
    let path = location.to_owned();
    let id = module_id.to_owned();
    let actual = tokio::task::spawn_blocking(move || hash_module_file(&id, &path, check))
        .await
        .map_err(|e| EvpError::Io(format!("module {module_id}: hashing failed: {e}")))??;
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(EvpError::InvalidArgument(format!(
            "Module hash mismatch: module {module_id} file {location} has sha256 {actual}, \
             the deployment says {}",
            sha256.to_ascii_lowercase()
        )));
    }
    Ok(())
}

/// Checks the module file is a regular file that passes `check` and returns its SHA-256 in
/// lower hex.
fn hash_module_file(module_id: &str, path: &str, check: FileCheck) -> Result<String, EvpError> {
    let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            EvpError::InvalidArgument(format!("module {module_id}: file {path} does not exist"))
        }
        _ => EvpError::Io(format!("module {module_id}: opening {path}: {e}")),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| EvpError::Io(format!("module {module_id}: inspecting {path}: {e}")))?;
    if !meta.is_file() {
        return Err(EvpError::InvalidArgument(format!(
            "module {module_id}: {path} is not a regular file"
        )));
    }
    check(module_id, path, &mut file, &meta)?;
    std::io::Seek::rewind(&mut file)
        .map_err(|e| EvpError::Io(format!("module {module_id}: reading {path}: {e}")))?;
    hash_reader(&mut file)
        .map_err(|e| EvpError::Io(format!("module {module_id}: reading {path}: {e}")))
}

/// The SHA-256 of a file in lower hex (a docker archive's, say).
pub(crate) fn hash_file(path: &str) -> std::io::Result<String> {
    hash_reader(&mut std::fs::File::open(path)?)
}

/// The SHA-256 of everything `file` holds, in lower hex, read in chunks.
fn hash_reader(file: &mut std::fs::File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What runs for an instance: a program, its argv and environment beyond the SDK's.
pub(crate) struct Launch {
    /// The file executed.
    pub program: std::path::PathBuf,
    /// `argv[0]`.
    pub arg0: String,
    /// The rest of argv.
    pub args: Vec<std::ffi::OsString>,
    /// Environment entries beyond the `env` option and the SDK's two variables.
    pub env: Vec<(String, String)>,
}

/// The module file the instance runs: its own copy when it has a uid of its own (the module
/// cache is not readable by it), else the cached file.
pub(crate) fn module_for(spec: &StartSpec) -> Result<std::path::PathBuf, String> {
    match spec.uid {
        Some(uid) => copy_module(spec, uid),
        None => Ok(spec.module_location.clone().into()),
    }
}

/// Starts `launch` as a process leading its own process group, its stdout and stderr going to
/// the instance's log relay.
pub(crate) fn spawn(spec: StartSpec, logs: &LogPolicy, launch: Launch) -> Result<Started, String> {
    // Started before the module, so none of its output is missed; if the module cannot
    // start, the relay sees the pipes close and ends.
    let output =
        logs::start_relay(&spec.instance, &spec.instance_dir, logs).map_err(|e| e.to_string())?;
    let mut command = Command::new(&launch.program);
    if let Some(uid) = spec.uid {
        // gid = uid; setting the uid also makes std drop every supplementary group (it calls
        // setgroups(0) before setuid), so nothing of the runtime's groups is inherited.
        command.uid(uid).gid(uid);
        // SAFETY: the closure runs in the child between fork and exec and only makes system
        // calls (see `drop_all_capabilities`), which is async-signal-safe.
        unsafe {
            command.pre_exec(crate::identity::drop_all_capabilities);
        }
    }
    command
        .arg0(&launch.arg0)
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .envs(&spec.env)
        .env(ENV_SDK_SOCKET, &spec.sdk_socket)
        .env(ENV_DEFAULT_WORKSPACE, &spec.workspace)
        .stdin(Stdio::null())
        .stdout(output.stdout)
        .stderr(output.stderr)
        .process_group(0)
        .kill_on_drop(false);
    if spec.env.contains_key(ENV_SDK_SOCKET) || spec.env.contains_key(ENV_DEFAULT_WORKSPACE) {
        warn!(
            instance = %spec.instance,
            "the env option names an SDK variable; the runtime's own value wins"
        );
    }
    let (mut child, pid) = {
        // Held until the pid is tracked, so the orphan reaper never reaps this child.
        let mut tracked = crate::reaper::tracked();
        let spawned = command.spawn();
        // The runtime keeps no write end of the module's pipes (the relay ends when they close).
        drop(command);
        let child = spawned.map_err(|e| format!("cannot run {}: {e}", launch.program.display()))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| format!("{} started without a process id", spec.module_location))?;
        tracked.insert(pid);
        (child, pid)
    };
    info!(instance = %spec.instance, pid, uid = ?spec.uid, location = %spec.module_location, "instance spawned");
    // The child is not reaped before `wait` below, so its /proc entry is there even if it
    // already exited.
    let handle = match process::stat(pid) {
        Ok(Some(stat)) => Some(ProcessHandle {
            pid,
            start_time: stat.start_time,
        }),
        Ok(None) => None,
        Err(e) => {
            warn!(instance = %spec.instance, pid, "the instance cannot be re-adopted after a restart: {e}");
            None
        }
    };
    let exited = async move {
        let exit = match child.wait().await {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(signal_name(sig)),
                (None, None) => Exit::Lost(format!("unexpected wait status {status}")),
            },
            Err(e) => Exit::Lost(format!("waiting for it failed: {e}")),
        };
        crate::reaper::untrack(pid);
        exit
    }
    .boxed();
    let scope = scope_of(pid, spec.uid, &spec.workspace);
    Ok(Started {
        workload: Arc::new(ProcessGroup {
            pgid: Pid::from_raw(pid),
            pidfd: None,
            scope: scope.clone(),
        }),
        exited,
        process: handle,
        pid: pid.unsigned_abs(),
        scope: Some(scope),
        container: None,
    })
}

/// Every process of the instance: its uid's when it has one of its own, else its tree.
fn scope_of(pid: i32, uid: Option<u32>, workspace: &std::path::Path) -> Scope {
    match uid {
        Some(uid) => Scope::Uid(uid),
        None => Scope::Tree {
            leader: pid,
            marker: format!("{ENV_DEFAULT_WORKSPACE}={}", workspace.display()),
        },
    }
}

/// Copies the module file to `<instance dir>/module`, owned by `uid` with mode 0500 (written
/// beside it and renamed, so a running copy is never rewritten in place).
fn copy_module(spec: &StartSpec, uid: u32) -> Result<std::path::PathBuf, String> {
    let target = spec.instance_dir.join(MODULE_COPY);
    let temp = spec.instance_dir.join(format!("{MODULE_COPY}.tmp"));
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", temp.display());
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("removing a stale", e)),
    }
    std::fs::copy(&spec.module_location, &temp)
        .map_err(|e| format!("copying {} for uid {uid}: {e}", spec.module_location))?;
    // The mode first: once the file is the instance's, only CAP_FOWNER (which the unit does
    // not grant) could change it.
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(MODULE_COPY_MODE))
        .map_err(|e| fail("chmod", e))?;
    std::os::unix::fs::chown(&temp, Some(uid), Some(uid)).map_err(|e| fail("chown", e))?;
    std::fs::rename(&temp, &target).map_err(|e| fail("renaming", e))?;
    Ok(target)
}

/// Finds a process started by an earlier run of the daemon: alive, and with the recorded start
/// time (a PID the kernel gave to another process since is not it). Its output still goes to
/// the relay started with it, which did not depend on the daemon.
pub(crate) fn adopt(spec: AdoptSpec) -> Result<Adoption, String> {
    let AdoptSpec {
        instance,
        instance_dir,
        process: recorded,
        uid,
        container: _,
    } = spec;
    let pid = recorded.pid;
    if let Some(gone) = gone_reason(recorded)? {
        return Ok(Adoption::Gone(gone));
    }
    let pidfd = match PidFd::open(pid).map_err(|e| e.to_string())? {
        Some(fd) => Arc::new(fd),
        None => return Ok(Adoption::Gone(format!("process {pid} no longer exists"))),
    };
    // The PID may have changed hands between the check and pidfd_open; checking again once
    // the pidfd is held proves it names the recorded process.
    if let Some(gone) = gone_reason(recorded)? {
        return Ok(Adoption::Gone(gone));
    }
    info!(instance, pid, "instance re-adopted");
    let watched = pidfd.clone();
    let exited = async move {
        match watched.exited().await {
            Ok(()) => Exit::Unknown,
            Err(e) => Exit::Lost(format!("watching its pidfd failed: {e}")),
        }
    }
    .boxed();
    let scope = scope_of(pid, uid, &instance_dir.join(DEFAULT_WORKSPACE_DIR));
    Ok(Adoption::Running(Started {
        workload: Arc::new(ProcessGroup {
            pgid: Pid::from_raw(pid),
            pidfd: Some(pidfd),
            scope: scope.clone(),
        }),
        exited,
        process: Some(recorded),
        pid: pid.unsigned_abs(),
        scope: Some(scope),
        container: None,
    }))
}

/// Why the recorded process is not running any more, or `None` if it is.
fn gone_reason(recorded: ProcessHandle) -> Result<Option<String>, String> {
    let pid = recorded.pid;
    Ok(match process::stat(pid).map_err(|e| e.to_string())? {
        None => Some(format!("process {pid} no longer exists")),
        Some(s) if s.start_time != recorded.start_time => Some(format!(
            "PID {pid} now belongs to another process (started at tick {}, the instance's at {})",
            s.start_time, recorded.start_time
        )),
        Some(s) if s.exited => Some(format!("process {pid} has exited")),
        Some(_) => None,
    })
}

/// `SIGSEGV` for 11; the number when nix does not know it.
fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("{sig}"))
}

/// A spawned instance: its process group, led by the module process, and every other process
/// of it (descendants that left the group).
struct ProcessGroup {
    pgid: Pid,
    /// For a re-adopted instance, the leader itself, signalled through its pidfd as well in
    /// case it left its group.
    pidfd: Option<Arc<PidFd>>,
    scope: Scope,
}

impl ProcessGroup {
    fn signal(&self, signal: Signal) -> Result<(), String> {
        // SIGKILL is repeated until nothing of the instance is left (a fork meanwhile).
        tree::signal_all(&self.scope, signal, signal == Signal::SIGKILL);
        if matches!(self.scope, Scope::Uid(_)) {
            // Every process of the uid, the group included, was signalled; the runtime, of
            // another uid and without CAP_KILL, could not signal the group itself.
            return Ok(());
        }
        if let Some(fd) = &self.pidfd
            && let Err(e) = fd.signal(signal)
        {
            warn!(
                pid = fd.pid(),
                "sending {} through the pidfd: {e}",
                signal.as_str()
            );
        }
        match killpg(self.pgid, signal) {
            // The group is empty: everything in it has exited already.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(format!(
                "sending {} to process group {}: {e}",
                signal.as_str(),
                self.pgid
            )),
        }
    }
}

impl Workload for ProcessGroup {
    fn terminate(&self) -> Result<(), String> {
        self.signal(Signal::SIGTERM)
    }

    fn kill(&self) -> Result<(), String> {
        self.signal(Signal::SIGKILL)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use evp_schemas::ModuleImpl;
    use evp_schemas::dbus::{self, EvpError};
    use sha2::{Digest, Sha256};
    use tempfile::TempDir;
    use tokio::sync::mpsc;

    use crate::logs::LogPolicy;
    use crate::runtime::{InstanceEvent, InstanceOptions, OnExit, Runtime, Supervisor};

    use super::SpawnRuntime;

    /// Upper bound for any awaited condition; generous for a loaded 2-core machine.
    const DEADLINE: Duration = Duration::from_secs(15);

    struct Fixture {
        dir: TempDir,
        sup: Arc<Supervisor>,
        events: mpsc::UnboundedReceiver<InstanceEvent>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (sup, events) = Supervisor::new(
            dir.path().join("instances"),
            vec![Arc::new(SpawnRuntime::new(LogPolicy::in_process(
                crate::logs::DEFAULT_LOG_MAX_BYTES,
            ))) as Arc<dyn Runtime>],
        );
        Fixture { dir, sup, events }
    }

    impl Fixture {
        /// Writes an executable /bin/sh module and returns its path and SHA-256.
        fn module_file(&self, name: &str, script: &str) -> (String, String) {
            let path = self.dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            let sha = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
            (path.to_str().unwrap().to_owned(), sha)
        }

        async fn load(&self, id: &str, script: &str) -> String {
            let (path, sha) = self.module_file(id, script);
            self.sup
                .load_module(id, "spawn", &path, &sha)
                .await
                .unwrap();
            path
        }

        async fn start(&self, instance: &str, module: &str) -> Result<(), EvpError> {
            self.sup
                .start_instance(instance, module, InstanceOptions::default())
                .await
                .map(|_| ())
        }

        fn status(&self, instance: &str) -> Option<(String, String)> {
            self.sup
                .instances()
                .into_iter()
                .find(|i| i.0 == instance)
                .map(|i| (i.2, i.3))
        }

        /// Polls until the instance has `status`, returning its failure message.
        async fn wait_status(&self, instance: &str, status: &str) -> String {
            let start = Instant::now();
            loop {
                if let Some((s, m)) = self.status(instance)
                    && s == status
                {
                    return m;
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "{instance} never reached {status}: {:?}",
                    self.status(instance)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// The (status, message) events of `instance` so far.
        fn drain(&mut self, instance: &str) -> Vec<(String, String)> {
            let mut out = Vec::new();
            while let Ok(ev) = self.events.try_recv() {
                if ev.instance == instance {
                    out.push((ev.status.as_str().to_owned(), ev.failure_message));
                }
            }
            out
        }

        fn instance_dir(&self, instance: &str) -> PathBuf {
            self.dir.path().join("instances").join(instance)
        }
    }

    async fn wait_file(path: &Path) {
        let start = Instant::now();
        while !path.exists() {
            assert!(
                start.elapsed() < DEADLINE,
                "{} never appeared",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ev(status: &str, message: &str) -> (String, String) {
        (status.to_owned(), message.to_owned())
    }

    /// A module that runs until stopped and ignores SIGTERM once it has written `ready`.
    const IGNORES_TERM: &str = "trap '' TERM\n: > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/ready\"\nwhile :; do sleep 0.05; done";
    /// A module that runs until stopped; SIGTERM ends it.
    const RUNS: &str =
        ": > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/ready\"\nwhile :; do sleep 0.05; done";

    #[tokio::test]
    async fn exit_zero_is_self_exiting() {
        let mut f = fixture();
        f.load("m", "exit 0").await;
        f.start("i", "m").await.unwrap();
        assert_eq!(f.wait_status("i", "self-exiting").await, "");
        assert_eq!(
            f.drain("i"),
            [ev("starting", ""), ev("ok", ""), ev("self-exiting", "")]
        );
    }

    #[tokio::test]
    async fn non_zero_exit_is_an_error_with_the_status() {
        let mut f = fixture();
        f.load("m", "exit 3").await;
        f.start("i", "m").await.unwrap();
        assert_eq!(f.wait_status("i", "error").await, "exited with status 3");
        assert_eq!(
            f.drain("i").last(),
            Some(&ev("error", "exited with status 3"))
        );
    }

    #[tokio::test]
    async fn death_by_signal_is_an_error_naming_the_signal() {
        let f = fixture();
        f.load("m", "kill -SEGV $$").await;
        f.start("i", "m").await.unwrap();
        assert_eq!(
            f.wait_status("i", "error").await,
            "killed by signal SIGSEGV"
        );
    }

    #[tokio::test]
    async fn stop_uses_sigterm_and_is_not_an_error() {
        let mut f = fixture();
        f.load("m", RUNS).await;
        f.start("i", "m").await.unwrap();
        wait_file(&f.instance_dir("i").join("default_workspace/ready")).await;
        let t = Instant::now();
        f.sup.stop_instance("i", DEADLINE).await.unwrap();
        assert!(
            t.elapsed() < DEADLINE / 2,
            "SIGTERM did not end it: {:?}",
            t.elapsed()
        );
        assert!(f.sup.instances().is_empty());
        assert_eq!(
            f.drain("i"),
            [ev("starting", ""), ev("ok", ""), ev("stopped", "")]
        );
    }

    #[tokio::test]
    async fn stop_kills_what_ignores_sigterm_after_the_grace() {
        let mut f = fixture();
        f.load("m", IGNORES_TERM).await;
        f.start("i", "m").await.unwrap();
        wait_file(&f.instance_dir("i").join("default_workspace/ready")).await;
        let grace = Duration::from_millis(300);
        let t = Instant::now();
        f.sup.stop_instance("i", grace).await.unwrap();
        assert!(
            t.elapsed() >= grace,
            "returned before the grace: {:?}",
            t.elapsed()
        );
        assert!(f.sup.instances().is_empty());
        assert_eq!(f.drain("i").last(), Some(&ev("stopped", "")));
    }

    /// Without a uid of its own (here the runtime's), an instance's descendant that left its
    /// process group with setsid and lost its parent is still found (by the workspace variable
    /// in its environment) and stopped with it.
    #[tokio::test]
    async fn stop_ends_a_grandchild_that_called_setsid() {
        let f = fixture();
        f.load(
            "m",
            "( setsid /bin/sh -c 'echo $$ > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/gc.tmp\"; \
             mv \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/gc.tmp\" \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/gc\"; \
             exec sleep 300' & )\nexec sleep 300",
        )
        .await;
        f.start("i", "m").await.unwrap();
        let gc_file = f.instance_dir("i").join("default_workspace/gc");
        wait_file(&gc_file).await;
        let gc: i32 = std::fs::read_to_string(&gc_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let running = |pid: i32| {
            crate::process::stat(pid)
                .unwrap()
                .is_some_and(|s| !s.exited)
        };
        assert!(running(gc));
        f.sup
            .stop_instance("i", Duration::from_millis(300))
            .await
            .unwrap();
        let start = Instant::now();
        while running(gc) {
            assert!(
                start.elapsed() < DEADLINE,
                "the setsid grandchild {gc} survived the stop"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn parallel_stops_take_the_longest_grace_not_the_sum() {
        let f = fixture();
        f.load("m", IGNORES_TERM).await;
        f.start("a", "m").await.unwrap();
        f.start("b", "m").await.unwrap();
        wait_file(&f.instance_dir("a").join("default_workspace/ready")).await;
        wait_file(&f.instance_dir("b").join("default_workspace/ready")).await;
        let grace = Duration::from_millis(1000);
        let t = Instant::now();
        let (a, b) = tokio::join!(
            f.sup.stop_instance("a", grace),
            f.sup.stop_instance("b", grace)
        );
        a.unwrap();
        b.unwrap();
        let took = t.elapsed();
        assert!(took >= grace && took < grace * 2, "two stops took {took:?}");
        assert!(f.sup.instances().is_empty());
    }

    #[tokio::test]
    async fn stop_of_unknown_or_exited_instance_is_ok_and_forgets_it() {
        let mut f = fixture();
        f.sup.stop_instance("nobody", Duration::ZERO).await.unwrap();
        f.load("m", "exit 3").await;
        f.start("i", "m").await.unwrap();
        f.wait_status("i", "error").await;
        f.sup.stop_instance("i", Duration::ZERO).await.unwrap();
        assert!(f.sup.instances().is_empty());
        assert_eq!(f.drain("i").last(), Some(&ev("stopped", "")));
    }

    #[tokio::test]
    async fn output_lines_are_logged_with_the_instance_name() {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        // The test runtime is single-threaded, so the output tasks log on this thread.
        let _guard = tracing::subscriber::set_default(subscriber);

        let f = fixture();
        f.load(
            "m",
            "echo first line\necho 'to stderr' >&2\nprintf 'no newline'",
        )
        .await;
        f.start("printer", "m").await.unwrap();
        f.wait_status("printer", "self-exiting").await;
        let start = Instant::now();
        loop {
            let text = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
            let logged = |stream: &str, line: &str| {
                text.lines().any(|l| {
                    l.contains("instance=printer")
                        && l.contains(&format!("stream=\"{stream}\""))
                        && l.contains(line)
                })
            };
            if logged("stdout", "first line")
                && logged("stderr", "to stderr")
                && logged("stdout", "no newline")
            {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "lines not logged:\n{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn workspace_is_private_and_environment_minimal() {
        let f = fixture();
        f.load(
            "m",
            "env > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/env.txt\"",
        )
        .await;
        let sent = InstanceOptions {
            env: BTreeMap::from([("EXTRA".to_owned(), "value with spaces".to_owned())]),
            ..Default::default()
        };
        let options = InstanceOptions::from_dbus(sent.to_dbus().unwrap()).unwrap();
        f.sup.start_instance("i", "m", options).await.unwrap();
        f.wait_status("i", "self-exiting").await;

        let dir = f.instance_dir("i");
        let ws = dir.join("default_workspace");
        for d in [&dir, &ws] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let text = std::fs::read_to_string(ws.join("env.txt")).unwrap();
        let mut vars: BTreeMap<&str, &str> =
            text.lines().filter_map(|l| l.split_once('=')).collect();
        // dash defines PWD itself; it is not from the runtime.
        vars.remove("PWD");
        let socket = dir.join("sdk.sock");
        let expected = BTreeMap::from([
            ("EVP_MODULE_SDK_SOCKET_PATH", socket.to_str().unwrap()),
            (
                "EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH",
                ws.to_str().unwrap(),
            ),
            ("EXTRA", "value with spaces"),
        ]);
        assert_eq!(vars, expected);

        // The sdk_socket option replaces the default socket path.
        f.sup.stop_instance("i", Duration::ZERO).await.unwrap();
        let sent = InstanceOptions {
            sdk_socket: Some("/run/evp/sdk/i.sock".into()),
            ..Default::default()
        };
        let options = InstanceOptions::from_dbus(sent.to_dbus().unwrap()).unwrap();
        assert_eq!(
            options.sdk_socket,
            Some(PathBuf::from("/run/evp/sdk/i.sock"))
        );
        f.sup.start_instance("i", "m", options).await.unwrap();
        f.wait_status("i", "self-exiting").await;
        let text = std::fs::read_to_string(ws.join("env.txt")).unwrap();
        assert!(
            text.contains("EVP_MODULE_SDK_SOCKET_PATH=/run/evp/sdk/i.sock\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn start_is_idempotent_and_busy_for_another_module() {
        let mut f = fixture();
        f.load("m", RUNS).await;
        f.load("other", RUNS).await;
        f.start("i", "m").await.unwrap();
        f.wait_status("i", "ok").await;
        f.start("i", "m").await.unwrap();
        assert_eq!(f.drain("i"), [ev("starting", ""), ev("ok", "")]);
        let e = f.start("i", "other").await.unwrap_err();
        assert!(
            matches!(&e, EvpError::Busy(m) if m.contains("runs module m")),
            "{e:?}"
        );
        f.sup.stop_instance("i", DEADLINE).await.unwrap();
    }

    #[tokio::test]
    async fn unload_is_busy_while_an_instance_runs() {
        let f = fixture();
        f.load("m", RUNS).await;
        f.start("i", "m").await.unwrap();
        let e = f.sup.unload_module("m").await.unwrap_err();
        assert!(matches!(&e, EvpError::Busy(m) if m.contains('i')), "{e:?}");
        f.sup.stop_instance("i", DEADLINE).await.unwrap();
        f.sup.unload_module("m").await.unwrap();
        f.sup.unload_module("m").await.unwrap();
        let e = f.start("i", "m").await.unwrap_err();
        assert!(matches!(e, EvpError::NotFound(_)), "{e:?}");
    }

    #[tokio::test]
    async fn load_refuses_a_wrong_hash_kind_or_file() {
        let f = fixture();
        let (path, sha) = f.module_file("m", "exit 0");
        let wrong = "0".repeat(64);
        let e = f
            .sup
            .load_module("m", "spawn", &path, &wrong)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, EvpError::InvalidArgument(m) if m.starts_with("Module hash mismatch")),
            "{e:?}"
        );
        let e = f
            .sup
            .load_module("m", "docker", &path, &sha)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, EvpError::InvalidArgument(m) if m.contains("spawn")),
            "{e:?}"
        );
        let missing = format!("{path}.missing");
        let e = f
            .sup
            .load_module("m", "spawn", &missing, &sha)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, EvpError::InvalidArgument(m) if m.contains("does not exist")),
            "{e:?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = f
            .sup
            .load_module("m", "spawn", &path, &sha)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, EvpError::InvalidArgument(m) if m.contains("not executable")),
            "{e:?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Hex case does not matter.
        f.sup
            .load_module("m", "spawn", &path, &sha.to_ascii_uppercase())
            .await
            .unwrap();
        assert_eq!(f.sup.kinds(), ["spawn"]);
    }

    #[test]
    fn every_kind_run_here_is_routed_here() {
        for kind in fixture().sup.kinds() {
            let routed = ModuleImpl::parse(&kind).and_then(ModuleImpl::runtime);
            assert_eq!(routed, Some(dbus::Runtime::Container), "{kind}");
        }
    }

    #[tokio::test]
    async fn start_refuses_bad_names_and_reports_spawn_failures() {
        let mut f = fixture();
        f.load("m", "exit 0").await;
        let e = f.start("../escape", "m").await.unwrap_err();
        assert!(matches!(e, EvpError::InvalidArgument(_)), "{e:?}");
        let e = f.start("i", "nope").await.unwrap_err();
        assert!(matches!(e, EvpError::NotFound(_)), "{e:?}");

        // A module whose interpreter does not exist fails in exec: the OS error is the status.
        let (path, sha) = f.module_file("broken", "");
        std::fs::write(&path, "#!/nonexistent/interpreter\n").unwrap();
        let sha_now = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
        assert_ne!(sha, sha_now);
        f.sup
            .load_module("broken", "spawn", &path, &sha_now)
            .await
            .unwrap();
        let e = f.start("b", "broken").await.unwrap_err();
        assert!(
            matches!(&e, EvpError::Io(m) if m.contains("No such file")),
            "{e:?}"
        );
        let (status, message) = f.status("b").unwrap();
        assert_eq!(status, "error");
        assert!(message.contains("No such file"), "{message}");
        assert_eq!(f.drain("b").last(), Some(&ev("error", &message)));
        // A failed instance may be started again (here it fails again).
        assert!(f.start("b", "broken").await.is_err());
    }

    #[tokio::test]
    async fn purge_is_busy_while_running_and_removes_the_directory() {
        let f = fixture();
        f.load("m", RUNS).await;
        f.start("i", "m").await.unwrap();
        let e = f.sup.purge_instance("i").await.unwrap_err();
        assert!(matches!(e, EvpError::Busy(_)), "{e:?}");
        wait_file(&f.instance_dir("i").join("default_workspace/ready")).await;
        f.sup.stop_instance("i", DEADLINE).await.unwrap();
        f.sup.purge_instance("i").await.unwrap();
        assert!(!f.instance_dir("i").exists());
        f.sup.purge_instance("i").await.unwrap();
        let e = f.sup.purge_instance("..").await.unwrap_err();
        assert!(matches!(e, EvpError::InvalidArgument(_)), "{e:?}");

        // A symlink in the instances dir is removed, never followed.
        let outside = f.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, f.instance_dir("link")).unwrap();
        f.sup.purge_instance("link").await.unwrap();
        assert!(!f.instance_dir("link").exists());
        assert!(outside.join("keep").exists());
    }

    #[tokio::test]
    async fn shutdown_stops_every_instance_and_refuses_new_ones() {
        let f = fixture();
        f.load("m", IGNORES_TERM).await;
        f.load("n", RUNS).await;
        f.start("a", "m").await.unwrap();
        f.start("b", "n").await.unwrap();
        wait_file(&f.instance_dir("a").join("default_workspace/ready")).await;
        f.sup
            .shutdown(OnExit::Stop {
                grace: Duration::from_millis(200),
            })
            .await;
        assert!(f.sup.instances().is_empty());
        let e = f.start("c", "n").await.unwrap_err();
        assert!(
            matches!(&e, EvpError::Busy(m) if m.contains("shutting down")),
            "{e:?}"
        );
    }
}
