//! `evp-reconcilerd`: see the library.

use clap::Parser;

/// evp-agent reconcilerd.
#[derive(Parser)]
#[command(
    version,
    about = "evp-agent reconcilerd: desired deployment, downloads, reconciliation"
)]
struct Cli {
    #[command(flatten)]
    daemon: evp_daemon::DaemonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evp_daemon::init_logging("evp-reconcilerd");
    evp_reconcilerd::run(Cli::parse().daemon).await
}
