//! `spool`: hubd's persistent spool (hubd/src/spool.rs) seen from outside. The device reaches
//! mosquitto through the tests' [`Relay`](evp_system_tests::relay::Relay), which the scenario
//! cuts; `evp-test-ticker` instances make numbered telemetry; the hub driver counts what
//! arrives, each `(instance, seq)` once (QoS 1 is at least once).
//!
//! 1. Drain: a backlog built with the relay down by tickers at 1 ms, then the relay up: the
//!    rate from the first backlog message at the hub to the last.
//! 2. Disk: a steady flow, online and then offline: hubd's `/proc/<pid>/io` before and after,
//!    and its writes and syncs from `strace -f -y` (each file descriptor with its path).
//! 3. Recovery: the relay down for an outage while the flow goes on, then up: the time until
//!    `Hub1.Connection` is `connected` again, and until the backlog has arrived.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use evp_devhub::DeviceReport;
use evp_schemas::dbus::Hub1Proxy;
use evp_system_tests::relay::Relay;
use evp_system_tests::system::{Options, System};
use serde_json::{Value, json};

use crate::{deploy_until_ok, deployment_of, spawn_module};

/// The scenario's sizes (`evp-bench spool --help`).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Telemetry messages in the drain's backlog.
    pub backlog: u64,
    /// Tickers that build it.
    pub burst_tickers: u64,
    /// Tickers of the steady flow, each at `rate` msg/s.
    pub steady_tickers: u64,
    /// Messages per second of one steady ticker.
    pub rate: u64,
    /// Length of each disk measurement window.
    pub window: Duration,
    /// The recovery's outage.
    pub outage: Duration,
}

/// How long without a new message before a wait for the backlog gives up.
const STALL: Duration = Duration::from_secs(20);
/// Longest wait for hubd to see a change of the link.
const LINK_DEADLINE: Duration = Duration::from_secs(30);
/// How often the connection and the queued bytes are read.
const POLL: Duration = Duration::from_millis(10);

/// What the hub driver received: each `(instance, seq)` once, with its arrival time.
#[derive(Default)]
struct Received {
    seen: HashSet<(String, u64)>,
    /// Arrival of each new message, in order.
    arrivals: Vec<Instant>,
    duplicates: u64,
    /// Reports the driver's broadcast channel skipped (the count would be short).
    lagged: u64,
}

/// Counts the tickers' telemetry at the hub driver, from now on.
fn collect(sys: &System) -> Arc<Mutex<Received>> {
    let received = Arc::new(Mutex::new(Received::default()));
    let mut reports = sys.hub.subscribe();
    let r = Arc::clone(&received);
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let report = reports.recv().await;
            let now = Instant::now();
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            match report {
                Ok(DeviceReport::Telemetry(v)) => {
                    for (key, value) in v.as_object().into_iter().flatten() {
                        let Some(instance) = key.strip_suffix("/seq") else {
                            continue;
                        };
                        let seq = value
                            .as_u64()
                            .or_else(|| value.as_str().and_then(|s| s.parse().ok()));
                        let Some(seq) = seq else { continue };
                        if r.seen.insert((instance.to_owned(), seq)) {
                            r.arrivals.push(now);
                        } else {
                            r.duplicates += 1;
                        }
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => r.lagged += n,
                Err(RecvError::Closed) => return,
            }
        }
    });
    received
}

fn unique(received: &Mutex<Received>) -> u64 {
    received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .arrivals
        .len() as u64
}

/// Per instance: how many arrived, the highest seq, and the first seqs missing below it.
fn gaps(seen: &HashSet<(String, u64)>) -> String {
    let mut by: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (i, s) in seen {
        by.entry(i).or_default().push(*s);
    }
    let mut out = Vec::new();
    for (i, mut seqs) in by {
        seqs.sort_unstable();
        let max = seqs.last().copied().unwrap_or(0);
        let have: HashSet<u64> = seqs.iter().copied().collect();
        let missing: Vec<u64> = (0..max).filter(|s| !have.contains(s)).collect();
        let first: Vec<u64> = missing.iter().take(8).copied().collect();
        out.push(format!(
            "{i}: {} (max {max}, {} missing below: {first:?})",
            seqs.len(),
            missing.len()
        ));
    }
    out.join("; ")
}

/// Waits until `total` distinct messages arrived; the arrival of the last.
async fn wait_received(received: &Mutex<Received>, total: u64) -> Result<Instant> {
    let mut last = (unique(received), Instant::now());
    loop {
        {
            let r = received.lock().unwrap_or_else(|e| e.into_inner());
            let n = r.arrivals.len() as u64;
            if n >= total {
                return Ok(r.arrivals[total as usize - 1]);
            }
            if n > last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > STALL {
                bail!(
                    "{n} of {total} messages at the hub, none new for {STALL:?} ({} reports \
                     skipped by the driver's channel); {}",
                    r.lagged,
                    gaps(&r.seen)
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls hubd's `Hub1.Connection` until `want` says yes; when it did.
async fn wait_connection(hub: &Hub1Proxy<'_>, want: impl Fn(&str) -> bool) -> Result<Instant> {
    let end = Instant::now() + LINK_DEADLINE;
    loop {
        if want(&hub.connection().await?) {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!("Hub1.Connection did not change within {LINK_DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `Hub1.QueuedBytes` once it has not changed for `quiet` (the tickers are done).
async fn settled_queued_bytes(hub: &Hub1Proxy<'_>, quiet: Duration) -> Result<u64> {
    let mut last = (hub.queued_bytes().await?, Instant::now());
    while last.1.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = hub.queued_bytes().await?;
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    Ok(last.0)
}

/// `/proc/<pid>/io`'s fields.
fn proc_io(pid: u32) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// `strace` following every thread of a process into a file, with timestamps and paths.
struct Trace {
    child: Child,
    out: std::path::PathBuf,
}

impl Trace {
    fn attach(pid: u32, out: &Path) -> Result<Trace> {
        let child = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-y",
                "-ttt",
                "-s",
                "0",
                "-e",
                "signal=none",
                "-e",
            ])
            .arg("trace=write,writev,pwrite64,sendto,sendmsg,fsync,fdatasync,rename,renameat,renameat2")
            .arg("-o")
            .arg(out)
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting strace (apt-get install strace)")?;
        Ok(Trace {
            child,
            out: out.to_owned(),
        })
    }

    /// Detaches (SIGINT) and counts the calls made between `from` and `to` (Unix seconds).
    fn finish(mut self, from: f64, to: f64, spool_dir: &Path) -> Result<Value> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        Ok(count_calls(&text, from, to, &spool_dir.to_string_lossy()))
    }
}

/// Counts the calls of a `strace -f -ttt -y` log in `[from, to]`, by kind: writes to spool
/// files, to other files, to sockets; fsyncs and fdatasyncs; renames.
fn count_calls(text: &str, from: f64, to: f64, spool_dir: &str) -> Value {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut spool_bytes = 0u64;
    for line in text.lines() {
        // `<pid> <time> <call>(<fd><path>, ...) = <result>`; a resumed call was counted when
        // it started.
        let Some((_, rest)) = line.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        let Some((time, call)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(time) = time.parse::<f64>() else {
            continue;
        };
        if call.starts_with("<...") || time < from || time > to {
            continue;
        }
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let target = args.split_once('>').map(|(t, _)| t).unwrap_or("");
        let kind = match name {
            "fsync" | "fdatasync" => {
                if target.contains(spool_dir) {
                    "syncs_spool"
                } else {
                    "syncs_other"
                }
            }
            "rename" | "renameat" | "renameat2" => "renames",
            _ if target.contains(spool_dir) => {
                spool_bytes += call
                    .rsplit_once("= ")
                    .and_then(|(_, r)| r.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                "writes_spool_files"
            }
            _ if target.contains("socket:")
                || target.contains("TCP")
                || target.contains("UNIX") =>
            {
                "writes_sockets"
            }
            _ => "writes_other_files",
        };
        *counts.entry(kind).or_default() += 1;
    }
    let mut out: serde_json::Map<String, Value> = counts
        .into_iter()
        .map(|(k, v)| (k.into(), json!(v)))
        .collect();
    out.insert("spool_file_bytes".into(), json!(spool_bytes));
    Value::Object(out)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// hubd's writes and syncs over `window`, per second.
async fn disk_window(sys: &System, window: Duration, label: &str) -> Result<Value> {
    let pid = sys.stack.pid("evp-hubd").context("hubd is not running")?;
    let spool_dir = sys.data_dir().join("hub").join("spool");
    let trace = Trace::attach(pid, &sys.dir.path().join(format!("strace-{label}.log")))?;
    // strace attaches to each thread in turn; the window starts once it surely has.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (io_before, from, started) = (proc_io(pid)?, unix_now(), Instant::now());
    tokio::time::sleep(window).await;
    let (io_after, to, secs) = (proc_io(pid)?, unix_now(), started.elapsed().as_secs_f64());
    let calls = trace.finish(from, to, &spool_dir)?;
    let per_s = |x: u64| (x as f64 / secs * 100.0).round() / 100.0;
    let io =
        |k: &str| io_after.get(k).copied().unwrap_or(0) - io_before.get(k).copied().unwrap_or(0);
    let call = |k: &str| calls[k].as_u64().unwrap_or(0);
    Ok(json!({
        "seconds": (secs * 10.0).round() / 10.0,
        // Every write-like call of hubd (sockets too), from the kernel's own count.
        "write_syscalls_per_s": per_s(io("syscw")),
        "spool_file_writes_per_s": per_s(call("writes_spool_files")),
        "spool_file_bytes_per_s": per_s(call("spool_file_bytes")),
        "fsyncs_per_s": per_s(call("syncs_spool") + call("syncs_other")),
        "spool_fsyncs_per_s": per_s(call("syncs_spool")),
        // Pages hubd dirtied (what writeback will send to the disk), less those whose file
        // went before they were written back.
        "bytes_to_storage_per_s": per_s(io("write_bytes").saturating_sub(io("cancelled_write_bytes"))),
        "write_bytes_per_s": per_s(io("write_bytes")),
        "cancelled_write_bytes_per_s": per_s(io("cancelled_write_bytes")),
        "strace_calls": calls,
    }))
}

/// Sets `topic` of each of `instances` to `value`.
async fn configure(sys: &System, instances: &[String], topic: &str, value: u64) -> Result<()> {
    for i in instances {
        sys.hub
            .set_configuration(i, topic, &value.to_string())
            .await?;
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn relay(sys: &System) -> Result<&Relay> {
    sys.relay.as_ref().context("the system has no relay")
}

/// The scenario: drain, disk online and offline, recovery after an outage.
pub async fn run(p: Params) -> Result<Value> {
    if p.rate == 0 || 1000 % p.rate != 0 || p.burst_tickers == 0 || p.steady_tickers == 0 {
        bail!("--rate must divide 1000 (a ticker's period is whole ms), and tickers be > 0");
    }
    let sys = System::start_with(Options {
        relay: true,
        ..Options::default()
    })
    .await
    .context("starting the agent")?;
    let hub = Hub1Proxy::builder(&sys.conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let burst: Vec<String> = (0..p.burst_tickers).map(|i| format!("burst-{i}")).collect();
    let steady: Vec<String> = (0..p.steady_tickers)
        .map(|i| format!("steady-{i}"))
        .collect();
    let all: Vec<String> = burst.iter().chain(&steady).cloned().collect();
    let ticker = spawn_module("evp-test-ticker")?;
    deploy_until_ok(&sys, &deployment_of("spool", &all, &ticker)).await?;
    let received = collect(&sys);

    // 1. Drain. The tickers start online (their configuration comes from the hub); the relay
    // goes down at the first message, so the few before it are not part of the backlog.
    let per_ticker = p.backlog.div_ceil(p.burst_tickers);
    let burst_total = per_ticker * p.burst_tickers;
    configure(&sys, &burst, "period_ms", 1).await?;
    configure(&sys, &burst, "count", per_ticker).await?;
    wait_received(&received, 1).await?;
    relay(&sys)?.down();
    wait_connection(&hub, |c| c != "connected").await?;
    let backlog_bytes = settled_queued_bytes(&hub, Duration::from_secs(2)).await?;
    let before_up = unique(&received);
    let up = Instant::now();
    relay(&sys)?.up().await?;
    let connected = wait_connection(&hub, |c| c == "connected").await?;
    let last = wait_received(&received, burst_total).await?;
    let (first, dups, lagged) = {
        let r = received.lock().unwrap_or_else(|e| e.into_inner());
        (r.arrivals[before_up as usize], r.duplicates, r.lagged)
    };
    let backlog = burst_total - before_up;
    let drain_s = (last - first).as_secs_f64();
    let drain = json!({
        "backlog_msgs": backlog,
        "backlog_bytes": backlog_bytes,
        "drain_msgs_per_s": (backlog as f64 / drain_s.max(1e-6)).round(),
        "drain_s": secs(last - first),
        "up_to_connected_s": secs(connected - up),
        "up_to_all_received_s": secs(last - up),
        "duplicates": dups,
        "lagged_reports": lagged,
    });
    eprintln!("drain: {drain}");

    // 2. and 3. One steady flow through the online window, the outage (whose first part is
    // the offline window), ending just before the relay comes up.
    let lead = Duration::from_secs(2);
    let flow = lead * 2 + p.window + p.outage - Duration::from_secs(1);
    let steady_count = p.rate * flow.as_secs();
    configure(&sys, &steady, "period_ms", 1000 / p.rate).await?;
    configure(&sys, &steady, "count", steady_count).await?;
    tokio::time::sleep(lead).await;
    let online = disk_window(&sys, p.window, "online").await?;
    eprintln!("online: {online}");
    relay(&sys)?.down();
    let down = Instant::now();
    wait_connection(&hub, |c| c != "connected").await?;
    tokio::time::sleep(lead).await;
    let offline = disk_window(&sys, p.window, "offline").await?;
    eprintln!("offline: {offline}");
    tokio::time::sleep(p.outage.saturating_sub(down.elapsed())).await;
    let outage_bytes = hub.queued_bytes().await?;
    let at_up = unique(&received);
    let up = Instant::now();
    relay(&sys)?.up().await?;
    let connected = wait_connection(&hub, |c| c == "connected").await?;
    let total = burst_total + steady_count * p.steady_tickers;
    let last = wait_received(&received, total).await?;
    let recovery = json!({
        "outage_s": secs(up - down),
        "backlog_msgs_at_up": total.saturating_sub(at_up),
        "backlog_bytes_at_up": outage_bytes,
        "up_to_connected_s": secs(connected - up),
        "up_to_all_received_s": secs(last - up),
    });
    eprintln!("recovery: {recovery}");
    let (dups, lagged) = {
        let r = received.lock().unwrap_or_else(|e| e.into_inner());
        (r.duplicates, r.lagged)
    };
    let strace = Command::new("strace").arg("-V").output()?;
    let out = json!({
        "scenario": "spool",
        "drain_msgs_per_s": drain["drain_msgs_per_s"],
        "backlog_bytes": backlog_bytes,
        "drain": drain,
        "steady_msgs_per_s": p.rate * p.steady_tickers,
        "disk_online": online,
        "disk_offline": offline,
        "recovery_s_after_60s_outage": {
            "to_connected": recovery["up_to_connected_s"],
            "to_backlog_received": recovery["up_to_all_received_s"],
        },
        "recovery": recovery,
        "messages_total": total,
        "duplicates_total": dups,
        "lagged_reports_total": lagged,
        "strace": String::from_utf8_lossy(&strace.stdout).lines().next().unwrap_or(""),
    });
    sys.stop().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_target_within_the_window() {
        let log = "\
10  100.5 write(7</d/hub/spool/telemetry/0.seg>, \"\"..., 85) = 85
10 101.0 write(9<socket:[42]>, \"\"..., 30) = 30
11 101.5 fdatasync(7</d/hub/spool/telemetry/0.seg>) = 0
11 101.6 fsync(8</d/hub/cursor.json.tmp>) = 0
11 101.7 renameat2(AT_FDCWD, \"/d/a.tmp\", AT_FDCWD, \"/d/a\", 0) = 0
12 101.8 write(7</d/hub/spool/telemetry/0.seg>, \"\"..., 40 <unfinished ...>
12 101.9 <... write resumed>) = 40
10 102.5 write(7</d/hub/spool/telemetry/0.seg>, \"\"..., 85) = 85
";
        let counts = count_calls(log, 100.0, 102.0, "/d/hub/spool");
        let expect = json!({
            "writes_spool_files": 2, "writes_sockets": 1, "syncs_spool": 1, "syncs_other": 1,
            "renames": 1, "spool_file_bytes": 85,
        });
        assert_eq!(counts, expect);
    }
}
