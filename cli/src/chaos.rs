//! `ferryctl chaos`: random histories on a real local cluster, each from a seed that replays it.
//!
//! A history is a sequence of steps drawn from the seed: store blobs, SIGKILL a service (and
//! start it again now or later), wipe a node, take a node down across an epoch boundary, change
//! a weight, remove a node and add it back, pause and resume a recovery, restart etcd. At most
//! one node is impaired at a time (down, wiped or removed), as the committee tolerates. After
//! the history the cluster must come to rest (every member `Active` with every owned shard
//! `Active` at the current epoch, the epoch `Done`), and then: the audit finds no hole, no
//! attestation was written twice, every member attested the final epoch, and every blob reads
//! back byte-identical. Anything else is a violation, reported with its seed.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ferry_proto::v1::{self as pb, recovery_service_client::RecoveryServiceClient};
use ferry_shared::{
    client::BlobClient,
    control_plane::{ControlPlane, EpochPhase},
    types::{BlobId, NodeId},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    audit,
    epoch::{self, MemberChanges},
    local::{LocalCluster, UpOptions},
};

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// First seed.
    pub first_seed: u64,
    /// Number of seeds (one history each).
    pub seeds: u64,
    /// Steps per history.
    pub steps: usize,
    /// Working directory (one cluster at a time, deleted first).
    pub dir: PathBuf,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
}

/// The outcome of one history.
#[derive(Debug, Clone)]
pub struct HistoryOutcome {
    /// The seed that replays it.
    pub seed: u64,
    /// The steps taken.
    pub steps: Vec<String>,
    /// What went wrong, if anything.
    pub violation: Option<String>,
    /// How long it took.
    pub took: Duration,
}

/// Runs `options.seeds` histories and returns their outcomes (printing a line per history).
pub async fn run(options: &ChaosOptions) -> anyhow::Result<Vec<HistoryOutcome>> {
    let mut outcomes = Vec::new();
    for seed in options.first_seed..options.first_seed + options.seeds {
        let dir = options.dir.join(format!("seed-{seed}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let started = Instant::now();
        let mut steps = Vec::new();
        let violation = match history(seed, options.steps, &dir, &options.bin_dir, &mut steps).await {
            Ok(()) => None,
            Err(e) => Some(format!("{e:#}")),
        };
        let outcome = HistoryOutcome { seed, steps, violation, took: started.elapsed() };
        match &outcome.violation {
            None => {
                println!("seed {seed}: ok in {:.1?} ({})", outcome.took, outcome.steps.join(", "));
                let _ = std::fs::remove_dir_all(&dir); // keep only the failing ones
            }
            Some(v) => println!(
                "seed {seed}: VIOLATION after {:.1?}: {v}\n  steps: {}\n  cluster left in {}",
                outcome.took,
                outcome.steps.join(", "),
                dir.display()
            ),
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The set-up every history starts from: 4 nodes, 8 shards, mutual TLS, quick retries.
fn up_options(dir: &Path, bin_dir: &Path) -> UpOptions {
    UpOptions {
        nodes: 4,
        shards: 8,
        dir: dir.to_path_buf(),
        bin_dir: bin_dir.to_path_buf(),
        sync_extra: "[shard_sync]\ninitial_backoff_ms = 50\nmax_backoff_ms = 500\ngive_up_after_ms = 3000\n".into(),
        recovery_extra: "[recovery]\nretry_initial_ms = 50\nretry_max_ms = 500\n".into(),
        tls: true,
    }
}

async fn history(seed: u64, steps: usize, dir: &Path, bin_dir: &Path, log: &mut Vec<String>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cluster = LocalCluster::up(&up_options(dir, bin_dir)).await?;
    let result = async {
        let cp = cluster.control_plane().await?;
        let mut world =
            World { rng: StdRng::seed_from_u64(seed), blobs: Vec::new(), down: None, wiped: None, removed: None };
        world.store(&cluster, &cp, 10).await?;
        for _ in 0..steps {
            let step = world.step(&mut cluster, &cp).await?;
            log.push(step);
        }
        world.heal(&mut cluster, &cp, log).await?;
        quiesce(&cluster, &cp).await?;
        check(&cluster, &cp, &world.blobs).await
    }
    .await;
    if result.is_ok() {
        cluster.down()?;
    } else {
        let _ = cluster.down();
    }
    result
}

/// The history's state: the blobs stored, and the one node (if any) that is down, recovering
/// from a wipe, or removed.
struct World {
    rng: StdRng,
    blobs: Vec<(BlobId, Vec<u8>)>,
    down: Option<usize>,
    wiped: Option<usize>,
    removed: Option<usize>,
}

impl World {
    async fn store(&mut self, cluster: &LocalCluster, cp: &ControlPlane, n: usize) -> anyhow::Result<()> {
        let client = BlobClient::new(cp.clone(), cluster.connector()?, Duration::from_secs(10));
        for _ in 0..n {
            let mut data = vec![0u8; self.rng.gen_range(0..3000)];
            self.rng.fill(&mut data[..]);
            let id = client.store(&data).await.context("store a blob")?;
            self.blobs.push((id, data));
        }
        Ok(())
    }

    /// A node to impair, if none is impaired now (the committee tolerates one).
    fn healthy_pick(&mut self, cluster: &LocalCluster) -> Option<usize> {
        if self.down.is_some() || self.wiped.is_some() || self.removed.is_some() {
            return None;
        }
        Some(self.rng.gen_range(0..cluster.nodes.len()))
    }

    async fn epoch_change(&mut self, cp: &ControlPlane, changes: MemberChanges) -> anyhow::Result<()> {
        wait_done(cp).await?;
        let plan = epoch::plan(cp, &changes).await?;
        cp.propose_epoch(&plan.next).await?;
        Ok(())
    }

    async fn step(&mut self, cluster: &mut LocalCluster, cp: &ControlPlane) -> anyhow::Result<String> {
        let members: Vec<NodeId> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
        match self.rng.gen_range(0..9) {
            0 | 1 => {
                let n = self.rng.gen_range(3..15);
                self.store(cluster, cp, n).await?;
                Ok(format!("store {n}"))
            }
            2 => match self.healthy_pick(cluster) {
                Some(i) => {
                    let service = if self.rng.gen_bool(0.5) { "sync-service" } else { "recovery-service" };
                    cluster.kill_service(i, service)?;
                    if self.rng.gen_bool(0.5) {
                        cluster.start_node(i)?;
                        cluster.wait_healthy(i).await?;
                        Ok(format!("kill -9 {service} of node {i}, restart"))
                    } else {
                        self.down = Some(i);
                        cluster.kill_node(i)?;
                        Ok(format!("kill -9 {service} of node {i}, down"))
                    }
                }
                None => self.restore(cluster, cp).await,
            },
            3 => match self.healthy_pick(cluster) {
                Some(i) => {
                    cluster.wipe_node(i)?;
                    cluster.start_node(i)?;
                    cluster.wait_healthy(i).await?;
                    self.wiped = Some(i);
                    Ok(format!("wipe node {i}"))
                }
                None => self.restore(cluster, cp).await,
            },
            4 => {
                // A weight change; if a node is down, it stays down across the boundary.
                let who = members[self.rng.gen_range(0..members.len())].clone();
                if self.removed.is_some_and(|r| cluster.nodes[r].id == who) {
                    return Ok("skip (weight of a removed node)".into());
                }
                let weight = self.rng.gen_range(1..4);
                self.epoch_change(cp, MemberChanges { weights: vec![(who.clone(), weight)], ..Default::default() })
                    .await?;
                Ok(format!("epoch: weight {who}={weight}"))
            }
            5 => match (self.removed, self.healthy_pick(cluster)) {
                (None, Some(i)) => {
                    let id = cluster.nodes[i].id.clone();
                    self.epoch_change(cp, MemberChanges { remove: vec![id.clone()], ..Default::default() }).await?;
                    self.removed = Some(i);
                    Ok(format!("epoch: remove {id}"))
                }
                (Some(i), _) => {
                    let member = cluster.member(i, 1)?;
                    let id = member.node_id.clone();
                    self.epoch_change(cp, MemberChanges { add: vec![member], ..Default::default() }).await?;
                    self.removed = None;
                    Ok(format!("epoch: add {id} back"))
                }
                _ => self.restore(cluster, cp).await,
            },
            6 => {
                let i = self.rng.gen_range(0..cluster.nodes.len());
                if self.down == Some(i) || self.removed == Some(i) {
                    return Ok("skip (pause of an impaired node)".into());
                }
                set_paused(cluster, cp, i, true).await?;
                tokio::time::sleep(Duration::from_millis(self.rng.gen_range(100..1500))).await;
                set_paused(cluster, cp, i, false).await?;
                Ok(format!("pause and resume recovery of node {i}"))
            }
            7 => {
                cluster.restart_etcd().await?;
                Ok("restart etcd".into())
            }
            _ => self.restore(cluster, cp).await,
        }
    }

    /// Brings a down node back, or waits for a wiped one to finish its recovery.
    async fn restore(&mut self, cluster: &mut LocalCluster, cp: &ControlPlane) -> anyhow::Result<String> {
        if let Some(i) = self.down.take() {
            cluster.start_node(i)?;
            cluster.wait_healthy(i).await?;
            return Ok(format!("start node {i}"));
        }
        if let Some(i) = self.wiped.take() {
            quiesce(cluster, cp).await?;
            return Ok(format!("node {i} recovered"));
        }
        Ok("nothing to restore".into())
    }

    /// Ends the history with every node up and a member.
    async fn heal(
        &mut self,
        cluster: &mut LocalCluster,
        cp: &ControlPlane,
        log: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if self.down.is_some() {
            let step = self.restore(cluster, cp).await?;
            log.push(step);
        }
        if let Some(i) = self.removed.take() {
            let member = cluster.member(i, 1)?;
            log.push(format!("epoch: add {} back", member.node_id));
            self.epoch_change(cp, MemberChanges { add: vec![member], ..Default::default() }).await?;
        }
        Ok(())
    }
}

async fn set_paused(cluster: &LocalCluster, cp: &ControlPlane, i: usize, paused: bool) -> anyhow::Result<()> {
    let committee = cp.current_committee().await?.context("no committee")?;
    let id = &cluster.nodes[i].id;
    let address = match committee.member(id) {
        Some(m) => m.recovery_address.clone(),
        None => format!("127.0.0.1:{}", cluster.nodes[i].recovery_port),
    };
    let channel = cluster
        .connector()?
        .channel(&address, id, Some(Duration::from_secs(10)))
        .map_err(|s| anyhow::anyhow!(s.message().to_string()))?;
    let mut client = RecoveryServiceClient::new(channel);
    if paused {
        client.pause_recovery(pb::PauseRecoveryRequest {}).await?;
    } else {
        client.resume_recovery(pb::ResumeRecoveryRequest {}).await?;
    }
    Ok(())
}

/// How long a cluster may take to come to rest after a history.
const QUIESCE: Duration = Duration::from_secs(180);

async fn wait_done(cp: &ControlPlane) -> anyhow::Result<()> {
    let deadline = Instant::now() + QUIESCE;
    loop {
        if let Some(EpochPhase::Done(_)) = cp.current().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the epoch did not become Done within {QUIESCE:?} (phase {:?})", cp.current().await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the epoch is `Done` and every member is `Active` at it with every owned shard
/// `Active`.
pub async fn quiesce(cluster: &LocalCluster, cp: &ControlPlane) -> anyhow::Result<()> {
    let deadline = Instant::now() + QUIESCE;
    loop {
        let phase = cp.current().await?;
        let committee = cp.current_committee().await?.context("no committee")?;
        let mut waiting = Vec::new();
        if !matches!(phase, Some(EpochPhase::Done(e)) if e == committee.epoch) {
            waiting.push(format!("phase {phase:?}"));
        }
        for (i, n) in cluster.nodes.iter().enumerate() {
            if !committee.is_member(&n.id) {
                continue;
            }
            match cluster.sync_status(i).await {
                Some(s) => {
                    let owned = committee.shards_of(&n.id);
                    let all_active = owned
                        .iter()
                        .all(|o| s.shards.iter().any(|r| r.shard == o.0 && r.status == pb::ShardStatus::Active as i32));
                    if s.epoch != committee.epoch || s.node_status != pb::NodeStatus::Active as i32 || !all_active {
                        waiting.push(format!(
                            "{} at epoch {} status {} ({} of {} shards Active)",
                            n.id,
                            s.epoch,
                            s.node_status,
                            owned
                                .iter()
                                .filter(|o| s
                                    .shards
                                    .iter()
                                    .any(|r| r.shard == o.0 && r.status == pb::ShardStatus::Active as i32))
                                .count(),
                            owned.len()
                        ));
                    }
                }
                None => waiting.push(format!("{} unreachable", n.id)),
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not come to rest within {QUIESCE:?}: {}", waiting.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The checks after a history at rest.
pub async fn check(cluster: &LocalCluster, cp: &ControlPlane, blobs: &[(BlobId, Vec<u8>)]) -> anyhow::Result<()> {
    let report = audit::run(cp, &cluster.connector()?).await?;
    if report.holes() > 0 {
        bail!("the audit found {} holes:\n{}", report.holes(), audit::render(&report));
    }
    let committee = cp.current_committee().await?.context("no committee")?;
    for epoch in 1..=committee.epoch {
        for n in &cluster.nodes {
            let writes = cp.attestation_writes(epoch, &n.id).await?;
            if writes > 1 {
                bail!("{} attested epoch {epoch} {writes} times", n.id);
            }
        }
    }
    for m in &committee.members {
        if committee.epoch > 0 && cp.attestation_writes(committee.epoch, &m.node_id).await? != 1 {
            bail!("{} did not attest the final epoch {}", m.node_id, committee.epoch);
        }
    }
    let client = BlobClient::new(cp.clone(), cluster.connector()?, Duration::from_secs(10));
    for (id, data) in blobs {
        let back = client.read(id).await.with_context(|| format!("read {id}"))?;
        if &back != data {
            bail!("blob {id} read back different bytes");
        }
    }
    Ok(())
}
