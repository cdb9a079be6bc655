//! `ferryctl bench`: shard sync measured against per-blob recovery and against the machine's
//! limits, on real local clusters (etcd plus sync-service and recovery-service processes), every
//! comparison side by side in one run on the same seeded data.
//!
//! Each fill run starts a fresh cluster, stores the blobs, restarts node 0 (so its peak RSS
//! covers only the fill), then applies an epoch change that gives node 0 a shard and
//! measures until node 0 reports every owned shard `Active`. Bytes and RPC counts come from the
//! services' own Prometheus counters (sliver payload bytes; `GetStatus` polling excluded), CPU
//! time and peak RSS from `/proc` of node 0's processes.

pub mod scale;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    client::BlobClient,
    crypto::{self, NodeKeypair, StreamShardIntent},
    erasure,
    grpc::{Connector, TracedChannel},
    metrics::{sample, scrape},
    tls::TlsConfig,
    types::{NodeId, ShardIndex},
};
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    epoch::{self, MemberChanges},
    local::{LocalCluster, UpOptions, proc_status_bytes},
};

/// Parameters of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Working directory (deleted and recreated per cluster).
    pub dir: PathBuf,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Blobs at scale 1.
    pub blobs: usize,
    /// Bytes per blob.
    pub blob_size: usize,
    /// Shards (n); nodes are 4.
    pub shards: u32,
    /// Data scales for the scaling comparison (the largest is used for the limits).
    pub scales: Vec<usize>,
}

/// One fill of node 0's gained shards.
#[derive(Debug, Clone, Serialize)]
pub struct FillRun {
    /// `shard_sync` or `blob_recovery`.
    pub method: String,
    /// Mutual TLS on.
    pub tls: bool,
    /// Data scale.
    pub scale: usize,
    /// Blobs stored.
    pub blobs: usize,
    /// Shards node 0 gained.
    pub gained_shards: usize,
    /// Sliver bytes in the gained shards.
    pub gained_bytes: u64,
    /// Epoch proposed to every gained shard `Active` on node 0.
    pub wall_secs: f64,
    /// The transfer itself, without the epoch change's propagation: for shard sync from the
    /// first attempt's start to the end of the transfer, as node 0 records them (ms); for blob
    /// recovery from node 0's sync-state stream showing the new epoch to every shard `Active`.
    pub transfer_secs: f64,
    /// Sliver payload bytes moved over the network to fill them.
    pub bytes_fetched: u64,
    /// RPCs served by all services during the fill (`GetStatus` excluded).
    pub rpcs: u64,
    /// CPU time of node 0's sync-service and recovery-service during the fill.
    pub cpu_secs: f64,
    /// Peak RSS of node 0's sync-service since its restart before the fill.
    pub peak_rss_bytes: u64,
    /// `gained_bytes / wall_secs`.
    pub mib_per_sec: f64,
    /// `gained_bytes / transfer_secs`.
    pub transfer_mib_per_sec: f64,
    /// Every transfer measured (shard sync: three epochs, one more shard each; the median is
    /// reported above).
    pub transfer_samples_secs: Vec<f64>,
    /// Per-stream bandwidth cap of the run (bytes/s), 0 = none.
    pub paced_bytes_per_sec: u64,
    /// For the resume run: the fraction of the gained bytes synced when node 0 was killed.
    pub killed_at: Option<f64>,
}

/// The machine's limits, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Loopback TCP, one stream (MiB/s).
    pub tcp_mib_s: f64,
    /// Loopback TLS (rustls, ring) over one stream (MiB/s).
    pub tls_mib_s: f64,
    /// `StreamShard` over mutual TLS pulled by a client that neither verifies nor stores (MiB/s).
    pub tonic_tls_stream_mib_s: f64,
    /// RocksDB durable batched writes of the same slivers through Ferry's shard store (MiB/s).
    pub rocksdb_write_mib_s: f64,
}

/// Peak RSS growth while a shard streams to a slow reader.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRun {
    /// Slivers streamed.
    pub items: u64,
    /// Sliver bytes streamed.
    pub shard_bytes: u64,
    /// Peak RSS growth of the serving sync-service.
    pub server_growth_bytes: u64,
    /// Peak RSS growth of the reading client (this process).
    pub reader_growth_bytes: u64,
}

/// A target of issue #7 and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// The target.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Met?
    pub met: bool,
}

/// Everything one `ferryctl bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The machine.
    pub machine: String,
    /// Blobs at scale 1, bytes per blob, shards.
    pub parameters: String,
    /// Every fill run.
    pub fills: Vec<FillRun>,
    /// The machine's limits.
    pub limits: Limits,
    /// Slow-reader memory, at 1x and 16x the shard size.
    pub memory: Vec<MemoryRun>,
    /// The targets.
    pub targets: Vec<TargetCheck>,
    /// Total time of the run.
    pub total_secs: f64,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

/// How node 0 is disturbed during a fill.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Disturb {
    None,
    /// SIGKILL node 0's sync-service once this fraction of the gained bytes is synced.
    KillAt(f64),
}

struct FillSpec {
    method: &'static str,
    tls: bool,
    scale: usize,
    /// Per-stream bandwidth cap (bytes/s), 0 = none. Paced runs also write small batches,
    /// so progress is persisted (and a kill can land) throughout the stream.
    rate: u64,
    disturb: Disturb,
}

/// Runs the whole benchmark and returns the report.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let started = Instant::now();
    if options.scales.is_empty() || options.blobs == 0 || options.blob_size == 0 {
        bail!("--blobs, --blob-size and --scales must be positive");
    }
    std::fs::create_dir_all(&options.dir)?;
    let mut fills = Vec::new();
    let max_scale = options.scales.iter().copied().max().unwrap_or(1);
    let mut limits = None;
    for &scale in &options.scales {
        for method in ["shard_sync", "blob_recovery"] {
            let spec = FillSpec { method, tls: true, scale, rate: 0, disturb: Disturb::None };
            let keep = method == "shard_sync" && scale == max_scale;
            let (run, cluster) = fill(options, &spec, keep).await?;
            say(format!(
                "{method} x{scale}: {:.2} s, {} fetched, {} RPCs",
                run.wall_secs,
                mib(run.bytes_fetched),
                run.rpcs
            ));
            fills.push(run);
            if let Some(mut cluster) = cluster {
                let measured = measure_limits(&cluster, options, scale).await;
                cluster.down()?;
                limits = Some(measured?);
            }
        }
    }
    let limits = limits.context("no limits measured")?;
    say(format!(
        "limits: tcp {:.0} MiB/s, tls {:.0} MiB/s, tonic TLS stream {:.0} MiB/s, rocksdb {:.0} MiB/s",
        limits.tcp_mib_s, limits.tls_mib_s, limits.tonic_tls_stream_mib_s, limits.rocksdb_write_mib_s
    ));

    // TLS tax: the largest shard sync again, plaintext.
    let (plain, _) = fill(
        options,
        &FillSpec { method: "shard_sync", tls: false, scale: max_scale, rate: 0, disturb: Disturb::None },
        false,
    )
    .await?;
    say(format!("shard_sync x{max_scale} plaintext: {:.2} s", plain.wall_secs));
    fills.push(plain);

    // Resume: a paced sync (so the kill lands mid-stream), uninterrupted and killed at 50%.
    let resume_scale = options.scales.iter().copied().filter(|s| *s > 1).min().unwrap_or(max_scale);
    let shard_bytes = gained_shard_bytes_estimate(options, resume_scale)?;
    let rate = (shard_bytes / 3).max(64 * 1024); // about 3 s per stream
    let (uninterrupted, _) = fill(
        options,
        &FillSpec { method: "shard_sync", tls: true, scale: resume_scale, rate, disturb: Disturb::None },
        false,
    )
    .await?;
    let (killed, _) = fill(
        options,
        &FillSpec { method: "shard_sync", tls: true, scale: resume_scale, rate, disturb: Disturb::KillAt(0.5) },
        false,
    )
    .await?;
    say(format!(
        "resume x{resume_scale}: uninterrupted {:.2} s, killed at {:.0}% {:.2} s",
        uninterrupted.wall_secs,
        killed.killed_at.unwrap_or(0.0) * 100.0,
        killed.wall_secs
    ));
    fills.push(uninterrupted);
    fills.push(killed);

    let memory = measure_memory(options).await?;
    let targets = check_targets(&fills, &limits, &memory);
    Ok(BenchReport {
        machine: machine(),
        parameters: format!(
            "4 nodes, {} shards, {} blobs x {} bytes at scale 1, scales {:?}",
            options.shards, options.blobs, options.blob_size, options.scales
        ),
        fills,
        limits,
        memory,
        targets,
        total_secs: started.elapsed().as_secs_f64(),
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn gained_shard_bytes_estimate(options: &BenchOptions, scale: usize) -> anyhow::Result<u64> {
    let k = erasure::original_count(options.shards)?;
    Ok((erasure::sliver_len(options.blob_size as u64, k)? * options.blobs * scale) as u64)
}

fn blob_data(i: usize, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(0xfe22 + i as u64);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

async fn store_blobs(client: &BlobClient, count: usize, len: usize) -> anyhow::Result<()> {
    let results: Vec<_> = futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            async move { client.store(&blob_data(i, len)).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

fn sync_channel(cluster: &LocalCluster, connector: &Connector, i: usize) -> anyhow::Result<TracedChannel> {
    let n = &cluster.nodes[i];
    Ok(connector.channel(&format!("127.0.0.1:{}", n.sync_port), &n.id, Some(Duration::from_secs(30)))?)
}

/// Counters summed over every service of the cluster.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    stream_bytes: f64,
    recovery_bytes: f64,
    rpcs: f64,
}

async fn counters(cluster: &LocalCluster) -> anyhow::Result<Counters> {
    let mut c = Counters::default();
    for n in &cluster.nodes {
        for (port, is_sync) in [(n.sync_metrics_port, true), (n.recovery_metrics_port, false)] {
            let text = scrape(SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .with_context(|| format!("metrics of {}", n.id))?;
            if is_sync {
                c.stream_bytes += sample(&text, "ferry_stream_bytes_total", &[]);
            } else {
                c.recovery_bytes += sample(&text, "ferry_recovery_bytes_fetched_total", &[]);
            }
            let polled = sample(&text, "ferry_rpc_duration_seconds_count", &["GetStatus"])
                + sample(&text, "ferry_rpc_duration_seconds_count", &["GetRecoveryStatus"]);
            c.rpcs += sample(&text, "ferry_rpc_duration_seconds_count", &[]) - polled;
        }
    }
    Ok(c)
}

fn proc_cpu_secs(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/<pid>/stat (utime, stime) in clock ticks; Linux uses 100 Hz.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return 0.0 };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    ticks as f64 / 100.0
}

async fn fill(options: &BenchOptions, spec: &FillSpec, keep: bool) -> anyhow::Result<(FillRun, Option<LocalCluster>)> {
    let label = format!(
        "{}-x{}{}{}",
        spec.method,
        spec.scale,
        if spec.tls { "" } else { "-plain" },
        if spec.disturb == Disturb::None { "" } else { "-killed" }
    );
    let dir = options.dir.join(&label);
    if dir.exists() {
        if let Ok(mut old) = LocalCluster::load(&dir) {
            let _ = old.down();
        }
        std::fs::remove_dir_all(&dir)?;
    }
    let batch_items = if spec.rate > 0 { 8 } else { 64 };
    let sync_extra = format!(
        "[shard_sync]\nfill_gained_by = \"{}\"\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\nbatch_items = {batch_items}\n[stream]\nmax_bytes_per_sec = {}\n",
        spec.method, spec.rate
    );
    let up = UpOptions {
        nodes: 4,
        shards: options.shards,
        dir: dir.clone(),
        bin_dir: options.bin_dir.clone(),
        sync_extra,
        recovery_extra: "[recovery]\nretry_initial_ms = 50\nretry_max_ms = 500\n".into(),
        tls: spec.tls,
    };
    let mut cluster = LocalCluster::up(&up).await.with_context(|| format!("start cluster {label}"))?;
    let result = fill_on(&mut cluster, options, spec).await;
    match result {
        Ok(run) if keep => Ok((run, Some(cluster))),
        Ok(run) => {
            cluster.down()?;
            Ok((run, None))
        }
        Err(e) => {
            let _ = cluster.down();
            Err(e.context(format!("fill run {label}; logs in {}", dir.join("logs").display())))
        }
    }
}

async fn fill_on(cluster: &mut LocalCluster, options: &BenchOptions, spec: &FillSpec) -> anyhow::Result<FillRun> {
    let cp = cluster.control_plane().await?;
    let connector = cluster.connector()?;
    let blobs = options.blobs * spec.scale;
    store_blobs(&BlobClient::new(cp.clone(), connector.clone(), Duration::from_secs(60)), blobs, options.blob_size)
        .await?;
    // A fresh node-0 process, so its peak RSS covers the fill alone.
    cluster.stop_node(0)?;
    cluster.start_node(0)?;
    cluster.wait_healthy(0).await?;

    let k = erasure::original_count(options.shards)?;
    let sliver = erasure::sliver_len(options.blob_size as u64, k)?;
    let before = counters(cluster).await?;
    let pids = |c: &LocalCluster| [c.nodes[0].sync_pid, c.nodes[0].recovery_pid];
    let cpu_before: f64 = pids(cluster).iter().flatten().map(|p| proc_cpu_secs(*p)).sum();
    let first = gain_one_shard(cluster, &cp, spec, blobs, sliver).await?;
    let after = counters(cluster).await?;
    let cpu_after: f64 = pids(cluster).iter().flatten().map(|p| proc_cpu_secs(*p)).sum::<f64>() + first.cpu_of_killed;
    let peak_rss = cluster.nodes[0].sync_pid.map(|p| proc_status_bytes(p, "VmHWM:")).unwrap_or(0);
    let bytes_fetched = if spec.method == "shard_sync" {
        after.stream_bytes - before.stream_bytes
    } else {
        after.recovery_bytes - before.recovery_bytes
    };
    // Sub-second shard syncs vary with background compaction: two more epochs, each giving
    // node 0 another shard of the same data, and the median of the three is reported.
    let mut walls = vec![first.wall];
    let mut transfers = vec![first.transfer];
    if spec.method == "shard_sync" && spec.rate == 0 && spec.disturb == Disturb::None {
        for _ in 0..2 {
            let again = gain_one_shard(cluster, &cp, spec, blobs, sliver).await?;
            walls.push(again.wall);
            transfers.push(again.transfer);
        }
    }
    let wall = median(&mut walls);
    let transfer = median(&mut transfers);
    let gained_bytes = first.gained_bytes;
    Ok(FillRun {
        method: spec.method.into(),
        tls: spec.tls,
        scale: spec.scale,
        blobs,
        gained_shards: first.gained_shards,
        gained_bytes,
        wall_secs: wall,
        bytes_fetched: bytes_fetched.max(0.0) as u64,
        rpcs: (after.rpcs - before.rpcs).max(0.0) as u64,
        cpu_secs: (cpu_after - cpu_before).max(0.0),
        peak_rss_bytes: peak_rss,
        mib_per_sec: gained_bytes as f64 / (1024.0 * 1024.0) / wall.max(1e-9),
        transfer_secs: transfer,
        transfer_mib_per_sec: gained_bytes as f64 / (1024.0 * 1024.0) / transfer.max(1e-9),
        transfer_samples_secs: transfers,
        paced_bytes_per_sec: spec.rate,
        killed_at: first.killed_at,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// One epoch change that gives node 0 one more shard, measured.
struct EpochFill {
    gained_shards: usize,
    gained_bytes: u64,
    wall: f64,
    transfer: f64,
    killed_at: Option<f64>,
    cpu_of_killed: f64,
}

async fn gain_one_shard(
    cluster: &mut LocalCluster,
    cp: &ferry_shared::control_plane::ControlPlane,
    spec: &FillSpec,
    blobs: usize,
    sliver: usize,
) -> anyhow::Result<EpochFill> {
    // The smallest weight increase that gives node 0 a shard (the comparison is per gained
    // shard: blob recovery rebuilds every missing shard of a blob from the same k slivers).
    let me = cluster.nodes[0].id.clone();
    let current = cp.current_committee().await?.context("no committee")?;
    let weight = current.member(&me).map(|m| m.weight).unwrap_or(1);
    let mut chosen = None;
    for w in weight + 1..=weight + 8 {
        let plan = epoch::plan(cp, &MemberChanges { weights: vec![(me.clone(), w)], ..Default::default() }).await?;
        let gained: Vec<ShardIndex> = plan.moves.iter().filter(|m| m.to == me).map(|m| m.shard).collect();
        if !gained.is_empty() {
            chosen = Some((plan, gained));
            break;
        }
    }
    let Some((plan, gained)) = chosen else { bail!("no weight increase up to 8 gives node 0 a shard") };
    let target = plan.next.epoch;
    let gained_bytes = (gained.len() * blobs * sliver) as u64;
    let connector = cluster.connector()?;
    // Node 0's own sync-state stream (as node 0) shows the epoch arriving and the shards
    // turning Active the moment they do; polling GetStatus would be coarser and costlier.
    let own = node_connector(cluster, 0)?;
    let watch = |c: &LocalCluster| -> anyhow::Result<SyncServiceClient<TracedChannel>> {
        Ok(SyncServiceClient::new(sync_channel(c, &own, 0)?))
    };
    let mut states = watch(cluster)?.watch_sync_state(pb::WatchSyncStateRequest {}).await?.into_inner();
    let t0 = Instant::now();
    cp.propose_epoch(&plan.next).await?;
    let mut killed_at = None;
    let mut cpu_of_killed = 0.0;
    let mut epoch_seen: Option<Instant> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut kill_poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let kill_pending = matches!(spec.disturb, Disturb::KillAt(_)) && killed_at.is_none();
        tokio::select! {
            message = states.message() => match message {
                Ok(Some(state)) => {
                    if state.epoch == target && epoch_seen.is_none() {
                        epoch_seen = Some(Instant::now());
                    }
                    if state.epoch == target && state.node_status == pb::NodeStatus::Active as i32 && state.shards_not_active.is_empty() {
                        break;
                    }
                }
                // The stream ends when node 0 is killed: follow the restarted one.
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Ok(r) = watch(cluster)?.watch_sync_state(pb::WatchSyncStateRequest {}).await {
                        states = r.into_inner();
                    }
                }
            },
            _ = kill_poll.tick(), if kill_pending => {
                let Disturb::KillAt(fraction) = spec.disturb else { continue };
                let mut client = SyncServiceClient::new(sync_channel(cluster, &connector, 0)?);
                if let Ok(status) = client.get_status(pb::GetStatusRequest {}).await.map(|r| r.into_inner()) {
                    let synced: u64 = status.shards.iter().filter(|s| gained.iter().any(|g| g.0 == s.shard)).filter_map(|s| s.sync.as_ref()).map(|p| p.bytes_done).sum();
                    if synced as f64 >= fraction * gained_bytes as f64 {
                        cpu_of_killed = cluster.nodes[0].sync_pid.map(proc_cpu_secs).unwrap_or(0.0);
                        cluster.kill_service(0, "sync-service")?;
                        killed_at = Some(synced as f64 / gained_bytes as f64);
                        cluster.start_node(0)?;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => bail!("node 0 did not fill its gained shards within 600 s"),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    // Shard sync: the node's own record of when the first attempt started and the transfer
    // finished. Blob recovery keeps no such record: from the new epoch on node 0's stream.
    let mut client = SyncServiceClient::new(sync_channel(cluster, &connector, 0)?);
    let status = client.get_status(pb::GetStatusRequest {}).await?.into_inner();
    let syncs: Vec<&pb::ShardSyncProgress> = status
        .shards
        .iter()
        .filter(|s| gained.iter().any(|g| g.0 == s.shard))
        .filter_map(|s| s.sync.as_ref())
        .filter(|p| p.gained_epoch == target && p.started_at_ms > 0 && p.finished_at_ms > 0)
        .collect();
    let transfer = match (syncs.iter().map(|p| p.started_at_ms).min(), syncs.iter().map(|p| p.finished_at_ms).max()) {
        (Some(started), Some(finished)) if syncs.len() == gained.len() => {
            finished.saturating_sub(started) as f64 / 1000.0
        }
        _ => epoch_seen.map(|t| t.elapsed().as_secs_f64()).unwrap_or(wall),
    };
    // The next proposal needs this epoch done (every member attested).
    let done = tokio::time::Instant::now() + Duration::from_secs(120);
    while cp.current().await? != Some(ferry_shared::control_plane::EpochPhase::Done(target)) {
        if tokio::time::Instant::now() > done {
            bail!("epoch {target} not done within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(EpochFill { gained_shards: gained.len(), gained_bytes, wall, transfer, killed_at, cpu_of_killed })
}

/// Channels with node `i`'s own certificate (what its recovery-service uses).
fn node_connector(cluster: &LocalCluster, i: usize) -> anyhow::Result<Connector> {
    if cluster.tls {
        Ok(Connector::new(TlsConfig::from_dir(&cluster.tls_dir(), cluster.nodes[i].id.as_str()).load(None)?))
    } else {
        Ok(Connector::plaintext())
    }
}

/// Streams `shard` from node `i` as node `i` itself (its key and certificate), reading with
/// `delay` per item and neither verifying nor storing; returns (items, bytes, seconds).
async fn pull_shard(
    cluster: &LocalCluster,
    i: usize,
    shard: ShardIndex,
    limit: u64,
    delay: Duration,
    mut on_item: impl FnMut(),
) -> anyhow::Result<(u64, u64, f64)> {
    let node = &cluster.nodes[i];
    let key = NodeKeypair::load(&cluster.dir.join("nodes").join(node.id.as_str()).join("node.key"))?;
    let connector = node_connector(cluster, i)?;
    let epoch = cluster.control_plane().await?.current_committee().await?.context("no committee")?.epoch;
    let request = StreamShardIntent {
        cluster: &cluster.name,
        server: &node.id,
        shard,
        epoch,
        start: None,
        requester: &node.id,
        timestamp_ms: crypto::now_ms(),
        include_metadata: false,
        limit,
        include_certificates: false,
    }
    .sign(&key);
    let mut client = SyncServiceClient::new(sync_channel(cluster, &connector, i)?)
        .max_decoding_message_size(ferry_shared::grpc::MAX_MESSAGE_BYTES);
    let started = Instant::now();
    let mut stream = client.stream_shard(request).await?.into_inner();
    let (mut items, mut bytes) = (0u64, 0u64);
    while let Some(item) = stream.message().await? {
        if item.end {
            break;
        }
        items += 1;
        bytes += item.data.len() as u64;
        on_item();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    Ok((items, bytes, started.elapsed().as_secs_f64()))
}

async fn measure_limits(cluster: &LocalCluster, options: &BenchOptions, scale: usize) -> anyhow::Result<Limits> {
    const RAW_BYTES: usize = 256 * 1024 * 1024;
    let tcp_mib_s = loopback_throughput(RAW_BYTES, None).await?;
    let tls_mib_s = loopback_throughput(RAW_BYTES, Some(&cluster.tls_dir())).await?;
    // Node 0 now owns its gained shards; pull every shard it owns, as itself.
    let committee = cluster.control_plane().await?.current_committee().await?.context("no committee")?;
    let me: &NodeId = &cluster.nodes[0].id;
    let (mut bytes, mut secs) = (0u64, 0f64);
    for shard in committee.shards_of(me) {
        let (_, b, s) = pull_shard(cluster, 0, shard, 0, Duration::ZERO, || {}).await?;
        bytes += b;
        secs += s;
    }
    let tonic_tls_stream_mib_s = bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9);
    let rocksdb_write_mib_s = rocksdb_throughput(options, scale).await?;
    Ok(Limits { tcp_mib_s, tls_mib_s, tonic_tls_stream_mib_s, rocksdb_write_mib_s })
}

/// One loopback stream of `total` bytes in 64 KiB writes, plain or TLS with the cluster's
/// node-0 certificate; MiB/s at the receiver.
async fn loopback_throughput(total: usize, tls_dir: Option<&Path>) -> anyhow::Result<f64> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tls = match tls_dir {
        Some(dir) => {
            let certs = CertificateDer::pem_file_iter(dir.join("node-0.pem"))?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(dir.join("node-0.key"))?;
            let server = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(dir.join("ca.pem"))? {
                roots.add(ca?)?;
            }
            let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            Some((
                tokio_rustls::TlsAcceptor::from(Arc::new(server)),
                tokio_rustls::TlsConnector::from(Arc::new(client)),
            ))
        }
        None => None,
    };
    let acceptor = tls.as_ref().map(|(a, _)| a.clone());
    let receiver = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let (got, started) = match acceptor {
            Some(acceptor) => {
                let stream = acceptor.accept(socket).await?;
                let started = Instant::now();
                (read_to_end_counting(stream).await?, started)
            }
            None => {
                let started = Instant::now();
                (read_to_end_counting(socket).await?, started)
            }
        };
        Ok::<_, std::io::Error>((got, started.elapsed()))
    });
    let socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let received = match tls {
        Some((_, connector)) => {
            let stream = connector.connect(ServerName::try_from("node-0.node.ferry")?.to_owned(), socket).await?;
            write_chunks(stream, total).await?;
            receiver.await??
        }
        None => {
            write_chunks(socket, total).await?;
            receiver.await??
        }
    };
    let (got, elapsed) = received;
    Ok(got as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64())
}

/// Reads until the writer closes (EOF or TLS close_notify); the byte count.
async fn read_to_end_counting(mut stream: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got += n;
    }
}

/// Writes `total` bytes in 64 KiB writes, then closes the write side.
async fn write_chunks(mut stream: impl tokio::io::AsyncWrite + Unpin, total: usize) -> std::io::Result<()> {
    let chunk = vec![0x5au8; 64 * 1024];
    for _ in 0..total / chunk.len() {
        stream.write_all(&chunk).await?;
    }
    stream.flush().await?;
    stream.shutdown().await
}

/// Writes the slivers of one gained shard at `scale` into a fresh shard store, the way shard
/// sync does (batches of 64 with their progress, durable); MiB/s.
async fn rocksdb_throughput(options: &BenchOptions, scale: usize) -> anyhow::Result<f64> {
    use ferry_sync_service::{
        config::StoreConfig,
        store::{ShardRecord, ShardStore, SliverWrite},
    };
    let dir = tempfile::Builder::new().prefix("ferry-bench-rocksdb-").tempdir_in(&options.dir)?;
    let store = ShardStore::open(&StoreConfig { path: dir.path().join("store"), ..StoreConfig::default() })?;
    let shard = ShardIndex(0);
    store.ensure_shard_storage(shard)?;
    let k = erasure::original_count(options.shards)?;
    let len = erasure::sliver_len(options.blob_size as u64, k)?;
    let count = options.blobs * scale;
    let record = ShardRecord::new(ferry_shared::types::ShardStatus::ActiveSync);
    let mut rng = StdRng::seed_from_u64(7);
    let batches: Vec<Vec<SliverWrite>> = (0..count)
        .collect::<Vec<_>>()
        .chunks(64)
        .map(|chunk| {
            chunk
                .iter()
                .map(|_| {
                    let mut id = [0u8; 32];
                    rng.fill(&mut id);
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data[..]);
                    SliverWrite { blob_id: ferry_shared::types::BlobId(id), data, metadata: None }
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut bytes = 0u64;
        for batch in &batches {
            store.write_sync_batch(shard, batch, &[], &[], &record)?;
            bytes += batch.iter().map(|w| w.data.len() as u64).sum::<u64>();
        }
        Ok(bytes)
    })
    .await??;
    Ok(written as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64())
}

/// A shard of 1x and 16x the size streamed to a reader that sleeps per item; peak RSS growth of
/// the server (sampled every 20 ms) and of this process.
async fn measure_memory(options: &BenchOptions) -> anyhow::Result<Vec<MemoryRun>> {
    let dir = options.dir.join("memory");
    if dir.exists() {
        if let Ok(mut old) = LocalCluster::load(&dir) {
            let _ = old.down();
        }
        std::fs::remove_dir_all(&dir)?;
    }
    // 256 KiB blobs: 64 KiB slivers at n = 8, so the 16-item channel holds 1 MiB and a read
    // batch 2 MiB; the 1x shard is already twice the channel, the 16x one 32 times.
    let blob_size = 256 * 1024;
    let base = 24usize;
    let up = UpOptions {
        nodes: 4,
        shards: options.shards,
        dir: dir.clone(),
        bin_dir: options.bin_dir.clone(),
        sync_extra: String::new(),
        recovery_extra: String::new(),
        tls: true,
    };
    let mut cluster = LocalCluster::up(&up).await?;
    let result = async {
        let cp = cluster.control_plane().await?;
        store_blobs(&BlobClient::new(cp.clone(), cluster.connector()?, Duration::from_secs(60)), base * 16, blob_size)
            .await?;
        let committee = cp.current_committee().await?.context("no committee")?;
        let shard = committee.shards_of(&cluster.nodes[1].id)[0];
        let server_pid = cluster.nodes[1].sync_pid.context("node 1 not running")?;
        let mut runs = Vec::new();
        for limit in [base as u64, (base * 16) as u64] {
            let server_base = proc_status_bytes(server_pid, "VmRSS:");
            let self_base = proc_status_bytes(std::process::id(), "VmRSS:");
            let (mut server_peak, mut self_peak) = (server_base, self_base);
            let (items, bytes, _) = pull_shard(&cluster, 1, shard, limit, Duration::from_millis(5), || {
                server_peak = server_peak.max(proc_status_bytes(server_pid, "VmRSS:"));
                self_peak = self_peak.max(proc_status_bytes(std::process::id(), "VmRSS:"));
            })
            .await?;
            runs.push(MemoryRun {
                items,
                shard_bytes: bytes,
                server_growth_bytes: server_peak - server_base,
                reader_growth_bytes: self_peak - self_base,
            });
        }
        Ok::<_, anyhow::Error>(runs)
    }
    .await;
    cluster.down()?;
    result
}

fn check_targets(fills: &[FillRun], limits: &Limits, memory: &[MemoryRun]) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    // Unpaced, uninterrupted runs only.
    let find = |method: &str, scale: usize, tls: bool, killed: bool| {
        fills.iter().find(|f| {
            f.method == method
                && f.scale == scale
                && f.tls == tls
                && f.killed_at.is_some() == killed
                && f.paced_bytes_per_sec == 0
        })
    };
    let scales: Vec<usize> = {
        let mut s: Vec<usize> = fills.iter().map(|f| f.scale).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    for &scale in &scales {
        if let (Some(ss), Some(br)) =
            (find("shard_sync", scale, true, false), find("blob_recovery", scale, true, false))
        {
            let speedup = br.wall_secs / ss.wall_secs.max(1e-9);
            let bytes_ratio = br.bytes_fetched as f64 / (ss.bytes_fetched as f64).max(1.0);
            out.push(TargetCheck {
                target: format!("x{scale}: shard sync >= 5x faster than blob recovery"),
                measured: format!("{speedup:.1}x faster, {bytes_ratio:.1}x fewer bytes"),
                met: speedup >= 5.0,
            });
        }
    }
    let max_scale = scales.iter().copied().max().unwrap_or(1);
    if let Some(ss) = find("shard_sync", max_scale, true, false) {
        // The transfer phase: the epoch change's propagation is not streaming.
        let rate = ss.transfer_mib_per_sec;
        let vs_tonic = rate / limits.tonic_tls_stream_mib_s.max(1e-9);
        out.push(TargetCheck {
            target: "shard sync >= 0.6 of a plain tonic TLS stream".into(),
            measured: format!(
                "transfer {rate:.1} vs {:.1} MiB/s = {vs_tonic:.2} (end to end {:.1} MiB/s)",
                limits.tonic_tls_stream_mib_s, ss.mib_per_sec
            ),
            met: vs_tonic >= 0.6,
        });
        let floor = limits.tls_mib_s.min(limits.rocksdb_write_mib_s);
        out.push(TargetCheck {
            target: "shard sync >= 0.5 of min(loopback TLS, RocksDB write)".into(),
            measured: format!("transfer {rate:.1} vs {floor:.1} MiB/s = {:.2}", rate / floor.max(1e-9)),
            met: rate >= 0.5 * floor,
        });
        if let Some(plain) = find("shard_sync", max_scale, false, false) {
            let ratio = ss.transfer_mib_per_sec / plain.transfer_mib_per_sec.max(1e-9);
            out.push(TargetCheck {
                target: "TLS shard sync >= 0.85 of plaintext".into(),
                measured: format!(
                    "transfer {:.1} vs {:.1} MiB/s = {ratio:.2}",
                    ss.transfer_mib_per_sec, plain.transfer_mib_per_sec
                ),
                met: ratio >= 0.85,
            });
        }
    }
    let killed = fills.iter().find(|f| f.killed_at.is_some());
    let paced = killed.and_then(|k| {
        fills.iter().find(|f| {
            f.killed_at.is_none()
                && f.paced_bytes_per_sec == k.paced_bytes_per_sec
                && f.scale == k.scale
                && f.method == k.method
        })
    });
    if let (Some(killed), Some(base)) = (killed, paced) {
        let bytes = killed.bytes_fetched as f64 / killed.gained_bytes.max(1) as f64;
        let time = killed.wall_secs / base.wall_secs.max(1e-9);
        out.push(TargetCheck {
            target: "resume after a kill at 50%: <= 1.05x bytes, <= 1.15x time".into(),
            measured: format!(
                "{bytes:.3}x bytes, {time:.2}x time (killed at {:.0}%)",
                killed.killed_at.unwrap_or(0.0) * 100.0
            ),
            met: bytes <= 1.05 && time <= 1.15,
        });
    }
    if let [small, large] = memory {
        let growth = large.server_growth_bytes.max(large.reader_growth_bytes) as i64
            - small.server_growth_bytes.max(small.reader_growth_bytes) as i64;
        out.push(TargetCheck {
            target: "peak RSS flat (within 64 MiB) as the shard grows 16x".into(),
            measured: format!(
                "server +{} / reader +{} at 16x vs server +{} / reader +{} at 1x",
                mib(large.server_growth_bytes),
                mib(large.reader_growth_bytes),
                mib(small.server_growth_bytes),
                mib(small.reader_growth_bytes)
            ),
            met: growth < 64 * 1024 * 1024,
        });
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:")).map(|v| v.trim().to_string()))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM")
}

/// The report as a table.
pub fn render(report: &BenchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!("machine: {}\nparameters: {}\n\n", report.machine, report.parameters));
    out.push_str("fill of node 0's gained shards\n");
    out.push_str(&format!(
        "{:<16} {:>5} {:>6} {:>6} {:>10} {:>7} {:>7} {:>12} {:>7} {:>7} {:>9} {:>8} {:>8}\n",
        "method",
        "tls",
        "scale",
        "blobs",
        "gained",
        "wall s",
        "xfer s",
        "fetched",
        "RPCs",
        "CPU s",
        "peak RSS",
        "MiB/s",
        "xfer/s"
    ));
    for f in &report.fills {
        let method = match f.killed_at {
            Some(at) => format!("{} kill@{:.0}%", f.method, at * 100.0),
            None => f.method.clone(),
        };
        out.push_str(&format!(
            "{:<16} {:>5} {:>6} {:>6} {:>10} {:>7.2} {:>7.2} {:>12} {:>7} {:>7.2} {:>9} {:>8.1} {:>8.1}\n",
            method,
            f.tls,
            f.scale,
            f.blobs,
            mib(f.gained_bytes),
            f.wall_secs,
            f.transfer_secs,
            mib(f.bytes_fetched),
            f.rpcs,
            f.cpu_secs,
            mib(f.peak_rss_bytes),
            f.mib_per_sec,
            f.transfer_mib_per_sec
        ));
    }
    let l = &report.limits;
    out.push_str(&format!(
        "\nlimits (MiB/s): loopback TCP {:.0}, loopback TLS {:.0}, tonic TLS StreamShard (no verify, no write) {:.1}, RocksDB durable batched write {:.1}\n",
        l.tcp_mib_s, l.tls_mib_s, l.tonic_tls_stream_mib_s, l.rocksdb_write_mib_s
    ));
    out.push_str("\nslow reader (5 ms per item)\n");
    for m in &report.memory {
        out.push_str(&format!(
            "  {:>4} slivers, {:>10}: server RSS +{}, reader RSS +{}\n",
            m.items,
            mib(m.shard_bytes),
            mib(m.server_growth_bytes),
            mib(m.reader_growth_bytes)
        ));
    }
    out.push_str("\ntargets\n");
    for t in &report.targets {
        out.push_str(&format!("  [{}] {}: {}\n", if t.met { "met" } else { "MISSED" }, t.target, t.measured));
    }
    out.push_str(&format!("\ntotal {:.0} s\n", report.total_secs));
    out
}

/// The report as JSON (for `--json FILE`).
pub fn to_json(report: &BenchReport) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(report)?)
}
