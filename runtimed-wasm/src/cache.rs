//! The on-disk cache of compiled modules, so a module is compiled once per engine and reused
//! across restarts of runtimed-wasm.
//!
//! An entry is two files named `<module sha256>-<engine key>`: `.cwasm`, wasmtime's compiled
//! code, and `.meta`, the SHA-256 of that file and the module's [`ModuleInfo`]. The engine key
//! is a digest of the wasmtime version and [`wasmtime::Engine::precompile_compatibility_hash`],
//! which covers the target, the host CPU features the code uses and the engine's config, so
//! code compiled by another engine is not looked up (and wasmtime refuses it anyway). Both
//! files are written with [`evp_daemon::write_atomic`], `.meta` last; an entry whose digest
//! does not match (torn write, disk corruption, a foreign file) is compiled again, never run.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use crate::loader::{self, LoadError, ModuleInfo};

/// Bumped when the entry layout changes, so older entries are ignored rather than misread.
const ENTRY_FORMAT: u32 = 1;
/// The wasmtime in Cargo.lock (a test keeps the two equal): wasmtime has no public constant
/// for it, and its compatibility hash names the version strategy, not the version.
const WASMTIME_VERSION: &str = "48.0.8";
const CODE_SUFFIX: &str = "cwasm";
const META_SUFFIX: &str = "meta";
/// How [`evp_daemon::fs::temp_path`] marks a file being written; leftovers from a crash are
/// removed by [`ModuleCache::new`].
const TEMP_SUFFIX: &str = ".tmp";
/// Entries are readable and writable by the daemon's user only, like their directory.
const FILE_MODE: u32 = 0o600;

/// How [`ModuleCache::load`] got the module, for the runtime's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Deserialized from a verified entry; nothing was compiled.
    Hit,
    /// There was no entry for this module and engine; compiled and cached.
    Compiled,
    /// An entry existed but could not be used; compiled again and replaced.
    Recompiled {
        /// What was wrong with the entry.
        why: String,
    },
}

/// A compiled module and what the host needs to know about it.
#[derive(Debug)]
pub struct CachedModule {
    /// The module, ready to instantiate in a store of the engine it was loaded with.
    pub module: Module,
    /// Its table export, memory and thread imports.
    pub info: ModuleInfo,
    /// Whether it came from the cache.
    pub outcome: CacheOutcome,
}

/// The `.meta` file of an entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct EntryMeta {
    format: u32,
    /// SHA-256 of the `.cwasm` file, in hex.
    code_sha256: String,
    info: ModuleInfo,
}

/// The compiled-module cache in one directory private to the daemon's user.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

impl ModuleCache {
    /// Opens the cache in `dir`, created or set to mode 0700; refuses a symbolic link and a
    /// directory owned by another user. Removes files left half-written by a crash.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, LoadError> {
        let dir = dir.into();
        let shown = dir.display().to_string();
        let dir_error = |message: String| LoadError::CacheDir {
            dir: shown.clone(),
            message,
        };
        // The owner is checked before the mode is set, so another user's directory is left
        // as it was.
        let existing =
            evp_daemon::fs::refuse_non_dir(&dir).map_err(|e| dir_error(e.to_string()))?;
        let euid = nix::unistd::geteuid().as_raw();
        if let Some(owner) = existing.map(|m| m.uid()).filter(|owner| *owner != euid) {
            return Err(dir_error(format!(
                "owned by uid {owner}, not by this daemon's uid {euid}"
            )));
        }
        evp_daemon::create_private_dir(&dir, 0o700).map_err(|e| dir_error(e.to_string()))?;
        let cache = ModuleCache { dir };
        for path in cache.files().map_err(|e| dir_error(e.to_string()))? {
            if file_name(&path).ends_with(TEMP_SUFFIX) {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The module whose SHA-256 is `hash_hex`, from the cache when an entry for `engine` is
    /// there and intact, else read from `wasm_path`, checked against the hash, prepared
    /// ([`loader::prepare`]), compiled and cached.
    pub fn load(
        &self,
        engine: &Engine,
        hash_hex: &str,
        wasm_path: &Path,
    ) -> Result<CachedModule, LoadError> {
        let hash = normalize_hash(hash_hex)?;
        let stem = format!("{hash}-{}", engine_key(engine));
        let code_path = self.dir.join(format!("{stem}.{CODE_SUFFIX}"));
        let meta_path = self.dir.join(format!("{stem}.{META_SUFFIX}"));
        let outcome = match self.open_entry(engine, &code_path, &meta_path) {
            Ok((module, info)) => {
                return Ok(CachedModule {
                    module,
                    info,
                    outcome: CacheOutcome::Hit,
                });
            }
            Err(EntryProblem::Absent) => CacheOutcome::Compiled,
            Err(EntryProblem::Unusable(why)) => CacheOutcome::Recompiled { why },
        };

        let wasm = fs::read(wasm_path).map_err(|e| LoadError::Read {
            path: wasm_path.display().to_string(),
            message: e.to_string(),
        })?;
        let actual = hex::encode(Sha256::digest(&wasm));
        if actual != hash {
            return Err(LoadError::HashMismatch {
                expected: hash,
                actual,
            });
        }
        let prepared = loader::prepare(&wasm)?;
        drop(wasm);
        let code = engine
            .precompile_module(&prepared.wasm)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        if let Err(e) = self.write_entry(&code_path, &meta_path, &code, &prepared.info) {
            // The cache only saves time: the module still runs, compiled again next time.
            tracing::warn!("compiled module {hash} is not cached: {e}");
        }
        // SAFETY: `code` is what `precompile_module` just produced in this process for this
        // engine, used from memory (not from the file, which another load may be replacing).
        let module = unsafe { Module::deserialize(engine, &code) }
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        Ok(CachedModule {
            module,
            info: prepared.info,
            outcome,
        })
    }

    /// Removes every entry of the module whose SHA-256 is `hash_hex` (for every engine);
    /// returns how many files went. A module that was never cached is not an error.
    pub fn remove(&self, hash_hex: &str) -> Result<usize, LoadError> {
        let hash = normalize_hash(hash_hex)?;
        let dir_error = |e: io::Error| LoadError::CacheDir {
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        };
        let prefix = format!("{hash}-");
        let mut removed = 0;
        for path in self.files().map_err(dir_error)? {
            if file_name(&path).starts_with(&prefix) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(dir_error(e)),
                }
            }
        }
        Ok(removed)
    }

    fn files(&self) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(&self.dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }

    /// The entry's module, after checking the code file against the digest in `.meta`.
    fn open_entry(
        &self,
        engine: &Engine,
        code_path: &Path,
        meta_path: &Path,
    ) -> Result<(Module, ModuleInfo), EntryProblem> {
        let meta_text = match fs::read_to_string(meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !code_path.exists() => {
                return Err(EntryProblem::Absent);
            }
            Err(e) => return Err(EntryProblem::unusable("reading .meta", e)),
        };
        let meta: EntryMeta = serde_json::from_str(&meta_text)
            .map_err(|e| EntryProblem::unusable("parsing .meta", e))?;
        if meta.format != ENTRY_FORMAT {
            return Err(EntryProblem::Unusable(format!(
                "entry format {} (this build writes {ENTRY_FORMAT})",
                meta.format
            )));
        }
        let mut file =
            File::open(code_path).map_err(|e| EntryProblem::unusable("opening .cwasm", e))?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher)
            .map_err(|e| EntryProblem::unusable("reading .cwasm", e))?;
        let digest = hex::encode(hasher.finalize());
        if digest != meta.code_sha256 {
            return Err(EntryProblem::Unusable(format!(
                "compiled code digest {digest} does not match the recorded {}",
                meta.code_sha256
            )));
        }
        // SAFETY: wasmtime runs these bytes as machine code. They are the output of
        // `precompile_module` as written by this cache: the digest above matches the one
        // recorded when the entry was written, so a torn or corrupted file is not mapped, and
        // wasmtime itself refuses code from another version or config. What remains is that
        // someone rewrites both files consistently, or the file between this check and its
        // use; that takes write access to a directory that only the daemon's own user has
        // (see `new`), and that user can already replace the daemon's binary.
        let module = unsafe { Module::deserialize_open_file(engine, file) }
            .map_err(|e| EntryProblem::Unusable(format!("wasmtime refused the entry: {e:#}")))?;
        Ok((module, meta.info))
    }

    /// Writes the entry: code first, then `.meta` with the code's digest, so an entry is
    /// complete once its `.meta` is there.
    fn write_entry(
        &self,
        code_path: &Path,
        meta_path: &Path,
        code: &[u8],
        info: &ModuleInfo,
    ) -> Result<(), String> {
        let meta = EntryMeta {
            format: ENTRY_FORMAT,
            code_sha256: hex::encode(Sha256::digest(code)),
            info: info.clone(),
        };
        let meta = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        evp_daemon::write_atomic(code_path, code, FILE_MODE, None).map_err(|e| e.to_string())?;
        evp_daemon::write_atomic(meta_path, &meta, FILE_MODE, None).map_err(|e| e.to_string())
    }
}

/// Why an entry was not used.
enum EntryProblem {
    /// Neither file exists: a first load.
    Absent,
    /// Something exists but cannot be trusted or read.
    Unusable(String),
}

impl EntryProblem {
    fn unusable(what: &str, e: impl std::fmt::Display) -> Self {
        EntryProblem::Unusable(format!("{what}: {e}"))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The module hash in lowercase hex; anything else would make a file name outside the cache.
fn normalize_hash(hash_hex: &str) -> Result<String, LoadError> {
    if hash_hex.len() == 64 && hash_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hash_hex.to_ascii_lowercase())
    } else {
        Err(LoadError::BadHash(hash_hex.to_owned()))
    }
}

/// 16 hex digits naming the engine's compiled-code compatibility, entry format included.
fn engine_key(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    ENTRY_FORMAT.hash(&mut hasher);
    WASMTIME_VERSION.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}

/// Feeds a [`Hash`] into SHA-256, which unlike `DefaultHasher` is stable across Rust releases,
/// so an upgrade of the toolchain alone does not invalidate the cache.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

#[cfg(test)]
mod tests;
