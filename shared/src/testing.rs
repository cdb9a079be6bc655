//! Test support shared by the crates' tests: free TCP ports that concurrently running test
//! processes do not hand out twice, and a throw-away single-member etcd ([`EtcdProcess`]).
//!
//! Compiled always (other crates' integration tests use it) but meant only for tests.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime},
};

use crate::control_plane::etcd::{EtcdServerTls, server_command};

/// How long a port reservation holds before another process may take the port again.
const RESERVATION_TTL: Duration = Duration::from_secs(600);

/// Attempts at finding an unreserved port before giving up on reservations.
const PORT_ATTEMPTS: usize = 1000;

fn reservation_dir() -> PathBuf {
    std::env::temp_dir().join("ferry-ports")
}

/// Reserves `port` for this process by creating `<tmp>/ferry-ports/<port>` exclusively; a
/// reservation older than [`RESERVATION_TTL`] is stale and taken over.
fn reserve(port: u16) -> bool {
    let dir = reservation_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        // Without a reservation directory, fall back to the kernel's choice alone.
        return true;
    }
    let path = dir.join(port.to_string());
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let stale = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > RESERVATION_TTL);
                if !stale {
                    return false;
                }
                // Stale: remove and try once more (another process may win the re-create).
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => return true,
        }
    }
    false
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range, with an exclusive
/// reservation file under `<tmp>/ferry-ports/` that keeps concurrently running test processes
/// from using the same port for [`RESERVATION_TTL`] (10 minutes).
///
/// Ports come from below the ephemeral range because a restarted service binds its port again:
/// a port the kernel handed out (bind to 0) may meanwhile be the local end of some outgoing
/// connection, and the restart would fail with "address in use".
pub fn free_port() -> u16 {
    use rand::Rng;
    let low = ephemeral_low().clamp(12_000, 32_768);
    let mut rng = rand::thread_rng();
    for _ in 0..PORT_ATTEMPTS {
        let port = rng.gen_range(10_000..low);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() && reserve(port) {
            return port;
        }
    }
    // Fall back to a port the kernel picks.
    let mut last = 0;
    for _ in 0..PORT_ATTEMPTS {
        let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) else { continue };
        let Ok(addr) = listener.local_addr() else { continue };
        drop(listener);
        last = addr.port();
        if reserve(last) {
            return last;
        }
    }
    last
}

/// The first port of the kernel's ephemeral range (32768 if it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// How long [`EtcdProcess::start`] waits for etcd to serve.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Poll interval while waiting for etcd.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The system etcd binary (Debian's `etcd-server`).
const ETCD_BINARY: &str = "/usr/bin/etcd";

/// A single-member etcd running from a temporary data directory, killed (and reaped) on drop.
#[derive(Debug)]
pub struct EtcdProcess {
    /// Client URL, `http://127.0.0.1:<port>` (`https://` when secured).
    pub endpoint: String,
    child: Option<Child>,
    log_path: PathBuf,
    dir: tempfile::TempDir,
    probe_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl EtcdProcess {
    /// Starts `/usr/bin/etcd` (plaintext, loopback) on two free ports with a fresh data
    /// directory and waits (at most 20 s) until it answers a KV request. On failure the error
    /// carries the tail of its log.
    pub async fn start() -> io::Result<Self> {
        Self::start_on(free_port()).await
    }

    /// [`EtcdProcess::start`] with the client port given (a test that starts a client first).
    pub async fn start_on(client_port: u16) -> io::Result<Self> {
        Self::launch(client_port, None).await
    }

    /// An etcd that serves only mutual TLS (`https://`), with the CA, server certificate and
    /// key that [`crate::tls::write_dev_pki`] wrote into `pki` (`ca.pem`, `etcd.pem`,
    /// `etcd.key`); readiness is probed with `probe`'s certificate. Authentication stays off
    /// until [`crate::control_plane::access::apply`] turns it on.
    pub async fn start_secured(pki: &std::path::Path, probe: &crate::tls::TlsMaterial) -> io::Result<Self> {
        let tls = EtcdServerTls {
            ca_file: pki.join("ca.pem"),
            cert_file: pki.join("etcd.pem"),
            key_file: pki.join("etcd.key"),
        };
        Self::launch(free_port(), Some((tls, probe.etcd_client_config()))).await
    }

    async fn launch(
        client_port: u16,
        tls: Option<(EtcdServerTls, tonic::transport::ClientTlsConfig)>,
    ) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-etcd-").tempdir()?;
        let log_path = dir.path().join("etcd.log");
        let log = File::create(&log_path)?;
        let child = server_command(
            std::path::Path::new(ETCD_BINARY),
            "default",
            &dir.path().join("data"),
            client_port,
            free_port(),
            tls.as_ref().map(|(server, _)| server),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut process = EtcdProcess {
            endpoint: format!("{scheme}://127.0.0.1:{client_port}"),
            child: Some(child),
            log_path,
            dir,
            probe_tls: tls.map(|(_, client)| client),
        };
        process.wait_ready(client_port).await?;
        Ok(process)
    }

    async fn wait_ready(&mut self, port: u16) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "etcd exited during start-up ({status}); log tail:\n{}",
                    self.log_tail()
                )));
            }
            let accepts = matches!(
                tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            if accepts && self.serves().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                self.kill();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("etcd did not serve on {} within {START_TIMEOUT:?}; log tail:\n{tail}", self.endpoint),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether etcd answers a real KV request (not just accepts TCP connections).
    async fn serves(&self) -> bool {
        let probe = async {
            let mut options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(1));
            if let Some(tls) = &self.probe_tls {
                options = options.with_tls(tls.clone());
            }
            let mut client = etcd_client::Client::connect([self.endpoint.as_str()], Some(options)).await.ok()?;
            client.get("/", Some(etcd_client::GetOptions::new().with_count_only())).await.ok()
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Some(_)))
    }

    /// Kills etcd (SIGKILL) and waits for it to exit; does nothing if it is gone already.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines (up to 8 KiB) of etcd's combined stdout and stderr.
    pub fn log_tail(&self) -> String {
        const TAIL: u64 = 8 * 1024;
        let Ok(mut file) = File::open(&self.log_path) else {
            return format!("(no log at {})", self.log_path.display());
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The temporary directory holding etcd's data and log (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_reserved() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        assert!(reservation_dir().join(a.to_string()).exists());
        assert!(!reserve(a), "a fresh reservation must not be handed out again");
    }
}
