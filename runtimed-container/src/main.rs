//! `evp-runtimed-container`: see the library. Run with `log-relay`, it is one instance's log
//! relay instead (see `relay`), started by the daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// evp-agent runtimed-container.
#[derive(Parser)]
#[command(
    version,
    about = "evp-agent runtimed-container: spawned (and later docker and python) modules"
)]
struct Cli {
    #[command(flatten)]
    daemon: evp_daemon::DaemonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// One instance's log relay: the module's stdout on fd 0, its stderr on fd 1.
    LogRelay {
        /// The instance, named in every logged line.
        #[arg(long)]
        instance: String,
        /// The instance's `logs` folder.
        #[arg(long)]
        dir: PathBuf,
        /// The most each stream takes on disk.
        #[arg(long)]
        max_bytes: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    evp_daemon::init_logging("evp-runtimed-container");
    match cli.command {
        Some(Command::LogRelay {
            instance,
            dir,
            max_bytes,
        }) => evp_runtimed_container::relay::run_process(
            &evp_runtimed_container::relay::RelayConfig {
                instance,
                dir,
                max_bytes,
            },
        ),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(evp_runtimed_container::run(cli.daemon)),
    }
}
