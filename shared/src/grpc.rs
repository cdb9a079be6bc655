//! gRPC conventions shared by Ferry's servers and clients: message size limits set explicitly
//! on both sides, client channels with connect and request timeouts, and conversions of
//! domain errors into statuses a person can act on.

use std::time::Duration;

use tonic::{Status, transport::{Channel, Endpoint}};

use crate::types::TypeError;

/// Largest gRPC message Ferry sends or accepts (a sliver plus its metadata fits easily).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long a client waits for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connecting channel to `address` (`host:port` or a full `http://` URI).
pub fn channel(address: &str, request_timeout: Option<Duration>) -> Result<Channel, Status> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Status::invalid_argument(format!("bad peer address {address:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    Ok(endpoint.connect_lazy())
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
