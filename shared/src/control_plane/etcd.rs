//! [`Kv`] over etcd's v3 API (`etcd-client`): gets, ranges, guarded transactions and
//! watches that replay history from a revision.
//!
//! Every call is bounded: the channel has a connect timeout ([`CONNECT_TIMEOUT`]) and a
//! per-request timeout ([`REQUEST_TIMEOUT`]), and each unary call is additionally wrapped in
//! a Tokio timeout, because a balanced channel with no reachable endpoint otherwise waits for
//! one forever. An unreachable etcd therefore surfaces as
//! [`ControlPlaneError::Unavailable`] instead of a hang.

use std::{
    collections::VecDeque,
    future::Future,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

use super::{ControlPlaneError, Guard, Kv, KvEvent, KvEventStream, Result, Versioned};
use crate::tls::TlsMaterial;

/// How long establishing a connection to an etcd endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one etcd request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Kv`] backed by an etcd cluster.
///
/// Cheap to share: every call clones the underlying [`etcd_client::Client`] (a handle onto
/// one multiplexed channel) instead of locking it.
#[derive(Clone)]
pub struct EtcdKv {
    client: Client,
    endpoints: String,
    /// The key whose read yields the current revision: inside the scope this party may read,
    /// so the probe works under etcd's RBAC.
    revision_probe: String,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdKv({})", self.endpoints)
    }
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` for a prefix):
/// the prefix with its last byte below `0xff` incremented and what follows dropped. A prefix
/// of only `0xff` bytes (or an empty one) has no such key; etcd spells "to the end" `\0`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn utf8_key(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| ControlPlaneError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: "key is not UTF-8".into(),
    })
}

impl EtcdKv {
    /// Connects to etcd at `endpoints` (`http://host:port`) and checks that it serves by
    /// reading the current revision; fails with [`ControlPlaneError::Unavailable`] within
    /// about [`REQUEST_TIMEOUT`] if it does not.
    /// `scope` is a key (or prefix) this party may read; the revision probe reads it.
    pub async fn connect(endpoints: &[String], identity: Option<&TlsMaterial>, scope: &str) -> Result<Self> {
        let client = connect_client(endpoints, identity).await?;
        let kv = EtcdKv { client, endpoints: endpoints.join(","), revision_probe: scope.to_string() };
        kv.revision().await?;
        Ok(kv)
    }

    /// The endpoints this store talks to, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn unavailable(&self, message: impl Into<String>) -> ControlPlaneError {
        ControlPlaneError::Unavailable { endpoints: self.endpoints.clone(), message: message.into() }
    }

    /// Runs one request with the Tokio-side bound and maps its error.
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => result.map_err(|e| request_error(&self.endpoints, what, e)),
            Err(_) => Err(self.unavailable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }
}

/// Whether `endpoints` need this party's certificate (`https://`).
pub(crate) fn needs_identity(endpoints: &[String]) -> bool {
    endpoints.iter().any(|e| e.starts_with("https://"))
}

/// A client of etcd at `endpoints`, with the connect and request timeouts and, for `https://`
/// endpoints, mutual TLS with `identity`'s certificate.
pub(crate) async fn connect_client(endpoints: &[String], identity: Option<&TlsMaterial>) -> Result<Client> {
    let unavailable = |message: String| ControlPlaneError::Unavailable { endpoints: endpoints.join(","), message };
    let mut options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
    if needs_identity(endpoints) {
        let identity = identity.ok_or_else(|| {
            unavailable("https:// endpoints need a TLS certificate to present (this party has none configured)".into())
        })?;
        options = options.with_tls(identity.etcd_client_config());
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(options))).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable(format!("no connection within {REQUEST_TIMEOUT:?}"))),
    }
}

/// A failed etcd request: a refusal by etcd's RBAC is [`ControlPlaneError::Denied`] (not worth
/// retrying), anything else [`ControlPlaneError::Unavailable`].
pub(crate) fn request_error(endpoints: &str, what: &str, error: etcd_client::Error) -> ControlPlaneError {
    match error {
        etcd_client::Error::GRpcStatus(status)
            if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) =>
        {
            ControlPlaneError::Denied {
                endpoints: endpoints.to_string(),
                what: what.to_string(),
                message: status.message().to_string(),
            }
        }
        other => {
            ControlPlaneError::Unavailable { endpoints: endpoints.to_string(), message: format!("{what}: {other}") }
        }
    }
}

/// State of a watch stream: the etcd watch (kept alive for the stream's lifetime), events of
/// the current response not yet yielded, and the last revision yielded.
struct WatchState {
    watch: WatchStream,
    pending: VecDeque<KvEvent>,
    last: u64,
    done: bool,
    endpoints: String,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<KvEvent>, WatchState)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last = event.revision;
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            let message = self.watch.message().await;
            match message {
                Ok(Some(response)) => {
                    if response.compact_revision() > 0 {
                        self.done = true;
                        let reason =
                            format!("etcd compacted its history up to revision {}", response.compact_revision());
                        return Some((Err(ControlPlaneError::WatchResume { after: self.last, reason }), self));
                    }
                    if response.canceled() {
                        self.done = true;
                        let reason = format!("etcd canceled the watch: {}", response.cancel_reason());
                        return Some((Err(ControlPlaneError::WatchResume { after: self.last, reason }), self));
                    }
                    for event in response.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(kv) = event.kv() else { continue };
                        let key = match utf8_key(kv.key()) {
                            Ok(key) => key,
                            Err(e) => {
                                self.done = true;
                                return Some((Err(e), self));
                            }
                        };
                        self.pending.push_back(KvEvent {
                            revision: to_u64(kv.mod_revision()),
                            key,
                            value: kv.value().to_vec(),
                        });
                    }
                }
                Ok(None) => {
                    self.done = true;
                    let error = ControlPlaneError::Unavailable {
                        endpoints: self.endpoints.clone(),
                        message: "etcd closed the watch stream".into(),
                    };
                    return Some((Err(error), self));
                }
                Err(e) => {
                    self.done = true;
                    let error = ControlPlaneError::Unavailable {
                        endpoints: self.endpoints.clone(),
                        message: format!("watch: {e}"),
                    };
                    return Some((Err(error), self));
                }
            }
        }
    }
}

#[async_trait]
impl Kv for EtcdKv {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let mut client = self.client.clone();
        let response = self.call("get", client.get(key, None)).await?;
        Ok(response.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            mod_revision: to_u64(kv.mod_revision()),
            version: to_u64(kv.version()),
        }))
    }

    async fn range(&self, prefix: &str, start: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>> {
        // Never start before the prefix, so only keys with the prefix come back.
        let from = match start {
            Some(s) if s > prefix => s,
            _ => prefix,
        };
        // etcd sorts by key, ascending, when no sort order is given; limit 0 is "no limit".
        let limit = if limit == usize::MAX { 0 } else { i64::try_from(limit).unwrap_or(0) };
        let mut options = GetOptions::new().with_range(prefix_end(prefix.as_bytes()));
        if limit > 0 {
            options = options.with_limit(limit);
        }
        let mut client = self.client.clone();
        let response = self.call("range", client.get(from, Some(options))).await?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                Ok((
                    utf8_key(kv.key())?,
                    Versioned {
                        value: kv.value().to_vec(),
                        mod_revision: to_u64(kv.mod_revision()),
                        version: to_u64(kv.version()),
                    },
                ))
            })
            .collect()
    }

    async fn txn(&self, guards: Vec<Guard>, puts: Vec<(String, Vec<u8>)>) -> Result<bool> {
        let compares: Vec<Compare> = guards
            .into_iter()
            .map(|guard| match guard {
                Guard::Absent(key) => Compare::version(key, CompareOp::Equal, 0),
                Guard::ModRevision(key, revision) => Compare::mod_revision(key, CompareOp::Equal, to_i64(revision)),
            })
            .collect();
        let ops: Vec<TxnOp> = puts.into_iter().map(|(key, value)| TxnOp::put(key, value, None)).collect();
        let txn = if compares.is_empty() { Txn::new().and_then(ops) } else { Txn::new().when(compares).and_then(ops) };
        let mut client = self.client.clone();
        let response = self.call("txn", client.txn(txn)).await?;
        Ok(response.succeeded())
    }

    async fn revision(&self) -> Result<u64> {
        let mut client = self.client.clone();
        let response = self
            .call("revision", client.get(self.revision_probe.as_str(), Some(GetOptions::new().with_count_only())))
            .await?;
        response
            .header()
            .map(|h| to_u64(h.revision()))
            .ok_or_else(|| self.unavailable("revision: the response has no header"))
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<KvEventStream> {
        // start_revision is inclusive, and 0 would mean "from now": after + 1 always replays
        // the history after `after` (all of it for after = 0).
        let start = to_i64(after.saturating_add(1));
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut client = self.client.clone();
        let watch = self.call("watch", client.watch(prefix, Some(options))).await?;
        let state =
            WatchState { watch, pending: VecDeque::new(), last: after, done: false, endpoints: self.endpoints.clone() };
        Ok(Box::pin(futures::stream::unfold(state, WatchState::next)))
    }
}

/// Files of an etcd server's mutual TLS: the CA that issued every client certificate, and the
/// server's own certificate and key (from [`crate::tls::ClusterCa::issue_etcd_server`]).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// The cluster CA (PEM): client certificates must chain to it.
    pub ca_file: PathBuf,
    /// The server certificate (PEM).
    pub cert_file: PathBuf,
    /// Its key (PEM).
    pub key_file: PathBuf,
}

/// A single-member etcd server for a local cluster or a test: `name` in `data_dir`, serving
/// clients on `client_port` and its peer port on `peer_port`, both on 127.0.0.1. With `tls`,
/// clients must present a certificate from the CA (`--client-cert-auth`), and once
/// [`super::access::apply`] has enabled authentication each is the user its common name
/// names; without, plaintext.
pub fn server_command(
    binary: &Path,
    name: &str,
    data_dir: &Path,
    client_port: u16,
    peer_port: u16,
    tls: Option<&EtcdServerTls>,
) -> Command {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(binary);
    command
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("{name}={peer_url}"), "--initial-cluster-state", "new"]);
    if let Some(tls) = tls {
        command
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(&tls.ca_file)
            .arg("--cert-file")
            .arg(&tls.cert_file)
            .arg("--key-file")
            .arg(&tls.key_file);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/ferry/a/"), b"/ferry/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
