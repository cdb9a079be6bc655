//! `recovery-service --config FILE`: runs a node's recovery-service until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_recovery_service::config::{ENV_PREFIX, RecoveryConfig};

/// Ferry recovery-service: node recovery, blob recovery and the single attestation.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Every setting can also be set from the environment as FERRY_RECOVERY__<SECTION>__<KEY>,\ne.g. FERRY_RECOVERY__RECOVERY__MAX_CONCURRENT_BLOBS=16.\n\nExample:\n  recovery-service --config /etc/ferry/recovery-service.toml"
)]
struct Args {
    /// TOML configuration file (see recovery-service.example.toml).
    #[arg(long, env = "FERRY_RECOVERY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: RecoveryConfig = ferry_shared::config::load(args.config.as_deref(), ENV_PREFIX)?;
    if args.print_config {
        print!("{}", ferry_shared::config::to_toml(&config)?);
        return Ok(());
    }
    ferry_shared::tls::install_crypto_provider();
    // Fail points from FAILPOINTS, in builds with the `failpoints` feature (tests) only.
    let _fail_points = ferry_shared::failpoints::setup_from_env();
    let _telemetry = ferry_shared::telemetry::init("recovery-service", config.log_format);
    ferry_recovery_service::run_until(config, args.config.as_deref(), ferry_shared::serving::shutdown_signal())
        .await
        .context("recovery-service")
}
