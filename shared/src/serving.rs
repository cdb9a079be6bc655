//! Server plumbing both services share: gRPC reflection (v1 and v1alpha; grpcurl 1.8 speaks
//! only v1alpha), the plaintext health server for kubelet probes, connection limits, and the
//! shutdown signal.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_reflection::server::Error as ReflectionError;

use crate::{
    authz::{Authentication, AuthzLayer, MethodTable, NoCommittee},
    config::{ConfigError, invalid},
    types::NodeId,
};

/// Limits on the connections of a gRPC port (`[server]`), so that no caller, authenticated or
/// not, can hold more than a bounded share of the node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Open connections per port; further connections are closed at once. Default 1024.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (calls) per connection. Default 256.
    pub max_streams_per_connection: u32,
    /// A TLS handshake not finished in this time closes the connection (ms). Default 10000.
    pub tls_handshake_timeout_ms: u64,
    /// HTTP/2 ping interval on idle connections (ms); a peer that does not answer within
    /// `keepalive_timeout_ms` is disconnected. Default 30000.
    pub keepalive_interval_ms: u64,
    /// See `keepalive_interval_ms`. Default 20000.
    pub keepalive_timeout_ms: u64,
    /// Largest header block of a request (bytes): metadata is small. Default 16384.
    pub max_header_list_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 1024,
            max_streams_per_connection: 256,
            tls_handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 20_000,
            max_header_list_bytes: 16 * 1024,
        }
    }
}

impl ServerConfig {
    /// Checks every limit is positive.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let checks = [
            ("max_connections", self.max_connections as u64),
            ("max_streams_per_connection", u64::from(self.max_streams_per_connection)),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("max_header_list_bytes", u64::from(self.max_header_list_bytes)),
        ];
        for (field, value) in checks {
            if value == 0 {
                return Err(invalid(&format!("{section}.{field}"), "must be positive"));
            }
        }
        Ok(())
    }

    /// The TLS handshake timeout, for `ServerTlsConfig::timeout`.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }

    /// A tonic server builder with these limits.
    pub fn builder(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_streams_per_connection)
            .http2_keepalive_interval(Some(Duration::from_millis(self.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(self.keepalive_timeout_ms)))
            .http2_max_header_list_size(self.max_header_list_bytes)
            .tcp_keepalive(Some(Duration::from_millis(self.keepalive_interval_ms)))
    }

    /// A builder with these limits and, with `tls`, mutual TLS (handshake timeout included),
    /// and how the authorisation layer is to treat callers. Without TLS the service warns that
    /// anyone who can reach the port can call every method.
    pub fn secured_builder(
        &self,
        tls: Option<&crate::tls::TlsMaterial>,
    ) -> Result<(tonic::transport::Server, Authentication), tonic::transport::Error> {
        let builder = self.builder();
        match tls {
            Some(tls) => Ok((
                builder.tls_config(tls.server_config().timeout(self.tls_handshake_timeout()))?,
                Authentication::ClientCertificates,
            )),
            None => {
                tracing::warn!(
                    "TLS is disabled (tls.enabled = false): callers are not authenticated and anyone who can reach this port can call every method"
                );
                Ok((builder, Authentication::None))
            }
        }
    }

    /// Accepts connections on `listener`, at most `max_connections` open at once; a connection
    /// beyond that is closed as soon as it is accepted, and `on_refused` is called.
    pub fn incoming(
        &self,
        listener: TcpListener,
        on_refused: impl Fn() + Send + 'static,
    ) -> impl Stream<Item = std::io::Result<CappedConnection>> + Send + 'static {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        TcpListenerStream::new(listener).filter_map(move |accepted| {
            let result = match accepted {
                Err(e) => Some(Err(e)),
                Ok(io) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        // tonic sets TCP_NODELAY only on connections it accepts itself. Without it
                        // a small answer after another waits for the caller's delayed ACK: 40 ms
                        // on Linux, the whole p99 of a small read.
                        if let Err(e) = io.set_nodelay(true) {
                            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
                        }
                        Some(Ok(CappedConnection { io, _permit: permit }))
                    }
                    Err(_) => {
                        tracing::warn!(peer = ?io.peer_addr().ok(), "connection limit reached; closing a new connection");
                        on_refused();
                        None
                    }
                },
            };
            std::future::ready(result)
        })
    }
}

/// An accepted connection holding one of the port's connection permits until it closes.
pub struct CappedConnection {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for CappedConnection {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for CappedConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Reflection service v1.
pub fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    ReflectionError,
> {
    reflection_builder().build_v1()
}

/// Reflection service v1alpha.
pub fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
    ReflectionError,
> {
    reflection_builder().build_v1alpha()
}

/// Serves gRPC health and reflection in plaintext on `listener` until `shutdown` turns true,
/// with the limits of `server` and nothing else reachable.
pub fn spawn_health_server<H: Health>(
    listener: TcpListener,
    health: HealthServer<H>,
    server: &ServerConfig,
    me: NodeId,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<Result<(), tonic::transport::Error>>, ReflectionError> {
    let authz = AuthzLayer::new(Arc::new(MethodTable::health_only()), Arc::new(NoCommittee(me)), Authentication::None);
    let router = server
        .builder()
        .layer(authz)
        .add_service(health)
        .add_service(reflection_v1()?)
        .add_service(reflection_v1alpha()?);
    let incoming = server.incoming(listener, || {});
    Ok(tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = shutdown.wait_for(|s| *s).await;
    })))
}

/// Binds `addr`, retrying for up to 10 s while it is still in use: a restarted process can
/// race the sockets of the one it replaces (a killed process releases them only when its last
/// thread has exited).
pub async fn bind_with_retry(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tracing::warn!(%addr, "address still in use; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
