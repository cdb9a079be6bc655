//! `ferryctl bench`: the throughput targets, on real local clusters (etcd plus sync-service and
//! recovery-service processes), every comparison side by side in one run on the same seeded
//! data, every figure over `--runs` runs with its spread.
//!
//! Per workload (blob size x shard count) a fresh cluster stores the blobs, restarts node 0 (so
//! its peak RSS covers only the fills), then applies epoch changes that each give node 0 more
//! shards, filled by shard sync on one cluster and by per-blob recovery on another, and the
//! machine's limits for the same slivers (a bare `StreamShard` pull, the disk written the way
//! shard sync writes, the decode). Then `ferryctl store` of many files, clients' latency under a
//! full shard sync and a wiped node's recovery with the throttle off and on ([`throttle`]), a
//! sync killed at 50% and resumed, and a slow reader's memory. Bytes and RPC counts come from the
//! services' own Prometheus counters (sliver payload bytes; `GetStatus` polling excluded), CPU
//! time and peak RSS from `/proc` of node 0's processes.

pub mod scale;
mod throttle;

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
    /// Where the service binaries (and ferryctl) are.
    pub bin_dir: PathBuf,
    /// Blobs per workload of blobs under 1 MiB.
    pub blobs: usize,
    /// Blobs per workload of blobs of 1 MiB or more.
    pub large_blobs: usize,
    /// Blob sizes to measure.
    pub blob_sizes: Vec<usize>,
    /// Shard counts to measure (4 nodes each).
    pub shards: Vec<u32>,
    /// Repetitions of every measured figure (each reported with its spread).
    pub runs: usize,
    /// Files of 1,000 bytes in the `ferryctl store` run.
    pub store_small_files: usize,
    /// Files of 4 MiB in the `ferryctl store` run.
    pub store_large_files: usize,
    /// Only these sections (`workloads`, `store`, `throttle`, `resume`, `memory`); all when empty.
    pub only: Vec<String>,
}

impl BenchOptions {
    fn runs_section(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    fn blobs_of(&self, blob_size: usize) -> usize {
        if blob_size >= 1024 * 1024 { self.large_blobs } else { self.blobs }
    }
}

/// A median with its spread over repeated runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    /// The median sample.
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// Every sample, in run order.
    pub samples: Vec<f64>,
}

impl Spread {
    /// The spread of `samples`.
    pub fn of(samples: Vec<f64>) -> Spread {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            samples,
        }
    }

    fn show(&self) -> String {
        format!("{:.1} ({:.1}-{:.1})", self.median, self.min, self.max)
    }
}

/// One epoch's fill of node 0's gained shards.
#[derive(Debug, Clone, Serialize)]
pub struct EpochSample {
    /// Shards node 0 gained.
    pub gained_shards: usize,
    /// Sliver bytes in them.
    pub gained_bytes: u64,
    /// Epoch proposed to every gained shard `Active` on node 0.
    pub wall_secs: f64,
    /// The transfer itself, without the epoch change's propagation: for shard sync from the
    /// first attempt's start to the end of the transfer, as node 0 records them (ms); for blob
    /// recovery from node 0's sync-state stream showing the new epoch to every shard `Active`.
    pub transfer_secs: f64,
}

/// The fills of one method on one workload: `runs` epochs, each giving node 0 more shards.
#[derive(Debug, Clone, Serialize)]
pub struct FillRun {
    /// `shard_sync` or `blob_recovery`.
    pub method: String,
    /// Mutual TLS on.
    pub tls: bool,
    /// Blobs stored.
    pub blobs: usize,
    /// Bytes per blob.
    pub blob_size: usize,
    /// Shards of the cluster.
    pub shards: u32,
    /// Every epoch.
    pub epochs: Vec<EpochSample>,
    /// Gained sliver bytes per transfer second (MiB/s).
    pub transfer_mib_s: Spread,
    /// Blobs filled per transfer second.
    pub blobs_per_sec: Spread,
    /// Blob bytes (whole blobs) per transfer second (MiB/s): what blob recovery decodes.
    pub blob_mib_s: Spread,
    /// Sliver payload bytes moved over the network in the first epoch.
    pub bytes_fetched: u64,
    /// RPCs served by all services during the first epoch (`GetStatus` excluded).
    pub rpcs: u64,
    /// CPU time of node 0's sync-service and recovery-service during the first epoch.
    pub cpu_secs: f64,
    /// Peak RSS of node 0's sync-service since its restart before the fills.
    pub peak_rss_bytes: u64,
    /// Per-stream bandwidth cap of the run (bytes/s), 0 = none.
    pub paced_bytes_per_sec: u64,
    /// For the resume run: the fraction of the gained bytes synced when node 0 was killed.
    pub killed_at: Option<f64>,
}

impl FillRun {
    fn first_wall(&self) -> f64 {
        self.epochs.first().map_or(0.0, |e| e.wall_secs)
    }
}

/// One workload (blob size, blob count, shard count): both fills and the machine's limits
/// for the same slivers.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadRun {
    /// Bytes per blob.
    pub blob_size: usize,
    /// Blobs.
    pub blobs: usize,
    /// Shards.
    pub shards: u32,
    /// Filled by shard sync.
    pub shard_sync: FillRun,
    /// Filled by per-blob recovery.
    pub blob_recovery: FillRun,
    /// `StreamShard` over mutual TLS pulled by a client that neither verifies nor stores.
    pub bare_stream_mib_s: Spread,
    /// The same slivers written into a fresh shard store the way shard sync writes them
    /// (batches of `shard_sync.batch_items` or `batch_bytes` with their progress, each durable).
    pub disk_mib_s: Spread,
    /// Decoding blobs of this size from k slivers on every core (blob MiB/s).
    pub decode_mib_s: Spread,
}

/// The machine's network limits, measured in the same run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Limits {
    /// Loopback TCP, one stream (MiB/s).
    pub tcp_mib_s: Spread,
    /// Loopback TLS (rustls, ring) over one stream (MiB/s).
    pub tls_mib_s: Spread,
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

/// `ferryctl store` of a directory of many files.
#[derive(Debug, Clone, Serialize)]
pub struct StoreRun {
    /// Bytes per file.
    pub file_size: usize,
    /// Files.
    pub files: usize,
    /// Blobs per second, one `ferryctl store` per run.
    pub blobs_per_sec: Spread,
    /// MiB per second.
    pub mib_s: Spread,
    /// Blobs per second the BLS work of storing alone allows on this machine (signing,
    /// summing and verifying each blob's certificate on 4 nodes), measured beside each run.
    pub certificate_limit_blobs_per_sec: Spread,
}

/// A target of issue #15 (or an earlier one) and whether this run met it.
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
    /// How the measured binaries were built.
    pub build: String,
    /// Repetitions per figure.
    pub runs: usize,
    /// Every workload.
    pub workloads: Vec<WorkloadRun>,
    /// The machine's network limits.
    pub limits: Limits,
    /// `ferryctl store` runs.
    pub stores: Vec<StoreRun>,
    /// Foreground latency under background load, unthrottled and throttled.
    pub throttle: Option<throttle::ThrottleRun>,
    /// The resume runs (paced, uninterrupted and killed at 50%).
    pub resume: Vec<FillRun>,
    /// Slow-reader memory, at 1x and 16x the shard size.
    pub memory: Vec<MemoryRun>,
    /// The targets, numbered as in issue #15, then earlier ones.
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
    blob_size: usize,
    blobs: usize,
    shards: u32,
    /// Epochs measured, each giving node 0 more shards.
    epochs: usize,
    /// Per-stream bandwidth cap (bytes/s), 0 = none. Paced runs also write small batches,
    /// so progress is persisted (and a kill can land) throughout the stream.
    rate: u64,
    disturb: Disturb,
}

/// Runs the whole benchmark and returns the report.
pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let started = Instant::now();
    if options.blob_sizes.is_empty() || options.shards.is_empty() || options.blobs == 0 || options.large_blobs == 0 {
        bail!("--blobs, --large-blobs, --blob-sizes and --shards must be positive");
    }
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    std::fs::create_dir_all(&options.dir)?;
    let mut workloads = Vec::new();
    let mut network = None;
    if options.runs_section("workloads") {
        for &shards in &options.shards {
            for &blob_size in &options.blob_sizes {
                workloads.push(measure_workload(options, blob_size, shards, &mut network).await?);
            }
        }
    }
    let limits = network.unwrap_or_default();
    say(format!("loopback: tcp {} MiB/s, tls {} MiB/s", limits.tcp_mib_s.show(), limits.tls_mib_s.show()));
    let stores = if options.runs_section("store") { measure_store(options).await? } else { Vec::new() };
    let throttle = if options.runs_section("throttle") { Some(throttle::measure(options).await?) } else { None };

    // Resume: a paced sync (so the kill lands mid-stream), uninterrupted and killed at 50%.
    let blob_size = options.blob_sizes.iter().copied().min().unwrap_or(32 * 1024);
    let shards = options.shards.iter().copied().min().unwrap_or(8);
    let blobs = options.blobs_of(blob_size);
    let shard_bytes = gained_shard_bytes_estimate(blob_size, blobs, shards)?;
    let rate = (shard_bytes / 3).max(64 * 1024); // about 3 s per stream
    let paced =
        |disturb| FillSpec { method: "shard_sync", tls: true, blob_size, blobs, shards, epochs: 1, rate, disturb };
    let mut resume = Vec::new();
    if options.runs_section("resume") {
        let uninterrupted = fill(options, &paced(Disturb::None), false).await?.0;
        let killed = fill(options, &paced(Disturb::KillAt(0.5)), false).await?.0;
        say(format!(
            "resume: uninterrupted {:.2} s, killed at {:.0}% {:.2} s",
            uninterrupted.first_wall(),
            killed.killed_at.unwrap_or(0.0) * 100.0,
            killed.first_wall()
        ));
        resume = vec![uninterrupted, killed];
    }
    let memory = if options.runs_section("memory") { measure_memory(options).await? } else { Vec::new() };
    let mut report = BenchReport {
        machine: machine(),
        build: build_profile().into(),
        runs: options.runs,
        workloads,
        limits,
        stores,
        throttle,
        resume,
        memory,
        targets: Vec::new(),
        total_secs: 0.0,
    };
    report.targets = check_targets(&report);
    report.total_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// How this binary was built: the bench's figures mean little for a debug build.
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug (dev profile): not what the targets are measured on; run make bench"
    } else {
        "optimised (bench profile, no debug assertions)"
    }
}

/// Both fills of one workload, then the limits of the same slivers on the shard-sync cluster.
async fn measure_workload(
    options: &BenchOptions,
    blob_size: usize,
    shards: u32,
    network: &mut Option<Limits>,
) -> anyhow::Result<WorkloadRun> {
    let blobs = options.blobs_of(blob_size);
    let spec = |method| FillSpec {
        method,
        tls: true,
        blob_size,
        blobs,
        shards,
        epochs: options.runs,
        rate: 0,
        disturb: Disturb::None,
    };
    let (shard_sync, cluster) = fill(options, &spec("shard_sync"), true).await?;
    let mut cluster = cluster.context("the shard-sync cluster was not kept")?;
    let limits = async {
        if network.is_none() {
            *network = Some(measure_network(&cluster, options.runs).await?);
        }
        let mut stream = Vec::new();
        for _ in 0..options.runs {
            stream.push(bare_stream(&cluster).await?);
        }
        let mut disk = Vec::new();
        let mut decode = Vec::new();
        for run in 0..options.runs {
            let gained = shard_sync.epochs.first().map_or(1, |e| e.gained_shards);
            disk.push(rocksdb_throughput(options, blob_size, blobs, shards, gained, run as u64).await?);
            decode.push(decode_throughput(blob_size, shards, blobs.min(64)).await?);
        }
        Ok::<_, anyhow::Error>((Spread::of(stream), Spread::of(disk), Spread::of(decode)))
    }
    .await;
    down_and_discard(&mut cluster)?;
    let (bare_stream_mib_s, disk_mib_s, decode_mib_s) = limits?;
    let (blob_recovery, _) = fill(options, &spec("blob_recovery"), false).await?;
    say(format!(
        "{blobs} x {blob_size} B, {shards} shards: shard sync {} MiB/s, blob recovery {} blobs/s; bare stream {}, disk {}, decode {} MiB/s",
        shard_sync.transfer_mib_s.show(),
        blob_recovery.blobs_per_sec.show(),
        bare_stream_mib_s.show(),
        disk_mib_s.show(),
        decode_mib_s.show()
    ));
    Ok(WorkloadRun { blob_size, blobs, shards, shard_sync, blob_recovery, bare_stream_mib_s, disk_mib_s, decode_mib_s })
}

/// Deletes what an earlier run left in `dir`, stopping its cluster first.
fn clear(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        if let Ok(mut old) = LocalCluster::load(dir) {
            let _ = old.down();
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot delete {}", dir.display()))?;
    }
    Ok(())
}

/// A fresh 4-node mutual-TLS cluster in `dir` (cleared first) with the smallest shard count
/// of the run and `sync_extra` in every sync-service config.
async fn fresh_cluster(options: &BenchOptions, dir: &Path, sync_extra: &str) -> anyhow::Result<LocalCluster> {
    clear(dir)?;
    let up = UpOptions {
        nodes: 4,
        shards: options.shards.iter().copied().min().unwrap_or(8),
        dir: dir.to_path_buf(),
        bin_dir: options.bin_dir.clone(),
        sync_extra: sync_extra.into(),
        recovery_extra: String::new(),
        tls: true,
    };
    LocalCluster::up(&up).await
}

/// Stops a measured cluster and deletes its data (the logs stay): a full run's clusters would
/// hold tens of GiB otherwise.
fn down_and_discard(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    cluster.down()?;
    for i in 0..cluster.nodes.len() {
        for store in ["sync-store", "recovery-store"] {
            let path = cluster.node_dir(i).join(store);
            if path.exists() {
                std::fs::remove_dir_all(&path).with_context(|| format!("cannot delete {}", path.display()))?;
            }
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn gained_shard_bytes_estimate(blob_size: usize, blobs: usize, shards: u32) -> anyhow::Result<u64> {
    let k = erasure::original_count(shards)?;
    Ok((erasure::sliver_len(blob_size as u64, k)? * blobs) as u64)
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
        "{}-{}x{}-n{}{}{}",
        spec.method,
        spec.blobs,
        spec.blob_size,
        spec.shards,
        if spec.tls { "" } else { "-plain" },
        match spec.disturb {
            Disturb::None if spec.rate > 0 => "-paced",
            Disturb::None => "",
            Disturb::KillAt(_) => "-killed",
        }
    );
    let dir = options.dir.join(&label);
    clear(&dir)?;
    // Paced runs write small batches so a kill lands mid-stream; the others use the defaults.
    let batch_items = if spec.rate > 0 { "batch_items = 8\n" } else { "" };
    // The throttle stays on (the default); with no clients it never binds.
    let sync_extra = format!(
        "[shard_sync]\nfill_gained_by = \"{}\"\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\n{batch_items}[stream]\nmax_bytes_per_sec = {}\n",
        spec.method, spec.rate
    );
    let up = UpOptions {
        nodes: 4,
        shards: spec.shards,
        dir: dir.clone(),
        bin_dir: options.bin_dir.clone(),
        sync_extra,
        recovery_extra: "[recovery]\nretry_initial_ms = 50\nretry_max_ms = 500\n".into(),
        tls: spec.tls,
    };
    let mut cluster = LocalCluster::up(&up).await.with_context(|| format!("start cluster {label}"))?;
    let result = fill_on(&mut cluster, spec).await;
    match result {
        Ok(run) if keep => Ok((run, Some(cluster))),
        Ok(run) => {
            down_and_discard(&mut cluster)?;
            Ok((run, None))
        }
        Err(e) => {
            let _ = cluster.down();
            Err(e.context(format!("fill run {label}; logs in {}", dir.join("logs").display())))
        }
    }
}

async fn fill_on(cluster: &mut LocalCluster, spec: &FillSpec) -> anyhow::Result<FillRun> {
    let cp = cluster.control_plane().await?;
    let connector = cluster.connector()?;
    store_blobs(&BlobClient::new(cp.clone(), connector.clone(), Duration::from_secs(120)), spec.blobs, spec.blob_size)
        .await?;
    // A fresh node-0 process, so its peak RSS covers the fills alone.
    cluster.stop_node(0)?;
    cluster.start_node(0)?;
    cluster.wait_healthy(0).await?;

    let k = erasure::original_count(spec.shards)?;
    let sliver = erasure::sliver_len(spec.blob_size as u64, k)?;
    let before = counters(cluster).await?;
    let pids = |c: &LocalCluster| [c.nodes[0].sync_pid, c.nodes[0].recovery_pid];
    let cpu_before: f64 = pids(cluster).iter().flatten().map(|p| proc_cpu_secs(*p)).sum();
    let first = gain_one_shard(cluster, &cp, spec, sliver).await?;
    let after = counters(cluster).await?;
    let cpu_after: f64 = pids(cluster).iter().flatten().map(|p| proc_cpu_secs(*p)).sum::<f64>() + first.cpu_of_killed;
    let bytes_fetched = if spec.method == "shard_sync" {
        after.stream_bytes - before.stream_bytes
    } else {
        after.recovery_bytes - before.recovery_bytes
    };
    let killed_at = first.killed_at;
    let mut epochs = vec![first.sample];
    while epochs.len() < spec.epochs {
        epochs.push(gain_one_shard(cluster, &cp, spec, sliver).await?.sample);
    }
    let peak_rss = cluster.nodes[0].sync_pid.map(|p| proc_status_bytes(p, "VmHWM:")).unwrap_or(0);
    let per_sec =
        |f: &dyn Fn(&EpochSample) -> f64| Spread::of(epochs.iter().map(|e| f(e) / e.transfer_secs.max(1e-9)).collect());
    let mib = 1024.0 * 1024.0;
    let transfer_mib_s = per_sec(&|e| e.gained_bytes as f64 / mib);
    let blobs_per_sec = per_sec(&|_| spec.blobs as f64);
    let blob_mib_s = per_sec(&|_| (spec.blobs * spec.blob_size) as f64 / mib);
    Ok(FillRun {
        method: spec.method.into(),
        tls: spec.tls,
        blobs: spec.blobs,
        blob_size: spec.blob_size,
        shards: spec.shards,
        epochs,
        transfer_mib_s,
        blobs_per_sec,
        blob_mib_s,
        bytes_fetched: bytes_fetched.max(0.0) as u64,
        rpcs: (after.rpcs - before.rpcs).max(0.0) as u64,
        cpu_secs: (cpu_after - cpu_before).max(0.0),
        peak_rss_bytes: peak_rss,
        paced_bytes_per_sec: spec.rate,
        killed_at,
    })
}

/// One epoch change that gives node 0 one more shard, measured.
struct EpochFill {
    sample: EpochSample,
    killed_at: Option<f64>,
    cpu_of_killed: f64,
}

async fn gain_one_shard(
    cluster: &mut LocalCluster,
    cp: &ferry_shared::control_plane::ControlPlane,
    spec: &FillSpec,
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
    let gained_bytes = (gained.len() * spec.blobs * sliver) as u64;
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
    Ok(EpochFill {
        sample: EpochSample { gained_shards: gained.len(), gained_bytes, wall_secs: wall, transfer_secs: transfer },
        killed_at,
        cpu_of_killed,
    })
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

/// Every shard node 0 owns, pulled as node 0 itself, neither verified nor stored (MiB/s).
async fn bare_stream(cluster: &LocalCluster) -> anyhow::Result<f64> {
    let committee = cluster.control_plane().await?.current_committee().await?.context("no committee")?;
    let me: &NodeId = &cluster.nodes[0].id;
    let (mut bytes, mut secs) = (0u64, 0f64);
    for shard in committee.shards_of(me) {
        let (_, b, s) = pull_shard(cluster, 0, shard, 0, Duration::ZERO, || {}).await?;
        bytes += b;
        secs += s;
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9))
}

/// Loopback TCP and TLS, `runs` times each.
async fn measure_network(cluster: &LocalCluster, runs: usize) -> anyhow::Result<Limits> {
    const RAW_BYTES: usize = 256 * 1024 * 1024;
    let (mut tcp, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        tcp.push(loopback_throughput(RAW_BYTES, None).await?);
        tls.push(loopback_throughput(RAW_BYTES, Some(&cluster.tls_dir())).await?);
    }
    Ok(Limits { tcp_mib_s: Spread::of(tcp), tls_mib_s: Spread::of(tls) })
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
            let mut server = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
            // The client never reads: a session ticket left unread in its socket would make its
            // close a reset that cuts the server's reading short.
            server.send_tls13_tickets = 0;
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

/// Writes the slivers of `gained` shards of the workload (the bytes of one epoch's shard sync)
/// into a fresh shard store the way shard sync does: batches of up to 1024 items or 8 MiB
/// (`shard_sync.batch_items`, `batch_bytes`), each written with its progress record and
/// synced; MiB/s.
async fn rocksdb_throughput(
    options: &BenchOptions,
    blob_size: usize,
    blobs: usize,
    shards: u32,
    gained: usize,
    seed: u64,
) -> anyhow::Result<f64> {
    use ferry_sync_service::{
        config::{ShardSyncConfig, StoreConfig},
        store::{ShardRecord, ShardStore, SliverWrite},
    };
    let dir = tempfile::Builder::new().prefix("ferry-bench-rocksdb-").tempdir_in(&options.dir)?;
    let store = ShardStore::open(&StoreConfig { path: dir.path().join("store"), ..StoreConfig::default() })?;
    let k = erasure::original_count(shards)?;
    let len = erasure::sliver_len(blob_size as u64, k)?;
    let sync = ShardSyncConfig::default();
    let record = ShardRecord::new(ferry_shared::types::ShardStatus::ActiveSync);
    let mut rng = StdRng::seed_from_u64(7 + seed);
    let mut batches: Vec<(ShardIndex, Vec<SliverWrite>)> = Vec::new();
    for shard in (0..gained as u32).map(ShardIndex) {
        store.ensure_shard_storage(shard)?;
        // A stream arrives in blob-id order.
        let mut ids: Vec<[u8; 32]> = (0..blobs).map(|_| rng.r#gen()).collect();
        ids.sort_unstable();
        let mut batch_bytes = 0usize;
        for id in ids {
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            let write = SliverWrite { blob_id: ferry_shared::types::BlobId(id), data, metadata: None };
            match batches.last_mut() {
                Some((s, last)) if *s == shard && last.len() < sync.batch_items && batch_bytes < sync.batch_bytes => {
                    last.push(write)
                }
                _ => {
                    batch_bytes = 0;
                    batches.push((shard, vec![write]));
                }
            }
            batch_bytes += len;
        }
    }
    let started = Instant::now();
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut bytes = 0u64;
        for (shard, batch) in &batches {
            store.write_sync_batch(*shard, batch, &[], &[], &record)?;
            bytes += batch.iter().map(|w| w.data.len() as u64).sum::<u64>();
        }
        Ok(bytes)
    })
    .await??;
    Ok(written as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64())
}

/// Decoding `count` blobs of `blob_size` from k slivers, split over every core; blob MiB/s.
async fn decode_throughput(blob_size: usize, shards: u32, count: usize) -> anyhow::Result<f64> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let encoded: Vec<_> =
        (0..count.max(cores)).map(|i| erasure::encode(&blob_data(i, blob_size), shards)).collect::<Result<_, _>>()?;
    let k = erasure::original_count(shards)? as usize;
    let encoded = Arc::new(encoded);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for core in 0..cores {
        let encoded = encoded.clone();
        tasks.push(tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let mut decoded = 0;
            for blob in encoded.iter().skip(core).step_by(cores) {
                // The last k slivers: recovery rarely has the first ones (they are the lost).
                let slivers: Vec<(ShardIndex, &[u8])> = blob
                    .slivers
                    .iter()
                    .enumerate()
                    .rev()
                    .take(k)
                    .map(|(i, s)| (ShardIndex(i as u32), s.as_slice()))
                    .collect();
                decoded += erasure::decode(&blob.metadata, &slivers)?.len();
            }
            Ok(decoded)
        }));
    }
    let mut bytes = 0usize;
    for task in tasks {
        bytes += task.await??;
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64())
}

/// The BLS work that storing files of `file_size` costs a 4-node cluster per blob, done on
/// every core: each owner signs a confirmation, the client checks each and sums them into a
/// certificate, and every member verifies a batch's certificates at once (as `CertifyBlobs`
/// does, batches as `ferryctl store` makes them); blobs/s. Storing cannot go faster than this
/// on the same cores, whatever else it does.
async fn certificate_throughput(file_size: usize) -> anyhow::Result<f64> {
    use ferry_shared::certificate::{Certificate, CertificateBuilder, CommitteeKeys, verify_batch};
    const CLUSTER: &str = "bench";
    let batch = crate::store::BATCH_FILES.min(crate::store::BATCH_BYTES as usize / file_size.max(1)).max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // Enough batches for every core, and about a second of work.
    let count = (cores * batch).max(2048).div_ceil(batch) * batch;
    let keys: Vec<(NodeId, NodeKeypair)> = (0..4)
        .map(|i| Ok((NodeId::new(format!("node-{i}"))?, NodeKeypair::generate())))
        .collect::<anyhow::Result<_>>()?;
    let members = keys.iter().map(|(id, k)| ferry_shared::Member::for_key(id.clone(), k, "", "", 1)).collect();
    let committee = Arc::new(ferry_shared::Committee::genesis(8, members)?);
    let committee_keys = Arc::new(CommitteeKeys::new(committee.clone())?);
    let keys = Arc::new(keys);
    let mut rng = StdRng::seed_from_u64(count as u64);
    let blobs: Vec<ferry_shared::BlobId> = (0..count).map(|_| ferry_shared::BlobId(rng.r#gen())).collect();
    let batches: Vec<Vec<ferry_shared::BlobId>> = blobs.chunks(batch).map(<[_]>::to_vec).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for core in 0..cores {
        let mine: Vec<Vec<ferry_shared::BlobId>> = batches.iter().skip(core).step_by(cores).cloned().collect();
        let (keys, committee_keys, epoch) = (keys.clone(), committee_keys.clone(), committee.epoch);
        tasks.push(tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for batch in mine {
                let mut certificates: Vec<(ferry_shared::BlobId, Certificate)> = Vec::with_capacity(batch.len());
                for blob in batch {
                    let message = crypto::confirmation_message(CLUSTER, &blob, epoch);
                    let mut builder = CertificateBuilder::new(CLUSTER, blob, &committee_keys);
                    for (id, key) in keys.iter() {
                        builder.add(id, &key.bls_sign(&message))?;
                    }
                    certificates.push((blob, builder.build_unchecked()?));
                }
                let items: Vec<(ferry_shared::BlobId, &Certificate, &CommitteeKeys)> =
                    certificates.iter().map(|(b, c)| (*b, c, committee_keys.as_ref())).collect();
                for _member in 0..keys.len() {
                    if let Some(Err(e)) = verify_batch(CLUSTER, &items).into_iter().find(Result::is_err) {
                        bail!("a certificate made here does not verify: {e}");
                    }
                }
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// One `ferryctl store DIR` per run (the real binary, as a user runs it) of `files` files of
/// `file_size` bytes each, fresh content every run; blobs/s and MiB/s.
async fn measure_store(options: &BenchOptions) -> anyhow::Result<Vec<StoreRun>> {
    let dir = options.dir.join("store");
    let mut cluster = fresh_cluster(options, &dir, "").await?;
    let result = async {
        let mut out = Vec::new();
        for (file_size, files) in [(1000usize, options.store_small_files), (4 * 1024 * 1024, options.store_large_files)]
        {
            let (mut rates, mut mibs, mut bls) = (Vec::new(), Vec::new(), Vec::new());
            for run in 0..options.runs {
                bls.push(certificate_throughput(file_size).await?);
                let files_dir = dir.join(format!("files-{file_size}-{run}"));
                std::fs::create_dir_all(&files_dir)?;
                for i in 0..files {
                    let data = blob_data(1_000_000 * (run + 1) + i + file_size, file_size);
                    std::fs::write(files_dir.join(format!("{i:06}")), data)?;
                }
                let started = Instant::now();
                let output = tokio::process::Command::new(options.bin_dir.join("ferryctl"))
                    .arg("--dir")
                    .arg(&dir)
                    .arg("store")
                    .arg(&files_dir)
                    .stdout(std::process::Stdio::null())
                    .output()
                    .await
                    .context("run ferryctl store")?;
                let secs = started.elapsed().as_secs_f64();
                if !output.status.success() {
                    bail!("ferryctl store failed: {}", String::from_utf8_lossy(&output.stderr));
                }
                std::fs::remove_dir_all(&files_dir)?;
                rates.push(files as f64 / secs);
                mibs.push((files * file_size) as f64 / (1024.0 * 1024.0) / secs);
            }
            let run = StoreRun {
                file_size,
                files,
                blobs_per_sec: Spread::of(rates),
                mib_s: Spread::of(mibs),
                certificate_limit_blobs_per_sec: Spread::of(bls),
            };
            say(format!(
                "ferryctl store {files} x {file_size} B: {} blobs/s, {} MiB/s; certificates alone allow {} blobs/s",
                run.blobs_per_sec.show(),
                run.mib_s.show(),
                run.certificate_limit_blobs_per_sec.show()
            ));
            out.push(run);
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    down_and_discard(&mut cluster)?;
    result
}

/// A shard of 1x and 16x the size streamed to a reader that sleeps per item; peak RSS growth of
/// the server (sampled every 20 ms) and of this process.
async fn measure_memory(options: &BenchOptions) -> anyhow::Result<Vec<MemoryRun>> {
    let dir = options.dir.join("memory");
    // 256 KiB blobs: 64 KiB slivers at n = 8, so the 16-item channel holds 1 MiB and a read
    // batch 2 MiB; the 1x shard is already twice the channel, the 16x one 32 times.
    let blob_size = 256 * 1024;
    let base = 24usize;
    let mut cluster = fresh_cluster(options, &dir, "").await?;
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
    down_and_discard(&mut cluster)?;
    result
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1024 * 1024 && bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn check_targets(report: &BenchReport) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    for w in &report.workloads {
        let at = format!("{}, {} shards", size_label(w.blob_size), w.shards);
        let sync = &w.shard_sync.transfer_mib_s;
        let floor = w.bare_stream_mib_s.median.min(w.disk_mib_s.median);
        out.push(TargetCheck {
            target: format!("1. shard sync >= 0.6 of min(bare TLS stream, disk), {at}"),
            measured: format!(
                "{} MiB/s vs min({}, {}) = {:.2}",
                sync.show(),
                w.bare_stream_mib_s.show(),
                w.disk_mib_s.show(),
                sync.median / floor.max(1e-9)
            ),
            met: sync.median >= 0.6 * floor,
        });
    }
    for w in &report.workloads {
        let at = format!("{}, {} shards", size_label(w.blob_size), w.shards);
        let speedup = w.shard_sync.transfer_mib_s.median / w.blob_recovery.transfer_mib_s.median.max(1e-9);
        out.push(TargetCheck {
            target: format!("2. shard sync >= 5x faster than blob recovery, {at}"),
            measured: format!(
                "{speedup:.1}x ({} vs {} MiB/s of gained slivers; {:.1}x fewer bytes fetched)",
                w.shard_sync.transfer_mib_s.show(),
                w.blob_recovery.transfer_mib_s.show(),
                w.blob_recovery.bytes_fetched as f64 / (w.shard_sync.bytes_fetched as f64).max(1.0)
            ),
            met: speedup >= 5.0,
        });
    }
    for w in &report.workloads {
        let at = format!("{}, {} shards", size_label(w.blob_size), w.shards);
        let r = &w.blob_recovery;
        if w.blob_size < 1024 * 1024 {
            out.push(TargetCheck {
                target: format!("3. blob recovery >= 500 blobs/s, {at}"),
                measured: format!("{} blobs/s", r.blobs_per_sec.show()),
                met: r.blobs_per_sec.median >= 500.0,
            });
        } else {
            out.push(TargetCheck {
                target: format!("3. blob recovery >= 0.5 of the decode limit, {at}"),
                measured: format!(
                    "{} MiB/s of blobs vs decode {} MiB/s = {:.2}",
                    r.blob_mib_s.show(),
                    w.decode_mib_s.show(),
                    r.blob_mib_s.median / w.decode_mib_s.median.max(1e-9)
                ),
                met: r.blob_mib_s.median >= 0.5 * w.decode_mib_s.median,
            });
        }
    }
    for st in &report.stores {
        let (target, met) = if st.file_size >= 1024 * 1024 {
            ("100 MiB/s", st.mib_s.median >= 100.0)
        } else {
            ("500 blobs/s", st.blobs_per_sec.median >= 500.0)
        };
        out.push(TargetCheck {
            target: format!("4. ferryctl store of {} files of {} >= {target}", st.files, size_label(st.file_size)),
            measured: format!(
                "{} blobs/s, {} MiB/s; BLS certificates alone allow {} blobs/s",
                st.blobs_per_sec.show(),
                st.mib_s.show(),
                st.certificate_limit_blobs_per_sec.show()
            ),
            met,
        });
    }
    let throttle_rows = report.throttle.iter().flat_map(|t| {
        [
            ("reads", t.idle.read_p99_ms, t.unthrottled.latency.read_p99_ms, t.throttled.latency.read_p99_ms),
            ("stores", t.idle.store_p99_ms, t.unthrottled.latency.store_p99_ms, t.throttled.latency.store_p99_ms),
        ]
    });
    for (kind, idle, unthrottled, throttled) in throttle_rows {
        out.push(TargetCheck {
            target: format!("5. {kind}' p99 within 1.5x of idle under full shard sync and recovery, throttled"),
            measured: format!(
                "idle {idle:.2} ms; unthrottled {unthrottled:.2} ms ({:.2}x); throttled {throttled:.2} ms ({:.2}x)",
                unthrottled / idle.max(1e-9),
                throttled / idle.max(1e-9)
            ),
            met: throttled <= 1.5 * idle,
        });
    }
    out.push(TargetCheck {
        target: "6. an optimised build, every figure over at least 3 runs".into(),
        measured: format!("{}; {} runs", report.build, report.runs),
        met: !cfg!(debug_assertions) && report.runs >= 3,
    });
    if let [base, killed] = report.resume.as_slice() {
        let bytes = killed.bytes_fetched as f64 / killed.epochs.first().map_or(1, |e| e.gained_bytes).max(1) as f64;
        let time = killed.first_wall() / base.first_wall().max(1e-9);
        out.push(TargetCheck {
            target: "(#7) resume after a kill at 50%: <= 1.05x bytes, <= 1.15x time".into(),
            measured: format!(
                "{bytes:.3}x bytes, {time:.2}x time (killed at {:.0}%)",
                killed.killed_at.unwrap_or(0.0) * 100.0
            ),
            met: bytes <= 1.05 && time <= 1.15,
        });
    }
    if let [small, large] = report.memory.as_slice() {
        let growth = large.server_growth_bytes.max(large.reader_growth_bytes) as i64
            - small.server_growth_bytes.max(small.reader_growth_bytes) as i64;
        out.push(TargetCheck {
            target: "(#7) peak RSS flat (within 64 MiB) as the shard grows 16x".into(),
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
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}\nbuild: {}\nruns per figure: {}", report.machine, report.build, report.runs);
    let _ = writeln!(out, "figures are median (min-max) over the runs\n");
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>6} {:<13} {:>6} {:>10} {:>22} {:>22} {:>10} {:>7} {:>7} {:>9}",
        "blob",
        "shards",
        "blobs",
        "fill",
        "gained",
        "gained 1st",
        "transfer MiB/s",
        "blobs/s",
        "fetched",
        "RPCs",
        "CPU s",
        "peak RSS"
    );
    for w in &report.workloads {
        for f in [&w.shard_sync, &w.blob_recovery] {
            let first = f.epochs.first();
            let _ = writeln!(
                out,
                "{:<8} {:>6} {:>6} {:<13} {:>6} {:>10} {:>22} {:>22} {:>10} {:>7} {:>7.2} {:>9}",
                size_label(w.blob_size),
                w.shards,
                w.blobs,
                f.method,
                first.map_or(0, |e| e.gained_shards),
                mib(first.map_or(0, |e| e.gained_bytes)),
                f.transfer_mib_s.show(),
                f.blobs_per_sec.show(),
                mib(f.bytes_fetched),
                f.rpcs,
                f.cpu_secs,
                mib(f.peak_rss_bytes)
            );
        }
        let _ = writeln!(
            out,
            "         limits: bare TLS StreamShard {} MiB/s, disk (shard sync's writes) {} MiB/s, decode {} MiB/s",
            w.bare_stream_mib_s.show(),
            w.disk_mib_s.show(),
            w.decode_mib_s.show()
        );
    }
    let l = &report.limits;
    let _ = writeln!(out, "\nloopback (MiB/s): TCP {}, TLS {}", l.tcp_mib_s.show(), l.tls_mib_s.show());
    let _ = writeln!(out, "\nferryctl store of a directory");
    for st in &report.stores {
        let _ = writeln!(
            out,
            "  {:>5} files of {:<8}: {} blobs/s, {} MiB/s (BLS certificates alone allow {} blobs/s)",
            st.files,
            size_label(st.file_size),
            st.blobs_per_sec.show(),
            st.mib_s.show(),
            st.certificate_limit_blobs_per_sec.show()
        );
    }
    if let Some(t) = &report.throttle {
        out.push_str(&throttle::render(t));
    }
    let _ = writeln!(out, "\nresume (paced shard sync)");
    for f in &report.resume {
        let _ = writeln!(
            out,
            "  {:<24} {:.2} s, {} fetched of {}",
            f.killed_at.map_or("uninterrupted".to_string(), |at| format!("SIGKILL at {:.0}%", at * 100.0)),
            f.first_wall(),
            mib(f.bytes_fetched),
            mib(f.epochs.first().map_or(0, |e| e.gained_bytes))
        );
    }
    let _ = writeln!(out, "\nslow reader (5 ms per item)");
    for m in &report.memory {
        let _ = writeln!(
            out,
            "  {:>4} slivers, {:>10}: server RSS +{}, reader RSS +{}",
            m.items,
            mib(m.shard_bytes),
            mib(m.server_growth_bytes),
            mib(m.reader_growth_bytes)
        );
    }
    let _ = writeln!(out, "\ntargets");
    for t in &report.targets {
        let _ = writeln!(out, "  [{}] {}: {}", if t.met { "met" } else { "MISSED" }, t.target, t.measured);
    }
    let _ = writeln!(out, "\ntotal {:.0} s", report.total_secs);
    out
}

/// The report as JSON (for `--json FILE`).
pub fn to_json(report: &BenchReport) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(report)?)
}
