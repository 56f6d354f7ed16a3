//! `evp-runtimed-container`: see the library.

use clap::Parser;

/// evp-agent runtimed-container.
#[derive(Parser)]
#[command(
    version,
    about = "evp-agent runtimed-container: spawned (and later docker and python) modules"
)]
struct Cli {
    #[command(flatten)]
    daemon: evp_daemon::DaemonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evp_daemon::init_logging("evp-runtimed-container");
    evp_runtimed_container::run(Cli::parse().daemon).await
}
