//! A full disk: the data directory's file system is a small tmpfs the test fills. A deployment
//! that cannot be persisted fails with an error the hub sees (ENOSPC named), what runs keeps
//! running and being reported, no half-written file is left, and the device takes the
//! deployment by itself once there is room again.

use std::io::Write;
use std::path::{Path, PathBuf};

use evp_system_tests::system::{Options, System, deployment, instance_status};

/// Big enough for the daemons' files and a few shell-script modules.
const TMPFS_BYTES: u64 = 16 << 20;

/// Fills the file system of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial chunk: byte by byte is not worth it, the kernel took what fit.
    let _ = f.sync_all();
    path
}

/// Files under `dir` whose name says they are unfinished writes.
fn half_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(half_files(&path));
        } else {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.contains(".partial") {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_on_a_full_disk_fails_with_enospc_and_is_taken_once_there_is_room() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: mounting a tmpfs for the data directory needs root");
        return;
    }
    let sys = match System::start_with(Options {
        data_dir_tmpfs: Some(TMPFS_BYTES),
        ..Options::default()
    })
    .await
    {
        Ok(s) => s,
        Err(e) if format!("{e:#}").contains("mount") => {
            eprintln!("skipped: cannot mount a tmpfs here: {e:#}");
            return;
        }
        Err(e) => panic!("{e:#}"),
    };
    let pids = sys.run_instances("d1", &["a1"]).await.unwrap();
    let (url_a, hash_a) = sys.module("a", "exec /bin/sleep 300").unwrap();
    let (url_b, hash_b) = sys.module("b", "exec /bin/sleep 301").unwrap();
    let d2 = deployment(
        "d2",
        &[("a1", "a"), ("b1", "b")],
        &[("a", &url_a, &hash_a), ("b", &url_b, &hash_b)],
    );

    let filler = fill(&sys.data_dir());
    sys.deploy(&d2).await.unwrap();
    let failed = sys
        .wait_status(|s| s["deploymentId"] == "d2" && s["reconcileStatus"] == "error")
        .await
        .unwrap();
    let message = failed["failureMessage"].as_str().unwrap_or_default();
    assert!(message.contains("ENOSPC"), "{failed}");
    assert_eq!(instance_status(&failed, "a1"), "ok", "{failed}");
    assert_eq!(sys.instance_pids("a1"), pids, "what ran keeps running");
    let desired = std::fs::read_to_string(sys.data_dir().join("deployment/desired.json")).unwrap();
    assert!(
        desired.contains("\"d1\""),
        "the previous deployment stays on disk"
    );
    assert_eq!(half_files(&sys.data_dir()), Vec::<PathBuf>::new());

    // Room again: no hub action, the device takes d2 by itself.
    std::fs::remove_file(&filler).unwrap();
    sys.wait_status(|s| {
        s["deploymentId"] == "d2"
            && s["reconcileStatus"] == "ok"
            && instance_status(s, "a1") == "ok"
            && instance_status(s, "b1") == "ok"
    })
    .await
    .unwrap();
    assert_eq!(
        sys.instance_pids("a1"),
        pids,
        "an unchanged instance keeps its process"
    );
    assert_eq!(half_files(&sys.data_dir()), Vec::<PathBuf>::new());
    sys.stop().await;
}
