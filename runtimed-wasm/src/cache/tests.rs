use super::*;
use crate::loader::TABLE_EXPORT;
use crate::loader::tests::c_module;
use std::os::unix::fs::PermissionsExt;

/// A cache in a fresh directory, and a module file in another.
struct Fixture {
    _root: tempfile::TempDir,
    cache: ModuleCache,
    wasm_path: PathBuf,
    hash: String,
}

impl Fixture {
    fn new(wasm: &[u8]) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let wasm_path = root.path().join("module.wasm");
        fs::write(&wasm_path, wasm).expect("write module");
        let cache = ModuleCache::new(root.path().join("cache")).expect("cache");
        Fixture {
            cache,
            wasm_path,
            hash: hex::encode(Sha256::digest(wasm)),
            _root: root,
        }
    }

    fn load(&self, engine: &Engine) -> Result<CachedModule, LoadError> {
        self.cache.load(engine, &self.hash, &self.wasm_path)
    }

    fn outcome(&self, engine: &Engine) -> CacheOutcome {
        self.load(engine).expect("loads").outcome
    }

    /// The entry's files, sorted: `.cwasm` then `.meta`.
    fn entry(&self) -> Vec<PathBuf> {
        let mut files = self.cache.files().expect("list");
        files.sort();
        files
    }
}

fn engine_with_opt_level(level: wasmtime::OptLevel) -> Engine {
    let mut config = wasmtime::Config::new();
    config.cranelift_opt_level(level);
    Engine::new(&config).expect("engine")
}

/// An engine whose code wasmtime will not load into a default one: it reserves less address
/// space per linear memory, so its bounds checks differ.
fn engine_with_small_memory_reservation() -> Engine {
    let mut config = wasmtime::Config::new();
    config.memory_reservation(1 << 24);
    Engine::new(&config).expect("engine")
}

#[track_caller]
fn assert_recompiled(outcome: CacheOutcome, needle: &str) {
    match outcome {
        CacheOutcome::Recompiled { why } => {
            assert!(why.contains(needle), "{why:?} lacks {needle:?}")
        }
        other => panic!("expected Recompiled, got {other:?}"),
    }
}

#[test]
fn a_first_load_compiles_and_the_next_is_a_hit_even_after_a_restart() {
    let fixture = Fixture::new(&c_module());
    let engine = Engine::default();
    let first = fixture.load(&engine).expect("first load");
    assert_eq!(first.outcome, CacheOutcome::Compiled);
    assert_eq!(first.info.table_export.as_deref(), Some(TABLE_EXPORT));
    assert_eq!(fixture.entry().len(), 2);

    // A new cache on the same directory stands for the daemon after a restart; the module
    // file is not even needed for a hit.
    fs::remove_file(&fixture.wasm_path).expect("remove module");
    let restarted = ModuleCache::new(fixture.cache.dir()).expect("cache");
    let hit = restarted
        .load(&engine, &fixture.hash.to_uppercase(), &fixture.wasm_path)
        .expect("hit");
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert_eq!(hit.info, first.info);
    let mut store = wasmtime::Store::new(&engine, ());
    let instance = wasmtime::Instance::new(&mut store, &hit.module, &[]).expect("instantiates");
    let table = instance.get_table(&mut store, TABLE_EXPORT).expect("table");
    assert_eq!(table.size(&store), 3);
}

/// Something done to one file of an entry.
type Damage<'a> = &'a dyn Fn(&Path);

#[test]
fn a_damaged_entry_is_compiled_again_never_run() {
    let flip = |path: &Path| {
        let mut bytes = fs::read(path).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        fs::write(path, bytes).expect("write");
    };
    let truncate = |path: &Path| {
        let bytes = fs::read(path).expect("read");
        fs::write(path, &bytes[..bytes.len() / 3]).expect("write");
    };
    let remove = |path: &Path| fs::remove_file(path).expect("remove");
    let garble = |path: &Path| fs::write(path, b"{not json").expect("write");
    // (case, damage, which file: 0 = .cwasm, 1 = .meta, what `why` says)
    #[rustfmt::skip]
    let cases: [(&str, Damage, usize, &str); 5] = [
        ("flipped byte", &flip, 0, "does not match the recorded"),
        ("truncated code", &truncate, 0, "does not match the recorded"),
        ("code removed", &remove, 0, "opening .cwasm"),
        ("meta removed", &remove, 1, "reading .meta"),
        ("meta garbled", &garble, 1, "parsing .meta"),
    ];
    let engine = Engine::default();
    for (case, damage, file, needle) in cases {
        let fixture = Fixture::new(&c_module());
        assert_eq!(fixture.outcome(&engine), CacheOutcome::Compiled, "{case}");
        damage(&fixture.entry()[file]);
        assert_recompiled(fixture.outcome(&engine), needle);
        assert_eq!(
            fixture.outcome(&engine),
            CacheOutcome::Hit,
            "{case}: entry replaced"
        );
    }
}

#[test]
fn another_engine_config_does_not_use_the_entry() {
    let fixture = Fixture::new(&c_module());
    let speed = engine_with_opt_level(wasmtime::OptLevel::Speed);
    let none = engine_with_opt_level(wasmtime::OptLevel::None);
    assert_eq!(fixture.outcome(&speed), CacheOutcome::Compiled);
    // Another config has another key: a miss, with its own entry beside the first.
    assert_eq!(fixture.outcome(&none), CacheOutcome::Compiled);
    assert_eq!(fixture.entry().len(), 4);
    assert_eq!(fixture.outcome(&speed), CacheOutcome::Hit);
    assert_eq!(fixture.outcome(&none), CacheOutcome::Hit);
}

#[test]
fn a_foreign_entry_under_this_engines_name_is_refused_by_wasmtime_and_recompiled() {
    let fixture = Fixture::new(&c_module());
    let default = Engine::default();
    let foreign = engine_with_small_memory_reservation();
    assert_eq!(fixture.outcome(&foreign), CacheOutcome::Compiled);
    let (foreign_key, key) = (engine_key(&foreign), engine_key(&default));
    assert_ne!(foreign_key, key);
    for from in fixture.entry() {
        let name = file_name(&from).replace(&foreign_key, &key);
        fs::copy(&from, fixture.cache.dir().join(name)).expect("copy");
    }
    assert_recompiled(fixture.outcome(&default), "wasmtime refused the entry");
    assert_eq!(fixture.outcome(&default), CacheOutcome::Hit);
}

#[test]
fn a_module_that_is_not_what_was_asked_for_is_refused_and_not_cached() {
    let engine = Engine::default();
    let fixture = Fixture::new(&c_module());
    let other_hash = hex::encode(Sha256::digest(b"another module"));
    match fixture.cache.load(&engine, &other_hash, &fixture.wasm_path) {
        Err(LoadError::HashMismatch { expected, actual }) => {
            assert_eq!((expected, actual), (other_hash, fixture.hash.clone()));
        }
        other => panic!("expected HashMismatch, got {:?}", other.map(|m| m.outcome)),
    }
    assert!(fixture.entry().is_empty(), "something was cached");

    let cases = [
        ("../../etc/passwd", "is not a SHA-256 in hex"),
        ("", "is not a SHA-256 in hex"),
        (&fixture.hash[1..], "is not a SHA-256 in hex"),
    ];
    for (hash, needle) in cases {
        let error = fixture
            .cache
            .load(&engine, hash, &fixture.wasm_path)
            .err()
            .unwrap_or_else(|| panic!("{hash:?} accepted"));
        assert!(error.to_string().contains(needle), "{hash:?}: {error}");
    }
    assert!(fixture.entry().is_empty(), "something was cached");
}

#[test]
fn an_invalid_or_missing_module_is_an_error_and_not_cached() {
    let engine = Engine::default();
    let garbage = Fixture::new(b"not wasm at all");
    let error = garbage.load(&engine).expect_err("refused");
    assert!(matches!(error, LoadError::Invalid(_)), "{error}");
    assert!(garbage.entry().is_empty());

    let missing = Fixture::new(&c_module());
    fs::remove_file(&missing.wasm_path).expect("remove");
    let error = missing.load(&engine).expect_err("refused");
    assert!(matches!(error, LoadError::Read { .. }), "{error}");
    assert!(missing.entry().is_empty());
}

#[test]
fn remove_drops_every_entry_of_the_module_only() {
    let fixture = Fixture::new(&c_module());
    let engine = Engine::default();
    fixture.load(&engine).expect("load");
    fixture
        .load(&engine_with_opt_level(wasmtime::OptLevel::None))
        .expect("load");
    let other = hex::encode(Sha256::digest(b"other"));
    let other_file = fixture.cache.dir().join(format!("{other}-0123.cwasm"));
    fs::write(&other_file, b"x").expect("write");
    assert_eq!(fixture.cache.remove(&fixture.hash).expect("remove"), 4);
    assert_eq!(fixture.entry(), vec![other_file]);
    assert_eq!(
        fixture.cache.remove(&fixture.hash).expect("remove again"),
        0
    );
    assert!(fixture.cache.remove("nope").is_err());
}

#[test]
fn the_directory_is_private_and_crash_leftovers_go() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("a/b/cache");
    ModuleCache::new(&dir).expect("create");
    let mode = |dir: &Path| fs::metadata(dir).expect("stat").mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);

    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let leftover = evp_daemon::fs::temp_path(&dir.join("x.cwasm"));
    fs::write(&leftover, b"half").expect("write");
    let cache = ModuleCache::new(&dir).expect("reopen");
    assert_eq!(mode(&dir), 0o700);
    assert!(!leftover.exists());
    assert_eq!(cache.dir(), dir);
}

#[test]
fn the_key_names_the_wasmtime_in_cargo_lock() {
    let lock_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock = fs::read_to_string(&lock_path).expect("Cargo.lock");
    let locked = lock
        .split("[[package]]")
        .find(|p| p.contains("\nname = \"wasmtime\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"'))
        .expect("wasmtime in Cargo.lock");
    assert_eq!(
        WASMTIME_VERSION, locked,
        "update WASMTIME_VERSION in cache.rs"
    );
}

#[test]
fn a_directory_that_is_not_the_daemons_own_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let elsewhere = root.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    let link = root.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
    let error = ModuleCache::new(&link).expect_err("refused");
    assert!(error.to_string().contains("is a symbolic link"), "{error}");

    // Only root can give a directory away; elsewhere the refusal cannot be set up.
    if nix::unistd::geteuid().is_root() {
        let theirs = nix::unistd::Uid::from_raw(4242);
        nix::unistd::chown(&elsewhere, Some(theirs), None).expect("chown");
        let error = ModuleCache::new(&elsewhere).expect_err("refused");
        assert!(error.to_string().contains("owned by uid 4242"), "{error}");
        let mode = fs::metadata(&elsewhere).expect("stat").mode() & 0o777;
        assert_ne!(mode, 0o700, "their directory was changed");
    }
}
