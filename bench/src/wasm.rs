//! The scenarios of runtimed-wasm alone: `wasm-load`, `wasm-idle-memory`, `wasm-compute`
//! (`deploy-wasm` and `wasm-telemetry` are `deploy-spawn` and `telemetry` with a WASM module).
//! Their C modules are `sdk/c/bench-modules/` and `sdk/c/test-modules/`, built by
//! `evp_system_tests::wasm` with the C SDK header.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use evp_schemas::dbus::{RUNTIME_WASM_NAME, RUNTIME_WASM_PATH, Runtime1Proxy};
use evp_system_tests::system::{Options, System, try_wait_state};
use evp_system_tests::wasm::{try_build_bench_module, try_build_bench_program, try_build_c_module};
use serde_json::{Value, json};
use sha2::Digest;

use crate::memory::{self, Sample};
use crate::{RUN_DEADLINE, deploy_until_ok, deployment_of, note_run, summary};

/// runtimed-wasm's default `[wasm] memory_limit_bytes`, which the scenarios keep: no linear
/// memory is larger.
const MEMORY_LIMIT: u64 = 64 << 20;
/// runtimed-wasm's default `[wasm] thread_stack_bytes`: the host stack of an instance thread.
const THREAD_STACK: u64 = 1 << 20;

/// A WASM file as a deployment's module entry.
pub fn module_entry(path: &Path) -> Value {
    evp_system_tests::wasm::wasm_module(path)
}

/// The C test module `name` (`sdk/c/test-modules`), built, as a deployment's module entry.
pub fn test_module(name: &str) -> Result<Value> {
    Ok(module_entry(&try_build_c_module(name)?))
}

/// The C bench module `name` (`sdk/c/bench-modules`), built, as a deployment's module entry.
pub fn bench_module(name: &str) -> Result<Value> {
    Ok(module_entry(&try_build_bench_module(name)?))
}

/// A proxy of runtimed-wasm's `Runtime1`.
async fn runtime(sys: &System) -> Result<Runtime1Proxy<'static>> {
    Ok(Runtime1Proxy::builder(&sys.conn)
        .destination(RUNTIME_WASM_NAME)
        .path(RUNTIME_WASM_PATH)
        .build()
        .await?)
}

/// Removes every file of runtimed-wasm's compiled-module cache.
fn empty_cache(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        std::fs::remove_file(entry?.path())?;
    }
    Ok(())
}

/// `wasm-load`: `LoadModule` of `large.wasm` with the compiled-code cache empty, then again
/// from the cache (the module unloaded between), each timed over the bus.
pub async fn load(runs: usize) -> Result<Value> {
    let built = try_build_bench_module("large")?;
    let sys = System::start().await.context("starting the agent")?;
    let path = sys.modules_dir().join("large.wasm");
    std::fs::copy(&built, &path)?;
    let bytes = std::fs::read(&path)?;
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let location = path.to_string_lossy().into_owned();
    let cache = sys.data_dir().join("cache").join("wasm");
    let runtime = runtime(&sys).await?;
    let timed_load = async || -> Result<Duration> {
        let started = Instant::now();
        runtime
            .load_module("large", "wasm", &location, &sha256)
            .await
            .context("LoadModule")?;
        let took = started.elapsed();
        runtime.unload_module("large").await?;
        Ok(took)
    };
    let (mut first, mut cached) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        empty_cache(&cache)?;
        let compiled = timed_load().await?;
        if std::fs::read_dir(&cache).map_or(0, |d| d.count()) == 0 {
            bail!(
                "runtimed-wasm cached nothing in {} (its log is in {})",
                cache.display(),
                sys.stack.config().log_dir().display()
            );
        }
        let from_cache = timed_load().await?;
        if note_run(
            run,
            &format!("first load {compiled:?}, cached {from_cache:?}"),
        ) {
            first.push(compiled);
            cached.push(from_cache);
        }
    }
    let cache_bytes: u64 = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    sys.stop().await;
    Ok(json!({
        "scenario": "wasm-load",
        "module": "sdk/c/bench-modules/large.c",
        "module_bytes": bytes.len(),
        "cache_entry_bytes": cache_bytes,
        "runs": runs,
        "first_load": summary(&first),
        "cached_load": summary(&cached),
    }))
}

/// Configures each of `instances` (echo-state) and waits for its echo, so each has run a
/// callback and is back in `EVP_processEvent`.
async fn echo_each(sys: &System, instances: &[String]) -> Result<()> {
    for n in instances {
        sys.hub.set_configuration(n, "t", "v").await?;
    }
    for n in instances {
        try_wait_state(sys, &format!("state/{n}/t"), |v| v == "v", RUN_DEADLINE).await?;
    }
    Ok(())
}

/// The median of `values`, 0 for none.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// How to read one figure of a [`Sample`], in KiB.
type Figure = fn(&Sample) -> u64;

/// The figures of a [`Sample`] reported per instance: each name and how to read it.
const PER_INSTANCE: [(&str, Figure); 6] = [
    ("rss_kib", |s| s.total.rss_kib),
    ("pss_kib", |s| s.total.pss_kib),
    ("linear_memory_rss_kib", |s| s.linear.rss_kib),
    ("thread_stack_rss_kib", |s| s.stacks.rss_kib),
    ("beyond_linear_memory_rss_kib", |s| {
        s.total.rss_kib.saturating_sub(s.linear.rss_kib)
    }),
    ("beyond_linear_memory_pss_kib", |s| {
        s.total.pss_kib.saturating_sub(s.linear.pss_kib)
    }),
];

/// What one instance costs between two samples `n` instances apart, for each of
/// [`PER_INSTANCE`].
fn per_instance(from: &Sample, to: &Sample, n: usize) -> [f64; PER_INSTANCE.len()] {
    PER_INSTANCE.map(|(_, figure)| figure(to).saturating_sub(figure(from)) as f64 / n.max(1) as f64)
}

/// The median over runs of each of [`PER_INSTANCE`], to a tenth of a KiB.
fn median_per_instance(runs: &[[f64; PER_INSTANCE.len()]]) -> Value {
    let mut out = serde_json::Map::new();
    for (i, (name, _)) in PER_INSTANCE.iter().enumerate() {
        let mut column: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        out.insert(
            (*name).into(),
            json!((median(&mut column) * 10.0).round() / 10.0),
        );
    }
    Value::Object(out)
}

/// `wasm-idle-memory`: runtimed-wasm sampled fresh, with one instance of echo-state, and with
/// `instances` more, each idle after echoing one configuration; a fresh device each run,
/// all of them sharing one compiled-module cache, which the warm-up run fills (so no sample
/// holds what a compile leaves in the heap).
pub async fn idle_memory(instances: usize, runs: usize) -> Result<Value> {
    let module = test_module("echo-state")?;
    let cache = tempfile::Builder::new()
        .prefix("evp-bench-wasm-cache-")
        .tempdir()?;
    let options = Options {
        extra_toml: format!(
            "[wasm]\ncache_dir = {:?}\n",
            cache.path().display().to_string()
        ),
        ..Options::default()
    };
    let names: Vec<String> = (0..instances).map(|i| format!("idle-{i}")).collect();
    let mut samples = Vec::new();
    let (mut marginal, mut overall) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let sys = System::start_with(options.clone())
            .await
            .context("starting the agent")?;
        let pid = evp_system_tests::wait_for("runtimed-wasm's pid", RUN_DEADLINE, async || {
            sys.stack.pid("evp-runtimed-wasm")
        })
        .await?;
        let sample = || memory::sample(pid, MEMORY_LIMIT, THREAD_STACK);
        let fresh = sample()?;
        let first = vec!["first".to_owned()];
        deploy_until_ok(&sys, &deployment_of("one", &first, &module)).await?;
        echo_each(&sys, &first).await?;
        let one = sample()?;
        let all: Vec<String> = first.iter().chain(&names).cloned().collect();
        let took = deploy_until_ok(&sys, &deployment_of("all", &all, &module)).await?;
        echo_each(&sys, &names).await?;
        // Whatever the starts left to settle (freed buffers, exited helper threads).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let full = sample()?;
        sys.stop().await;
        let m = per_instance(&one, &full, instances);
        let line = PER_INSTANCE
            .iter()
            .zip(m)
            .map(|((name, _), v)| format!("{name} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let figures = format!(
            "RSS/PSS KiB fresh {}/{}, 1 instance {}/{}, {} instances {}/{} ({instances} more ok \
             in {took:?}); per idle instance: {line}",
            fresh.total.rss_kib,
            fresh.total.pss_kib,
            one.total.rss_kib,
            one.total.pss_kib,
            instances + 1,
            full.total.rss_kib,
            full.total.pss_kib,
        );
        if note_run(run, &figures) {
            samples.push(json!({"fresh": fresh, "one_instance": one, "all_instances": full}));
            marginal.push(m);
            overall.push(per_instance(&fresh, &full, instances + 1));
        }
    }
    Ok(json!({
        "scenario": "wasm-idle-memory",
        "module": "sdk/c/test-modules/echo-state.c",
        "instances": instances,
        "runs": runs,
        "samples": samples,
        "per_idle_instance": median_per_instance(&marginal),
        "per_instance_with_first_costs": median_per_instance(&overall),
    }))
}

/// One run's figures, as both builds report them: `{"bytes":B,"ns":T,"digest":"<hex>"}`.
fn parse_run(text: &str) -> Result<(Duration, String)> {
    let v: Value = serde_json::from_str(text.trim()).with_context(|| format!("{text:?}"))?;
    let ns = v["ns"].as_u64().with_context(|| format!("no ns in {v}"))?;
    let digest = v["digest"]
        .as_str()
        .with_context(|| format!("no digest in {v}"))?;
    Ok((Duration::from_nanos(ns), digest.to_owned()))
}

/// The SHA-256 of sha256.h's bench input of `len` bytes (its xorshift32 sequence), in hex:
/// what both builds must report.
fn expected_digest(len: usize) -> String {
    let mut x: u32 = 0x1234_5678;
    let input: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    hex::encode(sha2::Sha256::digest(&input))
}

/// `wasm-compute`: SHA-256 over `mib` MiB in the `sha256` WASM instance and in the native
/// build of the same C code, a run of each in turn; the hash alone is timed, by the code
/// itself.
pub async fn compute(mib: u64, runs: usize) -> Result<Value> {
    let native = try_build_bench_program("sha256-native")?;
    let module = bench_module("sha256")?;
    let expected = expected_digest(usize::try_from(mib << 20)?);
    let sys = System::start().await.context("starting the agent")?;
    deploy_until_ok(&sys, &deployment_of("compute", &["sha".into()], &module)).await?;
    let (mut in_wasm, mut natively) = (Vec::new(), Vec::new());
    let mut previous = Value::Null;
    for run in 0..=runs {
        // A distinct value each run (the module skips spaces), so it is a new configuration.
        let value = format!("{}{mib}", " ".repeat(run));
        sys.hub.set_configuration("sha", "sha256", &value).await?;
        let state =
            try_wait_state(&sys, "state/sha/sha256", |v| *v != previous, RUN_DEADLINE).await?;
        previous = state.clone();
        let (wasm_took, wasm_digest) = parse_run(state.as_str().unwrap_or_default())?;
        let output = Command::new(&native).arg(mib.to_string()).output()?;
        anyhow::ensure!(
            output.status.success(),
            "{}: {}",
            native.display(),
            output.status
        );
        let (native_took, native_digest) = parse_run(&String::from_utf8_lossy(&output.stdout))?;
        for (build, digest) in [("WASM", &wasm_digest), ("native", &native_digest)] {
            anyhow::ensure!(
                *digest == expected,
                "the {build} build's digest {digest} is not the SHA-256 of the input ({expected})"
            );
        }
        let ratio = wasm_took.as_secs_f64() / native_took.as_secs_f64().max(1e-9);
        let figures = format!("WASM {wasm_took:?}, native {native_took:?}, ratio {ratio:.2}");
        if note_run(run, &figures) {
            in_wasm.push(wasm_took);
            natively.push(native_took);
        }
    }
    sys.stop().await;
    let ms = |d: &[Duration]| {
        let mut v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        median(&mut v)
    };
    let (wasm_ms, native_ms) = (ms(&in_wasm), ms(&natively));
    Ok(json!({
        "scenario": "wasm-compute",
        "mib": mib,
        "runs": runs,
        "digest": expected,
        "wasm": summary(&in_wasm),
        "native": summary(&natively),
        "ratio_of_medians": (wasm_ms / native_ms.max(1e-9) * 100.0).round() / 100.0,
        "wasm_mib_per_s": (mib as f64 / (wasm_ms / 1e3).max(1e-9)).round(),
        "native_mib_per_s": (mib as f64 / (native_ms / 1e3).max(1e-9)).round(),
    }))
}
