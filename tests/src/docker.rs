//! Docker test images, made here from a root filesystem the test builds: a workspace test
//! module with the shared libraries it links (from `ldd`), imported with `docker import`. No
//! image is pulled: this machine reaches no registry, and a test must not leave it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// Runs the `docker` client with `args`, failing with its stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running the docker client (apt-get install docker.io)")?;
    ensure!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Fails with the reason when the Docker engine cannot be used here, so no docker test passes
/// by skipping.
pub fn require_engine() -> Result<()> {
    docker(&["version", "--format", "{{.Server.Version}}"])
        .map(drop)
        .context("the docker tests need a running Docker engine at /var/run/docker.sock")
}

/// The files `binary` needs at run time: itself and what `ldd` lists (the dynamic loader
/// included), by absolute path.
fn closure(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    ensure!(out.status.success(), "ldd {}", binary.display());
    let mut files = vec![binary.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push(PathBuf::from(p));
        }
    }
    Ok(files)
}

/// Builds image `tag` whose entry point is `binary` (at `/module`), from a root filesystem of
/// that binary and its libraries. Replaces an image of that tag.
pub fn import_module_image(tag: &str, binary: &Path, work: &Path) -> Result<()> {
    let root = work.join(format!("rootfs-{}", tag.replace(['/', ':'], "-")));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for file in closure(binary)? {
        let inside = if file == binary {
            root.join("module")
        } else {
            root.join(file.strip_prefix("/")?)
        };
        std::fs::create_dir_all(inside.parent().context("a file has a folder")?)?;
        std::fs::copy(&file, &inside).with_context(|| format!("copying {}", file.display()))?;
    }
    // Where a module's own files and a terminal's name may go.
    std::fs::create_dir_all(root.join("tmp"))?;
    std::fs::create_dir_all(root.join("evp"))?;
    let tarball = work.join(format!("{}.tar", tag.replace(['/', ':'], "-")));
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar of {}", root.display());
    let tarball = tarball.to_string_lossy().into_owned();
    docker(&[
        "import",
        "--change",
        r#"ENTRYPOINT ["/module"]"#,
        &tarball,
        tag,
    ])?;
    Ok(())
}

/// Saves image `tag` as a `docker save` archive at `path` (an air-gapped module file).
pub fn save_image(tag: &str, path: &Path) -> Result<()> {
    let path = path.to_string_lossy();
    docker(&["save", "-o", &path, tag]).map(drop)
}

/// Removes image `tag` (and nothing else); absent is fine.
pub fn remove_image(tag: &str) {
    let _ = docker(&["rmi", "-f", tag]);
}

/// The id of the running container named `name`, if any.
pub fn running_container(name: &str) -> Option<String> {
    let id = docker(&[
        "ps",
        "--filter",
        &format!("name=^{name}$"),
        "--format",
        "{{.ID}}",
    ])
    .ok()?;
    (!id.is_empty()).then_some(id)
}

/// Inspects container `name` with a Go template (`{{.HostConfig.NetworkMode}}`).
pub fn inspect(name: &str, template: &str) -> Result<String> {
    docker(&["inspect", "--format", template, name])
}

/// Removes every container the agent labelled, whatever test left it.
pub fn remove_agent_containers(instances: &[&str]) {
    for name in instances {
        let _ = docker(&["rm", "-f", name]);
    }
}

/// Fails unless `tag` is present.
pub fn has_image(tag: &str) -> Result<()> {
    match docker(&["image", "inspect", "--format", "{{.Id}}", tag]) {
        Ok(_) => Ok(()),
        Err(e) => bail!("image {tag} is missing: {e}"),
    }
}

/// A stand-in for the engine's socket that the test can cut and bring back: each connection
/// to it is relayed to the real engine's socket. Cutting it closes every connection and the
/// socket, as an engine that stops does to its clients.
pub struct EngineProxy {
    path: PathBuf,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// The real engine's socket.
const ENGINE_SOCKET: &str = "/var/run/docker.sock";

impl EngineProxy {
    /// A proxy at `path`, already serving.
    pub fn start(path: &Path) -> Result<EngineProxy> {
        let mut proxy = EngineProxy {
            path: path.to_path_buf(),
            server: None,
        };
        proxy.resume()?;
        Ok(proxy)
    }

    /// Serves the socket again.
    pub fn resume(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path)
            .with_context(|| format!("binding {}", self.path.display()))?;
        self.server = Some(tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                relays.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect(ENGINE_SOCKET).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        }));
        Ok(())
    }

    /// Closes the socket and every connection through it (aborting the server aborts its
    /// relays, which its `JoinSet` owns).
    pub fn cut(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
