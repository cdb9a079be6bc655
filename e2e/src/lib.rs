//! Test harness for Ferry's multi-node tests: a real etcd ([`EtcdProcess`]), and per node a
//! real sync-service (RocksDB store, gRPC on a loopback port) and optionally a
//! recovery-service, started in this process. Nodes talk mutual TLS with certificates from a
//! throw-away CA (set [`Cluster::tls`] false before starting for plaintext). Waits are bounded
//! and driven by the services' own watch channels, and every timeout says what it waited for.

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, anyhow, bail};
use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_recovery_service::{RecoveryServiceHandle, config::RecoveryConfig};
use ferry_shared::{
    Committee, Member,
    client::BlobClient,
    committee::rebalance,
    config::ControlPlaneConfig,
    control_plane::{ControlPlane, EpochPhase},
    crypto::NodeKeypair,
    grpc::{Connector, TracedChannel},
    testing::{EtcdProcess, free_port},
    tls::{self, TlsConfig},
    types::{BlobId, NodeId, NodeStatus, ShardIndex, ShardStatus},
};
use ferry_sync_service::{SyncServiceHandle, config::SyncConfig, node::NodeView};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tempfile::TempDir;

/// Default bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(60);

/// One node's slots: its identity, ports, directories and running services.
pub struct TestNode {
    /// Node id.
    pub id: NodeId,
    /// Key file.
    pub key_file: PathBuf,
    /// Public key hex.
    pub public_key: String,
    /// BLS key with its proof of possession, hex.
    pub bls_key: String,
    /// sync-service gRPC port.
    pub sync_port: u16,
    /// sync-service health port.
    pub sync_health_port: u16,
    /// recovery-service gRPC port.
    pub recovery_port: u16,
    /// recovery-service health port.
    pub recovery_health_port: u16,
    /// sync-service store directory.
    pub store_dir: PathBuf,
    /// recovery-service store directory.
    pub recovery_dir: PathBuf,
    /// Running sync-service.
    pub sync: Option<SyncServiceHandle>,
    /// Running recovery-service.
    pub recovery: Option<RecoveryServiceHandle>,
}

impl TestNode {
    /// The committee entry of this node.
    pub fn member(&self, weight: u64) -> Member {
        Member {
            node_id: self.id.clone(),
            public_key: self.public_key.clone(),
            bls_key: self.bls_key.clone(),
            sync_address: format!("127.0.0.1:{}", self.sync_port),
            recovery_address: format!("127.0.0.1:{}", self.recovery_port),
            weight,
        }
    }

    /// The running sync-service's node.
    pub fn node(&self) -> anyhow::Result<&Arc<ferry_sync_service::node::Node>> {
        self.sync.as_ref().map(|s| &s.node).ok_or_else(|| anyhow!("sync-service of {} is not running", self.id))
    }
}

/// A cluster of in-process nodes over a real etcd.
pub struct Cluster {
    /// The etcd process.
    pub etcd: EtcdProcess,
    /// The control plane (a client of that etcd).
    pub control_plane: ControlPlane,
    /// Cluster name.
    pub name: String,
    /// Temp directory holding every node's files.
    pub dir: TempDir,
    /// The nodes.
    pub nodes: Vec<TestNode>,
    /// Number of shards.
    pub n_shards: u32,
    /// Adjusts every sync-service config before start.
    pub tweak_sync: Box<dyn Fn(&mut SyncConfig) + Send + Sync>,
    /// Adjusts every recovery-service config before start.
    pub tweak_recovery: Box<dyn Fn(&mut RecoveryConfig) + Send + Sync>,
    /// Mutual TLS (default true); certificates for every node, for [`CLIENT`] and for [`APP`]
    /// are in [`Cluster::tls_dir`].
    pub tls: bool,
}

/// The identity tests use for data-plane and operator calls: an operator, as `ferryctl` is.
pub const CLIENT: &str = "ferryctl";
/// An application client: may store and read, not operate the node.
pub const APP: &str = "app";

impl Cluster {
    /// Starts etcd and prepares `n_nodes` nodes (keys, ports, directories); starts nothing else.
    pub async fn new(n_nodes: usize, n_shards: u32) -> anyhow::Result<Cluster> {
        ferry_shared::tls::install_crypto_provider();
        drop(ferry_shared::telemetry::init("ferry-e2e", ferry_shared::telemetry::LogFormat::Text));
        let etcd = EtcdProcess::start().await.context("start etcd")?;
        let name = "test".to_string();
        let control_plane = ControlPlane::connect_etcd(std::slice::from_ref(&etcd.endpoint), &name, None).await?;
        let dir = tempfile::Builder::new().prefix("ferry-e2e-").tempdir()?;
        let mut nodes = Vec::new();
        for i in 0..n_nodes {
            let id = NodeId::new(format!("node-{i}"))?;
            let key = NodeKeypair::generate();
            let key_file = dir.path().join(format!("{id}.key"));
            key.save(&key_file)?;
            nodes.push(TestNode {
                public_key: key.public_hex(),
                bls_key: key.bls_key_hex(),
                key_file,
                sync_port: free_port(),
                sync_health_port: free_port(),
                recovery_port: free_port(),
                recovery_health_port: free_port(),
                store_dir: dir.path().join(format!("{id}/sync")),
                recovery_dir: dir.path().join(format!("{id}/recovery")),
                id,
                sync: None,
                recovery: None,
            });
        }
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
        tls::write_dev_pki(&dir.path().join("tls"), &ids, CLIENT, APP)?;
        Ok(Cluster {
            etcd,
            control_plane,
            name,
            dir,
            nodes,
            n_shards,
            tweak_sync: Box::new(|_| {}),
            tweak_recovery: Box::new(|_| {}),
            tls: true,
        })
    }

    /// Where the CA and certificates are (`ca.pem`, `<name>.pem`, `<name>.key`).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The TLS settings of party `name` (a node id or [`CLIENT`]).
    pub fn tls_config(&self, name: &str) -> TlsConfig {
        if self.tls { TlsConfig::from_dir(&self.tls_dir(), name) } else { TlsConfig::plaintext() }
    }

    /// Client channels with the certificate of `name` (a node id or [`CLIENT`]).
    pub fn connector_as(&self, name: &str) -> anyhow::Result<Connector> {
        Ok(Connector::new(self.tls_config(name).load(None)?))
    }

    /// A channel to node `i`'s sync-service, presenting `name`'s certificate.
    pub fn sync_channel_as(&self, i: usize, name: &str) -> anyhow::Result<TracedChannel> {
        Ok(self.connector_as(name)?.channel(
            &format!("127.0.0.1:{}", self.nodes[i].sync_port),
            &self.nodes[i].id,
            Some(Duration::from_secs(30)),
        )?)
    }

    /// A TLS channel to node `i`'s sync-service that verifies the node but presents no
    /// certificate: an anonymous caller.
    pub async fn anonymous_channel(&self, i: usize) -> anyhow::Result<tonic::transport::Channel> {
        let ca = std::fs::read(self.tls_dir().join("ca.pem"))?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(ferry_shared::tls::node_server_name(&self.nodes[i].id));
        Ok(tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{}", self.nodes[i].sync_port))?
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// A channel to node `i`'s recovery-service, presenting `name`'s certificate.
    pub fn recovery_channel_as(&self, i: usize, name: &str) -> anyhow::Result<TracedChannel> {
        Ok(self.connector_as(name)?.channel(
            &format!("127.0.0.1:{}", self.nodes[i].recovery_port),
            &self.nodes[i].id,
            Some(Duration::from_secs(30)),
        )?)
    }

    /// Proposes the genesis committee (weight 1 each) and starts every sync-service; waits
    /// until all are `Active` at epoch 0.
    pub async fn start_genesis(&mut self) -> anyhow::Result<Committee> {
        let members = self.nodes.iter().map(|n| n.member(1)).collect();
        let genesis = Committee::genesis(self.n_shards, members)?;
        self.control_plane.propose_epoch(&genesis).await?;
        for i in 0..self.nodes.len() {
            self.start_sync(i).await?;
        }
        for i in 0..self.nodes.len() {
            self.wait_view(i, "Active at epoch 0", |v| v.status() == NodeStatus::Active && v.epoch() == 0).await?;
        }
        Ok(genesis)
    }

    /// The sync-service config of node `i`.
    pub fn sync_config(&self, i: usize) -> SyncConfig {
        let n = &self.nodes[i];
        let mut c = SyncConfig {
            node_id: n.id.to_string(),
            key_file: n.key_file.clone(),
            listen: ([127, 0, 0, 1], n.sync_port).into(),
            health_listen: ([127, 0, 0, 1], n.sync_health_port).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            tls: self.tls_config(n.id.as_str()),
            control_plane: ControlPlaneConfig {
                etcd_endpoints: vec![self.etcd.endpoint.clone()],
                cluster: self.name.clone(),
                ..ControlPlaneConfig::default()
            },
            ..SyncConfig::default()
        };
        c.store.path = n.store_dir.clone();
        c.shard_sync.initial_backoff_ms = 50;
        c.shard_sync.max_backoff_ms = 500;
        // Tests with a source down for good should not wait the production deadline (5 min).
        c.shard_sync.give_up_after_ms = 3_000;
        // The progress quantum shrinks with the window (64 blobs per 5 minutes in production):
        // tests that throttle a source's stream still make progress.
        c.shard_sync.progress_blobs = 1;
        // Nor a restarted node for a member that is down (the production deadline is 30 s);
        // and peers compare indexes often, so a missed blob is found within a test's wait.
        c.index.catch_up_deadline_ms = 2_000;
        c.index.anti_entropy_interval_ms = 1_000;
        (self.tweak_sync)(&mut c);
        c
    }

    /// The recovery-service config of node `i`.
    pub fn recovery_config(&self, i: usize) -> RecoveryConfig {
        let n = &self.nodes[i];
        let mut c = RecoveryConfig {
            node_id: n.id.to_string(),
            key_file: n.key_file.clone(),
            listen: ([127, 0, 0, 1], n.recovery_port).into(),
            health_listen: ([127, 0, 0, 1], n.recovery_health_port).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            tls: self.tls_config(n.id.as_str()),
            sync_service: format!("127.0.0.1:{}", n.sync_port),
            control_plane: ControlPlaneConfig {
                etcd_endpoints: vec![self.etcd.endpoint.clone()],
                cluster: self.name.clone(),
                ..ControlPlaneConfig::default()
            },
            store_path: n.recovery_dir.clone(),
            ..RecoveryConfig::default()
        };
        c.recovery.retry_initial_ms = 50;
        c.recovery.retry_max_ms = 500;
        c.recovery.peer_timeout_ms = 3000;
        (self.tweak_recovery)(&mut c);
        c
    }

    /// Starts node `i`'s sync-service.
    pub async fn start_sync(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.sync_config(i);
        let handle = ferry_sync_service::start_with(config, self.control_plane.clone())
            .await
            .with_context(|| format!("start sync-service of node {i}"))?;
        self.nodes[i].sync = Some(handle);
        Ok(())
    }

    /// Stops node `i`'s sync-service gracefully.
    pub async fn stop_sync(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(h) = self.nodes[i].sync.take() {
            h.shutdown().await?;
        }
        Ok(())
    }

    /// Starts node `i`'s recovery-service.
    pub async fn start_recovery(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.recovery_config(i);
        let handle = ferry_recovery_service::start_with(config, self.control_plane.clone())
            .await
            .with_context(|| format!("start recovery-service of node {i}"))?;
        self.nodes[i].recovery = Some(handle);
        Ok(())
    }

    /// Stops node `i`'s recovery-service.
    pub async fn stop_recovery(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(h) = self.nodes[i].recovery.take() {
            h.shutdown().await?;
        }
        Ok(())
    }

    /// Stops both services of node `i` gracefully, keeping its stores (a restart, not a wipe).
    pub async fn stop_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_recovery(i).await?;
        self.stop_sync(i).await
    }

    /// Starts both services of node `i`.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.start_sync(i).await?;
        self.start_recovery(i).await
    }

    /// `ferryctl audit` against the cluster (as [`CLIENT`]).
    pub async fn audit(&self) -> anyhow::Result<ferryctl::audit::AuditReport> {
        ferryctl::audit::run(&self.control_plane, &self.connector_as(CLIENT)?).await
    }

    /// Fails unless the audit finds every owned shard of every node holding every certified
    /// blob; the error is the audit's report.
    pub async fn assert_no_holes(&self) -> anyhow::Result<ferryctl::audit::AuditReport> {
        let report = self.audit().await?;
        if report.holes() > 0 {
            bail!("the audit found holes:\n{}", ferryctl::audit::render(&report));
        }
        Ok(report)
    }

    /// Deletes node `i`'s stores (its services must be stopped).
    pub fn wipe(&self, i: usize) -> anyhow::Result<()> {
        for dir in [&self.nodes[i].store_dir, &self.nodes[i].recovery_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
        }
        Ok(())
    }

    /// A blob client (with the [`CLIENT`] certificate).
    pub fn client(&self) -> BlobClient {
        let connector = self.connector_as(CLIENT).unwrap_or_else(|e| panic!("test client TLS material: {e:#}"));
        BlobClient::new(self.control_plane.clone(), connector, Duration::from_secs(10))
    }

    /// Stores `count` random blobs of 0 to `max_len` bytes (seeded); returns them.
    pub async fn store_random_blobs(
        &self,
        count: usize,
        max_len: usize,
        seed: u64,
    ) -> anyhow::Result<Vec<(BlobId, Vec<u8>)>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let client = self.client();
        let mut blobs = Vec::new();
        let data: Vec<Vec<u8>> = (0..count)
            .map(|_| {
                let mut data = vec![0u8; rng.gen_range(0..=max_len)];
                rng.fill(&mut data[..]);
                data
            })
            .collect();
        for chunk in data.chunks(ferry_shared::client::STORE_BATCH_BLOBS) {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            for (stored, data) in client.store_many(&refs).await?.into_iter().zip(chunk) {
                blobs.push((stored.context("store blob")?, data.clone()));
            }
        }
        Ok(blobs)
    }

    /// Reads every blob back and checks it byte for byte.
    pub async fn check_blobs(&self, blobs: &[(BlobId, Vec<u8>)]) -> anyhow::Result<()> {
        let client = self.client();
        for (id, data) in blobs {
            let read = client.read(id).await.with_context(|| format!("read {id}"))?;
            if &read != data {
                bail!("blob {id} read back different bytes ({} vs {} bytes)", read.len(), data.len());
            }
        }
        Ok(())
    }

    /// Every node as a member of weight 1, except node `heavy` with `weight`.
    pub fn weighted(&self, heavy: usize, weight: u64) -> Vec<Member> {
        self.nodes.iter().enumerate().map(|(i, n)| n.member(if i == heavy { weight } else { 1 })).collect()
    }

    /// The current committee.
    pub async fn committee(&self) -> anyhow::Result<Committee> {
        self.control_plane.current_committee().await?.ok_or_else(|| anyhow!("no committee"))
    }

    /// Proposes the next epoch with `members` (rebalanced); returns the new committee.
    pub async fn next_epoch(&self, members: Vec<Member>) -> anyhow::Result<Committee> {
        let current = self.committee().await?;
        let next = rebalance(&current, members)?;
        self.control_plane.propose_epoch(&next).await?;
        Ok(next)
    }

    /// Waits until node `i`'s sync-service view satisfies `pred`.
    pub async fn wait_view(&self, i: usize, what: &str, pred: impl Fn(&NodeView) -> bool) -> anyhow::Result<NodeView> {
        let mut rx = self.nodes[i].node()?.subscribe();
        let id = self.nodes[i].id.clone();
        let result = tokio::time::timeout(WAIT, rx.wait_for(|v| pred(v))).await.map(|r| r.map(|v| v.clone()));
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => bail!("node {id} stopped while waiting for: {what}"),
            Err(_) => {
                bail!("timed out after {WAIT:?} waiting for node {id}: {what}; last view: {}", describe(&rx.borrow()))
            }
        }
    }

    /// Waits until node `i` is `Active` with every owned shard `Active` at `epoch`.
    pub async fn wait_all_active(&self, i: usize, epoch: u64) -> anyhow::Result<NodeView> {
        let id = self.nodes[i].id.clone();
        self.wait_view(i, &format!("Active with all shards Active at epoch {epoch}"), |v| {
            v.epoch() == epoch
                && v.status() == NodeStatus::Active
                && v.owned(&id).iter().all(|s| v.shards.get(s).map(|r| r.status) == Some(ShardStatus::Active))
        })
        .await
    }

    /// Waits until the epoch's phase is `Done`.
    pub async fn wait_done(&self, epoch: u64) -> anyhow::Result<()> {
        wait_until(&format!("epoch {epoch} Done"), || async {
            Ok(self.control_plane.current().await? == Some(EpochPhase::Done(epoch)))
        })
        .await
    }

    /// A gRPC client to node `i`'s sync-service, as [`CLIENT`].
    pub async fn sync_client(&self, i: usize) -> anyhow::Result<SyncServiceClient<TracedChannel>> {
        self.sync_client_as(i, CLIENT).await
    }

    /// A gRPC client to node `i`'s sync-service, presenting `name`'s certificate.
    pub async fn sync_client_as(&self, i: usize, name: &str) -> anyhow::Result<SyncServiceClient<TracedChannel>> {
        Ok(SyncServiceClient::new(self.sync_channel_as(i, name)?)
            .max_decoding_message_size(ferry_shared::grpc::MAX_MESSAGE_BYTES))
    }

    /// All slivers of a shard on node `i`, in order.
    pub fn shard_contents(&self, i: usize, shard: ShardIndex) -> anyhow::Result<Vec<(BlobId, Vec<u8>)>> {
        Ok(self.nodes[i].node()?.store.read_shard(shard, None, usize::MAX, usize::MAX)?)
    }
}

/// Blobs a test stored, with their bytes.
pub type Blobs = Vec<(BlobId, Vec<u8>)>;

/// A 4-node, 8-shard cluster with both services on every node (sync-service configs adjusted
/// by `tweak`) and `count` seeded blobs of up to 2000 bytes.
pub async fn cluster_with_blobs(
    count: usize,
    tweak: impl Fn(&mut SyncConfig) + Send + Sync + 'static,
) -> anyhow::Result<(Cluster, Blobs)> {
    let mut cluster = Cluster::new(4, 8).await?;
    cluster.tweak_sync = Box::new(tweak);
    cluster.start_genesis().await?;
    for i in 0..4 {
        cluster.start_recovery(i).await?;
    }
    let blobs = cluster.store_random_blobs(count, 2000, 7).await?;
    Ok((cluster, blobs))
}

impl Cluster {
    /// Fails unless every owned shard of node `i` holds exactly the encoding of every blob in
    /// `blobs` (byte for byte, as the writer encoded it).
    pub fn check_shards_match_encoding(&self, i: usize, blobs: &[(BlobId, Vec<u8>)]) -> anyhow::Result<()> {
        let view = self.nodes[i].node()?.view();
        for shard in view.owned(&self.nodes[i].id) {
            let contents = self.shard_contents(i, shard)?;
            if contents.len() != blobs.len() {
                bail!("shard {shard} of node {i} holds {} of {} blobs", contents.len(), blobs.len());
            }
            for (id, data) in blobs {
                let expected = &ferry_shared::erasure::encode(data, self.n_shards)?.slivers[shard.as_usize()];
                if contents.iter().find(|(b, _)| b == id).map(|(_, d)| d) != Some(expected) {
                    bail!("the sliver of {id} in shard {shard} of node {i} is not the writer's");
                }
            }
        }
        Ok(())
    }
}

/// A one-line description of a view for failure messages.
pub fn describe(v: &NodeView) -> String {
    let shards: Vec<String> = v.shards.iter().map(|(s, r)| format!("{s}:{:?}", r.status)).collect();
    format!("epoch {} status {} shards [{}]", v.epoch(), v.status(), shards.join(", "))
}

/// Polls an external condition (etcd state) every 50 ms until it holds, for at most [`WAIT`].
/// Used only where no watch is available for the condition.
pub async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GetStatus` of a sync-service.
pub async fn status(client: &mut SyncServiceClient<TracedChannel>) -> anyhow::Result<pb::GetStatusResponse> {
    Ok(client.get_status(pb::GetStatusRequest {}).await?.into_inner())
}

/// Sends every span of this process (all in-process services) to an in-memory exporter;
/// keep the guard for the test's length.
pub fn trace_to_memory() -> (
    opentelemetry_sdk::trace::InMemorySpanExporter,
    opentelemetry_sdk::trace::SdkTracerProvider,
    ferry_shared::telemetry::TelemetryGuard,
) {
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider =
        opentelemetry_sdk::trace::SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let guard = ferry_shared::telemetry::init_with_provider(
        "ferry-e2e",
        ferry_shared::telemetry::LogFormat::Text,
        Some(provider.clone()),
    );
    (exporter, provider, guard)
}
