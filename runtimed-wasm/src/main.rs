//! `evp-runtimed-wasm`: see the library.

use clap::Parser;

/// evp-agent runtimed-wasm.
#[derive(Parser)]
#[command(version, about = "evp-agent runtimed-wasm: WASM modules")]
struct Cli {
    #[command(flatten)]
    daemon: evp_daemon::DaemonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evp_daemon::init_logging("evp-runtimed-wasm");
    evp_runtimed_wasm::run(Cli::parse().daemon).await
}
