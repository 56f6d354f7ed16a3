//! The systemd units as systemd reads them: every unit verifies, and every daemon's exposure
//! (`systemd-analyze security`) stays low, so a change that loosens the sandbox fails here.

use std::path::Path;
use std::process::Command;

/// Highest exposure accepted, ×10 as `--threshold` takes it: 2.0 of 10, "OK" in systemd's
/// scale. The units score 1.0–1.7 today; the margin is for systemd versions that weigh
/// settings differently, not for loosening the sandbox.
const MAX_EXPOSURE_X10: u32 = 20;
/// runtimed-container's own limit, 2.1: it must give each instance a uid of its own
/// (CAP_SETUID, CAP_SETGID, CAP_CHOWN and the @setuid/@chown system calls). What would bring it
/// back to 2.0 (ProcSubset=pid, MemoryDenyWriteExecute=yes) is inherited by the modules and
/// would change what an unchanged EVP module sees (/proc/meminfo, a JIT), so it is not set.
const MAX_EXPOSURE_X10_RUNTIME_CONTAINER: u32 = 21;

const DAEMONS: [&str; 5] = [
    "evp-hubd",
    "evp-reconcilerd",
    "evp-runtimed-wasm",
    "evp-runtimed-container",
    "evp-sdk-broker",
];

fn systemd_analyze() -> Command {
    assert!(
        Path::new("/usr/bin/systemd-analyze").exists(),
        "systemd-analyze is not installed (apt-get install systemd)"
    );
    Command::new("systemd-analyze")
}

/// Copies the unit with `ExecStart` pointing at the built binary (verify checks it exists).
fn unit_here(dir: &Path, daemon: &str) -> std::path::PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(format!("{daemon}.service"));
    let text = std::fs::read_to_string(&source).unwrap();
    let binary = evp_system_tests::bin_dir().join(daemon);
    assert!(
        text.contains(&format!("/usr/bin/{daemon}")),
        "{}",
        source.display()
    );
    let path = dir.join(format!("{daemon}.service"));
    std::fs::write(
        &path,
        text.replace(&format!("/usr/bin/{daemon}"), &binary.to_string_lossy()),
    )
    .unwrap();
    path
}

#[test]
fn every_unit_verifies_and_keeps_a_low_exposure() {
    let dir = tempfile::tempdir().unwrap();
    for daemon in DAEMONS {
        let unit = unit_here(dir.path(), daemon);
        let verify = systemd_analyze()
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{daemon}.service does not verify:\n{}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let security = systemd_analyze()
            .args(["security", "--offline=true"])
            .arg(format!(
                "--threshold={}",
                if daemon == "evp-runtimed-container" {
                    MAX_EXPOSURE_X10_RUNTIME_CONTAINER
                } else {
                    MAX_EXPOSURE_X10
                }
            ))
            .arg(&unit)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&security.stdout);
        assert!(
            security.status.success(),
            "{daemon}.service exposes too much:\n{}",
            report.lines().last().unwrap_or_default()
        );
        assert!(report.contains("Overall exposure level"), "{report}");
    }
}
