//! One whole device for one test: a private bus, mosquitto, the five daemons, and the hub's
//! side of EVP2, in a temporary directory that holds everything the device writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use evp_devhub::hub::HubSideOptions;
use evp_devhub::stack::DaemonOutput;
use evp_devhub::{HubSide, PrivateBus, Stack, StackConfig};
use evp_schemas::Protocol;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::DEADLINE;
use crate::certs::{self, Pki};
use crate::mosquitto::{Mosquitto, TlsFiles};
use crate::proxy::ConnectProxy;
use crate::relay::Relay;

/// How a [`System`] is set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The device reaches the broker over mutual TLS only (the hub driver keeps a plain
    /// loopback listener of the same broker).
    pub tls: bool,
    /// Trust this CA file instead of the one that signed the broker's certificate.
    pub wrong_ca: bool,
    /// More agent.toml, appended to what the stack generates (e.g. a `[reconciler]` table).
    pub extra_toml: String,
    /// More environment for every daemon.
    pub env: Vec<(String, String)>,
    /// Restart a daemon that fails, as systemd's `Restart=on-failure` does.
    pub supervise: bool,
    /// The device reaches the broker through a [`Relay`] the test can cut (plain MQTT only).
    pub relay: bool,
    /// The device reaches the broker through a [`ConnectProxy`] (`EVP_MQTT_PROXY_*`, Basic
    /// auth as [`PROXY_USER`] with [`PROXY_PASSWORD`]; `env` may override them).
    pub proxy: bool,
    /// The daemons' data directory is a tmpfs of this many bytes, mounted before they start
    /// (root only), so a test can fill it.
    pub data_dir_tmpfs: Option<u64>,
    /// hubd's provisioning key and secret (agent.toml).
    pub provision_key: Option<(String, String)>,
    /// The key and secret the hub driver provisions devices for, before the device starts.
    pub hub_provisioning: Option<evp_devhub::hub::ProvisionProfile>,
    /// The hub's dialect: hubd is configured with it and the hub driver speaks it, taking
    /// and giving EVP2's shapes either way (`evp_devhub::hub::dialect`).
    pub protocol: Protocol,
}

/// A device under test.
pub struct System {
    /// Everything the device writes lives here; kept on failure only if `EVP_KEEP_TEST_DIRS`.
    pub dir: tempfile::TempDir,
    /// The private dbus-daemon.
    pub bus: PrivateBus,
    /// The broker.
    pub mosquitto: Mosquitto,
    /// The five daemons.
    pub stack: Stack,
    /// The hub's side of EVP2.
    pub hub: HubSide,
    /// The test's own connection to the private bus.
    pub conn: zbus::Connection,
    /// The test PKI, with [`Options::tls`].
    pub pki: Option<Pki>,
    /// The uids this device's instances get, held for its lifetime.
    pub uids: UidBlock,
    /// The device's way to the broker, with [`Options::relay`].
    pub relay: Option<Relay>,
    /// The device's proxy, with [`Options::proxy`].
    pub proxy: Option<ConnectProxy>,
    /// The tmpfs mounted on the data directory ([`Options::data_dir_tmpfs`]), unmounted on drop.
    tmpfs: Option<PathBuf>,
}

/// Client id of the device, and CN of its certificate.
pub const DEVICE: &str = "device-under-test";
/// The user the device's proxy ([`Options::proxy`]) lets through.
pub const PROXY_USER: &str = "device-proxy-user";
/// Its password.
pub const PROXY_PASSWORD: &str = "proxy-pass: with colon";

impl System {
    /// A device on a plain MQTT connection.
    pub async fn start() -> Result<System> {
        Self::start_with(Options::default()).await
    }

    /// A device on a plain MQTT connection whose hub speaks `protocol`.
    pub async fn start_speaking(protocol: Protocol) -> Result<System> {
        Self::start_with(Options {
            protocol,
            ..Options::default()
        })
        .await
    }

    /// A device set up as `options` says.
    pub async fn start_with(options: Options) -> Result<System> {
        let dir = tempfile::Builder::new().prefix("evp-system-").tempdir()?;
        // Instances run under uids of their own when the test runs as root: they must get
        // through to their workspace and SDK socket inside (without listing anything), as
        // through /var/lib and /run on a device.
        traversable(dir.path())?;
        let bus = PrivateBus::start(&dir.path().join("bus")).context("starting dbus-daemon")?;
        let pki = if options.tls {
            Some(certs::make(dir.path(), DEVICE)?)
        } else {
            None
        };
        let tls = pki.as_ref().map(TlsFiles::server_of);
        let mosquitto = Mosquitto::start(dir.path(), tls.as_ref())?;
        let hub = HubSide::connect_with(
            &mosquitto.url(),
            HubSideOptions {
                protocol: options.protocol,
                ..HubSideOptions::default()
            },
        )
        .await
        .context("connecting the hub driver")?;
        hub.set_provisioning(options.hub_provisioning.clone());
        let relay = if options.relay {
            Some(Relay::start(mosquitto.port).await?)
        } else {
            None
        };
        let device_port = match &relay {
            Some(r) => r.port,
            None => mosquitto.tls_port.unwrap_or(mosquitto.port),
        };
        let mut config = StackConfig::new(
            dir.path().join("device"),
            bus.address(),
            "127.0.0.1",
            device_port,
        )?;
        config.bin_dir = crate::bin_dir();
        config.protocol = options.protocol;
        let uids = UidBlock::take()?;
        config.instance_uids = Some((uids.min, uids.max));
        config.output = DaemonOutput::LogFiles;
        // Reports as fast as the agent allows, so tests wait on conditions, not on clocks.
        config.report_status_interval_min_ms = 0;
        config.env.push(("EVP_MQTT_CLIENTID".into(), DEVICE.into()));
        let proxy = if options.proxy {
            let proxy = ConnectProxy::start(PROXY_USER, PROXY_PASSWORD).await?;
            config.env.extend([
                ("EVP_MQTT_PROXY_HOST".into(), "127.0.0.1".into()),
                ("EVP_MQTT_PROXY_PORT".into(), proxy.port.to_string()),
                ("EVP_MQTT_PROXY_USERNAME".into(), PROXY_USER.into()),
                ("EVP_MQTT_PROXY_PASSWORD".into(), PROXY_PASSWORD.into()),
            ]);
            Some(proxy)
        } else {
            None
        };
        // Last, so that a test's own values win.
        config.env.extend(options.env.iter().cloned());
        config.supervise = options.supervise;
        config.provision.clone_from(&options.provision_key);
        if !options.extra_toml.is_empty() {
            config.agent_toml = Some(merged_toml(
                &config.render_agent_toml(),
                &options.extra_toml,
            )?);
        }
        if let Some(p) = &pki {
            let ca = if options.wrong_ca { &p.other_ca } else { &p.ca };
            config.env.extend([
                ("EVP_MQTT_TLS_CA_CERT".into(), path_string(ca)),
                (
                    "EVP_MQTT_TLS_CLIENT_CERT".into(),
                    path_string(&p.client_cert),
                ),
                ("EVP_MQTT_TLS_CLIENT_KEY".into(), path_string(&p.client_key)),
            ]);
        }
        for bin in ["evp-hubd", "evp-reconcilerd", "evp-runtimed-container"] {
            anyhow::ensure!(
                config.bin_dir.join(bin).exists(),
                "{} is not built: run `cargo build --workspace` before the tests",
                config.bin_dir.join(bin).display()
            );
        }
        let tmpfs = match options.data_dir_tmpfs {
            Some(bytes) => Some(mount_tmpfs(&config.data_dir(), bytes)?),
            None => None,
        };
        let stack = Stack::launch(config)
            .await
            .context("starting the daemons")?;
        let conn = zbus::connection::Builder::address(bus.address())
            .build()
            .await
            .context("connecting to the private bus")?;
        std::fs::create_dir_all(dir.path().join("modules"))?;
        Ok(System {
            dir,
            bus,
            mosquitto,
            stack,
            hub,
            conn,
            pki,
            uids,
            relay,
            proxy,
            tmpfs,
        })
    }

    /// The daemons' data root.
    pub fn data_dir(&self) -> PathBuf {
        self.stack.config().data_dir()
    }

    /// An instance's directory, as the runtime makes it.
    pub fn instance_dir(&self, instance: &str) -> PathBuf {
        self.data_dir().join("instances").join(instance)
    }

    /// Writes a spawn module: a shell script whose body is `body`. Returns its `file://` URL
    /// and its SHA-256. Different bodies give different hashes.
    pub fn module(&self, name: &str, body: &str) -> Result<(String, String)> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("modules").join(name);
        let text = format!("#!/bin/sh\n# module {name}\n{body}\n");
        std::fs::write(&path, &text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok((
            format!("file://{}", path.display()),
            hex::encode(Sha256::digest(text.as_bytes())),
        ))
    }

    /// The directory module files are written to (to serve them over HTTP).
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.path().join("modules")
    }

    /// Sends a deployment as the hub does.
    pub async fn deploy(&self, deployment: &Value) -> Result<()> {
        Ok(self.hub.deploy(deployment).await?)
    }

    /// Waits for a status report whose `deploymentStatus` satisfies `check`.
    pub async fn wait_status(&self, check: impl Fn(&Value) -> bool) -> Result<Value> {
        let report = self
            .hub
            .wait_for_status(|r| check(&r["deploymentStatus"]), DEADLINE)
            .await
            .with_context(|| {
                format!(
                    "daemon logs are in {}",
                    self.stack.config().log_dir().display()
                )
            })?;
        Ok(report["deploymentStatus"].clone())
    }

    /// PIDs of the module processes of `instance`, found by the workspace path the runtime
    /// put in their environment.
    pub fn instance_pids(&self, instance: &str) -> Vec<u32> {
        let marker = format!(
            "EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH={}",
            self.instance_dir(instance)
                .join("default_workspace")
                .display()
        );
        processes_with_env(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
    }

    /// A reboot of the device: every daemon stopped (and the modules with them), then started
    /// again from what is on disk.
    pub async fn restart_stack(&mut self) -> Result<()> {
        let config = self.stack.config().clone();
        self.stack.stop_all().await;
        self.stack = Stack::launch(config)
            .await
            .context("starting the daemons again")?;
        Ok(())
    }

    /// Deploys `instances` of one module that stays up (module id `a`), waits until the
    /// deployment is `ok` with all of them `ok`, and returns their PIDs in order; each must run
    /// as exactly one process.
    pub async fn run_instances(&self, id: &str, instances: &[&str]) -> Result<Vec<u32>> {
        let (url, hash) = self.module("a", "exec /bin/sleep 300")?;
        let specs: Vec<(&str, &str)> = instances.iter().map(|i| (*i, "a")).collect();
        self.deploy(&deployment(id, &specs, &[("a", &url, &hash)]))
            .await?;
        self.wait_status(|s| {
            s["deploymentId"] == id
                && s["reconcileStatus"] == "ok"
                && instances.iter().all(|i| instance_status(s, i) == "ok")
        })
        .await?;
        instances
            .iter()
            .map(|i| match self.instance_pids(i).as_slice() {
                [pid] => Ok(*pid),
                pids => anyhow::bail!("{i} should run as one process: {pids:?}"),
            })
            .collect()
    }

    /// Kills `daemon` with SIGKILL, waits for it to be gone and starts it again, as systemd's
    /// `Restart=` would after a crash.
    pub async fn kill_and_start(&self, daemon: &str) -> Result<()> {
        self.stack
            .kill(daemon, evp_devhub::stack::Signal::SIGKILL)?;
        self.stack.wait_exit(daemon, DEADLINE).await?;
        self.stack.start(daemon).await?;
        Ok(())
    }

    /// Restarts `daemon` with `EVP_TEST_CRASH_AT=point`, so that (a debug build) it aborts
    /// right after that write point, as a power cut there would leave the disk; returns its
    /// exit count, for [`System::wait_crashed_at`].
    pub async fn arm_crash_at(&self, daemon: &str, point: &str) -> Result<u64> {
        self.stack
            .set_env(daemon, vec![("EVP_TEST_CRASH_AT".into(), point.into())])?;
        self.stack
            .kill(daemon, evp_devhub::stack::Signal::SIGTERM)?;
        self.stack.wait_exit(daemon, DEADLINE).await?;
        self.stack.start(daemon).await?;
        Ok(self.stack.exits(daemon)?)
    }

    /// Waits until `daemon` exited again after `exits` and checks that its log says it
    /// aborted at `point`; then starts it again without the hook ("power back").
    pub async fn wait_crashed_at(&self, daemon: &str, point: &str, exits: u64) -> Result<()> {
        crate::wait_for(
            &format!("{daemon} to abort at {point}"),
            DEADLINE,
            async || (self.stack.exits(daemon).ok()? > exits).then_some(()),
        )
        .await?;
        let log =
            std::fs::read_to_string(self.stack.config().log_dir().join(format!("{daemon}.log")))?;
        anyhow::ensure!(
            log.contains(&format!("EVP_TEST_CRASH_AT={point}")),
            "{daemon} died, but not at {point}"
        );
        Ok(())
    }

    /// Starts `daemon` again without the crash hook.
    pub async fn start_disarmed(&self, daemon: &str) -> Result<()> {
        self.stack.set_env(daemon, Vec::new())?;
        self.stack.start(daemon).await?;
        Ok(())
    }

    /// Stops everything, and kills any module the daemons left behind.
    pub async fn stop(self) {
        self.stack.stop_all().await;
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // Modules of this device whose runtime was killed would outlive the test otherwise.
        kill_modules_under(&self.data_dir());
        if let Some(mount) = &self.tmpfs {
            // Lazily: a module killed just above may still hold a file there.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(mount)
                .status();
        }
        if std::env::var_os("EVP_KEEP_TEST_DIRS").is_some() {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept {}", path.keep().display());
        }
    }
}

/// Kills (SIGKILL) every module process whose SDK environment names a path under `dir`:
/// the modules of devices there, which outlive a runtime that was killed.
pub fn kill_modules_under(dir: &Path) {
    let marker = dir.to_string_lossy().into_owned();
    for pid in processes_with_env(|env| {
        env.split(|b| *b == 0)
            .any(|v| v.starts_with(b"EVP_MODULE_SDK_") && contains(v, marker.as_bytes()))
    }) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Mounts a tmpfs of `bytes` on `dir` (made first); the mount point is returned.
fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes},mode=0755"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .context("running mount")?;
    anyhow::ensure!(
        status.success(),
        "mount -t tmpfs on {}: {status}",
        dir.display()
    );
    Ok(dir.to_owned())
}

/// A block of uids of the runtime's default range (61184–65519) for one device's instances,
/// held with a lock file for the device's lifetime: devices of tests running at once (in one
/// test binary, or in several) never share a uid, since stopping an instance signals every
/// process of its uid. The lock goes with the process, so a crashed test frees its block.
#[derive(Debug)]
pub struct UidBlock {
    _lock: std::fs::File,
    /// First uid.
    pub min: u32,
    /// Last uid.
    pub max: u32,
}

/// Uids per [`UidBlock`]: more instances than any test deploys at once.
const UID_BLOCK: u32 = 64;

impl UidBlock {
    /// The first block no other test holds.
    pub fn take() -> Result<UidBlock> {
        use std::os::fd::AsRawFd;
        let (first, last) = (61184u32, 65519u32);
        for min in (first..=last - UID_BLOCK + 1).step_by(UID_BLOCK as usize) {
            let path = std::env::temp_dir().join(format!("evp-test-uids-{min}.lock"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: flock on a descriptor we own, with integer flags only.
            if unsafe {
                nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB)
            } == 0
            {
                return Ok(UidBlock {
                    _lock: file,
                    min,
                    max: min + UID_BLOCK - 1,
                });
            }
        }
        anyhow::bail!("every block of test uids is held by a running test")
    }
}

/// `extra` over `base`, table by table: a test's `[reconciler]` adds to the stack's own rather
/// than repeating the table (which TOML refuses).
pub fn merged_toml(base: &str, extra: &str) -> Result<String> {
    let mut top: toml::Table = base.parse().context("the stack's agent.toml")?;
    let extra: toml::Table = extra.parse().context("the test's extra agent.toml")?;
    for (key, value) in extra {
        match (top.get_mut(&key), value) {
            (Some(toml::Value::Table(have)), toml::Value::Table(more)) => have.extend(more),
            (_, value) => {
                top.insert(key, value);
            }
        }
    }
    Ok(toml::to_string(&top)?)
}

/// Lets every user through `dir` (mode 0711) without letting them list it.
pub fn traversable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod 0711 {}", dir.display()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// PIDs of the processes whose environment satisfies `check`.
pub fn processes_with_env(check: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| check(&env))
                .unwrap_or(false)
        })
        .collect()
}

/// A deployment of spawn modules: `instances` maps instance → module id, `modules` maps
/// module id → (download URL, hash).
pub fn deployment(id: &str, instances: &[(&str, &str)], modules: &[(&str, &str, &str)]) -> Value {
    let specs: serde_json::Map<String, Value> = instances
        .iter()
        .map(|(name, module)| {
            (
                (*name).to_owned(),
                json!({"moduleId": module, "publish": {}, "subscribe": {}}),
            )
        })
        .collect();
    let mods: serde_json::Map<String, Value> = modules
        .iter()
        .map(|(id, url, hash)| {
            (
                (*id).to_owned(),
                json!({"moduleImpl": "spawn", "entryPoint": "main", "downloadUrl": url, "hash": hash}),
            )
        })
        .collect();
    json!({
        "deploymentId": id,
        "instanceSpecs": specs,
        "modules": mods,
        "publishTopics": {},
        "subscribeTopics": {}
    })
}

/// A test module of the workspace as a deployment's module: its file URL and hash.
pub fn workspace_module(binary: &str) -> Value {
    let path = crate::bin_dir().join(binary);
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{} ({e}): run `cargo build --workspace`", path.display()));
    json!({
        "moduleImpl": "spawn",
        "entryPoint": "main",
        "downloadUrl": format!("file://{}", path.display()),
        "hash": hex::encode(Sha256::digest(&bytes)),
    })
}

/// One instance per `(instance, binary)`, no messaging routes.
pub fn deployment_of(id: &str, instances: &[(&str, &str)]) -> Value {
    let mut d = json!({
        "deploymentId": id, "instanceSpecs": {}, "modules": {},
        "publishTopics": {}, "subscribeTopics": {}
    });
    for (instance, binary) in instances {
        d["modules"][*binary] = workspace_module(binary);
        d["instanceSpecs"][*instance] = json!({"moduleId": binary, "publish": {}, "subscribe": {}});
    }
    d
}

/// Deploys `d` and waits until it is `ok` with every instance of it `ok`.
pub async fn deploy_and_wait(sys: &System, d: &Value) {
    sys.deploy(d).await.unwrap();
    let id = d["deploymentId"].as_str().unwrap().to_owned();
    let names: Vec<String> = d["instanceSpecs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    sys.wait_status(|s| {
        s["deploymentId"] == id.as_str()
            && s["reconcileStatus"] == "ok"
            && names.iter().all(|n| instance_status(s, n) == "ok")
    })
    .await
    .expect("the deployment to be ok");
}

/// Waits until the hub holds the instance state `key` (`state/<instance>/<topic>`) with a
/// value that satisfies `check`, and returns it.
pub async fn wait_state(sys: &System, key: &str, check: impl Fn(&Value) -> bool) -> Value {
    try_wait_state(sys, key, check, DEADLINE).await.unwrap()
}

/// [`wait_state`] for up to `timeout`, as a `Result`.
pub async fn try_wait_state(
    sys: &System,
    key: &str,
    check: impl Fn(&Value) -> bool,
    timeout: std::time::Duration,
) -> Result<Value> {
    crate::wait_for(&format!("the hub to see {key}"), timeout, async || {
        sys.hub
            .instance_states()
            .get(key)
            .filter(|v| check(v))
            .cloned()
    })
    .await
}

/// Asks instance `instance` (an `evp-test-blob`) for the blob operation `ask` under `topic`
/// and returns its outcome, once the hub sees it as the instance's state of that topic.
pub async fn blob_outcome(sys: &System, instance: &str, topic: &str, ask: Value) -> Value {
    sys.hub
        .set_configuration(instance, topic, &ask.to_string())
        .await
        .unwrap();
    let state = wait_state(sys, &format!("state/{instance}/{topic}"), |_| true).await;
    let text = state
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| state.to_string());
    serde_json::from_str(&text).unwrap_or(state)
}

/// Sets the configuration `topic` = `value` of `instance` from the hub and waits until the
/// hub sees it back as the instance's state of the same topic (an echoing module).
pub async fn echo_round_trip(sys: &System, instance: &str, topic: &str, value: &str) {
    sys.hub
        .set_configuration(instance, topic, value)
        .await
        .unwrap();
    wait_state(sys, &format!("state/{instance}/{topic}"), |v| v == value).await;
}

/// Instance `instance` (an `evp-test-rpc-echo`) answers the direct command `echo` with its
/// params and an unknown method with EVP's error, as the hub sees it; `reqid` and the next
/// number are the requests' ids.
pub async fn commands_are_answered(sys: &System, instance: &str, reqid: u64) {
    let wait = std::time::Duration::from_secs(20);
    let ok = sys
        .hub
        .call(instance, "echo", r#"{"text":"hi"}"#, reqid, wait)
        .await
        .unwrap();
    assert_eq!(ok["status"], "ok", "{ok}");
    assert_eq!(ok["response"], r#"{"text":"hi"}"#);
    let unknown = sys
        .hub
        .call(instance, "nope", "{}", reqid + 1, wait)
        .await
        .unwrap();
    assert_eq!(unknown["status"], "error", "{unknown}");
    assert_eq!(unknown["errorMessage"], "Unknown method");
}

/// With instances `echo` (echoing configurations as states) and `tele` (sending them as
/// telemetry) deployed: a configuration of each comes back as the hub expects, the JSON value
/// of the telemetry as JSON.
pub async fn configuration_comes_back_as_state_and_telemetry(sys: &System) {
    let mut telemetry = sys.hub.subscribe();
    sys.hub
        .set_configuration("tele", "room/temp", "21.5")
        .await
        .unwrap();
    echo_round_trip(sys, "echo", "greeting", "hello").await;
    let seen = wait_telemetry(&mut telemetry, "tele/room/temp").await;
    assert_eq!(seen["tele/room/temp"], json!(21.5), "{seen}");
}

/// Routes the publish alias `out` of instance `tx` to the subscribe alias `in` of `rx` in `d`
/// (through the local topic `salute`), deploys it, has `tx` send 1000 messages and checks, as
/// the hub sees it, that every one was delivered. The modules behave as `evp-test-msg-sender`
/// and `evp-test-msg-receiver`.
pub async fn exchange_a_thousand_messages(sys: &System, mut d: Value) {
    d["instanceSpecs"]["tx"]["publish"] = json!({"out": "pub-salute"});
    d["instanceSpecs"]["rx"]["subscribe"] = json!({"in": "sub-salute"});
    d["publishTopics"] = json!({"pub-salute": {"type": "local", "topic": "salute"}});
    d["subscribeTopics"] = json!({"sub-salute": {"type": "local", "topic": "salute"}});
    deploy_and_wait(sys, &d).await;
    sys.hub
        .set_configuration("tx", "count", "1000")
        .await
        .unwrap();
    let sent = wait_state(sys, "state/tx/sent", |_| true).await;
    let sent: Value = serde_json::from_str(sent.as_str().unwrap_or_default()).unwrap();
    assert_eq!(sent, json!({"sent": 1000, "errors": 0}));
    wait_state(sys, "state/rx/received", |v| v == "1000").await;
}

/// `org.evp.Hub1` of `sys`, its properties read afresh at every call.
pub async fn hub1(sys: &System) -> evp_schemas::dbus::Hub1Proxy<'static> {
    evp_schemas::dbus::Hub1Proxy::builder(&sys.conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

/// Waits up to `timeout` for `Hub1.Connection` to be `connected` (or anything else).
pub async fn wait_connection(
    hub: &evp_schemas::dbus::Hub1Proxy<'_>,
    connected: bool,
    timeout: std::time::Duration,
) {
    crate::wait_for(
        &format!("Hub1.Connection connected={connected}"),
        timeout,
        async || {
            let c = hub.connection().await.ok()?;
            ((c == "connected") == connected).then_some(())
        },
    )
    .await
    .unwrap();
}

/// Waits for the first line of `daemon`'s log that holds every one of `words`.
pub async fn wait_log_line(sys: &System, daemon: &str, words: &[&str]) -> String {
    let log = sys.stack.config().log_dir().join(format!("{daemon}.log"));
    crate::wait_for(
        &format!("{daemon} to log {words:?}"),
        DEADLINE,
        async || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .map(str::to_owned)
        },
    )
    .await
    .unwrap()
}

/// Waits for a telemetry message with `key` (`<instance>/<key>`) among the reports of
/// `reports` (from `HubSide::subscribe`), and returns the message.
pub async fn wait_telemetry(
    reports: &mut tokio::sync::broadcast::Receiver<evp_devhub::DeviceReport>,
    key: &str,
) -> Value {
    crate::wait_for(
        &format!("telemetry {key}"),
        DEADLINE,
        async || match reports.try_recv() {
            Ok(evp_devhub::DeviceReport::Telemetry(v)) if v.get(key).is_some() => Some(v),
            _ => None,
        },
    )
    .await
    .unwrap()
}

/// Deploys `d` and waits for the report in which its module `module` is `error`: that report
/// and the module's failure message.
pub async fn deploy_until_module_error(sys: &System, d: &Value, module: &str) -> (Value, String) {
    sys.deploy(d).await.unwrap();
    let id = d["deploymentId"].clone();
    let status = sys
        .wait_status(|s| s["deploymentId"] == id && s["modules"][module]["status"] == "error")
        .await
        .unwrap();
    let message = status["modules"][module]["failureMessage"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, message)
}

/// The status of one instance in a `deploymentStatus`, or `""`.
pub fn instance_status<'a>(status: &'a Value, instance: &str) -> &'a str {
    status["instances"][instance]["status"]
        .as_str()
        .unwrap_or("")
}

/// Waits up to the deadline for `pids` to be gone.
pub async fn wait_gone(pids: &[u32]) -> Result<()> {
    crate::wait_for("processes to exit", DEADLINE, async || {
        pids.iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
            .then_some(())
    })
    .await
}

/// Every daemon's bus name, object path and `org.evp` interface.
pub const DAEMON_INTERFACES: [(&str, &str, &str); 5] = {
    use evp_schemas::dbus::*;
    [
        (HUB_NAME, HUB_PATH, interfaces::HUB),
        (RECONCILER_NAME, RECONCILER_PATH, interfaces::RECONCILER),
        (RUNTIME_WASM_NAME, RUNTIME_WASM_PATH, interfaces::RUNTIME),
        (
            RUNTIME_CONTAINER_NAME,
            RUNTIME_CONTAINER_PATH,
            interfaces::RUNTIME,
        ),
        (SDK_BROKER_NAME, SDK_BROKER_PATH, interfaces::SDK_BROKER),
    ]
};

/// The introspection XML of `interface` in `schemas/dbus/`, the source of truth.
pub fn schema_xml(interface: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/dbus")
        .join(format!("{interface}.xml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
