//! The `python` kind: the module file is a zip with `__main__.py` at its root, run with the
//! Python interpreter as EVP does (`python <module file>`), otherwise a spawned process like
//! any other (own uid, log relay, re-adoption by pidfd). The agent's pure-Python `evp.app`
//! SDK (`sdk/python`) is on the module's import path, so a module ships only its own code.

use std::ffi::OsString;
use std::path::PathBuf;

use evp_schemas::ModuleImpl;
use evp_schemas::dbus::EvpError;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::logs::LogPolicy;
use crate::runtime::{AdoptSpec, Adoption, Runtime, StartSpec, Started};
use crate::spawn::{self, Launch};

/// The kind name, as EVP's `moduleImpl`.
pub const KIND: &str = ModuleImpl::Python.as_str();
/// The file Python runs in a zip, as `python -m zipfile -c m.zip __main__.py` makes it.
const MAIN: &str = "__main__.py";
/// `argv[0]` of the interpreter, as EVP passes it.
const ARG0: &str = "python";
/// The environment a python module gets besides the SDK's variables: what Python needs to run
/// predictably, and the variables `evp.app.blob` reads (EVP passes the agent's whole
/// environment; this passes only these, so nothing of the daemon's leaks to a module).
const PASSED_THROUGH: [&str; 7] = [
    "EVP_HTTPS_CA_CERT",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];
/// `PATH` of a python module: the system's usual directories, not the daemon's.
pub const MODULE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Runs `python` modules.
#[derive(Debug)]
pub struct PythonRuntime {
    logs: LogPolicy,
    /// The interpreter, resolved when the daemon started.
    interpreter: PathBuf,
    /// Folders put first on the module's `PYTHONPATH`: where the `evp.app` SDK (and the
    /// `flatbuffers` package it needs) are installed.
    sdk_path: Vec<PathBuf>,
}

impl PythonRuntime {
    /// A runtime running modules with `interpreter` and the SDK at `sdk_path`.
    pub fn new(logs: LogPolicy, interpreter: PathBuf, sdk_path: Vec<PathBuf>) -> PythonRuntime {
        PythonRuntime {
            logs,
            interpreter,
            sdk_path,
        }
    }
}

/// `name` as found on `path` (a `PATH` value), or `name` itself when it has a slash or is not
/// found (the start then fails with the reason).
pub fn find_program(name: &str, path: Option<&std::ffi::OsStr>) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A python module file must be a zip holding `__main__.py` at its root.
fn zip_with_main(
    module_id: &str,
    path: &str,
    file: &mut std::fs::File,
    _: &std::fs::Metadata,
) -> Result<(), EvpError> {
    let archive = zip::ZipArchive::new(file).map_err(|e| {
        EvpError::InvalidArgument(format!(
            "module {module_id}: {path} is not a zip archive ({e}); a python module is a zip \
             with {MAIN} at its root"
        ))
    })?;
    if archive.index_for_name(MAIN).is_none() {
        return Err(EvpError::InvalidArgument(format!(
            "module {module_id}: {path} has no {MAIN} at its root"
        )));
    }
    Ok(())
}

impl Runtime for PythonRuntime {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn load<'a>(
        &'a self,
        module_id: &'a str,
        location: &'a str,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<(), EvpError>> {
        spawn::verify_module_file(module_id, location, sha256, zip_with_main).boxed()
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, String>> {
        async move {
            let module = spawn::module_for(&spec)?;
            let mut env = vec![
                ("PATH".to_owned(), MODULE_PATH.to_owned()),
                // Output reaches the log line by line, not when a buffer fills.
                ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
                ("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()),
                ("LANG".to_owned(), "C.UTF-8".to_owned()),
                (
                    "HOME".to_owned(),
                    spec.workspace.to_string_lossy().into_owned(),
                ),
            ];
            if let Ok(joined) = std::env::join_paths(&self.sdk_path) {
                env.push((
                    "PYTHONPATH".to_owned(),
                    joined.to_string_lossy().into_owned(),
                ));
            }
            env.extend(
                PASSED_THROUGH
                    .iter()
                    .filter_map(|k| Some(((*k).to_owned(), std::env::var(k).ok()?))),
            );
            let launch = Launch {
                program: self.interpreter.clone(),
                arg0: ARG0.to_owned(),
                args: vec![OsString::from(module)],
                env,
            };
            spawn::spawn(spec, &self.logs, launch)
        }
        .boxed()
    }

    fn adopt(&self, spec: AdoptSpec) -> BoxFuture<'_, Result<Adoption, String>> {
        std::future::ready(spawn::adopt(spec)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn zip_of(files: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let mut out = tempfile::NamedTempFile::new().unwrap();
        {
            let mut zip = zip::ZipWriter::new(out.as_file_mut());
            for (name, body) in files {
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored);
                zip.start_file(*name, options).unwrap();
                zip.write_all(body.as_bytes()).unwrap();
            }
            zip.finish().unwrap();
        }
        out
    }

    fn check(file: &tempfile::NamedTempFile) -> Result<(), String> {
        let path = file.path().to_string_lossy().into_owned();
        let mut f = std::fs::File::open(file.path()).unwrap();
        let meta = f.metadata().unwrap();
        zip_with_main("m", &path, &mut f, &meta).map_err(|e| e.to_string())
    }

    #[test]
    fn a_module_is_a_zip_with_main_at_its_root() {
        assert_eq!(check(&zip_of(&[("__main__.py", "print(1)")])), Ok(()));
        let nested = check(&zip_of(&[("app/__main__.py", "print(1)")])).unwrap_err();
        assert!(
            nested.contains("has no __main__.py at its root"),
            "{nested}"
        );
        let mut text = tempfile::NamedTempFile::new().unwrap();
        text.write_all(b"print('not a zip')").unwrap();
        let not_zip = check(&text).unwrap_err();
        assert!(not_zip.contains("is not a zip archive"), "{not_zip}");
    }

    #[test]
    fn the_interpreter_is_found_on_the_path() {
        let found = find_program(
            "sh",
            Some(std::ffi::OsStr::new("/nonexistent:/bin:/usr/bin")),
        );
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        assert_eq!(
            find_program("/opt/py/bin/python3", None),
            PathBuf::from("/opt/py/bin/python3")
        );
        assert_eq!(
            find_program("nope-no-such", Some(std::ffi::OsStr::new("/bin"))),
            PathBuf::from("nope-no-such")
        );
    }
}
