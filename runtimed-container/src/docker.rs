//! The `docker` kind, through the Docker Engine API (bollard): the module is an image (an
//! image reference the engine pulls, or beyond EVP a verified `docker save` archive from the
//! module cache, loaded into the engine), an instance is a container named after it. Status
//! comes from the engine's wait endpoint, not from polling; the container's output goes to
//! the same log relay as a spawned module's; after a restart of the daemon, a container that
//! still runs is re-adopted by its recorded id, and containers of ours that no record names are
//! removed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use bollard::Docker;
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ImportImageOptions, KillContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions,
    WaitContainerOptions,
};
use evp_schemas::ModuleImpl;
use evp_schemas::dbus::EvpError;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::logs::{self, LogPolicy};
use crate::record::ProcessHandle;
use crate::registry::RegistryAuth;

mod spec;
use crate::runtime::{AdoptSpec, Adoption, Exit, Runtime, StartSpec, Started, Workload};
use spec::container_body;

/// The kind name, as EVP's `moduleImpl`.
pub const KIND: &str = ModuleImpl::Docker.as_str();
/// The label every container of this agent carries; its value is the instance name. Another
/// label than EVP's (`com.sss.evp.managed-by-evp-agent`), whose agent kills what carries it.
pub const MANAGED_LABEL: &str = "org.evp.agent.instance";
/// Where the instance directory is inside the container: SDK.md's default paths
/// (`/evp/sdk.sock`, `/evp/default_workspace`) then hold without any variable.
pub const CONTAINER_INSTANCE_DIR: &str = "/evp";
/// The engine's default socket, as EVP's `EVP_DOCKER_UNIX_SOCKET` default.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Seconds a request to the engine may take to answer (its headers: a pull, a wait or a log
/// stream then runs as long as it needs). bollard's own default.
const REQUEST_TIMEOUT_S: u64 = 120;
/// The engine's answer for a container or image it does not have.
const NOT_FOUND: u16 = 404;
/// Read size of an archive upload to the engine: large enough for few system calls.
const ARCHIVE_CHUNK: usize = 256 * 1024;
/// The oldest Engine API this runtime speaks (Docker 20.10); newer engines are negotiated.
const MIN_API: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Where the engine is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// Its Unix socket (`EVP_DOCKER_UNIX_SOCKET`).
    Unix(PathBuf),
    /// An `http://` or `tcp://` address (`EVP_DOCKER_HOST`), for an engine elsewhere.
    Http(String),
}

impl Engine {
    /// As EVP reads it: `EVP_DOCKER_UNIX_SOCKET` if set, else `EVP_DOCKER_HOST` if set, else the
    /// default socket.
    pub fn from_env(socket: Option<String>, host: Option<String>) -> Engine {
        match (socket, host) {
            (Some(s), _) if !s.is_empty() => Engine::Unix(s.into()),
            (_, Some(h)) if !h.is_empty() => Engine::Http(h),
            _ => Engine::Unix(DEFAULT_DOCKER_SOCKET.into()),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Unix(p) => write!(f, "unix://{}", p.display()),
            Engine::Http(h) => f.write_str(h),
        }
    }
}

/// Runs `docker` modules.
pub struct DockerRuntime {
    engine: Engine,
    logs: LogPolicy,
    /// Where pulls find their registry credentials.
    registry_auth: Arc<RegistryAuth>,
    /// The negotiated client, once the engine answered; dropped when it stops answering.
    client: tokio::sync::Mutex<Option<Docker>>,
    /// Archive path → the image it loaded, so a start finds the image of an archive module.
    archives: Mutex<HashMap<String, String>>,
    /// The images this runtime brought to the device (pulled when absent, or loaded), which it
    /// removes once no module uses them; an image that was there before is the operator's.
    brought: BroughtImages,
}

/// The images the runtime brought in, kept in a file across its restarts.
struct BroughtImages {
    /// `<data_dir>/docker/images.json`; `None` keeps them in memory only (tests).
    file: Option<PathBuf>,
    images: Mutex<std::collections::BTreeSet<String>>,
}

impl BroughtImages {
    fn open(file: Option<PathBuf>) -> BroughtImages {
        let images = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        BroughtImages {
            file,
            images: Mutex::new(images),
        }
    }

    fn contains(&self, image: &str) -> bool {
        self.images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(image)
    }

    /// Adds or removes `image`, and writes the file; a write that fails is logged (the image
    /// is then left on the device after its last use, never removed while used).
    fn set(&self, image: &str, brought: bool) {
        let mut images = self.images.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = if brought {
            images.insert(image.to_owned())
        } else {
            images.remove(image)
        };
        let Some(file) = self.file.as_deref().filter(|_| changed) else {
            return;
        };
        let written = file
            .parent()
            .map_or(Ok(()), |dir| evp_daemon::create_private_dir(dir, 0o700))
            .map_err(|e| e.to_string())
            .and_then(|()| serde_json::to_vec(&*images).map_err(|e| e.to_string()))
            .and_then(|bytes| {
                evp_daemon::write_atomic(file, &bytes, 0o600, None).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            warn!(file = %file.display(), "the images this runtime brought in are not recorded: {e}");
        }
    }
}

/// A failure talking to the engine, as an instance's or module's status says it.
fn engine_error(engine: &Engine, e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => {
            format!("Docker engine at {engine}: {message}")
        }
        e => format!("Docker engine not reachable at {engine}: {e}"),
    }
}

impl DockerRuntime {
    /// A runtime for the engine at `engine`, pulling with the credentials of `registry_auth`.
    pub fn new(
        engine: Engine,
        logs: LogPolicy,
        registry_auth: Arc<RegistryAuth>,
        images_file: Option<PathBuf>,
    ) -> DockerRuntime {
        DockerRuntime {
            engine,
            logs,
            registry_auth,
            client: tokio::sync::Mutex::new(None),
            archives: Mutex::new(HashMap::new()),
            brought: BroughtImages::open(images_file),
        }
    }

    /// The engine's client, connecting (and negotiating the API version) on first use and
    /// again after the engine went away.
    async fn docker(&self) -> Result<Docker, String> {
        let mut client = self.client.lock().await;
        if let Some(docker) = client.as_ref() {
            return Ok(docker.clone());
        }
        let fresh = match &self.engine {
            Engine::Unix(path) => {
                let path = path.to_string_lossy();
                Docker::connect_with_unix(&path, REQUEST_TIMEOUT_S, &MIN_API)
            }
            Engine::Http(host) => Docker::connect_with_http(host, REQUEST_TIMEOUT_S, &MIN_API),
        }
        .map_err(|e| engine_error(&self.engine, e))?;
        let docker = fresh
            .negotiate_version()
            .await
            .map_err(|e| engine_error(&self.engine, e))?;
        *client = Some(docker.clone());
        Ok(docker)
    }

    /// Runs `call` against the engine; an error that is not the engine's own answer drops the
    /// client, so the next call connects again.
    async fn call<T, F>(&self, call: impl FnOnce(Docker) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, bollard::errors::Error>>,
    {
        let docker = self.docker().await?;
        match call(docker).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if !matches!(e, bollard::errors::Error::DockerResponseServerError { .. }) {
                    *self.client.lock().await = None;
                }
                Err(engine_error(&self.engine, e))
            }
        }
    }

    /// Pulls `reference` with the registry's credentials, if any. A pull that fails while the
    /// image is already on the device uses that image: a gateway restarting offline keeps
    /// running what it ran.
    async fn pull(&self, module_id: &str, reference: &str) -> Result<(), EvpError> {
        let present = self
            .call(|docker| async move { docker.inspect_image(reference).await })
            .await
            .is_ok();
        // A digest names one image for good: nothing to pull when it is here.
        if present && reference.contains("@sha256:") {
            return Ok(());
        }
        let credentials = self.registry_auth.credentials_for(reference).await;
        let options = CreateImageOptions {
            from_image: Some(reference.to_owned()),
            ..Default::default()
        };
        let pulled = self
            .call(|docker| async move {
                let mut progress = docker.create_image(Some(options), None, credentials);
                while let Some(step) = progress.next().await {
                    step?;
                }
                Ok(())
            })
            .await;
        match pulled {
            Ok(()) => {
                info!(module_id, reference, "image pulled");
                if !present {
                    self.brought.set(reference, true);
                }
                Ok(())
            }
            Err(why) => {
                if present {
                    warn!(
                        module_id,
                        reference, "pull failed, using the image on the device: {why}"
                    );
                    Ok(())
                } else {
                    Err(EvpError::Io(format!(
                        "module {module_id}: image {reference}: {why}"
                    )))
                }
            }
        }
    }

    /// Verifies an archive against `sha256` and loads it into the engine; returns the image.
    async fn load_archive(
        &self,
        module_id: &str,
        path: &str,
        sha256: &str,
    ) -> Result<String, EvpError> {
        let owned = path.to_owned();
        let actual = tokio::task::spawn_blocking(move || crate::spawn::hash_file(&owned))
            .await
            .map_err(|e| EvpError::Io(format!("module {module_id}: hashing failed: {e}")))?
            .map_err(|e| EvpError::InvalidArgument(format!("module {module_id}: {path}: {e}")))?;
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(EvpError::InvalidArgument(format!(
                "Module hash mismatch: module {module_id} archive {path} has sha256 {actual}, \
                 the deployment says {}",
                sha256.to_ascii_lowercase()
            )));
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| EvpError::Io(format!("module {module_id}: opening {path}: {e}")))?;
        let loaded = self
            .call(|docker| async move {
                let body = evp_daemon::fs::chunks(file, ARCHIVE_CHUNK);
                let mut out = docker.import_image_stream(ImportImageOptions::default(), body, None);
                let mut image = None;
                while let Some(step) = out.next().await {
                    let step = step?;
                    if let Some(line) = step.stream.as_deref() {
                        image = loaded_image(line).or(image);
                    }
                }
                Ok(image)
            })
            .await
            .map_err(|e| EvpError::Io(format!("module {module_id}: loading {path}: {e}")))?;
        let image = loaded.ok_or_else(|| {
            EvpError::InvalidArgument(format!(
                "module {module_id}: {path} loaded no image (is it a `docker save` archive?)"
            ))
        })?;
        info!(module_id, path, image, "image archive loaded");
        self.brought.set(&image, true);
        self.archives
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned(), image.clone());
        Ok(image)
    }

    /// The image an instance of the module at `location` runs.
    fn image_of(&self, location: &str) -> Option<String> {
        if !location.starts_with('/') {
            return Some(location.to_owned());
        }
        self.archives
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(location)
            .cloned()
    }

    /// Removes a container of ours named `name`, left by an earlier start; refuses to touch a
    /// container of that name that is not ours.
    async fn remove_leftover(&self, name: &str) -> Result<(), String> {
        let found = self
            .call(|docker| async move { docker.inspect_container(name, None).await })
            .await;
        let existing = match found {
            Ok(c) => c,
            Err(_) => return Ok(()),
        };
        let ours = existing
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(MANAGED_LABEL))
            .is_some_and(|v| v == name);
        if !ours {
            return Err(format!(
                "a container named {name} exists and is not managed by this agent; remove or \
                 rename it"
            ));
        }
        self.force_remove(name).await
    }

    /// Removes container `id` (or name), stopping it first if it runs.
    async fn force_remove(&self, id: &str) -> Result<(), String> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        self.call(|docker| async move { docker.remove_container(id, Some(options)).await })
            .await
    }

    async fn start_container(&self, spec: StartSpec) -> Result<Started, String> {
        let image = self.image_of(&spec.module_location).ok_or_else(|| {
            format!(
                "the image of archive {} is not loaded; load the module again",
                spec.module_location
            )
        })?;
        self.remove_leftover(&spec.instance).await?;
        let body = container_body(&spec, &image, self.logs.max_bytes);
        let name = spec.instance.clone();
        let created = self
            .call(|docker| async move {
                docker
                    .create_container(
                        Some(CreateContainerOptions {
                            name: Some(name),
                            ..Default::default()
                        }),
                        body,
                    )
                    .await
            })
            .await?;
        let id = created.id;
        let output = logs::start_relay_writers(&spec.instance, &spec.instance_dir, &self.logs)
            .map_err(|e| e.to_string())?;
        let started_id = id.clone();
        self.call(|docker| async move { docker.start_container(&started_id, None).await })
            .await?;
        info!(instance = %spec.instance, container = %id, image, uid = ?spec.uid, "container started");
        self.watch(&spec.instance, id, output, 0).await
    }

    /// What the supervisor needs of a running container: its process (for the SDK binding
    /// and the record), its end (the engine's wait), and its output pumped into the relay
    /// from `logs_since` (Unix seconds; 0 for all of it).
    async fn watch(
        &self,
        instance: &str,
        id: String,
        output: logs::RelayWriters,
        logs_since: i32,
    ) -> Result<Started, String> {
        let inspected_id = id.clone();
        let inspected = self
            .call(|docker| async move { docker.inspect_container(&inspected_id, None).await })
            .await?;
        let pid = inspected
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("container {id} is not running"))?;
        let docker = self.docker().await?;
        let process = match crate::process::stat(pid) {
            Ok(Some(stat)) => Some(ProcessHandle {
                pid,
                start_time: stat.start_time,
            }),
            _ => None,
        };
        tokio::spawn(pump_logs(
            docker.clone(),
            instance.to_owned(),
            id.clone(),
            output,
            logs_since,
        ));
        let engine = self.engine.clone();
        let waited = docker.clone();
        let waited_id = id.clone();
        let exited = async move {
            let mut wait = waited.wait_container(
                &waited_id,
                Some(WaitContainerOptions {
                    condition: "not-running".into(),
                }),
            );
            match wait.next().await {
                Some(Ok(r)) => Exit::Code(i32::try_from(r.status_code).unwrap_or(i32::MAX)),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Exit::Code(i32::try_from(code).unwrap_or(i32::MAX))
                }
                Some(Err(e)) => Exit::Lost(engine_error(&engine, e)),
                None => Exit::Lost(format!("Docker engine at {engine} ended the wait")),
            }
        }
        .boxed();
        Ok(Started {
            workload: Arc::new(Container {
                docker,
                id: id.clone(),
            }),
            exited,
            process,
            pid: pid.unsigned_abs(),
            scope: None,
            container: Some(id),
        })
    }

    async fn adopt_container(&self, spec: AdoptSpec) -> Result<Adoption, String> {
        let Some(id) = spec.container.clone() else {
            return Ok(Adoption::Gone("no container was recorded".into()));
        };
        let inspected_id = id.clone();
        let found = self
            .call(|docker| async move {
                match docker.inspect_container(&inspected_id, None).await {
                    Ok(c) => Ok(Some(c)),
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: NOT_FOUND,
                        ..
                    }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let Some(inspected) = found else {
            return Ok(Adoption::Gone(format!("container {id} no longer exists")));
        };
        let running = inspected
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        if !running {
            return Ok(Adoption::Gone(format!("container {id} has exited")));
        }
        let output = logs::start_relay_writers(&spec.instance, &spec.instance_dir, &self.logs)
            .map_err(|e| e.to_string())?;
        // Its earlier output went to the relay of the daemon's previous run (and is still in
        // the engine's log); from now on it goes to this one.
        let now = i32::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .unwrap_or(0);
        info!(instance = %spec.instance, container = %id, "container re-adopted");
        self.watch(&spec.instance, id, output, now)
            .await
            .map(Adoption::Running)
    }
}

impl Runtime for DockerRuntime {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn load<'a>(
        &'a self,
        module_id: &'a str,
        location: &'a str,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<(), EvpError>> {
        async move {
            if location.is_empty() {
                return Err(EvpError::InvalidArgument(format!(
                    "module {module_id}: no image reference"
                )));
            }
            if location.starts_with('/') {
                self.load_archive(module_id, location, sha256)
                    .await
                    .map(drop)
            } else {
                self.pull(module_id, location).await
            }
        }
        .boxed()
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, String>> {
        self.start_container(spec).boxed()
    }

    fn adopt(&self, spec: AdoptSpec) -> BoxFuture<'_, Result<Adoption, String>> {
        self.adopt_container(spec).boxed()
    }

    fn unloaded<'a>(&'a self, location: &'a str) -> BoxFuture<'a, ()> {
        async move {
            let image = self.image_of(location);
            if location.starts_with('/') {
                self.archives
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(location);
            }
            let Some(image) = image.filter(|i| self.brought.contains(i)) else {
                return;
            };
            let name = image.as_str();
            let removed = self
                .call(|docker| async move {
                    match docker
                        .remove_image(name, None::<RemoveImageOptions>, None)
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(bollard::errors::Error::DockerResponseServerError {
                            status_code: NOT_FOUND,
                            ..
                        }) => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await;
            match removed {
                Ok(true) => {
                    info!(image, "image removed: no module uses it");
                    self.brought.set(&image, false);
                }
                Ok(false) => self.brought.set(&image, false),
                // In use by a container (of the operator's, say): kept, and tried again at
                // the next unload.
                Err(e) => info!(image, "image kept: {e}"),
            }
        }
        .boxed()
    }

    fn stopped<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, ()> {
        async move {
            if let Err(e) = self.remove_leftover(instance).await {
                warn!(instance, "removing its container: {e}");
            }
        }
        .boxed()
    }

    fn sweep<'a>(&'a self, keep: &'a [String]) -> BoxFuture<'a, ()> {
        async move {
            let filters = HashMap::from([("label".to_owned(), vec![MANAGED_LABEL.to_owned()])]);
            let listed = self
                .call(|docker| async move {
                    docker
                        .list_containers(Some(ListContainersOptions {
                            all: true,
                            filters: Some(filters),
                            ..Default::default()
                        }))
                        .await
                })
                .await;
            let containers = match listed {
                Ok(c) => c,
                Err(e) => {
                    info!("containers of earlier runs not checked: {e}");
                    return;
                }
            };
            for c in containers {
                let instance = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(MANAGED_LABEL))
                    .cloned()
                    .unwrap_or_default();
                if keep.contains(&instance) {
                    continue;
                }
                let Some(id) = c.id else { continue };
                match self.force_remove(&id).await {
                    Ok(()) => info!(instance, "removed a container no instance owns"),
                    Err(e) => warn!(instance, "removing a container no instance owns: {e}"),
                }
            }
        }
        .boxed()
    }
}

/// A running container, stopped through the engine's kill (SIGTERM, then SIGKILL after the
/// supervisor's grace), which is what the engine's own stop does.
struct Container {
    docker: Docker,
    id: String,
}

impl Container {
    fn send(&self, signal: &'static str) {
        let docker = self.docker.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            let options = KillContainerOptions {
                signal: signal.into(),
            };
            match docker.kill_container(&id, Some(options)).await {
                // 409: not running any more, which is what was wanted.
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }) => {}
                Err(e) => warn!(container = %id, "sending {signal}: {e}"),
            }
        });
    }
}

impl Workload for Container {
    fn terminate(&self) -> Result<(), String> {
        self.send("SIGTERM");
        Ok(())
    }

    fn kill(&self) -> Result<(), String> {
        self.send("SIGKILL");
        Ok(())
    }
}

/// Copies the container's output into its relay until the container ends (the engine closes
/// the stream) or the relay is gone. A terminal's `\r\n` becomes `\n`.
async fn pump_logs(
    docker: Docker,
    instance: String,
    id: String,
    output: logs::RelayWriters,
    since: i32,
) {
    let mut stdout = match tokio::net::unix::pipe::Sender::from_owned_fd(output.stdout.into()) {
        Ok(s) => s,
        Err(e) => {
            warn!(instance, "the container's output is not kept: {e}");
            return;
        }
    };
    drop(output.stderr);
    let mut stream = docker.logs(
        &id,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            since,
            tail: "all".into(),
            ..Default::default()
        }),
    );
    let mut crlf = CrLf::default();
    while let Some(chunk) = stream.next().await {
        let bytes = match chunk {
            Ok(out) => out.into_bytes(),
            Err(e) => {
                info!(instance, "the container's output stream ended: {e}");
                break;
            }
        };
        if stdout.write_all(&crlf.convert(&bytes)).await.is_err() {
            break;
        }
    }
}

/// Turns `\r\n` into `\n` across chunk boundaries.
#[derive(Default)]
struct CrLf {
    /// The last chunk ended in `\r`, held back.
    pending_cr: bool,
}

impl CrLf {
    fn convert(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + 1);
        if std::mem::take(&mut self.pending_cr) && bytes.first() != Some(&b'\n') {
            out.push(b'\r');
        }
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            rest = tail;
            if b == b'\r' {
                match rest.first() {
                    Some(b'\n') => continue,
                    None => self.pending_cr = true,
                    Some(_) => out.push(b),
                }
            } else {
                out.push(b);
            }
        }
        out
    }
}

/// The image a `docker load` output line names (`Loaded image: name:tag` or `Loaded image ID:
/// sha256:…`).
fn loaded_image(line: &str) -> Option<String> {
    let line = line.trim();
    line.strip_prefix("Loaded image ID: ")
        .or_else(|| line.strip_prefix("Loaded image: "))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_found_as_evp_finds_it() {
        fn check(socket: Option<&str>, host: Option<&str>, expect: &str) {
            let engine = Engine::from_env(socket.map(Into::into), host.map(Into::into));
            assert_eq!(engine.to_string(), expect, "{socket:?} {host:?}");
        }
        check(None, None, "unix:///var/run/docker.sock");
        check(Some("/run/d.sock"), None, "unix:///run/d.sock");
        check(
            Some("/run/d.sock"),
            Some("http://dockerd"),
            "unix:///run/d.sock",
        );
        check(None, Some("http://dockerd:2375"), "http://dockerd:2375");
        check(Some(""), Some(""), "unix:///var/run/docker.sock");
    }

    #[test]
    fn docker_load_output_names_the_image() {
        assert_eq!(
            loaded_image("Loaded image: cam:1\n").as_deref(),
            Some("cam:1")
        );
        assert_eq!(
            loaded_image("Loaded image ID: sha256:ab\n").as_deref(),
            Some("sha256:ab")
        );
        assert_eq!(loaded_image("Loading layer 1/2"), None);
    }

    #[test]
    fn terminal_line_ends_become_newlines_across_chunks() {
        let mut c = CrLf::default();
        let mut out = c.convert(b"a\r\nb\r");
        out.extend(c.convert(b"\nc\rd\r"));
        out.extend(c.convert(b"e"));
        assert_eq!(out, b"a\nb\nc\rd\re");
    }
}
