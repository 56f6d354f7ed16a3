//! The daemons as processes: spawning one with its environment and output, watching it for
//! exit and restart with backoff, stopping some gently, and finding what a stop left behind.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use super::{
    DaemonOutput, Inner, KILL_WAIT, POLL, STACK_MARKER_ENV, STOP_GRACE, SYSTEMD_ENV, Signal, Slot,
    StackError, describe_exit, die_with_parent, io, is_failure, lock, next_backoff, send_signal,
};

pub(super) fn unique() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Starts the daemon of `index` unless it runs; returns whether it started one.
pub(super) fn spawn_slot(inner: &Arc<Inner>, index: usize) -> Result<bool, StackError> {
    let slot = &inner.slots[index];
    let config = &inner.config;
    let mut state = lock(&slot.state);
    state.wanted = true;
    if state.pid.is_some() {
        return Ok(false);
    }
    let binary = config.bin_dir.join(slot.spec.binary);
    let mut command = Command::new(&binary);
    command
        .arg("--bus")
        .arg(&config.bus_address)
        .arg("--config")
        .arg(&inner.agent_toml)
        .env("EVP_MQTT_HOST", &config.mqtt_host)
        .env("EVP_MQTT_PORT", config.mqtt_port.to_string())
        .env("DBUS_SYSTEM_BUS_ADDRESS", &config.bus_address)
        .env("EVP_DATA_DIR", config.data_dir())
        .env(STACK_MARKER_ENV, &inner.marker);
    // Before the configured environment, so a test may still give a daemon its own
    // NOTIFY_SOCKET (to watch its READY and WATCHDOG messages).
    for name in SYSTEMD_ENV {
        command.env_remove(name);
    }
    command
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .envs(state.extra_env.iter().map(|(k, v)| (k, v)))
        .current_dir(&config.dir)
        .stdin(Stdio::null())
        // Its own process group: Ctrl-C in a terminal reaches the devhub only, which stops
        // the daemons in order; and what a daemon spawns is found by its group at stop.
        .process_group(0)
        .kill_on_drop(true);
    match config.output {
        DaemonOutput::Forward => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        DaemonOutput::LogFiles => {
            let path = config.log_dir().join(format!("{}.log", slot.spec.binary));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(format!("opening {}", path.display())))?;
            let err = file
                .try_clone()
                .map_err(io(format!("opening {}", path.display())))?;
            command.stdout(file).stderr(err);
        }
    }
    die_with_parent(command.as_std_mut());
    let mut child = command
        .spawn()
        .map_err(io(format!("starting {}", binary.display())))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward(out, slot.spec.binary, false));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward(err, slot.spec.binary, true));
    }
    state.pid = child.id();
    slot.running.send_replace(true);
    drop(state);
    tokio::spawn(monitor(inner.clone(), index, child, Instant::now()));
    Ok(true)
}

/// Copies a daemon's output line by line, each prefixed with its name.
pub(super) async fn forward(from: impl AsyncRead + Unpin, name: &'static str, to_stderr: bool) {
    use std::io::Write;
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                // A closed terminal is no reason to stop draining the pipe.
                if to_stderr {
                    let _ = writeln!(std::io::stderr().lock(), "[{name}] {text}");
                } else {
                    let _ = writeln!(std::io::stdout().lock(), "[{name}] {text}");
                }
            }
        }
    }
}

/// Reaps the daemon when it exits, and restarts it when supervision says so.
pub(super) async fn monitor(inner: Arc<Inner>, index: usize, mut child: Child, started: Instant) {
    let status = child.wait().await;
    let slot = &inner.slots[index];
    let name = slot.spec.binary;
    let restart_in = {
        let mut state = lock(&slot.state);
        state.pid = None;
        state.exits += 1;
        state.last_exit = status.as_ref().ok().copied();
        slot.running.send_replace(false);
        let how = status
            .as_ref()
            .map_or_else(|e| format!("status unknown: {e}"), describe_exit);
        let failed = status.as_ref().map_or(true, is_failure);
        if !state.wanted || inner.stopping.load(Ordering::SeqCst) {
            None
        } else if !inner.config.supervise {
            eprintln!("evp-devhub: {name} exited ({how})");
            state.wanted = false;
            None
        } else if !failed {
            eprintln!("evp-devhub: {name} exited ({how}); not restarting a clean exit");
            state.wanted = false;
            None
        } else {
            let (now, next) = next_backoff(state.backoff, started.elapsed());
            state.backoff = Some(next);
            eprintln!(
                "evp-devhub: {name} exited ({how}); restarting in {}s",
                now.as_secs()
            );
            Some(now)
        }
    };
    let Some(mut delay) = restart_in else {
        return;
    };
    let mut stopped = inner.stopped.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let still_wanted = {
            let state = lock(&slot.state);
            state.wanted && !inner.stopping.load(Ordering::SeqCst)
        };
        if !still_wanted {
            return;
        }
        match spawn_slot(&inner, index) {
            Ok(_) => return,
            Err(e) => {
                let mut state = lock(&slot.state);
                let (now, next) = next_backoff(state.backoff, Duration::ZERO);
                state.backoff = Some(next);
                eprintln!(
                    "evp-devhub: restarting {name} failed: {e}; again in {}s",
                    now.as_secs()
                );
                delay = now;
            }
        }
    }
}

pub(super) async fn wait_not_running(slot: &Slot, timeout: Duration) -> bool {
    let mut running = slot.running.subscribe();
    matches!(
        tokio::time::timeout(timeout, running.wait_for(|r| !*r)).await,
        Ok(Ok(_))
    )
}

/// SIGTERM to each, a grace, SIGKILL to what is left, and waits until each is reaped.
pub(super) async fn stop_slots(inner: &Inner, indices: &[usize]) {
    for &index in indices {
        let mut state = lock(&inner.slots[index].state);
        state.wanted = false;
        if let Some(pid) = state.pid {
            let _ = send_signal(pid, Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    for &index in indices {
        let slot = &inner.slots[index];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !wait_not_running(slot, left).await {
            let pid = lock(&slot.state).pid;
            if let Some(pid) = pid {
                eprintln!(
                    "evp-devhub: {} did not stop within {STOP_GRACE:?}; killing it",
                    slot.spec.binary
                );
                let _ = send_signal(pid, Signal::SIGKILL);
            }
            wait_not_running(slot, KILL_WAIT).await;
        }
    }
}

/// The processes, other than this one, that carry `marker` in their environment or belong
/// to one of the process groups `groups`.
pub(super) fn leftovers(marker: &str, groups: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let needle = format!("{STACK_MARKER_ENV}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| process_group_of(&stat))
            .is_some_and(|g| groups.contains(&g));
        let marked = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
            .unwrap_or(false);
        if in_group || marked {
            found.push(pid);
        }
    }
    found
}

/// The process group in the text of `/proc/<pid>/stat` (the fifth field; the second, the
/// command, is in parentheses and may hold spaces).
pub(super) fn process_group_of(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

/// SIGTERM, a grace, SIGKILL, for processes that are not this one's children (nobody here
/// reaps them; their parent or init does).
pub(super) async fn kill_and_wait(pids: &[u32]) {
    for &pid in pids {
        let _ = send_signal(pid, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    let alive = |pid: u32| {
        // A zombie has exited; only its parent's reaping is left.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .is_some_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
    };
    while tokio::time::Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        tokio::time::sleep(POLL).await;
    }
    for &pid in pids {
        if alive(pid) {
            let _ = send_signal(pid, Signal::SIGKILL);
        }
    }
}
