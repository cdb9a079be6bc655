//! Prometheus metrics: a per-service registry, the plain-HTTP exposition endpoint
//! (`GET /metrics`), and a tower layer that records every RPC's latency by method and gRPC
//! status code, measured until the response stream ends (not when the handler returns).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use crate::{
    authz::{self, MethodTable},
    throttle::BackgroundThrottle,
    tls::PeerIdentity,
};
use http_body::{Body, Frame, SizeHint};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, Registry, TextEncoder};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, warn};

/// Largest request head the metrics endpoint reads; scrapers send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scraper that sends no complete request head within this time is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Registers `metric` in `registry`; a name clash is a programming error reported once.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        warn!(error = %e, "metric not registered");
    }
    metric
}

/// Renders `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        warn!(error = %e, "metrics encoding failed");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true. Anything else gets 404 (or
/// 405/400); requests are read with a size and time bound.
pub fn spawn_metrics_server(
    listener: TcpListener,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &registry).await {
                            debug!(%peer, error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    let line = head.split(|b| *b == b'\r').next().map(|l| String::from_utf8_lossy(l).into_owned()).unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else if path != "/metrics" && !path.starts_with("/metrics?") {
        ("404 Not Found", "text/plain", "only /metrics is served here\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed", "text/plain", "use GET\n".to_string())
    } else {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(registry))
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Binds the metrics port and starts serving `registry` on it.
pub async fn start_metrics_server(
    addr: SocketAddr,
    registry: Registry,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = crate::serving::bind_with_retry(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, spawn_metrics_server(listener, registry, shutdown)))
}

/// Fetches `/metrics` from `addr` (benchmarks and tests read counters this way, as Prometheus
/// would).
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, stream.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!(
            "unexpected metrics response: {}",
            out.lines().next().unwrap_or_default()
        ))),
    }
}

/// The sum of every sample of `name` whose label set contains all of `labels` (each written
/// as `key="value"`), in Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// RPC latency by method and gRPC code, for one server.
#[derive(Clone)]
pub struct RpcMetrics {
    latency: HistogramVec,
    /// `ferry_refused_connections_total`: connections closed because the port was at its
    /// connection limit.
    pub refused_connections: IntCounter,
    foreground: Option<Foreground>,
}

/// Which RPCs are clients' (their latency closes the background throttle) and where they go.
#[derive(Clone)]
struct Foreground {
    throttle: Arc<BackgroundThrottle>,
    methods: &'static [&'static str],
}

impl RpcMetrics {
    /// Registers `ferry_rpc_duration_seconds{method, code}` in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let opts = HistogramOpts::new(
            "ferry_rpc_duration_seconds",
            "Served RPCs: time from request to the end of the response stream, by method and gRPC status code.",
        )
        .buckets(buckets);
        let latency = HistogramVec::new(opts, &["method", "code"])?;
        let refused = IntCounter::new(
            "ferry_refused_connections_total",
            "Connections closed at once because the gRPC port had its maximum open (server.max_connections).",
        )?;
        Ok(RpcMetrics {
            latency: register(registry, latency),
            refused_connections: register(registry, refused),
            foreground: None,
        })
    }

    /// Also reports the latency of `methods` (gRPC paths) to `throttle` when a client or an
    /// operator made them; nodes' calls are background work of their own.
    pub fn with_foreground(mut self, throttle: Arc<BackgroundThrottle>, methods: &'static [&'static str]) -> Self {
        self.foreground = Some(Foreground { throttle, methods });
        self
    }

    fn is_foreground<B>(&self, method: &'static str, request: &http::Request<B>) -> bool {
        self.foreground.as_ref().is_some_and(|f| f.methods.contains(&method))
            && !matches!(authz::peer_identity(request), Ok(Some(PeerIdentity::Node(_))))
    }

    fn observe(&self, method: &'static str, code: &str, elapsed: Duration, foreground: bool) {
        self.latency.with_label_values(&[method, code]).observe(elapsed.as_secs_f64());
        if foreground
            && code == "OK"
            && let Some(f) = &self.foreground
        {
            f.throttle.record_foreground(method, elapsed);
        }
    }
}

/// The tower layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: RpcMetrics,
    methods: Arc<MethodTable>,
}

impl RpcMetricsLayer {
    /// Records into `metrics`, labelled by the methods of `methods` (any other path is
    /// `unknown`, so that callers cannot grow the registry).
    pub fn new(metrics: RpcMetrics, methods: Arc<MethodTable>) -> Self {
        RpcMetricsLayer { metrics, methods }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner, metrics: self.metrics.clone(), methods: self.methods.clone() }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
    methods: Arc<MethodTable>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let method = self.methods.label(request.uri().path());
        let foreground = self.metrics.is_foreground(method, &request);
        let metrics = self.metrics.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // A trailers-only response (most errors) carries the code in its headers.
            let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(code_name);
            Ok(response.map(|inner| MeteredBody {
                inner: Box::pin(inner),
                record: Some(Record { metrics, method, started, code, foreground }),
            }))
        })
    }
}

struct Record {
    metrics: RpcMetrics,
    method: &'static str,
    started: Instant,
    code: Option<&'static str>,
    foreground: bool,
}

/// A response body that records its RPC when it ends (or is dropped by a cancelled call).
pub struct MeteredBody<B> {
    inner: Pin<Box<B>>,
    record: Option<Record>,
}

impl<B> MeteredBody<B> {
    fn finish(&mut self) {
        if let Some(r) = self.record.take() {
            // Dropped before any status: the client went away.
            r.metrics.observe(r.method, r.code.unwrap_or("CANCELLED"), r.started.elapsed(), r.foreground);
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).map(code_name);
                    if let (Some(record), Some(code)) = (self.record.as_mut(), code) {
                        record.code = Some(code);
                    }
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(record) = self.record.as_mut() {
                    record.code.get_or_insert("INTERNAL");
                }
                self.finish();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn code_name(raw: &str) -> &'static str {
    match raw.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::Unknown) => "UNKNOWN",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        Err(_) => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let registry = Registry::new();
        let counter = register(&registry, prometheus::IntCounter::new("ferry_test_total", "A test counter.").unwrap());
        counter.inc_by(7);
        let (_tx, rx) = watch::channel(false);
        let (addr, _task) = start_metrics_server("127.0.0.1:0".parse().unwrap(), registry, rx).await.unwrap();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("ferry_test_total 7"), "{ok}");
        assert!(get(addr, "GET /other HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        let oversized = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST_HEAD + 10));
        assert!(get(addr, &oversized).await.starts_with("HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn scrape_and_sample_read_what_is_served() {
        let registry = Registry::new();
        let by_shard = register(
            &registry,
            prometheus::IntCounterVec::new(prometheus::Opts::new("ferry_x_total", "x"), &["shard"]).unwrap(),
        );
        by_shard.with_label_values(&["1"]).inc_by(2);
        by_shard.with_label_values(&["2"]).inc_by(3);
        let (_tx, rx) = watch::channel(false);
        let (addr, _task) = start_metrics_server("127.0.0.1:0".parse().unwrap(), registry, rx).await.unwrap();
        let text = scrape(addr).await.unwrap();
        assert_eq!(sample(&text, "ferry_x_total", &[]), 5.0);
        assert_eq!(sample(&text, "ferry_x_total", &["shard=\"2\""]), 3.0);
        assert_eq!(sample(&text, "ferry_x", &[]), 0.0, "a prefix is not a name");
    }

    #[test]
    fn codes_are_named() {
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("7"), "PERMISSION_DENIED");
        assert_eq!(code_name("x"), "UNKNOWN");
    }
}
