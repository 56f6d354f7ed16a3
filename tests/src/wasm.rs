//! WASM test modules, built on demand into the target directory: the C modules of
//! `sdk/c/test-modules/` and of `sdk/c/bench-modules/` (the benchmarks', with their native
//! reference programs; clang for `wasm32-wasi` against `sdk/c/include/evp/sdk.h`) and the
//! Rust threads module of `sdk/wasm-threads-module/` (for `wasm32-wasip1-threads`). A module
//! is rebuilt only when its source or a header is newer than the built file. When a tool is
//! missing, the build fails naming the Debian package or rustup target that provides it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The clang flags every C module is built with: a WASI command (`_start` runs `main`) that
/// exports `malloc` and `free`, through which the agent hands data to callbacks. The SDK
/// functions need no `--allow-undefined`: the header gives each an `env` import name.
pub const C_FLAGS: [&str; 6] = [
    "--target=wasm32-wasi",
    "-O2",
    "-Wall",
    "-Werror",
    "-Wl,--export=malloc",
    "-Wl,--export=free",
];

/// The rustup target of the threads module.
pub const THREADS_TARGET: &str = "wasm32-wasip1-threads";

/// One build at a time in this process: tests of one binary run on threads. Builds of other
/// processes are kept apart by writing to a file of their own and renaming it.
static BUILDING: Mutex<()> = Mutex::new(());

/// The repository's root.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the built modules are kept: `target/<profile>/wasm-modules/`.
fn cache_dir() -> PathBuf {
    crate::bin_dir().join("wasm-modules")
}

/// `sdk/c/test-modules/<name>.c` built for `wasm32-wasi` with [`C_FLAGS`], as
/// `target/<profile>/wasm-modules/<name>.wasm`. Panics saying why when it cannot be built (a
/// missing tool is named by its Debian package).
pub fn build_c_module(name: &str) -> PathBuf {
    try_build_c_module(name).unwrap_or_else(|e| panic!("building the C module {name}: {e:#}"))
}

/// [`build_c_module`], as a `Result`.
pub fn try_build_c_module(name: &str) -> Result<PathBuf> {
    build_c_from("test-modules", name, Platform::Wasm)
}

/// `sdk/c/bench-modules/<name>.c` built as [`build_c_module`] builds a test module, for the
/// benchmarks; its headers there are inputs too.
pub fn try_build_bench_module(name: &str) -> Result<PathBuf> {
    build_c_from("bench-modules", name, Platform::Wasm)
}

/// The clang flags of a program built for this host, to compare with WASM.
pub const HOST_C_FLAGS: [&str; 3] = ["-O2", "-Wall", "-Werror"];

/// `sdk/c/bench-modules/<name>.c` built for this host with [`HOST_C_FLAGS`], as
/// `target/<profile>/wasm-modules/<name>`: the benchmarks' native reference.
pub fn try_build_bench_program(name: &str) -> Result<PathBuf> {
    build_c_from("bench-modules", name, Platform::Host)
}

/// What a C file is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    /// A WASM module, with [`C_FLAGS`] and the SDK header.
    Wasm,
    /// A program for this host, with [`HOST_C_FLAGS`].
    Host,
}

/// `sdk/c/<folder>/<name>.c` built for `platform` into `target/<profile>/wasm-modules/`,
/// unless the built file is newer than the source, the SDK header and the headers of the
/// test modules and of `folder`.
fn build_c_from(folder: &str, name: &str, platform: Platform) -> Result<PathBuf> {
    let sdk_c = repo_root().join("sdk/c");
    let modules = sdk_c.join(folder);
    let source = modules.join(format!("{name}.c"));
    anyhow::ensure!(source.exists(), "{} does not exist", source.display());
    let (flags, file): (&[&str], String) = match platform {
        Platform::Wasm => (&C_FLAGS, format!("{name}.wasm")),
        Platform::Host => (&HOST_C_FLAGS, name.to_owned()),
    };
    let out = cache_dir().join(&file);
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let mut inputs = vec![
        source.clone(),
        sdk_c.join("include/evp/sdk.h"),
        sdk_c.join("test-modules/test-module.h"),
    ];
    inputs.extend(headers_in(&modules)?);
    if is_fresh(&out, &inputs)? {
        return Ok(out);
    }
    match platform {
        Platform::Wasm => check_c_toolchain()?,
        Platform::Host => {
            run("clang", &["-dumpversion"])
                .map_err(|e| anyhow::anyhow!("clang is missing (apt-get install clang): {e}"))?;
        }
    }
    std::fs::create_dir_all(cache_dir())?;
    let partial = out.with_file_name(format!("{file}.{}", std::process::id()));
    let output = Command::new("clang")
        .args(flags)
        .arg("-I")
        .arg(sdk_c.join("include"))
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .output()
        .context("running clang")?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "clang failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::rename(&partial, &out)?;
    Ok(out)
}

/// The threads module (`sdk/wasm-threads-module`), built by cargo for
/// [`THREADS_TARGET`]. Panics saying why when it cannot be built.
pub fn build_threads_module() -> PathBuf {
    try_build_threads_module().unwrap_or_else(|e| panic!("building the threads module: {e:#}"))
}

/// [`build_threads_module`], as a `Result`. Cargo decides whether it is fresh.
pub fn try_build_threads_module() -> Result<PathBuf> {
    let manifest = repo_root().join("sdk/wasm-threads-module/Cargo.toml");
    let target_dir = cache_dir().join("cargo");
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    check_rust_target()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--offline", "--locked", "--target"])
        .arg(THREADS_TARGET)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .context("running cargo")?;
    if !output.status.success() {
        bail!(
            "cargo build failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(target_dir.join(format!(
        "{THREADS_TARGET}/release/evp-test-wasm-threads.wasm"
    )))
}

/// A deployment's module entry for a WASM file: its `file://` URL and its SHA-256.
pub fn wasm_module(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{} ({e})", path.display()));
    json!({
        "moduleImpl": "wasm",
        "entryPoint": "main",
        "downloadUrl": format!("file://{}", path.display()),
        "hash": hex::encode(Sha256::digest(&bytes)),
    })
}

/// The C module `name`, built, as a deployment's module entry.
pub fn c_module(name: &str) -> Value {
    wasm_module(&build_c_module(name))
}

/// The `.h` files of `dir`.
fn headers_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut headers = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "h") {
            headers.push(path);
        }
    }
    Ok(headers)
}

/// Whether `out` exists and is newer than every one of `inputs`.
fn is_fresh(out: &Path, inputs: &[PathBuf]) -> Result<bool> {
    let Ok(built) = std::fs::metadata(out).and_then(|m| m.modified()) else {
        return Ok(false);
    };
    for input in inputs {
        let changed = std::fs::metadata(input)
            .and_then(|m| m.modified())
            .with_context(|| format!("reading {}", input.display()))?;
        if changed >= built {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks that clang can build for `wasm32-wasi`, naming the Debian package that is missing:
/// `clang`, `lld` (wasm-ld), `wasi-libc` (the C library) or `libclang-rt-<N>-dev-wasm32`
/// (the compiler's builtins for wasm32).
fn check_c_toolchain() -> Result<()> {
    let version = run("clang", &["-dumpversion"])
        .map_err(|e| anyhow::anyhow!("clang is missing (apt-get install clang): {e}"))?;
    if run("wasm-ld", &["--version"]).is_err() {
        bail!("wasm-ld is missing (apt-get install lld)");
    }
    let for_wasi = |arg| run("clang", &["--target=wasm32-wasi", arg]);
    // clang prints the bare file name when it finds no such library.
    let libc = for_wasi("-print-file-name=libc.a")?;
    if !Path::new(&libc).is_absolute() {
        bail!("the wasm32-wasi C library is missing (apt-get install wasi-libc)");
    }
    let builtins = for_wasi("-print-libgcc-file-name")?;
    if !Path::new(&builtins).exists() {
        let major = version.split('.').next().unwrap_or(&version);
        bail!("{builtins} is missing (apt-get install libclang-rt-{major}-dev-wasm32)");
    }
    Ok(())
}

/// Checks that the Rust toolchain has the standard library of [`THREADS_TARGET`].
fn check_rust_target() -> Result<()> {
    let sysroot = run("rustc", &["--print", "sysroot"])?;
    let std = Path::new(&sysroot).join("lib/rustlib").join(THREADS_TARGET);
    if !std.exists() {
        bail!("the Rust target {THREADS_TARGET} is missing (rustup target add {THREADS_TARGET})");
    }
    Ok(())
}

/// The trimmed stdout of a command that must succeed.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} {args:?} failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// A file of `dir` whose modification time is `age` seconds before now.
    fn file_aged(dir: &Path, name: &str, age: u64) -> PathBuf {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(age))
            .unwrap();
        path
    }

    #[test]
    fn a_module_is_rebuilt_when_missing_or_older_than_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let check = |out_age: Option<u64>, input_ages: &[u64], fresh: bool| {
            let out = match out_age {
                Some(age) => file_aged(dir.path(), "m.wasm", age),
                None => dir.path().join("absent.wasm"),
            };
            let inputs: Vec<PathBuf> = (0..input_ages.len())
                .map(|i| file_aged(dir.path(), &format!("in{i}"), input_ages[i]))
                .collect();
            assert_eq!(
                is_fresh(&out, &inputs).unwrap(),
                fresh,
                "{out_age:?} {input_ages:?}"
            );
        };
        check(None, &[100], false);
        check(Some(10), &[100, 50], true);
        check(Some(10), &[100, 5], false);
        check(Some(10), &[10], false);
    }
}
