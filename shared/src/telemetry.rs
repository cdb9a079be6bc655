//! Telemetry set-up shared by every Ferry binary: a `tracing` subscriber writing to stderr,
//! filtered by `RUST_LOG` (default `info`), as text or JSON lines.
//!
//! The OpenTelemetry (OTLP) exporter plugs in here as one more layer when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; until then that variable is reported and ignored.

use serde::{Deserialize, Serialize};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable text (default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber for `service`. Safe to call more than once (later calls
/// are no-ops), so tests that start several services in one process can all call it.
pub fn init(service: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
    if result.is_ok() {
        if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            tracing::warn!(%endpoint, "OTLP export is not built into this version; traces stay local");
        }
        tracing::debug!(service, "telemetry initialised");
    }
}
