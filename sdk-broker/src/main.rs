//! `evp-sdk-broker`: see the library.

use clap::Parser;

/// evp-agent sdk-broker.
#[derive(Parser)]
#[command(version, about = "evp-agent sdk-broker: per-instance SDK sockets")]
struct Cli {
    #[command(flatten)]
    daemon: evp_daemon::DaemonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evp_daemon::init_logging("evp-sdk-broker");
    evp_sdk_broker::run(Cli::parse().daemon).await
}
