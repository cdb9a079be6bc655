//! `ferryctl demo`: the scenario Ferry exists for, on a real local cluster. A node loses its
//! data and recovers; while it recovers an epoch change gives it shards from healthy nodes;
//! those are filled by shard sync, recovery waits for the syncs, the node attests once, and
//! every blob reads back.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ferry_proto::v1::{
    self as pb, recovery_service_client::RecoveryServiceClient, sync_service_client::SyncServiceClient,
};
use ferry_shared::{
    client::BlobClient,
    control_plane::EpochPhase,
    grpc::{Connector, TracedChannel},
    types::{BlobId, NodeId, NodeStatus, ShardStatus},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    epoch::{self, MemberChanges},
    local::{LocalCluster, UpOptions},
};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Directory of the demo cluster (removed first).
    pub dir: PathBuf,
    /// Service binaries.
    pub bin_dir: PathBuf,
    /// Blobs to store.
    pub blobs: usize,
}

fn say(line: impl AsRef<str>) {
    println!("==> {}", line.as_ref());
}

async fn wait<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo; returns an error if any check failed. The cluster is stopped either way.
pub async fn run(options: &DemoOptions) -> anyhow::Result<()> {
    if options.dir.exists() {
        if let Ok(mut old) = LocalCluster::load(&options.dir) {
            let _ = old.down();
        }
        std::fs::remove_dir_all(&options.dir).with_context(|| format!("clear {}", options.dir.display()))?;
    }
    let up = UpOptions {
        nodes: 4,
        shards: 8,
        dir: options.dir.clone(),
        bin_dir: options.bin_dir.clone(),
        // Pace shard streams so the syncs are long enough to watch recovery wait for them.
        sync_extra: "[stream]\nmax_bytes_per_sec = 400000\n".into(),
        recovery_extra: String::new(),
        tls: true,
    };
    say("starting a local cluster: etcd + 4 nodes (sync-service + recovery-service each), 8 shards");
    let mut cluster = LocalCluster::up(&up).await?;
    let result = scenario(&mut cluster, options).await;
    say("stopping the cluster");
    cluster.down()?;
    match &result {
        Ok(()) => say(format!("demo passed; logs in {}", options.dir.join("logs").display())),
        Err(e) => say(format!("demo FAILED: {e:#}; logs in {}", options.dir.join("logs").display())),
    }
    result
}

async fn scenario(cluster: &mut LocalCluster, options: &DemoOptions) -> anyhow::Result<()> {
    let cp = cluster.control_plane().await?;
    let connector = cluster.connector()?;
    let client = BlobClient::new(cp.clone(), connector.clone(), Duration::from_secs(10));
    let mut rng = StdRng::seed_from_u64(42);
    let started = Instant::now();
    let mut blobs: Vec<(BlobId, Vec<u8>)> = Vec::new();
    for i in 0..options.blobs {
        let len = match i % 10 {
            0 => rng.gen_range(64 * 1024..256 * 1024),
            1..=3 => rng.gen_range(4 * 1024..64 * 1024),
            _ => rng.gen_range(0..4 * 1024),
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        blobs.push((client.store(&data).await?, data));
    }
    let total: usize = blobs.iter().map(|(_, d)| d.len()).sum();
    say(format!(
        "stored {} blobs ({} KiB) in {:.1?}, each certified by a quorum",
        blobs.len(),
        total / 1024,
        started.elapsed()
    ));

    let victim = 3;
    let victim_id = cluster.nodes[victim].id.clone();
    say(format!("wiping {victim_id}'s stores and restarting it: it must recover"));
    cluster.wipe_node(victim)?;
    cluster.start_node(victim)?;
    cluster.wait_healthy(victim).await?;
    let recovery_addr = format!("127.0.0.1:{}", cluster.nodes[victim].recovery_port);
    let sync_addr = format!("127.0.0.1:{}", cluster.nodes[victim].sync_port);
    let mut recovery = connect_recovery(&connector, &recovery_addr, &victim_id).await?;
    recovery.pause_recovery(pb::PauseRecoveryRequest {}).await?;
    let mut sync = SyncServiceClient::new(connector.channel(&sync_addr, &victim_id, Some(Duration::from_secs(10)))?);
    let s = sync.get_status(pb::GetStatusRequest {}).await?.into_inner();
    let status = NodeStatus::from_proto(s.node_status, s.recovery_epoch)?;
    say(format!("{victim_id} is {status}; its recovery is paused (like Ceph's norecover)"));
    if !matches!(status, NodeStatus::RecoveryInProgress(_)) {
        bail!("{victim_id} should be recovering after the wipe, but is {status}");
    }

    say(format!("advancing the epoch: {victim_id}'s weight goes to 3, so it gains shards from healthy nodes"));
    let changes = MemberChanges { weights: vec![(victim_id.clone(), 3)], ..MemberChanges::default() };
    let mut plan = epoch::plan(&cp, &changes).await?;
    epoch::measure(&mut plan, &cp, &connector).await?;
    print!("{}", epoch::render(&plan));
    let gained: Vec<u32> = plan.moves.iter().filter(|m| m.to == victim_id).map(|m| m.shard.0).collect();
    let change_started = Instant::now();
    cp.propose_epoch(&plan.next).await?;
    wait("the epoch change to reach the node", Duration::from_secs(30), || {
        let mut sync = sync.clone();
        async move { Ok(sync.get_status(pb::GetStatusRequest {}).await?.into_inner().epoch == 1) }
    })
    .await?;
    let s = sync.get_status(pb::GetStatusRequest {}).await?.into_inner();
    say(format!("{victim_id} applied epoch 1 while recovering; running shard syncs: {}", s.running_syncs));

    say("resuming recovery: it must wait for the shard syncs before recovering blobs");
    recovery.resume_recovery(pb::ResumeRecoveryRequest {}).await?;
    let saw_waiting = std::sync::atomic::AtomicBool::new(false);
    wait(&format!("{victim_id} to finish recovery"), Duration::from_secs(120), || {
        let mut sync = sync.clone();
        let mut recovery = recovery.clone();
        let saw = &saw_waiting;
        async move {
            let r = recovery.get_recovery_status(pb::GetRecoveryStatusRequest {}).await?.into_inner();
            if r.waiting_for_syncs {
                saw.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let s = sync.get_status(pb::GetStatusRequest {}).await?.into_inner();
            Ok(s.node_status == pb::NodeStatus::Active as i32
                && s.shards
                    .iter()
                    .filter(|sh| sh.status != pb::ShardStatus::LockedToMove as i32)
                    .all(|sh| sh.status == pb::ShardStatus::Active as i32))
        }
    })
    .await?;
    let recovery_time = change_started.elapsed();
    wait("epoch 1 to be done", Duration::from_secs(60), || {
        let cp = cp.clone();
        async move { Ok(cp.current().await? == Some(EpochPhase::Done(1))) }
    })
    .await?;

    // The report.
    let s = sync.get_status(pb::GetStatusRequest {}).await?.into_inner();
    let r = recovery.get_recovery_status(pb::GetRecoveryStatusRequest {}).await?.into_inner();
    let mut failures = Vec::new();
    println!();
    println!("{:<7} {:<13} {:<30} {:>8} {:>12}", "shard", "status", "filled by", "slivers", "bytes");
    let mut sync_bytes = 0;
    for sh in &s.shards {
        let st = ShardStatus::from_proto(sh.status).map(|s| s.to_string()).unwrap_or_default();
        let filled = match &sh.sync {
            Some(p) if gained.contains(&sh.shard) => {
                sync_bytes += p.bytes_done;
                if p.blobs_done as usize != blobs.len() {
                    failures.push(format!(
                        "gained shard {} got {} of {} slivers by shard sync",
                        sh.shard,
                        p.blobs_done,
                        blobs.len()
                    ));
                }
                format!("shard sync from {}", p.source)
            }
            _ => "blob recovery".to_string(),
        };
        let bytes = sh.sync.as_ref().map(|p| p.bytes_done.to_string()).unwrap_or_else(|| "-".into());
        println!("{:<7} {:<13} {:<30} {:>8} {:>12}", sh.shard, st, filled, sh.sliver_count, bytes);
        if sh.sliver_count as usize != blobs.len() {
            failures.push(format!("shard {} holds {} of {} slivers", sh.shard, sh.sliver_count, blobs.len()));
        }
    }
    println!();
    println!(
        "recovery: {} blobs recovered, {} failed, {} bytes fetched by blob recovery, {} bytes by shard sync",
        r.blobs_recovered, r.blobs_failed, r.bytes_fetched, sync_bytes
    );
    println!(
        "recovery waited for shard syncs: {}",
        if saw_waiting.load(std::sync::atomic::Ordering::Relaxed) {
            "yes"
        } else {
            "not observed (syncs finished first)"
        }
    );
    println!("time from epoch change to {victim_id} Active: {recovery_time:.1?}");
    let attestations = cp.attestations(1).await?;
    println!("attestations for epoch 1:");
    for a in &attestations {
        println!("  {} by {} ({} shards of evidence)", a.node_id, a.attested_by, a.evidence.len());
    }
    let mine: Vec<_> = attestations.iter().filter(|a| a.node_id == victim_id).collect();
    if mine.len() != 1 || mine[0].attested_by != "recovery-service" {
        failures
            .push(format!("{victim_id} should have exactly one attestation by recovery-service, has {}", mine.len()));
    }
    let epoch_done = cp.current().await? == Some(EpochPhase::Done(1));
    if !epoch_done {
        failures.push("epoch 1 is not done".to_string());
    }
    let report = crate::status::collect(&cp, &connector).await?;
    println!();
    print!("{}", crate::status::render(&report));
    let mut read_ok = 0;
    for (id, data) in &blobs {
        match client.read(id).await {
            Ok(back) if &back == data => read_ok += 1,
            Ok(_) => failures.push(format!("blob {id} read back different bytes")),
            Err(e) => failures.push(format!("blob {id}: {e}")),
        }
    }
    println!("read-back: {read_ok}/{} blobs byte-identical", blobs.len());
    let audit = crate::audit::run(&cp, &connector).await?;
    print!("{}", crate::audit::render(&audit));
    if audit.holes() > 0 {
        failures.push(format!("the audit found {} holes", audit.holes()));
    }
    println!();
    let checks = [
        ("gained shards filled by shard sync", !gained.is_empty() && failures.iter().all(|f| !f.contains("gained"))),
        ("every shard of the recovered node holds every blob", failures.iter().all(|f| !f.contains("holds"))),
        ("exactly one attestation by recovery-service", failures.iter().all(|f| !f.contains("attestation"))),
        ("epoch 1 done", epoch_done),
        ("every blob reads back byte-identical", read_ok == blobs.len()),
        ("audit: every node holds every certified blob in every shard it owns", audit.holes() == 0),
    ];

    for (what, ok) in checks {
        println!("  [{}] {what}", if ok { "PASS" } else { "FAIL" });
    }
    if !failures.is_empty() {
        bail!("{} check(s) failed: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}

async fn connect_recovery(
    connector: &Connector,
    addr: &str,
    node: &NodeId,
) -> anyhow::Result<RecoveryServiceClient<TracedChannel>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = RecoveryServiceClient::new(connector.channel(addr, node, Some(Duration::from_secs(5)))?);
    loop {
        match client.get_recovery_status(pb::GetRecoveryStatusRequest {}).await {
            Ok(_) => return Ok(client),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(e).with_context(|| format!("connect to recovery-service at {addr}")),
        }
    }
}
