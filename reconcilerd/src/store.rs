//! What reconcilerd keeps on disk: the desired deployment (written crash-safely) and the module
//! cache, where every module file is named by its SHA-256 once verified.

use std::io::Write;
use std::path::{Path, PathBuf};

use evp_schemas::Deployment;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// Failures of the desired-deployment file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Writing the new desired deployment failed; the previous one is still in place.
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The desired deployment on disk, `<dir>/desired.json`.
#[derive(Debug, Clone)]
pub struct DesiredStore {
    dir: PathBuf,
}

/// Name of the desired deployment file inside the store's directory.
const DESIRED_FILE: &str = "desired.json";

impl DesiredStore {
    /// A store in `dir`, which must exist.
    pub fn new(dir: PathBuf) -> Self {
        DesiredStore { dir }
    }

    /// Path of the desired deployment file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(DESIRED_FILE)
    }

    /// Reads the last desired deployment. A missing file is `None`; an unreadable or invalid
    /// one is logged, moved aside for inspection, and also `None` (the device then waits for
    /// the hub rather than running something it cannot trust).
    pub fn load(&self) -> Option<Deployment> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!("cannot read {}: {e}", path.display());
                return None;
            }
        };
        match Deployment::from_json(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                let aside = self.dir.join("desired.json.invalid");
                warn!(
                    "{} is not a valid deployment ({e}); moved to {}",
                    path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&path, aside);
                None
            }
        }
    }

    /// Replaces the desired deployment atomically: a temporary file is written and synced,
    /// renamed over the old one, and the directory synced, so after a power cut the file holds
    /// either the old or the new deployment, never a mix.
    pub fn save(&self, deployment: &Deployment) -> Result<(), StoreError> {
        let path = self.path();
        write_atomically(&path, deployment.to_json().as_bytes())
            .map_err(|source| StoreError::Write { path, source })
    }
}

/// Writes `bytes` to `path` with temp file, fsync, rename and directory fsync.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Why a module could not be fetched. The `Display` texts of the first two are EVP's own
/// failure messages, which hubs may already show to operators.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The file's SHA-256 is not the manifest's `hash` (or the hash is not 64 hex digits).
    #[error("Module hash mismatch")]
    HashMismatch,
    /// The server answered with a non-success status.
    #[error("Download failed HTTP Response = {0}")]
    HttpStatus(u16),
    /// The transfer failed (connection refused, reset, timeout).
    #[error("Download failed: {0}")]
    Transfer(String),
    /// The URL scheme is not `http`, `https` or `file`.
    #[error("unsupported download URL {0:?}")]
    UnsupportedScheme(String),
    /// Reading the source file or writing the cache failed.
    #[error("Error when saving module: {0}")]
    Io(#[from] std::io::Error),
}

/// Module files named by their verified SHA-256, shared read-only with the runtimes.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
    http: reqwest::Client,
}

/// Length of a SHA-256 in hex digits.
const SHA256_HEX_LEN: usize = 64;

impl ModuleCache {
    /// A cache in `dir`, which must exist.
    pub fn new(dir: PathBuf) -> anyhow::Result<Self> {
        // One process-wide TLS provider, chosen explicitly: ring builds without cmake or nasm.
        // Installing it twice is harmless (the second call is refused).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .tls_backend_rustls()
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))?;
        Ok(ModuleCache { dir, http })
    }

    /// Path of the verified module file with this hash (which may not exist yet).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Returns the cached file with this hash, downloading `url` into the cache first if it
    /// is not there. Nothing is written under the final name unless its hash matched.
    pub async fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, FetchError> {
        let sha256 = sha256.to_ascii_lowercase();
        if sha256.len() != SHA256_HEX_LEN || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(FetchError::HashMismatch);
        }
        let target = self.path_of(&sha256);
        if target.exists() {
            return Ok(target);
        }
        let partial = self.dir.join(format!("{sha256}.partial"));
        let result = self.download(url, &partial).await;
        let got = match result {
            Ok(got) => got,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        };
        if got != sha256 {
            let _ = tokio::fs::remove_file(&partial).await;
            warn!("module from {url}: expected SHA-256 {sha256}, got {got}");
            return Err(FetchError::HashMismatch);
        }
        set_module_mode(&partial)?;
        tokio::fs::rename(&partial, &target).await?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        info!("module {sha256} cached from {url}");
        Ok(target)
    }

    /// Copies or downloads `url` into `partial`, returning the hex SHA-256 of what was written.
    async fn download(&self, url: &str, partial: &Path) -> Result<String, FetchError> {
        let mut out = tokio::fs::File::create(partial).await?;
        let mut hasher = Sha256::new();
        if let Some(path) = url.strip_prefix("file://") {
            let mut src = tokio::fs::File::open(path).await?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut src, &mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).await?;
            }
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let mut response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| FetchError::Transfer(e.to_string()))?;
            if !response.status().is_success() {
                return Err(FetchError::HttpStatus(response.status().as_u16()));
            }
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| FetchError::Transfer(e.to_string()))?
            {
                hasher.update(&chunk);
                out.write_all(&chunk).await?;
            }
        } else {
            return Err(FetchError::UnsupportedScheme(url.to_owned()));
        }
        out.sync_all().await?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Module files are readable and executable by the runtimes (through the cache directory's
/// group), writable by nobody: a module never changes under a running instance.
fn set_module_mode(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o550))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[tokio::test]
    async fn file_url_is_cached_under_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.bin");
        std::fs::write(&src, b"module").unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir(&cache_dir).unwrap();
        let cache = ModuleCache::new(cache_dir).unwrap();
        let url = format!("file://{}", src.display());
        let path = cache
            .fetch(&url, &sha(b"module").to_uppercase())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"module");
        assert_eq!(path, cache.path_of(&sha(b"module")));
    }

    #[tokio::test]
    async fn wrong_hash_leaves_nothing_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.bin");
        std::fs::write(&src, b"module").unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir(&cache_dir).unwrap();
        let cache = ModuleCache::new(cache_dir.clone()).unwrap();
        let url = format!("file://{}", src.display());
        let e = cache.fetch(&url, &sha(b"other")).await.unwrap_err();
        assert_eq!(e.to_string(), "Module hash mismatch");
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0);
        // A hash of the wrong length is a mismatch too, as in EVP.
        let e = cache.fetch(&url, "abcd").await.unwrap_err();
        assert!(matches!(e, FetchError::HashMismatch));
    }

    #[test]
    fn desired_store_round_trips_and_sets_aside_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::new(dir.path().to_owned());
        assert!(store.load().is_none());
        let d = Deployment {
            deployment_id: Some("d1".into()),
            ..Default::default()
        };
        store.save(&d).unwrap();
        assert_eq!(store.load(), Some(d));
        std::fs::write(store.path(), b"{not json").unwrap();
        assert!(store.load().is_none());
        assert!(dir.path().join("desired.json.invalid").exists());
    }
}
