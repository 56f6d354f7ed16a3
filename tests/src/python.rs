//! Python modules for the system tests: the zips of `sdk/python/test-modules/<name>/`
//! (`__main__.py` at the root, as `python -m zipfile -c` makes them), written by the tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `sdk/python` of this workspace.
pub fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/python")
}

/// Zips test module `name` into `<dir>/<name>.zip` and returns it as a deployment's module
/// entry (`file://` URL and SHA-256).
pub fn test_module(name: &str, dir: &Path) -> Result<Value> {
    let source = sdk_dir().join("test-modules").join(name);
    let zip_path = dir.join(format!("{name}.zip"));
    let file = std::fs::File::create(&zip_path)?;
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for entry in std::fs::read_dir(&source).with_context(|| format!("{}", source.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("py") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("a file name")?;
        zip.start_file(name, options)?;
        zip.write_all(&std::fs::read(&path)?)?;
    }
    zip.finish()?;
    let bytes = std::fs::read(&zip_path)?;
    Ok(json!({
        "moduleImpl": "python",
        "entryPoint": "main",
        "downloadUrl": format!("file://{}", zip_path.display()),
        "hash": hex::encode(Sha256::digest(&bytes)),
    }))
}
