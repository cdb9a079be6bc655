//! gRPC conventions shared by Ferry's servers and clients: message size limits set explicitly
//! on both sides, client channels (mutual TLS, trace context, connect and request timeouts),
//! and conversions of domain errors into statuses a person can act on.

use std::time::Duration;

use std::sync::Arc;

use tonic::{
    Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    telemetry::TraceContextInjector,
    tls::TlsMaterial,
    types::{NodeId, TypeError},
};

/// Largest gRPC message Ferry sends or accepts (a sliver plus its metadata fits easily).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window of one stream a Ferry client receives (4 MiB).
pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// HTTP/2 flow-control window of one client connection (8 MiB).
pub const CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// How long a client waits for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Framing and fields besides the payload in an answer: a client's decode limit for a call is
/// what an honest peer sends plus this, so a peer cannot make it hold more.
pub const ANSWER_OVERHEAD_BYTES: usize = 4096;

/// The largest honest answer carrying slivers of `sliver_lens` bytes: the decode limit for
/// `GetSliver` and `GetSlivers`.
pub fn sliver_answer_limit(sliver_lens: impl Iterator<Item = usize>) -> usize {
    sliver_lens.map(|len| len + 8).sum::<usize>() + ANSWER_OVERHEAD_BYTES
}

/// A channel that carries the caller's trace context on every request.
pub type TracedChannel = InterceptedService<Channel, TraceContextInjector>;

/// Makes client channels to Ferry nodes: mutual TLS when the party has TLS material (the
/// server must prove it is the node the caller expects), plaintext otherwise.
#[derive(Debug, Clone, Default)]
pub struct Connector {
    tls: Option<Arc<TlsMaterial>>,
}

impl Connector {
    /// Plaintext channels (only with `tls.enabled = false`).
    pub fn plaintext() -> Self {
        Connector { tls: None }
    }

    /// Channels with TLS from `tls`, or plaintext for `None`.
    pub fn new(tls: Option<Arc<TlsMaterial>>) -> Self {
        Connector { tls }
    }

    /// A lazily connecting channel to node `server` at `address` (`host:port`).
    pub fn channel(
        &self,
        address: &str,
        server: &NodeId,
        request_timeout: Option<Duration>,
    ) -> Result<TracedChannel, Status> {
        let host_port = address.split_once("://").map_or(address, |(_, rest)| rest);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
            .map_err(|e| Status::invalid_argument(format!("bad peer address {address:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Large enough windows that a shard stream keeps flowing while the receiver writes a
            // batch; they bound what one stream can buffer.
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.client_config(server))
                .map_err(|e| Status::internal(format!("TLS set-up for {server}: {e}")))?;
        }
        if let Some(t) = request_timeout {
            endpoint = endpoint.timeout(t);
        }
        Ok(InterceptedService::new(endpoint.connect_lazy(), TraceContextInjector))
    }
}

/// A plaintext channel to a health port (`host:port`), which never uses TLS.
pub fn health_channel(address: &str, request_timeout: Duration) -> Result<Channel, Status> {
    Ok(Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| Status::invalid_argument(format!("bad health address {address:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(request_timeout)
        .connect_lazy())
}

/// `INVALID_ARGUMENT` for malformed input.
pub fn invalid(err: impl std::fmt::Display) -> Status {
    Status::invalid_argument(err.to_string())
}

impl From<TypeError> for Status {
    fn from(err: TypeError) -> Status {
        Status::invalid_argument(err.to_string())
    }
}
