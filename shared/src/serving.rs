//! Server plumbing both services share: gRPC reflection (v1 and v1alpha; grpcurl 1.8 speaks
//! only v1alpha), the plaintext health server for kubelet probes, and the shutdown signal.

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_reflection::server::Error as ReflectionError;

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

/// Serves gRPC health and reflection in plaintext on `listener` until `shutdown` turns true.
pub fn spawn_health_server<H: Health>(
    listener: TcpListener,
    health: HealthServer<H>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<Result<(), tonic::transport::Error>>, ReflectionError> {
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1()?)
        .add_service(reflection_v1alpha()?);
    Ok(tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
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
