//! Deployment documents for the devhub: reading a manifest file, filling in the hash of
//! `file://` modules, and the bundled sample deployment.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The file name of the bundled sample module, next to `evp-devhub`.
pub const SAMPLE_BINARY: &str = "evp-sample-module";
/// The module id of the sample in the sample deployment.
pub const SAMPLE_MODULE_ID: &str = "sample";
/// The instances of the sample deployment: two, to show that instances of one module are
/// separate (each has its own workspace and tick count).
pub const SAMPLE_INSTANCES: [&str; 2] = ["sample-1", "sample-2"];

/// The URL scheme of modules copied from the local file system.
const FILE_SCHEME: &str = "file://";

/// Why a deployment document could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Where and why parsing failed.
        #[source]
        source: serde_json::Error,
    },
    /// The document is not a deployment.
    #[error("{0}")]
    Shape(String),
    /// A module's file is missing or unreadable.
    #[error("module {module}: cannot read its file {path}: {source}")]
    ModuleFile {
        /// The module id.
        module: String,
        /// The file named by its `downloadUrl`.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// The hex SHA-256 of a file's contents, read in blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    /// Read size: large enough to be fast, small enough never to matter for memory.
    const BLOCK: usize = 64 * 1024;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The manifest inside a document that is either the manifest itself or
/// `{"deployment": {...}}` (the PATCH shape).
pub fn unwrap_deployment(document: Value) -> Result<Value, ManifestError> {
    let Value::Object(mut object) = document else {
        return Err(ManifestError::Shape(
            "a deployment must be a JSON object (the manifest, or {\"deployment\": {...}})".into(),
        ));
    };
    let is_manifest = object.contains_key("instanceSpecs") || object.contains_key("modules");
    if !is_manifest && let Some(inner) = object.remove("deployment") {
        return match inner {
            Value::Object(_) => Ok(inner),
            other => Err(ManifestError::Shape(format!(
                "\"deployment\" must be an object, found {other}"
            ))),
        };
    }
    if !is_manifest {
        return Err(ManifestError::Shape(
            "no \"instanceSpecs\" or \"modules\": this is not a deployment manifest".into(),
        ));
    }
    Ok(Value::Object(object))
}

/// For every module whose `downloadUrl` is `file://<path>`: makes a relative path absolute
/// against `base_dir` (the daemons run elsewhere), checks the file is readable, and fills in
/// `hash` when it is absent, `null` or empty. Returns the ids of the modules it hashed.
pub fn fill_file_hashes(
    manifest: &mut Value,
    base_dir: &Path,
) -> Result<Vec<String>, ManifestError> {
    let mut hashed = Vec::new();
    let Some(modules) = manifest.get_mut("modules").and_then(Value::as_object_mut) else {
        return Ok(hashed);
    };
    for (id, module) in modules.iter_mut() {
        let Some(module) = module.as_object_mut() else {
            continue;
        };
        let Some(rest) = module
            .get("downloadUrl")
            .and_then(Value::as_str)
            .and_then(|u| u.strip_prefix(FILE_SCHEME))
        else {
            continue;
        };
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        let path = if Path::new(rest).is_absolute() {
            PathBuf::from(rest)
        } else {
            base_dir.join(rest)
        };
        let file_error = |source| ManifestError::ModuleFile {
            module: id.clone(),
            path: path.clone(),
            source,
        };
        let metadata = std::fs::metadata(&path).map_err(file_error)?;
        if !metadata.is_file() {
            return Err(file_error(std::io::Error::other("not a regular file")));
        }
        module.insert(
            "downloadUrl".into(),
            Value::String(format!("{FILE_SCHEME}{}", path.display())),
        );
        let has_hash = module
            .get("hash")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty());
        if !has_hash {
            let hash = sha256_file(&path).map_err(file_error)?;
            module.insert("hash".into(), Value::String(hash));
            hashed.push(id.clone());
        }
    }
    Ok(hashed)
}

/// Reads a deployment file (the manifest, or `{"deployment": {...}}`) and prepares it with
/// [`fill_file_hashes`], relative paths resolved against the file's folder.
pub fn read_deployment_file(path: &Path) -> Result<Value, ManifestError> {
    let text = std::fs::read(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let document: Value = serde_json::from_slice(&text).map_err(|source| ManifestError::Json {
        path: path.to_owned(),
        source,
    })?;
    let mut manifest = unwrap_deployment(document)?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    fill_file_hashes(&mut manifest, &base)?;
    Ok(manifest)
}

/// The bundled sample deployment: the `spawn` module at `module_path` (absolute) and its
/// [`SAMPLE_INSTANCES`]. The deployment id carries the start of the hash, so deploying the
/// same binary again changes nothing and a rebuilt one is a new deployment.
pub fn sample_deployment(module_path: &Path) -> Result<Value, ManifestError> {
    let hash = sha256_file(module_path).map_err(|source| ManifestError::ModuleFile {
        module: SAMPLE_MODULE_ID.into(),
        path: module_path.to_owned(),
        source,
    })?;
    let instances: serde_json::Map<String, Value> = SAMPLE_INSTANCES
        .iter()
        .map(|name| {
            (
                (*name).to_owned(),
                json!({ "moduleId": SAMPLE_MODULE_ID, "publish": {}, "subscribe": {} }),
            )
        })
        .collect();
    Ok(json!({
        "deploymentId": format!("devhub-sample-{}", &hash[..12]),
        "instanceSpecs": instances,
        "modules": {
            SAMPLE_MODULE_ID: {
                "moduleImpl": "spawn",
                "entryPoint": "main",
                "downloadUrl": format!("{FILE_SCHEME}{}", module_path.display()),
                "hash": hash,
            }
        },
        "publishTopics": {},
        "subscribeTopics": {},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256 of the three bytes `abc` (FIPS 180-2's first example).
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn both_document_shapes_give_the_manifest() {
        let m = json!({"instanceSpecs": {}, "modules": {}});
        assert_eq!(unwrap_deployment(m.clone()).unwrap(), m);
        assert_eq!(
            unwrap_deployment(json!({"deployment": m.clone()})).unwrap(),
            m
        );
        assert!(unwrap_deployment(json!({"deployment": 3})).is_err());
        assert!(unwrap_deployment(json!({"other": 1})).is_err());
        assert!(unwrap_deployment(json!([1])).is_err());
    }

    #[test]
    fn file_modules_get_their_hash_and_an_absolute_url() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.bin"), b"abc").unwrap();
        let mut manifest = json!({
            "modules": {
                "relative": {"moduleImpl": "spawn", "entryPoint": "main", "downloadUrl": "file://m.bin"},
                "kept": {"moduleImpl": "spawn", "entryPoint": "main",
                         "downloadUrl": format!("file://{}/m.bin", dir.path().display()), "hash": "00"},
                "remote": {"moduleImpl": "wasm", "entryPoint": "main", "downloadUrl": "https://x/y"},
            },
            "instanceSpecs": {}
        });
        let hashed = fill_file_hashes(&mut manifest, dir.path()).unwrap();
        assert_eq!(hashed, vec!["relative".to_owned()]);
        let m = &manifest["modules"];
        assert_eq!(m["relative"]["hash"], ABC_SHA256);
        assert_eq!(
            m["relative"]["downloadUrl"],
            format!("file://{}/m.bin", dir.path().display())
        );
        assert_eq!(m["kept"]["hash"], "00");
        assert!(m["remote"].get("hash").is_none());
    }

    #[test]
    fn a_missing_module_file_names_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = json!({"modules": {"gone": {"downloadUrl": "file:///no/such/file"}}});
        let e = fill_file_hashes(&mut manifest, dir.path()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("gone") && text.contains("/no/such/file"),
            "{text}"
        );
    }

    #[test]
    fn deployment_files_report_bad_json_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        std::fs::write(&path, "{ not json").unwrap();
        let text = read_deployment_file(&path).unwrap_err().to_string();
        assert!(
            text.contains("d.json") && text.contains("not valid JSON"),
            "{text}"
        );
        let text = read_deployment_file(&dir.path().join("absent.json"))
            .unwrap_err()
            .to_string();
        assert!(text.contains("cannot read"), "{text}");
    }

    #[test]
    fn the_sample_deployment_is_valid_for_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(SAMPLE_BINARY);
        std::fs::write(&bin, b"abc").unwrap();
        let d = sample_deployment(&bin).unwrap();
        assert_eq!(d["modules"][SAMPLE_MODULE_ID]["hash"], ABC_SHA256);
        assert_eq!(d["deploymentId"], "devhub-sample-ba7816bf8f01");
        // The agent's own decoder accepts it.
        let changes = evp_schemas::HubCodec::decode_attribute_update(
            &evp_schemas::evp2::Evp2Codec,
            json!({ "deployment": d }).to_string().as_bytes(),
        );
        assert!(
            matches!(
                changes.as_slice(),
                [evp_schemas::DesiredChange::Deployment(_)]
            ),
            "{changes:?}"
        );
    }
}
