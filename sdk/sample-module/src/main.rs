//! The sample module that evp-devhub deploys: a small native program written with `evp-sdk`.
//!
//! Every [`TICK_EVERY`] it prints `sample: alive, tick N`, stores `N` in a file of its
//! workspace (so a restart resumes the count and shows that the workspace persists), reports
//! the state `tick` = `N` and sends the telemetry entry `tick` = `N`. Without a workspace it
//! counts in memory only. It returns from `main` when the agent's exit event arrives.
//!
//! When the SDK socket cannot be reached (an agent that does not open one for the instance),
//! it says so and keeps ticking without state or telemetry, dying on SIGTERM by the default
//! action.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evp_sdk::{Client, EvpResult, RpcStatus};

/// How often the module says it is alive: often enough to see at once that it runs, rarely
/// enough not to flood the daemons' logs.
const TICK_EVERY: Duration = Duration::from_secs(5);

/// The file in the workspace that holds the last tick.
const COUNTER_FILE: &str = "sample-ticks";

/// The tick counter, kept in a file when there is a workspace.
#[derive(Debug)]
struct Counter {
    file: Option<PathBuf>,
    tick: u64,
    /// Whether a failed write was already reported, so that a full disk is said once.
    write_error_reported: bool,
}

impl Counter {
    /// Opens the counter in `workspace`, resuming from its file; in memory when `None`.
    fn open(workspace: Option<&Path>) -> Counter {
        let file = workspace.map(|w| w.join(COUNTER_FILE));
        let tick = file.as_deref().map_or(0, read_tick);
        Counter {
            file,
            tick,
            write_error_reported: false,
        }
    }

    /// Counts one more tick, stores it, and returns it.
    fn advance(&mut self) -> u64 {
        self.tick += 1;
        if let Some(file) = &self.file {
            if let Err(e) = write_tick(file, self.tick) {
                if !self.write_error_reported {
                    eprintln!(
                        "sample: cannot store the tick in {}: {e}; counting in memory",
                        file.display()
                    );
                    self.write_error_reported = true;
                }
            } else {
                self.write_error_reported = false;
            }
        }
        self.tick
    }
}

/// The tick stored in `file`; 0 when there is none or it is unreadable.
fn read_tick(file: &Path) -> u64 {
    match std::fs::read_to_string(file) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("sample: {} holds no number; starting at 0", file.display());
            0
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            eprintln!("sample: cannot read {}: {e}; starting at 0", file.display());
            0
        }
    }
}

/// Stores `tick` in `file` atomically (temporary file, then rename), so a kill mid-write
/// never leaves a torn number behind.
fn write_tick(file: &Path, tick: u64) -> std::io::Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{tick}\n"))?;
    std::fs::rename(&tmp, file)
}

/// The workspace named by the agent, if set (an empty value counts as unset).
fn workspace() -> Option<PathBuf> {
    std::env::var_os(evp_sdk::ENV_WORKSPACE)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Tells the agent about `tick`: the state `tick` and one telemetry entry `tick`.
fn report(client: &mut Client, tick: u64) {
    let value = tick.to_string();
    if let Err(e) = client.send_state("tick", value.as_bytes(), |_| {}) {
        eprintln!("sample: state not sent: {e}");
    }
    if let Err(e) = client.send_telemetry(&[("tick", &value)], |_| {}) {
        eprintln!("sample: telemetry not sent: {e}");
    }
}

fn main() {
    let mut client = match Client::initialize() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("sample: {e}; ticking without the SDK");
            None
        }
    };
    if let Some(c) = client.as_mut() {
        // `echo` answers with its parameters: something to try with `evp-devhub call`.
        let registered = c.set_rpc_callback(|c, req| {
            let status = if req.method == "echo" {
                RpcStatus::Ok
            } else {
                RpcStatus::MethodNotFound
            };
            if let Err(e) = c.send_rpc_response(req.id, &req.params, status, |_| {}) {
                eprintln!("sample: answer to {} not sent: {e}", req.method);
            }
        });
        if let Err(e) = registered {
            eprintln!("sample: no direct commands: {e}");
        }
    }
    let workspace = workspace();
    let mut counter = Counter::open(workspace.as_deref());
    match &workspace {
        Some(w) => println!(
            "sample: started, workspace {}, resuming after tick {}",
            w.display(),
            counter.tick
        ),
        None => println!(
            "sample: started without {}; counting in memory only",
            evp_sdk::ENV_WORKSPACE
        ),
    }
    let mut next = Instant::now() + TICK_EVERY;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match client.as_mut().map(|c| c.process_event(Some(wait))) {
            None => std::thread::sleep(wait),
            Some(EvpResult::Ok | EvpResult::TimedOut) => {}
            Some(EvpResult::ShouldExit) => {
                println!("sample: asked to exit after tick {}", counter.tick);
                return;
            }
            Some(other) => {
                eprintln!("sample: the agent connection failed ({other}); leaving");
                return;
            }
        }
        if Instant::now() < next {
            continue;
        }
        next += TICK_EVERY;
        let tick = counter.advance();
        if let Some(c) = client.as_mut() {
            report(c, tick);
        }
        let mut out = std::io::stdout().lock();
        // Nobody reading stdout is no reason to stop ticking: the counter file still moves.
        let _ = writeln!(out, "sample: alive, tick {tick}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "evp-sample-module-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        dir
    }

    #[test]
    fn the_count_resumes_from_the_workspace() {
        let dir = scratch("resume");
        let mut first = Counter::open(Some(&dir));
        assert_eq!(first.advance(), 1);
        assert_eq!(first.advance(), 2);
        let mut second = Counter::open(Some(&dir));
        assert_eq!(second.tick, 2);
        assert_eq!(second.advance(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_workspace_it_counts_in_memory() {
        let mut c = Counter::open(None);
        assert_eq!(c.advance(), 1);
        assert_eq!(c.advance(), 2);
    }

    #[test]
    fn a_garbled_counter_file_starts_over() {
        let dir = scratch("garbled");
        std::fs::write(dir.join(COUNTER_FILE), "not a number").expect("writing");
        assert_eq!(Counter::open(Some(&dir)).tick, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_workspace_still_counts() {
        let missing = scratch("missing").join("does/not/exist");
        let mut c = Counter::open(Some(&missing));
        assert_eq!(c.advance(), 1);
        assert!(c.write_error_reported);
        assert_eq!(c.advance(), 2);
    }
}
