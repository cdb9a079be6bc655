//! `sync-service --config FILE`: runs a node's sync-service until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_sync_service::config::{ENV_PREFIX, SyncConfig};

/// Ferry sync-service: the node's shard store, data plane and shard sync.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Every setting can also be set from the environment as FERRY_SYNC__<SECTION>__<KEY>,\ne.g. FERRY_SYNC__SHARD_SYNC__MAX_CONCURRENT_SYNCS=8.\n\nExample:\n  sync-service --config /etc/ferry/sync-service.toml"
)]
struct Args {
    /// TOML configuration file (see sync-service.example.toml).
    #[arg(long, env = "FERRY_SYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: SyncConfig = ferry_shared::config::load(args.config.as_deref(), ENV_PREFIX)?;
    if args.print_config {
        print!("{}", ferry_shared::config::to_toml(&config)?);
        return Ok(());
    }
    ferry_shared::tls::install_crypto_provider();
    // Fail points from FAILPOINTS, in builds with the `failpoints` feature (tests) only.
    let _fail_points = ferry_shared::failpoints::setup_from_env();
    let _telemetry = ferry_shared::telemetry::init("sync-service", config.log_format);
    ferry_sync_service::run_until(config, args.config.as_deref(), ferry_shared::serving::shutdown_signal())
        .await
        .context("sync-service")
}
