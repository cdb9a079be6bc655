//! `ferryctl bench-scale`: a 4-node local cluster filled with many small blobs (a million by
//! default), measuring what must not grow with the blob count (etcd, node memory, the time of
//! `ferryctl status`) while it fills, then the time of a shard sync and of a wiped node's
//! recovery at that size.
//!
//! The report is rewritten after every sample (`--json`), so a long run shows its progress and
//! an interrupted one keeps what it measured.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ferry_shared::{client::BlobClient, erasure};
use futures::{StreamExt, stream::FuturesUnordered};
use serde::Serialize;

use super::{Disturb, FillSpec, blob_data, gain_one_shard, machine, say};
use crate::{
    local::{LocalCluster, UpOptions, proc_status_bytes},
    status,
};

/// Parameters of a scale run.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Working directory (deleted first).
    pub dir: PathBuf,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Blobs to store.
    pub blobs: usize,
    /// Bytes per blob.
    pub blob_size: usize,
    /// Shards of the cluster.
    pub shards: u32,
    /// Store batches in flight.
    pub concurrency: usize,
    /// Blobs between samples.
    pub sample_every: usize,
    /// Skip the wipe-and-recover phase.
    pub skip_recovery: bool,
    /// Where the report is (re)written.
    pub json: Option<PathBuf>,
}

/// One sample, taken after every `sample_every` blobs.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleSample {
    /// Blobs stored so far.
    pub blobs: u64,
    /// Store rate since the previous sample.
    pub blobs_per_sec: f64,
    /// Keys under the cluster's etcd prefix.
    pub etcd_keys: u64,
    /// Bytes of those keys and values.
    pub etcd_bytes: u64,
    /// Size of etcd's database file.
    pub etcd_db_bytes: u64,
    /// Wall time of `ferryctl status` (every member's `GetStatus`).
    pub status_ms: f64,
    /// Certified blobs `ferryctl status` reported.
    pub status_blobs: u64,
    /// RSS of each node's sync-service.
    pub sync_rss_bytes: Vec<u64>,
    /// RSS of each node's recovery-service.
    pub recovery_rss_bytes: Vec<u64>,
    /// On-disk size of each node's shard store.
    pub sync_store_bytes: Vec<u64>,
}

/// A timed phase after the fill.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRun {
    /// What was timed.
    pub what: String,
    /// Wall time.
    pub secs: f64,
    /// Details.
    pub detail: String,
}

/// Everything a scale run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScaleReport {
    /// The machine.
    pub machine: String,
    /// Nodes, shards, blobs and their size.
    pub parameters: String,
    /// Samples during the fill.
    pub samples: Vec<ScaleSample>,
    /// Blobs stored (refused or failed stores are not counted).
    pub stored: u64,
    /// Stores that failed.
    pub failed: u64,
    /// Wall time of the whole fill.
    pub store_secs: f64,
    /// Peak RSS (`VmHWM`) of any sync-service over the fill.
    pub peak_sync_rss_bytes: u64,
    /// Peak RSS of any recovery-service over the fill.
    pub peak_recovery_rss_bytes: u64,
    /// The phases after the fill.
    pub phases: Vec<PhaseRun>,
    /// Total time.
    pub total_secs: f64,
}

impl ScaleReport {
    fn save(&self, path: Option<&Path>) -> anyhow::Result<()> {
        if let Some(path) = path {
            std::fs::write(path, serde_json::to_string_pretty(self)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn sample(cluster: &LocalCluster, stored: u64, blobs_per_sec: f64) -> anyhow::Result<ScaleSample> {
    let cp = cluster.control_plane().await?;
    let (etcd_keys, etcd_bytes) = cp.footprint().await?;
    let started = Instant::now();
    let report = status::collect(&cp, &cluster.connector()?).await?;
    let status_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss = |pid: Option<u32>| pid.map(|p| proc_status_bytes(p, "VmRSS:")).unwrap_or(0);
    Ok(ScaleSample {
        blobs: stored,
        blobs_per_sec,
        etcd_keys,
        etcd_bytes,
        etcd_db_bytes: std::fs::metadata(cluster.dir.join("etcd/member/snap/db")).map(|m| m.len()).unwrap_or(0),
        status_ms,
        status_blobs: report.blobs,
        sync_rss_bytes: cluster.nodes.iter().map(|n| rss(n.sync_pid)).collect(),
        recovery_rss_bytes: cluster.nodes.iter().map(|n| rss(n.recovery_pid)).collect(),
        sync_store_bytes: (0..cluster.nodes.len())
            .map(|i| dir_bytes(&cluster.node_dir(i).join("sync-store")))
            .collect(),
    })
}

/// Runs the scale benchmark.
pub async fn run(options: &ScaleOptions) -> anyhow::Result<ScaleReport> {
    if options.blobs == 0 || options.blob_size == 0 || options.sample_every == 0 {
        bail!("--blobs, --blob-size and --sample-every must be positive");
    }
    let started = Instant::now();
    if options.dir.exists() {
        if let Ok(mut old) = LocalCluster::load(&options.dir) {
            let _ = old.down();
        }
        std::fs::remove_dir_all(&options.dir)?;
    }
    let up = UpOptions {
        nodes: 4,
        shards: options.shards,
        dir: options.dir.clone(),
        bin_dir: options.bin_dir.clone(),
        sync_extra: String::new(),
        recovery_extra: String::new(),
        tls: true,
    };
    let mut cluster = LocalCluster::up(&up).await.context("start the cluster")?;
    let result = measure(&mut cluster, options, started).await;
    let _ = cluster.down();
    result.map_err(|e| e.context(format!("logs in {}", options.dir.join("logs").display())))
}

async fn measure(cluster: &mut LocalCluster, options: &ScaleOptions, started: Instant) -> anyhow::Result<ScaleReport> {
    let json = options.json.as_deref();
    let mut report = ScaleReport {
        machine: machine(),
        parameters: format!(
            "4 nodes, {} shards, {} blobs x {} bytes, {} store batches of up to {} blobs in flight",
            options.shards,
            options.blobs,
            options.blob_size,
            options.concurrency,
            crate::store::BATCH_FILES
        ),
        ..Default::default()
    };
    let cp = cluster.control_plane().await?;
    let client = BlobClient::new(cp.clone(), cluster.connector()?, Duration::from_secs(60));
    report.samples.push(sample(cluster, 0, 0.0).await?);
    say(format!("empty cluster: etcd {} keys, {} bytes", report.samples[0].etcd_keys, report.samples[0].etcd_bytes));

    // The fill: batches of distinct blobs, `concurrency` in flight, a sample every
    // `sample_every` blobs.
    let batch = crate::store::BATCH_FILES;
    let fill_started = Instant::now();
    let mut next = 0usize;
    let mut in_flight = FuturesUnordered::new();
    let (mut since_sample, mut sample_started) = (0usize, Instant::now());
    loop {
        while in_flight.len() < options.concurrency.max(1) && next < options.blobs {
            let range = next..(next + batch).min(options.blobs);
            next = range.end;
            let client = client.clone();
            let size = options.blob_size;
            in_flight.push(async move {
                let data: Vec<Vec<u8>> = range.map(|i| blob_data(i, size)).collect();
                let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                client.store_many(&refs).await
            });
        }
        let Some(outcome) = in_flight.next().await else { break };
        for r in outcome? {
            match r {
                Ok(_) => report.stored += 1,
                Err(e) => {
                    report.failed += 1;
                    if report.failed <= 10 {
                        say(format!("a store failed: {e}"));
                    }
                }
            }
            since_sample += 1;
        }
        if since_sample >= options.sample_every || (in_flight.is_empty() && next >= options.blobs) {
            let rate = since_sample as f64 / sample_started.elapsed().as_secs_f64().max(1e-9);
            let s = sample(cluster, report.stored, rate).await?;
            say(row(&s));
            report.samples.push(s);
            report.store_secs = fill_started.elapsed().as_secs_f64();
            report.save(json)?;
            (since_sample, sample_started) = (0, Instant::now());
        }
    }
    report.store_secs = fill_started.elapsed().as_secs_f64();
    let hwm = |pid: Option<u32>| pid.map(|p| proc_status_bytes(p, "VmHWM:")).unwrap_or(0);
    report.peak_sync_rss_bytes = cluster.nodes.iter().map(|n| hwm(n.sync_pid)).max().unwrap_or(0);
    report.peak_recovery_rss_bytes = cluster.nodes.iter().map(|n| hwm(n.recovery_pid)).max().unwrap_or(0);
    say(format!(
        "stored {} blobs in {:.0} s ({:.0} blobs/s), {} failed",
        report.stored,
        report.store_secs,
        report.stored as f64 / report.store_secs.max(1e-9),
        report.failed
    ));
    report.save(json)?;

    // An epoch change that gives node 0 a shard, filled by shard sync.
    let k = erasure::original_count(options.shards)?;
    let sliver = erasure::sliver_len(options.blob_size as u64, k)?;
    let spec = FillSpec {
        method: "shard_sync",
        tls: true,
        blob_size: options.blob_size,
        blobs: report.stored as usize,
        shards: options.shards,
        epochs: 1,
        rate: 0,
        disturb: Disturb::None,
    };
    let fill = gain_one_shard(cluster, &cp, &spec, sliver).await?.sample;
    report.phases.push(PhaseRun {
        what: "shard sync of node 0's gained shards (epoch change to Done)".into(),
        secs: fill.wall_secs,
        detail: format!(
            "{} shard(s), {} MiB of slivers, transfer {:.1} s",
            fill.gained_shards,
            fill.gained_bytes >> 20,
            fill.transfer_secs
        ),
    });
    say(format!("shard sync: {:.1} s wall, {:.1} s transfer", fill.wall_secs, fill.transfer_secs));
    report.save(json)?;

    if !options.skip_recovery {
        let victim = cluster.nodes.len() - 1;
        let expected = cluster.sync_status(0).await.map(|s| s.certified_count).context("node 0's status")?;
        cluster.wipe_node(victim)?;
        let t0 = Instant::now();
        cluster.start_node(victim)?;
        let mut learned_at = None;
        let deadline = Instant::now() + Duration::from_secs(6 * 3600);
        loop {
            if Instant::now() > deadline {
                bail!("the wiped node did not recover within 6 hours");
            }
            if let Some(s) = cluster.sync_status(victim).await {
                if learned_at.is_none() && s.index_caught_up && s.certified_count >= expected {
                    learned_at = Some(t0.elapsed().as_secs_f64());
                    say(format!(
                        "wiped node knows all {expected} certified blobs after {:.1} s",
                        t0.elapsed().as_secs_f64()
                    ));
                }
                let whole = s.shards.iter().all(|r| r.sliver_count >= expected);
                if s.node_status == ferry_proto::v1::NodeStatus::Active as i32 && whole && s.pending_count == 0 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let owned = cluster.sync_status(victim).await.map(|s| s.shards.len()).unwrap_or(0);
        report.phases.push(PhaseRun {
            what: "a wiped node's recovery (start to Active with every sliver)".into(),
            secs,
            detail: format!(
                "{owned} shard(s) x {expected} blobs; certified index caught up after {:.1} s",
                learned_at.unwrap_or(secs)
            ),
        });
        say(format!("recovery of a wiped node: {secs:.1} s"));
        report.samples.push(sample(cluster, report.stored, 0.0).await?);
    }
    report.total_secs = started.elapsed().as_secs_f64();
    report.save(json)?;
    Ok(report)
}

/// A sample as a row of the report's table.
fn row(s: &ScaleSample) -> String {
    let mib = |v: &[u64]| v.iter().map(|b| (b >> 20).to_string()).collect::<Vec<_>>().join("/");
    format!(
        "{:>9} {:>8.0} {:>6} {:>9} {:>9} {:>9.0} {:>22} {:>14}",
        s.blobs,
        s.blobs_per_sec,
        s.etcd_keys,
        s.etcd_bytes,
        s.etcd_db_bytes >> 10,
        s.status_ms,
        mib(&s.sync_rss_bytes),
        mib(&s.sync_store_bytes)
    )
}

/// The report as text.
pub fn render(report: &ScaleReport) -> String {
    let mut out = format!("machine: {}\nparameters: {}\n\n", report.machine, report.parameters);
    out.push_str(&format!(
        "{:>9} {:>8} {:>6} {:>9} {:>9} {:>9} {:>22} {:>14}\n",
        "blobs", "blobs/s", "keys", "etcd B", "db KiB", "status ms", "sync RSS MiB", "store MiB"
    ));
    for s in &report.samples {
        out.push_str(&row(s));
        out.push('\n');
    }
    out.push_str(&format!(
        "\nstored {} ({} failed) in {:.0} s: {:.0} blobs/s; peak RSS sync-service {} MiB, recovery-service {} MiB\n",
        report.stored,
        report.failed,
        report.store_secs,
        report.stored as f64 / report.store_secs.max(1e-9),
        report.peak_sync_rss_bytes >> 20,
        report.peak_recovery_rss_bytes >> 20
    ));
    for p in &report.phases {
        out.push_str(&format!("{}: {:.1} s ({})\n", p.what, p.secs, p.detail));
    }
    out.push_str(&format!("total {:.0} s\n", report.total_secs));
    out
}
