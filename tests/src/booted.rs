//! A booted device: a Docker container of a Debian bookworm root filesystem with systemd as
//! PID 1, its own dbus-daemon and mosquitto, into which the agent is installed as a device
//! gets it (units, bus policy, system users), so the units' sandboxes, the policy and the
//! users are tested as systemd and dbus-daemon apply them.
//!
//! The image is made here with `debootstrap` and `docker import` (no registry is reached); it
//! is tagged with a hash of its recipe and reused while the engine has it. Making it, and
//! running the container (it needs CAP_SYS_ADMIN), needs root and the Docker engine: without
//! either, [`image`] fails and says why, so no test passes by skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use evp_devhub::hub::HubSide;

use crate::docker::{docker, require_engine};

/// Where the root filesystem comes from.
const MIRROR: &str = "http://deb.debian.org/debian";
/// The suite: this machine's, so the workspace's debug binaries (linked against its glibc)
/// run inside.
const SUITE: &str = "bookworm";
/// What the device has beyond `minbase`: systemd as init, the system bus, the broker hubd
/// connects to, `ss` (iproute2), `ps` (procps), `setpriv` (util-linux) and `nc -U`
/// (netcat-openbsd, a client of the SDK sockets).
const PACKAGES: &str =
    "systemd,systemd-sysv,dbus,mosquitto,iproute2,procps,util-linux,netcat-openbsd";
/// The image's entry point. systemd needs the cgroup hierarchies writable; the engine mounts
/// them read-only (and the host's own `/sys/fs/cgroup` must never be bind-mounted instead:
/// systemd would remount it).
const ENTRY: &str = "#!/bin/sh\n\
for d in /sys/fs/cgroup/*/; do mount -o remount,bind,rw \"$d\"; done\n\
exec /sbin/init\n";
const ENTRY_PATH: &str = "/usr/local/sbin/evp-booted-init";
/// mosquitto also listens on the container's address, for a hub driven from the host (the
/// tests' `HubSide`); hubd connects to it on 127.0.0.1 as to a broker of its own.
const MOSQUITTO_CONF: &str = "listener 1883\nallow_anonymous true\n";
const MOSQUITTO_CONF_PATH: &str = "etc/mosquitto/conf.d/evp-booted.conf";

/// How long systemd gets to boot, and the agent to start.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(60);

/// The tag of the image the recipe above makes.
fn image_tag() -> String {
    let recipe = format!(
        "{MIRROR}\n{SUITE}\n{PACKAGES}\n{ENTRY}\n{ENTRY_PATH}\n{MOSQUITTO_CONF}\n{MOSQUITTO_CONF_PATH}\nv1"
    );
    let hash = hex::encode(Sha256::digest(recipe.as_bytes()));
    format!("evp-booted:{}", &hash[..16])
}

/// The workspace's `target` folder.
fn target_dir() -> PathBuf {
    let bin = crate::bin_dir();
    bin.parent().map(Path::to_path_buf).unwrap_or(bin)
}

/// Runs `command`, failing with its name and the end of its output.
fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?}: {}: {}",
        out.status,
        tail(&[&out.stderr, &out.stdout], 40)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `lines` lines of the outputs, joined.
fn tail(outputs: &[&[u8]], lines: usize) -> String {
    let text: String = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(o).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let all: Vec<&str> = text.trim().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The tag of the booted-device image, made on first use (once per machine while the engine
/// keeps it; a file lock keeps parallel tests from making it twice).
pub fn image() -> Result<String> {
    static MADE: Mutex<Option<String>> = Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tag) = &*made {
        return Ok(tag.clone());
    }
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the booted-device tests must run as root: debootstrap makes the image, and systemd in \
         the container needs CAP_SYS_ADMIN (CI runs them as root)"
    );
    require_engine()?;
    let tag = image_tag();
    let dir = target_dir().join("booted");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = dir.join("image.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).is_err() {
        let started = Instant::now();
        build_image(&tag, &dir)?;
        eprintln!("booted: made image {tag} in {:?}", started.elapsed());
    }
    *made = Some(tag.clone());
    Ok(tag)
}

/// debootstrap into `dir/rootfs-<tag>`, the entry script, then `docker import` as `tag`.
fn build_image(tag: &str, dir: &Path) -> Result<()> {
    let debootstrap = ["/usr/sbin/debootstrap", "/usr/bin/debootstrap"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("debootstrap is not installed (apt-get install debootstrap; .ci/run does)")?;
    let root = dir.join(format!("rootfs-{}", tag.replace(':', "-")));
    if root.exists() {
        // What an interrupted build left.
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    run(Command::new(debootstrap)
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&root)
        .arg(MIRROR))
    .context("debootstrap of the booted-device root filesystem")?;
    let entry = root.join(ENTRY_PATH.trim_start_matches('/'));
    std::fs::create_dir_all(entry.parent().context("the entry script has a folder")?)?;
    std::fs::write(&entry, ENTRY)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(root.join(MOSQUITTO_CONF_PATH), MOSQUITTO_CONF)?;
    // Every container gets a machine id of its own at boot: systemd makes one when
    // /etc/machine-id is empty, and would reuse dbus's instead.
    std::fs::write(root.join("etc/machine-id"), "")?;
    let _ = std::fs::remove_file(root.join("var/lib/dbus/machine-id"));
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in std::fs::read_dir(root.join(cache))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let tar_out = tar.stdout.take().context("tar's stdout")?;
    let import = Command::new("docker")
        .args(["import", "--change", "ENV container=docker", "--change"])
        .arg(format!(r#"ENTRYPOINT ["{ENTRY_PATH}"]"#))
        .args(["-", tag])
        .stdin(tar_out)
        .output()
        .context("running docker import")?;
    let tar_status = tar.wait()?;
    ensure!(
        tar_status.success(),
        "tar of {}: {tar_status}",
        root.display()
    );
    ensure!(
        import.status.success(),
        "docker import {tag}: {}",
        tail(&[&import.stderr], 20)
    );
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok(())
}

/// How [`BootedDevice::install_agent`] installed the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// A Debian package ([`package`], or `EVP_BOOTED_INSTALL`'s), as a device gets it.
    Package(PathBuf),
    /// The workspace's debug binaries and `systemd/` files, copied where the package puts them.
    UnpackagedBuild,
}

/// A running container of [`image`], removed (`docker rm -f`) when dropped.
pub struct BootedDevice {
    name: String,
}

impl BootedDevice {
    /// Starts a container of `image` with systemd as PID 1 (not yet booted: see
    /// [`BootedDevice::wait_running`]).
    pub fn start(image: &str) -> Result<BootedDevice> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "evp-booted-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = docker(&["rm", "-f", &name]);
        // systemd as PID 1 without --privileged (the host's bounding set lacks
        // CAP_SYS_RESOURCE): its own cgroup namespace, SYS_ADMIN to mount, tmpfs for /run.
        // The agent's state is on a tmpfs too, a file system that gives a file the group of
        // its set-group-id folder, as a device's does (the engine's fuse-overlayfs does not,
        // and the runtimes read the module cache through its group).
        let options = "run -d --cgroupns=private --cap-add SYS_ADMIN --cap-add NET_ADMIN \
                       --security-opt seccomp=unconfined --tmpfs /run --tmpfs /run/lock \
                       --tmpfs /var/lib/evp:rw,exec,nosuid,nodev,mode=755,size=1g \
                       --stop-signal SIGRTMIN+3";
        let mut args: Vec<&str> = options.split_whitespace().collect();
        args.extend(["--name", &name, "--hostname", &name, image]);
        docker(&args).with_context(|| format!("starting the booted device {name}"))?;
        Ok(BootedDevice { name })
    }

    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's broker as the host reaches it: `mqtt://<container address>:1883`.
    pub fn broker_url(&self) -> Result<String> {
        let ip = docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.name,
        ])?;
        ensure!(!ip.is_empty(), "{} has no network address", self.name);
        Ok(format!("mqtt://{ip}:1883"))
    }

    /// Waits until systemd has booted: its private socket exists, then
    /// `systemctl is-system-running --wait` says `running`, or `degraded` (the failed units
    /// are printed then; the tests check the units they care about).
    pub fn wait_running(&self) -> Result<()> {
        let end = Instant::now() + BOOT_DEADLINE;
        while !self
            .exec(&["test", "-S", "/run/systemd/private"])?
            .status
            .success()
        {
            if Instant::now() >= end {
                bail!(
                    "{}: no /run/systemd/private after {BOOT_DEADLINE:?}; container output:\n{}",
                    self.name,
                    self.container_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = end
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        let out = self.exec(&[
            "timeout",
            &left.to_string(),
            "systemctl",
            "is-system-running",
            "--wait",
        ])?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "running" => Ok(()),
            "degraded" => {
                eprintln!(
                    "booted: {} booted degraded:\n{}",
                    self.name,
                    self.exec_text(&["systemctl", "--failed", "--no-pager"])
                );
                Ok(())
            }
            state => bail!(
                "{}: systemd did not boot (state {state:?}, {}):\n{}",
                self.name,
                out.status,
                self.exec_text(&["systemctl", "--failed", "--no-pager"])
            ),
        }
    }

    /// Runs `args` inside; its output, whatever its exit status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        Command::new("docker")
            .args(["exec", &self.name])
            .args(args)
            .output()
            .with_context(|| format!("docker exec {} {}", self.name, args.join(" ")))
    }

    /// Runs `args` inside, failing unless it exits with 0; its standard output.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args)?;
        ensure!(
            out.status.success(),
            "in {}: {}: {}: {}",
            self.name,
            args.join(" "),
            out.status,
            tail(&[&out.stderr, &out.stdout], 40)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sh -c script` inside, failing unless it exits with 0.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.exec_ok(&["sh", "-c", script])
    }

    /// Standard output and error of `args`, for a report (never fails).
    fn exec_text(&self, args: &[&str]) -> String {
        match self.exec(args) {
            Ok(out) => tail(&[&out.stdout, &out.stderr], 200),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Writes `contents` to `path` inside (its folder created), with `mode`.
    pub fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        use std::io::Write;
        let script = format!(
            "mkdir -p \"$(dirname '{path}')\" && cat > '{path}' && chmod {mode:o} '{path}'"
        );
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.name, "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("docker exec -i")?;
        child
            .stdin
            .take()
            .context("docker exec's stdin")?
            .write_all(contents)?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "writing {path} in {}: {}",
            self.name,
            tail(&[&out.stderr], 20)
        );
        Ok(())
    }

    /// `docker cp` of `host` to `inside`.
    pub fn copy_in(&self, host: &Path, inside: &str) -> Result<()> {
        let from = host.to_string_lossy();
        docker(&["cp", &from, &format!("{}:{inside}", self.name)]).map(drop)
    }

    /// `docker cp` of `inside` to `host`.
    pub fn copy_out(&self, inside: &str, host: &Path) -> Result<()> {
        let to = host.to_string_lossy();
        docker(&["cp", &format!("{}:{inside}", self.name), &to]).map(drop)
    }

    /// The journal of `unit` (`journalctl -u`), or why it could not be read.
    pub fn journal(&self, unit: &str) -> String {
        self.exec_text(&[
            "journalctl",
            "-u",
            unit,
            "--no-pager",
            "-o",
            "short-monotonic",
        ])
    }

    /// `systemctl status` of `unit` and the last 50 lines of its journal: what a failure
    /// message shows.
    pub fn unit_report(&self, unit: &str) -> String {
        let status = self.exec_text(&["systemctl", "status", "--no-pager", "-l", unit]);
        let journal = self.exec_text(&[
            "journalctl",
            "-u",
            unit,
            "--no-pager",
            "-n",
            "50",
            "-o",
            "short-monotonic",
        ]);
        format!("--- systemctl status {unit}\n{status}\n--- journalctl -u {unit} -n 50\n{journal}")
    }

    /// One property of `unit` (`systemctl show -p PROP --value`).
    pub fn unit_property(&self, unit: &str, prop: &str) -> Result<String> {
        let out = self.exec_ok(&["systemctl", "show", "-p", prop, "--value", unit])?;
        Ok(out.trim().to_owned())
    }

    /// The processes in `unit`'s control group, read from `/proc/*/cgroup` inside.
    pub fn pids_of(&self, unit: &str) -> Result<Vec<u32>> {
        let cgroup = self.unit_property(unit, "ControlGroup")?;
        if cgroup.is_empty() {
            return Ok(Vec::new());
        }
        // Lines like `/proc/42/cgroup:1:name=systemd:/system.slice/evp-hubd.service`; grep's
        // status is ignored: processes come and go while it reads.
        let out = self.exec(&["sh", "-c", "grep -sH '' /proc/[0-9]*/cgroup"])?;
        let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.rsplit(':').next() == Some(cgroup.as_str()))
            .filter_map(|l| l.strip_prefix("/proc/")?.split('/').next()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// The real uid of process `pid` inside; fails if its effective, saved or file-system uid
    /// differs from it.
    pub fn uid_of(&self, pid: u32) -> Result<u32> {
        let status = self.exec_ok(&["cat", &format!("/proc/{pid}/status")])?;
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .with_context(|| format!("no Uid: in /proc/{pid}/status"))?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(
            uids.len() == 4 && uids.iter().all(|u| *u == uids[0]),
            "process {pid} has mixed uids {uids:?}"
        );
        Ok(uids[0])
    }

    /// The uid of user `name` inside.
    pub fn user_id(&self, name: &str) -> Result<u32> {
        Ok(self.exec_ok(&["id", "-u", name])?.trim().parse()?)
    }

    /// Installs the agent as a device gets it: the Debian package of the workspace's debug
    /// binaries ([`package`] of the workspace's version), with `apt-get install`, which enables
    /// and starts `evp.target`. `EVP_BOOTED_INSTALL=/path/to.deb` installs that package
    /// instead, and `EVP_BOOTED_INSTALL=build` copies the unpackaged build in
    /// ([`BootedDevice::install_unpackaged_build`]). Either way `/etc/evp/agent.toml` points
    /// hubd at the device's own mosquitto (127.0.0.1:1883), and is kept as the operator's.
    pub fn install_agent(&self, bin_dir: &Path) -> Result<Installed> {
        self.write_file("/etc/evp/agent.toml", AGENT_TOML.as_bytes(), 0o644)?;
        let deb = match std::env::var("EVP_BOOTED_INSTALL") {
            Ok(choice) if choice == "build" => {
                self.install_unpackaged_build(bin_dir)?;
                return Ok(Installed::UnpackagedBuild);
            }
            Ok(deb) if deb.ends_with(".deb") => PathBuf::from(deb),
            _ => package(WORKSPACE_VERSION)?,
        };
        self.install_package(&deb)?;
        Ok(Installed::Package(deb))
    }

    /// `apt-get install` of the package `deb` (a first install or an upgrade), keeping the
    /// device's `/etc/evp/agent.toml`.
    pub fn install_package(&self, deb: &Path) -> Result<()> {
        self.copy_in(deb, "/tmp/evp-agent.deb")?;
        self.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             -o Dpkg::Options::=--force-confold /tmp/evp-agent.deb \
             && rm /tmp/evp-agent.deb")
            .with_context(|| format!("installing {}", deb.display()))?;
        Ok(())
    }

    /// What stands in for the Debian package while there is none: the workspace's binaries
    /// from `bin_dir` into /usr/bin, the units, bus policy, sysusers.d and tmpfiles.d files of
    /// `systemd/` where the package puts them; then the users, the folders, a reload of
    /// systemd and dbus-daemon, and `systemctl enable --now evp.target`.
    pub fn install_unpackaged_build(&self, bin_dir: &Path) -> Result<()> {
        let systemd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
        self.exec_ok(&["mkdir", "-p", "/tmp/evp-install/bin"])?;
        for binary in BINARIES {
            let path = bin_dir.join(binary);
            ensure!(
                path.exists(),
                "{} is missing (cargo build --workspace)",
                path.display()
            );
            self.copy_in(&path, &format!("/tmp/evp-install/bin/{binary}"))?;
        }
        self.copy_in(&systemd, "/tmp/evp-install/systemd")?;
        self.sh("set -e; cd /tmp/evp-install\n\
             install -m 0755 -t /usr/bin bin/*\n\
             install -m 0644 -t /usr/lib/systemd/system systemd/*.service systemd/evp.target\n\
             install -m 0644 -t /usr/share/dbus-1/system.d systemd/dbus/*.conf\n\
             install -D -m 0644 systemd/sysusers.d/evp.conf /usr/lib/sysusers.d/evp.conf\n\
             install -D -m 0644 systemd/tmpfiles.d/evp.conf /usr/lib/tmpfiles.d/evp.conf\n\
             cd / && rm -rf /tmp/evp-install\n\
             systemd-sysusers\n\
             systemd-tmpfiles --create\n\
             systemctl daemon-reload\n\
             systemctl reload dbus\n\
             systemctl enable --now evp.target")
            .context("installing the unpackaged build")?;
        Ok(())
    }

    /// What the container wrote to its console (systemd's boot messages).
    fn container_log(&self) -> String {
        match Command::new("docker").args(["logs", &self.name]).output() {
            Ok(out) => tail(&[&out.stdout, &out.stderr], 50),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for BootedDevice {
    /// Removes the container, unless `EVP_BOOTED_KEEP` is set (to look inside after a failure:
    /// `docker exec -it NAME bash`, then `docker rm -f NAME`).
    fn drop(&mut self) {
        if std::env::var_os("EVP_BOOTED_KEEP").is_some() {
            eprintln!(
                "booted: EVP_BOOTED_KEEP is set: leaving container {}",
                self.name
            );
            return;
        }
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// The daemons, the command-line tool and the units installed.
pub const BINARIES: [&str; 6] = [
    "evp-hubd",
    "evp-reconcilerd",
    "evp-runtimed-wasm",
    "evp-runtimed-container",
    "evp-sdk-broker",
    "evpctl",
];

/// The device's configuration: hubd connects to the device's own mosquitto; short report
/// intervals, so a test sees a change within a fifth of a second; file:// modules from the
/// sample's directory only.
const AGENT_TOML: &str = "# Written by the booted-device tests.\n\
[hub]\n\
mqtt_host = \"127.0.0.1\"\n\
mqtt_port = 1883\n\
report_status_interval_min_ms = 200\n\
report_status_interval_max_ms = 10000\n\
[reconciler]\n\
file_url_dirs = [\"/usr/local/lib/evp-sample\"]\n";

/// The workspace's version, the package [`BootedDevice::install_agent`] installs.
pub const WORKSPACE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Debian package `version` of the workspace's debug binaries
/// (`packaging/build-deb --debug --version V --out target/booted/deb`), made at most once per
/// test run: under a file lock (parallel test binaries), and again only when a binary or a
/// packaged file is newer than the package.
pub fn package(version: &str) -> Result<PathBuf> {
    static MADE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let out = target_dir().join("booted/deb");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let arch = run(Command::new("dpkg").arg("--print-architecture"))?;
    let deb = out.join(format!("evp-agent_{version}_{}.deb", arch.trim()));
    if made.iter().any(|v| v == version) {
        return Ok(deb);
    }
    let lock_path = out.join("build.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let built = std::fs::metadata(&deb).and_then(|m| m.modified()).ok();
    if built.is_none_or(|b| newest_input().is_ok_and(|n| n > b)) {
        let started = Instant::now();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-deb");
        run(Command::new(&script)
            .args(["--debug", "--version", version, "--out"])
            .arg(&out))
        .context("packaging/build-deb --debug")?;
        eprintln!("booted: built {} in {:?}", deb.display(), started.elapsed());
    }
    made.push(version.to_owned());
    Ok(deb)
}

/// When the newest of what goes into the package changed: the debug binaries, and the files
/// of `systemd/`, `packaging/` and `sdk/python/evp`.
fn newest_input() -> Result<std::time::SystemTime> {
    fn walk(path: &Path, newest: &mut std::time::SystemTime) -> Result<()> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        *newest = (*newest).max(meta.modified()?);
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                walk(&entry?.path(), newest)?;
            }
        }
        Ok(())
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = std::time::UNIX_EPOCH;
    for dir in ["systemd", "packaging", "sdk/python/evp"] {
        walk(&root.join(dir), &mut newest)?;
    }
    for binary in BINARIES {
        walk(&crate::bin_dir().join(binary), &mut newest)?;
    }
    Ok(newest)
}

/// Each unit, its bus name and object, its interface, and the user it runs as.
pub const DAEMONS: [(&str, &str, &str, &str, &str); 5] = [
    (
        "evp-hubd",
        "org.evp.Hub1",
        "/org/evp/Hub1",
        "org.evp.Hub1",
        "evp-hub",
    ),
    (
        "evp-reconcilerd",
        "org.evp.Reconciler1",
        "/org/evp/Reconciler1",
        "org.evp.Reconciler1",
        "evp-reconciler",
    ),
    (
        "evp-runtimed-wasm",
        "org.evp.Runtime1.Wasm",
        "/org/evp/Runtime1/Wasm",
        "org.evp.Runtime1",
        "evp-wasm",
    ),
    (
        "evp-runtimed-container",
        "org.evp.Runtime1.Container",
        "/org/evp/Runtime1/Container",
        "org.evp.Runtime1",
        "evp-container",
    ),
    (
        "evp-sdk-broker",
        "org.evp.SdkBroker1",
        "/org/evp/SdkBroker1",
        "org.evp.SdkBroker1",
        "evp-sdk",
    ),
];

/// systemd's range for dynamic users, runtimed-container's default instance uids.
pub const INSTANCE_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

/// Where the sample module is copied on the device; reconcilerd fetches it from there.
pub const SAMPLE_PATH: &str = "/usr/local/lib/evp-sample/evp-sample-module";

/// A booted device with the agent installed ([`BootedDevice::install_agent`]) and every unit
/// active, its bus name owned; each phase's time on stderr.
pub async fn device_with_agent() -> BootedDevice {
    let started = Instant::now();
    let image = image().unwrap();
    eprintln!("booted: image ready in {:?}", started.elapsed());
    let device = BootedDevice::start(&image).unwrap();
    device.wait_running().unwrap();
    eprintln!(
        "booted: {} running after {:?}",
        device.name(),
        started.elapsed()
    );
    let installed = device.install_agent(&crate::bin_dir()).unwrap();
    eprintln!(
        "booted: agent installed ({installed:?}) after {:?}",
        started.elapsed()
    );
    device.wait_serving().await;
    eprintln!("booted: agent active after {:?}", started.elapsed());
    device
}

impl BootedDevice {
    /// Waits until every unit is active and its bus name owned; panics with the unit's
    /// report otherwise.
    pub async fn wait_serving(&self) {
        for (unit, name, ..) in DAEMONS {
            let active = crate::wait_for(&format!("{unit} active"), BOOT_DEADLINE, async || {
                let state = self.unit_property(unit, "ActiveState").ok()?;
                matches!(state.as_str(), "active" | "failed").then_some(state)
            })
            .await;
            assert!(
                active.as_ref().is_ok_and(|s| s == "active"),
                "{unit} is not active ({active:?}):\n{}",
                self.unit_report(unit)
            );
            let owned = crate::wait_for(&format!("{name} on the bus"), BOOT_DEADLINE, async || {
                self.owns(name).then_some(())
            })
            .await;
            assert!(
                owned.is_ok(),
                "{name} is not on the system bus:\n{}",
                self.unit_report(unit)
            );
        }
    }

    /// Whether bus name `name` has an owner (`busctl status`).
    pub fn owns(&self, name: &str) -> bool {
        self.exec(&["busctl", "status", name])
            .is_ok_and(|o| o.status.success())
    }

    /// `unit`'s main process, 0 when it has none.
    pub fn main_pid(&self, unit: &str) -> Result<u32> {
        Ok(self.unit_property(unit, "MainPID")?.parse()?)
    }

    /// The processes of runtimed-container's unit that run under an instance uid, with it.
    pub fn instance_processes(&self) -> Vec<(u32, u32)> {
        self.pids_of("evp-runtimed-container")
            .unwrap()
            .into_iter()
            .filter_map(|pid| Some((pid, self.uid_of(pid).ok()?)))
            .filter(|(_, uid)| INSTANCE_UIDS.contains(uid))
            .collect()
    }

    /// The process (pid, uid) of `instance`: the instance process whose SDK socket is
    /// `<instance>.sock`.
    pub fn instance_process(&self, instance: &str) -> Option<(u32, u32)> {
        let socket = format!(
            "{}=/run/evp/sdk/{instance}.sock",
            evp_schemas::instance::ENV_SDK_SOCKET
        );
        self.instance_processes().into_iter().find(|(pid, _)| {
            self.exec(&["cat", &format!("/proc/{pid}/environ")])
                .is_ok_and(|o| o.stdout.split(|b| *b == 0).any(|v| v == socket.as_bytes()))
        })
    }

    /// Copies the workspace's sample module to [`SAMPLE_PATH`]; its SHA-256.
    pub fn copy_sample(&self) -> Result<String> {
        let sample = crate::bin_dir().join("evp-sample-module");
        self.exec_ok(&["mkdir", "-p", "/usr/local/lib/evp-sample"])?;
        self.copy_in(&sample, SAMPLE_PATH)?;
        Ok(hex::encode(Sha256::digest(std::fs::read(&sample)?)))
    }

    /// The journal of `unit` as JSON entries (`journalctl -u UNIT -o json`).
    pub fn journal_json(&self, unit: &str) -> Result<Vec<serde_json::Value>> {
        let out = self.exec_ok(&["journalctl", "-u", unit, "--no-pager", "-o", "json"])?;
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// A deployment `id` of `instances`, each an instance of the sample module (SHA-256 `hash`,
/// at [`SAMPLE_PATH`]).
pub fn sample_deployment(id: &str, instances: &[&str], hash: &str) -> serde_json::Value {
    let specs: serde_json::Map<String, serde_json::Value> = instances
        .iter()
        .map(|i| {
            let spec = serde_json::json!({"moduleId": "sample", "publish": {}, "subscribe": {}});
            ((*i).to_owned(), spec)
        })
        .collect();
    serde_json::json!({
        "deploymentId": id,
        "instanceSpecs": specs,
        "modules": {"sample": {
            "moduleImpl": "spawn", "entryPoint": "main",
            "downloadUrl": format!("file://{SAMPLE_PATH}"), "hash": hash,
        }},
        "publishTopics": {}, "subscribeTopics": {},
    })
}

/// Waits for a status report newer than `after` (a [`HubSide::status_count`]) with the
/// deployment `id` `ok` and each of `instances` `ok`; panics with every unit's report
/// otherwise.
pub async fn wait_instances_ok(
    hub: &HubSide,
    device: &BootedDevice,
    id: &str,
    instances: &[&str],
    after: u64,
    why: &str,
) {
    let ok = crate::wait_for(
        &format!("{instances:?} ok {why}"),
        BOOT_DEADLINE,
        async || {
            let status = hub.latest_status()?;
            let d = &status["deploymentStatus"];
            (hub.status_count() > after
                && d["deploymentId"] == id
                && d["reconcileStatus"] == "ok"
                && instances
                    .iter()
                    .all(|i| d["instances"][i]["status"] == "ok"))
            .then_some(())
        },
    )
    .await;
    if ok.is_err() {
        let reports: Vec<String> = DAEMONS.iter().map(|d| device.unit_report(d.0)).collect();
        panic!(
            "{instances:?} not ok {why}; last status {:#}\n{}",
            hub.latest_status().unwrap_or_default(),
            reports.join("\n")
        );
    }
}

/// A device with the agent, a hub driver on its broker, and the deployment `id` of the
/// sample's `instances` applied and `ok`.
pub async fn device_running_samples(id: &str, instances: &[&str]) -> (BootedDevice, HubSide) {
    let device = device_with_agent().await;
    let hash = device.copy_sample().unwrap();
    let hub = HubSide::connect(&device.broker_url().unwrap())
        .await
        .unwrap();
    hub.deploy(&sample_deployment(id, instances, &hash))
        .await
        .unwrap();
    wait_instances_ok(&hub, &device, id, instances, 0, "after the deployment").await;
    (device, hub)
}
