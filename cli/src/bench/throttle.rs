//! Clients' latency while a shard sync and a blob recovery run at full speed: idle, then with
//! the background throttle off, then on, on one cluster. The throttle is switched live by
//! rewriting the nodes' configuration files, as an operator would.
//!
//! Each background phase proposes an epoch that gives node 0 a shard (shard sync) and wipes a
//! node the epoch moves nothing from or to (its recovery-service then recovers every blob from
//! its peers, node 0 among them). The clients read slivers from node 0 and store small blobs
//! (on every node) throughout; the phase ends when node 0 and the wiped node are both `Active`
//! in the new epoch.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ferry_proto::v1::{self as pb, sync_service_client::SyncServiceClient};
use ferry_shared::{
    client::BlobClient,
    control_plane::{ControlPlane, EpochPhase},
    metrics::{sample, scrape},
    types::{BlobId, ShardIndex},
};
use serde::Serialize;
use tokio::sync::watch;

use super::{BenchOptions, blob_data, say, sync_channel};
use crate::{
    epoch::{self, MemberChanges},
    local::LocalCluster,
};

/// Blobs of the throttle run, and their size.
const BLOBS: usize = 4000;
const BLOB_SIZE: usize = 32 * 1024;
/// Size of each blob the clients store during the phases.
const CLIENT_BLOB: usize = 4 * 1024;
/// The node whose clients are measured.
const MEASURED: usize = 0;
/// How long clients are measured with no background work.
const IDLE: Duration = Duration::from_secs(30);

/// p99 latencies of the clients' operations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    /// `GetSliver` from node 0 (ms).
    pub read_p99_ms: f64,
    /// A whole client store of a 4 KiB blob, every node (ms).
    pub store_p99_ms: f64,
    /// Reads measured.
    pub reads: usize,
    /// Stores measured.
    pub stores: usize,
}

/// One second of a phase.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Seconds since the phase started.
    pub t_secs: f64,
    /// Reads' p99 in this second (ms).
    pub read_p99_ms: f64,
    /// Stores' p99 in this second (ms).
    pub store_p99_ms: f64,
    /// Node 0's background budget at the end of this second (MiB/s; 0 = unlimited).
    pub budget_mib_s: f64,
    /// The wiped node's budget at the end of this second (MiB/s; 0 = unlimited).
    pub recovering_budget_mib_s: f64,
}

/// One background phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// The clients' latency over the phase.
    pub latency: LatencySummary,
    /// Phase start to node 0 and the wiped node `Active`.
    pub background_secs: f64,
    /// Per second.
    pub curve: Vec<CurvePoint>,
}

/// The whole throttle measurement.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThrottleRun {
    /// Blobs stored before the phases.
    pub blobs: usize,
    /// Their size.
    pub blob_size: usize,
    /// No background work.
    pub idle: LatencySummary,
    /// Background at full speed, throttle off.
    pub unthrottled: Phase,
    /// Background with the throttle on.
    pub throttled: Phase,
}

struct Sample {
    at: Duration,
    read: bool,
    ms: f64,
}

fn p99(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let at = ((values.len() as f64 * 0.99).ceil() as usize).clamp(1, values.len().max(1)) - 1;
    values.get(at).copied().unwrap_or(0.0)
}

fn summarise(samples: &[Sample]) -> LatencySummary {
    let reads: Vec<f64> = samples.iter().filter(|s| s.read).map(|s| s.ms).collect();
    let stores: Vec<f64> = samples.iter().filter(|s| !s.read).map(|s| s.ms).collect();
    LatencySummary { reads: reads.len(), stores: stores.len(), read_p99_ms: p99(reads), store_p99_ms: p99(stores) }
}

/// Reads and stores until `stop`, paced (a read every 5 ms, a store every 20 ms, each waiting
/// for the previous one); every latency.
async fn clients(
    cluster: &LocalCluster,
    blob_client: BlobClient,
    targets: &[(BlobId, ShardIndex)],
    stop: watch::Receiver<bool>,
    seed: usize,
) -> anyhow::Result<Vec<Sample>> {
    let started = Instant::now();
    let mut reader = SyncServiceClient::new(sync_channel(cluster, &cluster.connector()?, MEASURED)?);
    let reads = {
        let mut stop = stop.clone();
        async move {
            let mut out = Vec::new();
            for (blob, shard) in targets.iter().cycle() {
                if *stop.borrow() {
                    break;
                }
                let t = Instant::now();
                reader
                    .get_sliver(pb::GetSliverRequest { blob_id: blob.0.to_vec(), shard: shard.0 })
                    .await
                    .with_context(|| format!("read {blob} shard {shard}"))?;
                out.push(Sample { at: started.elapsed(), read: true, ms: t.elapsed().as_secs_f64() * 1000.0 });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok::<_, anyhow::Error>(out)
        }
    };
    let stores = {
        let mut stop = stop.clone();
        async move {
            let mut out = Vec::new();
            for i in 0.. {
                if *stop.borrow() {
                    break;
                }
                let data = blob_data(10_000_000 + seed * 100_000 + i, CLIENT_BLOB);
                let t = Instant::now();
                blob_client.store(&data).await.context("store")?;
                out.push(Sample { at: started.elapsed(), read: false, ms: t.elapsed().as_secs_f64() * 1000.0 });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok::<_, anyhow::Error>(out)
        }
    };
    let (reads, stores) = tokio::join!(reads, stores);
    let mut all = reads?;
    all.extend(stores?);
    Ok(all)
}

/// Writes `enabled` into every node's `[throttle]` and waits until each applied it.
async fn set_throttle(cluster: &LocalCluster, enabled: bool) -> anyhow::Result<()> {
    for i in 0..cluster.nodes.len() {
        let path = cluster.node_dir(i).join("sync-service.toml");
        let text = std::fs::read_to_string(&path)?;
        let text =
            text.replace(&format!("[throttle]\nenabled = {}", !enabled), &format!("[throttle]\nenabled = {enabled}"));
        std::fs::write(&path, text)?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &cluster.nodes {
        loop {
            let text = scrape(SocketAddr::from(([127, 0, 0, 1], n.sync_metrics_port))).await?;
            if (sample(&text, "ferry_background_throttle_enabled", &[]) > 0.5) == enabled {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not apply throttle.enabled = {enabled} within 20 s of the config change", n.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// An epoch that gives node 0 at least one shard, and a node to wipe that is neither a source
/// nor a destination of its moves.
async fn next_epoch(cluster: &LocalCluster, cp: &ControlPlane) -> anyhow::Result<(ferry_shared::Committee, usize)> {
    let me = cluster.nodes[MEASURED].id.clone();
    let current = cp.current_committee().await?.context("no committee")?;
    let weight = current.member(&me).map(|m| m.weight).unwrap_or(1);
    for w in weight + 1..=weight + 16 {
        let plan = epoch::plan(cp, &MemberChanges { weights: vec![(me.clone(), w)], ..Default::default() }).await?;
        if !plan.moves.iter().any(|m| m.to == me) {
            continue;
        }
        let bystander = (0..cluster.nodes.len()).rev().find(|i| {
            let id = &cluster.nodes[*i].id;
            *i != MEASURED && plan.moves.iter().all(|m| m.from != *id && m.to != *id)
        });
        if let Some(i) = bystander {
            return Ok((plan.next, i));
        }
    }
    bail!("no weight increase up to 16 gives node 0 a shard and leaves a node out of the moves")
}

/// Node `i` is `Active` in `committee`'s epoch with every shard it owns there `Active`.
fn active_in(
    cluster: &LocalCluster,
    i: usize,
    status: &Option<pb::GetStatusResponse>,
    committee: &ferry_shared::Committee,
) -> bool {
    status.as_ref().is_some_and(|s| {
        s.epoch == committee.epoch
            && s.node_status == pb::NodeStatus::Active as i32
            && committee
                .shards_of(&cluster.nodes[i].id)
                .iter()
                .all(|owned| s.shards.iter().any(|r| r.shard == owned.0 && r.status == pb::ShardStatus::Active as i32))
    })
}

/// Per node: (StoreBlobs seconds sum, count, CertifyBlobs seconds sum, count) of client calls.
async fn store_rpc_totals(cluster: &LocalCluster) -> Vec<[f64; 4]> {
    let mut out = Vec::new();
    for n in &cluster.nodes {
        let text = scrape(SocketAddr::from(([127, 0, 0, 1], n.sync_metrics_port))).await.unwrap_or_default();
        let m = |suffix: &str, method: &str| {
            sample(
                &text,
                &format!("ferry_rpc_duration_seconds_{suffix}"),
                &[&format!("/ferry.v1.SyncService/{method}\"")],
            )
        };
        out.push([
            m("sum", "StoreBlobs"),
            m("count", "StoreBlobs"),
            m("sum", "CertifyBlobs"),
            m("count", "CertifyBlobs"),
        ]);
    }
    out
}

fn say_rpc_means(what: &str, before: &[[f64; 4]], after: &[[f64; 4]]) {
    let per_node: Vec<String> = before
        .iter()
        .zip(after)
        .enumerate()
        .map(|(i, (b, a))| {
            // A wiped node restarted: its counters began again at zero.
            let restarted = a[1] < b[1] || a[3] < b[3];
            let base = if restarted { [0.0; 4] } else { *b };
            let mean = |s: usize, c: usize| 1000.0 * (a[s] - base[s]) / (a[c] - base[c]).max(1.0);
            format!("node-{i} StoreBlobs {:.1} ms, CertifyBlobs {:.1} ms", mean(0, 1), mean(2, 3))
        })
        .collect();
    say(format!("throttle {what}: server-side means: {}", per_node.join("; ")));
}

async fn phase(
    cluster: &mut LocalCluster,
    cp: &ControlPlane,
    blob_client: &BlobClient,
    targets: &[(BlobId, ShardIndex)],
    seed: usize,
) -> anyhow::Result<Phase> {
    let rpcs_before = store_rpc_totals(cluster).await;
    let (next, recovering) = next_epoch(cluster, cp).await?;
    let target = next.epoch;
    // The clock starts once the wiped node serves again: a restart's own unavailability is
    // not background load.
    cluster.wipe_node(recovering)?;
    cluster.start_node(recovering)?;
    cluster.wait_healthy(recovering).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    cp.propose_epoch(&next).await?;
    let metrics_ports = [cluster.nodes[MEASURED].sync_metrics_port, cluster.nodes[recovering].sync_metrics_port];
    let watcher = async {
        let mut budget = Vec::new();
        let deadline = started + Duration::from_secs(900);
        let mut last_sample = Duration::ZERO;
        loop {
            let (a, b) = (cluster.sync_status(MEASURED).await, cluster.sync_status(recovering).await);
            if active_in(cluster, MEASURED, &a, &next) && active_in(cluster, recovering, &b, &next) {
                break;
            }
            if started.elapsed() >= last_sample + Duration::from_secs(1) {
                last_sample = started.elapsed();
                let mut budgets = [0.0; 2];
                for (b, port) in budgets.iter_mut().zip(metrics_ports) {
                    let text = scrape(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap_or_default();
                    *b = sample(&text, "ferry_background_rate_bytes_per_second", &[]) / (1024.0 * 1024.0);
                }
                budget.push((last_sample, budgets));
            }
            if Instant::now() > deadline {
                bail!("node 0 and the wiped node {recovering} not Active in epoch {target} within 900 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = stop_tx.send(true);
        Ok::<_, anyhow::Error>((secs, budget))
    };
    let (watched, samples) = tokio::join!(watcher, clients(cluster, blob_client.clone(), targets, stop_rx, seed));
    let (background_secs, budget) = watched?;
    let samples = samples?;
    say_rpc_means(&format!("phase {seed} (node {recovering} wiped)"), &rpcs_before, &store_rpc_totals(cluster).await);
    // The next phase needs this epoch done.
    let done = Instant::now() + Duration::from_secs(120);
    while cp.current().await? != Some(EpochPhase::Done(target)) {
        if Instant::now() > done {
            bail!("epoch {target} not done within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = background_secs.ceil() as u64;
    let curve = (0..seconds)
        .map(|s| {
            let window = |read: bool| {
                p99(samples.iter().filter(|x| x.read == read && x.at.as_secs() == s).map(|x| x.ms).collect())
            };
            let budgets = budget.iter().rev().find(|(t, _)| t.as_secs() <= s + 1).map_or([0.0; 2], |(_, b)| *b);
            CurvePoint {
                t_secs: s as f64,
                read_p99_ms: window(true),
                store_p99_ms: window(false),
                budget_mib_s: budgets[0],
                recovering_budget_mib_s: budgets[1],
            }
        })
        .collect();
    Ok(Phase { latency: summarise(&samples), background_secs, curve })
}

/// Idle, unthrottled and throttled, on one 4-node cluster of the smallest shard count.
pub async fn measure(options: &BenchOptions) -> anyhow::Result<ThrottleRun> {
    let mut cluster =
        super::fresh_cluster(options, &options.dir.join("throttle"), "[throttle]\nenabled = true\n").await?;
    let result = async {
        let cp = cluster.control_plane().await?;
        let blob_client = BlobClient::new(cp.clone(), cluster.connector()?, Duration::from_secs(120));
        let blobs = BLOBS;
        let mut ids = Vec::with_capacity(blobs);
        for chunk in (0..blobs).collect::<Vec<_>>().chunks(256) {
            let data: Vec<Vec<u8>> = chunk.iter().map(|i| blob_data(20_000_000 + i, BLOB_SIZE)).collect();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            for r in blob_client.store_many(&refs).await? {
                ids.push(r?);
            }
        }
        let committee = cp.current_committee().await?.context("no committee")?;
        let shards = committee.shards_of(&cluster.nodes[MEASURED].id);
        let targets: Vec<(BlobId, ShardIndex)> =
            ids.iter().enumerate().map(|(i, id)| (*id, shards[i % shards.len()])).collect();

        let (stop_tx, stop_rx) = watch::channel(false);
        let idle = {
            // As many clients' calls as a background phase sees: a p99 of a few hundred calls
            // is their third worst, and varied from 19 to 73 ms between runs.
            let stop = async {
                tokio::time::sleep(IDLE).await;
                let _ = stop_tx.send(true);
            };
            let (_, samples) = tokio::join!(stop, clients(&cluster, blob_client.clone(), &targets, stop_rx, 0));
            summarise(&samples?)
        };
        say(format!("throttle: idle p99 read {:.2} ms, store {:.2} ms", idle.read_p99_ms, idle.store_p99_ms));
        set_throttle(&cluster, false).await?;
        let unthrottled = phase(&mut cluster, &cp, &blob_client, &targets, 1).await?;
        say(format!(
            "throttle off: {:.1} s of background, p99 read {:.2} ms, store {:.2} ms",
            unthrottled.background_secs, unthrottled.latency.read_p99_ms, unthrottled.latency.store_p99_ms
        ));
        set_throttle(&cluster, true).await?;
        let throttled = phase(&mut cluster, &cp, &blob_client, &targets, 2).await?;
        say(format!(
            "throttle on: {:.1} s of background, p99 read {:.2} ms, store {:.2} ms",
            throttled.background_secs, throttled.latency.read_p99_ms, throttled.latency.store_p99_ms
        ));
        Ok::<_, anyhow::Error>(ThrottleRun { blobs, blob_size: BLOB_SIZE, idle, unthrottled, throttled })
    }
    .await;
    super::down_and_discard(&mut cluster)?;
    result
}

/// The throttle section of the report: the summary, then both curves side by side.
pub fn render(run: &ThrottleRun) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nclients under full shard sync and recovery ({} blobs of {} KiB; reads from node 0, 4 KiB stores)",
        run.blobs,
        run.blob_size / 1024
    );
    let row = |name: &str, l: &LatencySummary, secs: Option<f64>| {
        format!(
            "  {name:<12} p99 read {:>7.2} ms ({:.2}x), store {:>7.2} ms ({:.2}x), {} reads, {} stores{}\n",
            l.read_p99_ms,
            l.read_p99_ms / run.idle.read_p99_ms.max(1e-9),
            l.store_p99_ms,
            l.store_p99_ms / run.idle.store_p99_ms.max(1e-9),
            l.reads,
            l.stores,
            secs.map_or(String::new(), |s| format!(", background {s:.1} s"))
        )
    };
    out.push_str(&row("idle", &run.idle, None));
    out.push_str(&row("unthrottled", &run.unthrottled.latency, Some(run.unthrottled.background_secs)));
    out.push_str(&row("throttled", &run.throttled.latency, Some(run.throttled.background_secs)));
    let _ = writeln!(
        out,
        "  per second: p99 read / store ms, then the budgets of node 0 / the wiped node (MiB/s, 0 = unlimited)"
    );
    let _ = writeln!(out, "  {:>4}  {:>35}  {:>35}", "s", "unthrottled", "throttled");
    let len = run.unthrottled.curve.len().max(run.throttled.curve.len());
    let cell = |p: Option<&CurvePoint>| {
        p.map_or(String::new(), |p| {
            format!(
                "{:>7.2} / {:>7.2} {:>8.1} / {:>7.1}",
                p.read_p99_ms, p.store_p99_ms, p.budget_mib_s, p.recovering_budget_mib_s
            )
        })
    };
    for s in 0..len {
        let _ = writeln!(
            out,
            "  {s:>4}  {:>35}  {:>35}",
            cell(run.unthrottled.curve.get(s)),
            cell(run.throttled.curve.get(s))
        );
    }
    out
}
