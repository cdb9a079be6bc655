//! Telemetry set-up shared by every Ferry binary: a `tracing` subscriber writing to stderr,
//! filtered by `RUST_LOG` (default `info`), as text or JSON lines; OpenTelemetry export over
//! OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; and W3C trace context carried in gRPC
//! metadata, injected by every Ferry client ([`TraceContextInjector`]) and picked up by every
//! Ferry server ([`grpc_server_span`]), so one trace follows a recovery across processes.

use opentelemetry::{
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
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

/// Set once a tracer provider is installed: without one there is no trace to hand on, and
/// looking for stored trace context would be wasted I/O.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process records OpenTelemetry spans.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the trace exporter alive; dropping it flushes the spans still buffered.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace export did not shut down cleanly: {e}");
        }
    }
}

/// Installs the global subscriber for `service`, with OTLP export when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (standard `OTEL_*` variables apply). Safe to call more
/// than once (later calls change nothing), so tests that start several services in one
/// process can all call it.
pub fn init(service: &str, format: LogFormat) -> TelemetryGuard {
    init_with_default_filter(service, format, "info")
}

/// [`init`] with another default log filter when `RUST_LOG` is unset (`ferryctl` uses `warn`,
/// so its output stays the command's own).
pub fn init_with_default_filter(service: &str, format: LogFormat, default_filter: &str) -> TelemetryGuard {
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => match otlp_provider(service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("OTLP export to {endpoint} is off: {e}");
                None
            }
        },
        _ => None,
    };
    install(service, format, provider, default_filter)
}

fn otlp_provider(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service.to_string()).build())
        .build())
}

/// [`init`] with a given tracer provider (tests pass one with an in-memory exporter).
pub fn init_with_provider(service: &str, format: LogFormat, provider: Option<SdkTracerProvider>) -> TelemetryGuard {
    install(service, format, provider, "info")
}

fn install(
    service: &str,
    format: LogFormat,
    provider: Option<SdkTracerProvider>,
    default_filter: &str,
) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string())));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
    if result.is_ok() {
        EXPORTING.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(service, export = provider.is_some(), "telemetry initialised");
        TelemetryGuard { provider }
    } else {
        // Another subscriber was installed first; it owns export.
        TelemetryGuard { provider: None }
    }
}

/// Puts the current span's trace context into outgoing gRPC metadata (`traceparent`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInjector;

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(key, value);
        }
    }
}

impl tonic::service::Interceptor for TraceContextInjector {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut MetadataInjector(request.metadata_mut()))
        });
        Ok(request)
    }
}

/// The current span's W3C `traceparent`, to hand the trace to work that starts elsewhere (an
/// epoch proposal stored in etcd and applied by every node). `None` without an active trace.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// A span named `name` continuing the trace of `traceparent` (from [`current_traceparent`]).
pub fn continue_trace(span: tracing::Span, traceparent: Option<&str>) -> tracing::Span {
    if let Some(value) = traceparent {
        let carrier: std::collections::HashMap<String, String> =
            [("traceparent".to_string(), value.to_string())].into();
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let _ = span.set_parent(parent);
    }
    span
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// For `tonic::transport::Server::trace_fn`: one span per call, named after the method,
/// continuing the caller's trace when the request carries W3C trace context and the caller
/// proved who it is (a verified certificate; see [`crate::authz`]); anyone else's starts a
/// new trace.
pub fn grpc_server_span(
    service: &'static str,
    node: String,
) -> impl Fn(&http::Request<()>) -> tracing::Span + Clone + Send + Sync + 'static {
    move |request: &http::Request<()>| {
        let method = request.uri().path().to_string();
        let span = tracing::info_span!("grpc.server", otel.name = %method, otel.kind = "server", rpc.method = %method, ferry.service = service, ferry.node = %node);
        // The certificate is read only for a request that carries a context to continue.
        if request.headers().contains_key("traceparent") && crate::authz::may_continue_trace(request) {
            let parent =
                opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
            // No subscriber with OpenTelemetry: nothing to continue.
            let _ = span.set_parent(parent);
        }
        span
    }
}
