//! A local cluster on 127.0.0.1: one etcd (Debian's `etcd-server`) and, per node, a
//! sync-service and a recovery-service process with generated keys and configs. Everything
//! lives under one directory: `cluster.json` (ports, pids), `etcd/`, `tls/` (a development CA,
//! a certificate per node and one for `ferryctl`), `nodes/<id>/` (key, configs, stores) and
//! `logs/`. Nodes talk mutual TLS unless the cluster was made with `--plaintext`. Processes are
//! real and detached; `down` stops them all.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use ferry_shared::{
    Committee, Member,
    config::ControlPlaneConfig,
    control_plane::{
        ControlPlane, access,
        etcd::{self, EtcdServerTls},
    },
    crypto::NodeKeypair,
    grpc::Connector,
    testing::free_port,
    tls::{self, PeerIdentity, TlsConfig, TlsMaterial},
    types::NodeId,
};
use serde::{Deserialize, Serialize};

/// The file describing a local cluster.
pub const STATE_FILE: &str = "cluster.json";

/// A node of a local cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalNode {
    /// Node id.
    pub id: NodeId,
    /// sync-service gRPC port.
    pub sync_port: u16,
    /// sync-service health port.
    pub sync_health_port: u16,
    /// recovery-service gRPC port.
    pub recovery_port: u16,
    /// recovery-service health port.
    pub recovery_health_port: u16,
    /// sync-service metrics port.
    pub sync_metrics_port: u16,
    /// recovery-service metrics port.
    pub recovery_metrics_port: u16,
    /// sync-service pid, when started.
    pub sync_pid: Option<u32>,
    /// recovery-service pid, when started.
    pub recovery_pid: Option<u32>,
}

/// A local cluster's persisted description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalCluster {
    /// The cluster's directory.
    pub dir: PathBuf,
    /// Cluster name in etcd.
    pub name: String,
    /// etcd client port.
    pub etcd_port: u16,
    /// etcd peer port.
    pub etcd_peer_port: u16,
    /// etcd pid.
    pub etcd_pid: Option<u32>,
    /// Number of shards.
    pub n_shards: u32,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Whether the nodes use mutual TLS (certificates under `tls/`).
    pub tls: bool,
    /// The nodes.
    pub nodes: Vec<LocalNode>,
}

/// The client identity `ferryctl` uses towards a local cluster.
pub const CLIENT_NAME: &str = "ferryctl";
/// The application-client certificate the local cluster also issues (store and read only).
pub const APP_CLIENT_NAME: &str = "app";

/// Options of [`LocalCluster::up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Nodes.
    pub nodes: usize,
    /// Shards.
    pub shards: u32,
    /// Directory.
    pub dir: PathBuf,
    /// Service binaries.
    pub bin_dir: PathBuf,
    /// Extra TOML appended to every sync-service config.
    pub sync_extra: String,
    /// Extra TOML appended to every recovery-service config.
    pub recovery_extra: String,
    /// Mutual TLS between nodes and clients (default); false runs plaintext.
    pub tls: bool,
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes, but only once its last thread has exited: the leader
    // of a killed multi-threaded process turns zombie first, and its sockets stay open until
    // the other threads are gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
            !zombie || threads > 1
        }
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Stops a process: SIGTERM, then SIGKILL after `grace`; waits until it is gone.
pub fn stop_pid(pid: u32, grace: Duration) -> anyhow::Result<()> {
    if !pid_alive(pid) {
        return Ok(());
    }
    signal(pid, "TERM");
    let deadline = Instant::now() + grace;
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_pid(pid)
}

/// The processes this process started and has not reaped yet. A long-lived caller (`chaos`,
/// the benches) kills and restarts services many times; without a wait each dead one would
/// stay a zombie until the caller exits. `cluster up` exits at once and leaves its services to
/// init, so it never needs this.
static SPAWNED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, std::process::Child>>> =
    std::sync::LazyLock::new(Default::default);

fn remember(child: std::process::Child) -> u32 {
    let pid = child.id();
    SPAWNED.lock().unwrap_or_else(|p| p.into_inner()).insert(pid, child);
    pid
}

/// Reaps `pid` if this process started it and it has exited.
fn reap(pid: u32) {
    let mut spawned = SPAWNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(child) = spawned.get_mut(&pid)
        && matches!(child.try_wait(), Ok(Some(_)) | Err(_))
    {
        spawned.remove(&pid);
    }
}

/// SIGKILLs a process and waits (bounded) until it is gone.
pub fn kill_pid(pid: u32) -> anyhow::Result<()> {
    if !pid_alive(pid) {
        reap(pid);
        return Ok(());
    }
    signal(pid, "KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} did not die within 10 s of SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    reap(pid);
    Ok(())
}

impl LocalCluster {
    /// Loads a cluster's description from its directory.
    pub fn load(dir: &Path) -> anyhow::Result<LocalCluster> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("no local cluster at {} (run `ferryctl cluster up --dir {}` first)", dir.display(), dir.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))
    }

    /// Saves the description.
    pub fn save(&self) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, self.dir.join(STATE_FILE))?;
        Ok(())
    }

    /// etcd endpoint: mutual TLS with etcd's RBAC when the cluster uses TLS.
    pub fn etcd_endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.etcd_port)
    }

    /// The operator certificate `ferryctl` uses here (towards nodes and etcd), or `None` for a
    /// plaintext cluster.
    pub fn operator_identity(&self) -> anyhow::Result<Option<Arc<TlsMaterial>>> {
        if !self.tls {
            return Ok(None);
        }
        Ok(TlsConfig::from_dir(&self.tls_dir(), CLIENT_NAME).load(None)?)
    }

    /// The directory with the cluster's CA and certificates.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// Client channels as `ferryctl` (its client certificate), or plaintext.
    pub fn connector(&self) -> anyhow::Result<Connector> {
        Ok(Connector::new(self.operator_identity()?))
    }

    /// A control-plane client, as the operator.
    pub async fn control_plane(&self) -> anyhow::Result<ControlPlane> {
        let identity = self.operator_identity()?;
        Ok(ControlPlane::connect_etcd(&[self.etcd_endpoint()], &self.name, identity.as_deref()).await?)
    }

    /// Index of a node by id.
    pub fn index(&self, id: &str) -> anyhow::Result<usize> {
        self.nodes.iter().position(|n| n.id.as_str() == id).ok_or_else(|| {
            anyhow!(
                "no node {id} in this cluster (nodes: {})",
                self.nodes.iter().map(|n| n.id.to_string()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Node `i`'s directory (key, configs, stores).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join("nodes").join(self.nodes[i].id.as_str())
    }

    /// The committee entry of node `i`.
    pub fn member(&self, i: usize, weight: u64) -> anyhow::Result<Member> {
        let n = &self.nodes[i];
        let key = NodeKeypair::load(&self.node_dir(i).join("node.key"))?;
        Ok(Member::for_key(
            n.id.clone(),
            &key,
            format!("127.0.0.1:{}", n.sync_port),
            format!("127.0.0.1:{}", n.recovery_port),
            weight,
        ))
    }

    /// Creates and starts a cluster: etcd, keys and configs, the genesis committee, and every
    /// node's services. On any failure everything started is stopped again.
    pub async fn up(options: &UpOptions) -> anyhow::Result<LocalCluster> {
        if options.dir.join(STATE_FILE).exists() {
            bail!(
                "a cluster already exists in {} (run `ferryctl cluster down --dir {}` first)",
                options.dir.display(),
                options.dir.display()
            );
        }
        for bin in ["sync-service", "recovery-service"] {
            if !options.bin_dir.join(bin).exists() {
                bail!(
                    "{} not found in {} (build with `make build`, or pass --bin-dir)",
                    bin,
                    options.bin_dir.display()
                );
            }
        }
        std::fs::create_dir_all(options.dir.join("logs"))?;
        let mut cluster = LocalCluster {
            dir: options.dir.canonicalize()?,
            name: "local".into(),
            etcd_port: free_port(),
            etcd_peer_port: free_port(),
            etcd_pid: None,
            n_shards: options.shards,
            bin_dir: options.bin_dir.canonicalize()?,
            tls: options.tls,
            nodes: (0..options.nodes)
                .map(|i| {
                    Ok(LocalNode {
                        id: NodeId::new(format!("node-{i}"))?,
                        sync_port: free_port(),
                        sync_health_port: free_port(),
                        recovery_port: free_port(),
                        recovery_health_port: free_port(),
                        sync_metrics_port: free_port(),
                        recovery_metrics_port: free_port(),
                        sync_pid: None,
                        recovery_pid: None,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        cluster.save()?;
        match cluster.bring_up(options).await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                let _ = cluster.down();
                Err(e)
            }
        }
    }

    async fn bring_up(&mut self, options: &UpOptions) -> anyhow::Result<()> {
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id.clone()).collect();
        if self.tls {
            tls::write_dev_pki(&self.tls_dir(), &ids, CLIENT_NAME, APP_CLIENT_NAME)?;
        }
        self.start_etcd()?;
        self.save()?;
        let cp = self.wait_for_etcd().await?;
        if let Some(operator) = self.operator_identity()? {
            // Each node, the application client and the operator become etcd users holding their
            // roles, and etcd's authentication goes on before anything is written.
            let mut parties: Vec<PeerIdentity> = ids.iter().cloned().map(PeerIdentity::Node).collect();
            parties.push(PeerIdentity::Client(APP_CLIENT_NAME.to_string()));
            access::apply(&[self.etcd_endpoint()], &operator, &self.name, &parties).await?;
        }
        let mut members = Vec::new();
        for i in 0..self.nodes.len() {
            let dir = self.node_dir(i);
            std::fs::create_dir_all(&dir)?;
            NodeKeypair::generate().save(&dir.join("node.key"))?;
            self.write_configs(i, &options.sync_extra, &options.recovery_extra)?;
            members.push(self.member(i, 1)?);
        }
        let genesis = Committee::genesis(self.n_shards, members)?;
        cp.propose_epoch(&genesis).await?;
        for i in 0..self.nodes.len() {
            self.start_node(i)?;
        }
        self.save()?;
        for i in 0..self.nodes.len() {
            self.wait_healthy(i).await?;
        }
        // Up means settled: every node's certified index has caught up with its peers, so a
        // node killed next does not hold the others' catch-up (and attestations) to the deadline.
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..self.nodes.len() {
            while !self.sync_status(i).await.is_some_and(|s| s.index_caught_up) {
                if Instant::now() > deadline {
                    bail!("{}'s certified index did not catch up within 60 s", self.nodes[i].id);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("logs/etcd.log"))?;
        let tls = self.tls.then(|| EtcdServerTls {
            ca_file: self.tls_dir().join("ca.pem"),
            cert_file: self.tls_dir().join("etcd.pem"),
            key_file: self.tls_dir().join("etcd.key"),
        });
        let child = etcd::server_command(
            Path::new("etcd"),
            "local",
            &self.dir.join("etcd"),
            self.etcd_port,
            self.etcd_peer_port,
            tls.as_ref(),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start etcd (install Debian's etcd-server: scripts/setup)")?;
        self.etcd_pid = Some(remember(child));
        Ok(())
    }

    async fn wait_for_etcd(&self) -> anyhow::Result<ControlPlane> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.control_plane().await {
                Ok(cp) if cp.revision().await.is_ok() => return Ok(cp),
                _ if Instant::now() > deadline => {
                    bail!("etcd did not start within 20 s; see {}", self.dir.join("logs/etcd.log").display())
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn write_configs(&self, i: usize, sync_extra: &str, recovery_extra: &str) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let dir = self.node_dir(i);
        let cp = ControlPlaneConfig {
            etcd_endpoints: vec![self.etcd_endpoint()],
            cluster: self.name.clone(),
            ..ControlPlaneConfig::default()
        };
        let cp_toml =
            format!("[control_plane]\netcd_endpoints = [\"{}\"]\ncluster = \"{}\"\n", cp.etcd_endpoints[0], cp.cluster);
        let tls = if self.tls { TlsConfig::from_dir(&self.tls_dir(), n.id.as_str()) } else { TlsConfig::plaintext() };
        let tls_toml = format!(
            "[tls]\nenabled = {}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            tls.enabled,
            tls.ca_file.display(),
            tls.cert_file.display(),
            tls.key_file.display()
        );
        // A local cluster's members are all on this machine: compare indexes often, and after a
        // restart wait for a member that is down only briefly (unless the caller says otherwise).
        let index_toml = if sync_extra.contains("[index]") {
            String::new()
        } else {
            "[index]\nanti_entropy_interval_ms = 2000\ncatch_up_deadline_ms = 5000\n".to_string()
        };
        let sync = format!(
            "node_id = \"{id}\"\nkey_file = \"{key}\"\nlisten = \"127.0.0.1:{p}\"\nhealth_listen = \"127.0.0.1:{h}\"\nmetrics_listen = \"127.0.0.1:{m}\"\n{cp_toml}\n{tls_toml}\n[store]\npath = \"{store}\"\n{index_toml}{sync_extra}\n",
            id = n.id,
            key = dir.join("node.key").display(),
            p = n.sync_port,
            h = n.sync_health_port,
            m = n.sync_metrics_port,
            store = dir.join("sync-store").display(),
        );
        let recovery = format!(
            "node_id = \"{id}\"\nkey_file = \"{key}\"\nlisten = \"127.0.0.1:{p}\"\nhealth_listen = \"127.0.0.1:{h}\"\nmetrics_listen = \"127.0.0.1:{m}\"\nsync_service = \"127.0.0.1:{s}\"\nstore_path = \"{store}\"\n{cp_toml}\n{tls_toml}\n{recovery_extra}\n",
            id = n.id,
            key = dir.join("node.key").display(),
            p = n.recovery_port,
            h = n.recovery_health_port,
            m = n.recovery_metrics_port,
            s = n.sync_port,
            store = dir.join("recovery-store").display(),
        );
        std::fs::write(dir.join("sync-service.toml"), sync)?;
        std::fs::write(dir.join("recovery-service.toml"), recovery)?;
        Ok(())
    }

    fn spawn(&self, i: usize, service: &str, env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let n = &self.nodes[i];
        let log_path = self.dir.join(format!("logs/{}-{service}.log", n.id));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(self.bin_dir.join(service))
            .arg("--config")
            .arg(self.node_dir(i).join(format!("{service}.toml")))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {service} of {}", n.id))?;
        Ok(remember(child))
    }

    /// Starts node `i`'s services (those not running).
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        if !self.nodes[i].sync_pid.is_some_and(pid_alive) {
            self.nodes[i].sync_pid = Some(self.spawn(i, "sync-service", &[])?);
        }
        if !self.nodes[i].recovery_pid.is_some_and(pid_alive) {
            self.nodes[i].recovery_pid = Some(self.spawn(i, "recovery-service", &[])?);
        }
        self.save()
    }

    /// Restarts one service of node `i` (`sync-service` or `recovery-service`) with extra
    /// environment variables, e.g. `FAILPOINTS` in builds with fail points.
    pub fn restart_service_with_env(&mut self, i: usize, service: &str, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill_service(i, service)?;
        let pid = self.spawn(i, service, env)?;
        if service == "sync-service" {
            self.nodes[i].sync_pid = Some(pid);
        } else {
            self.nodes[i].recovery_pid = Some(pid);
        }
        self.save()
    }

    /// Waits until node `i`'s sync-service reports a loaded committee (health SERVING).
    pub async fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) =
                ferry_shared::grpc::health_channel(&format!("127.0.0.1:{}", n.sync_health_port), Duration::from_secs(2))
            {
                let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
                let req = tonic_health::pb::HealthCheckRequest { service: "ferry.v1.SyncService".into() };
                if let Ok(r) = client.check(req).await
                    && r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return Ok(());
                }
            }
            if n.sync_pid.is_some_and(|p| !pid_alive(p)) {
                let log = self.dir.join(format!("logs/{}-sync-service.log", n.id));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("sync-service of {} exited; see {} ({})", n.id, log.display(), fatal_error(&text));
            }
            if Instant::now() > deadline {
                bail!(
                    "sync-service of {} not ready within 30 s; see {}",
                    n.id,
                    self.dir.join(format!("logs/{}-sync-service.log", n.id)).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops node `i` gracefully (SIGTERM).
    pub fn stop_node(&mut self, i: usize) -> anyhow::Result<()> {
        for pid in [self.nodes[i].recovery_pid.take(), self.nodes[i].sync_pid.take()].into_iter().flatten() {
            stop_pid(pid, Duration::from_secs(10))?;
        }
        self.save()
    }

    /// Kills node `i` with SIGKILL (both services), and waits until they are gone.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        for pid in [self.nodes[i].sync_pid.take(), self.nodes[i].recovery_pid.take()].into_iter().flatten() {
            kill_pid(pid)?;
        }
        self.save()
    }

    /// Freezes node `i` (SIGSTOP to both services): it answers nobody and sends nothing, like a
    /// node cut off by a partition or a stalled VM, but it is not restarted when it resumes.
    pub fn pause_node(&self, i: usize) {
        for pid in [self.nodes[i].sync_pid, self.nodes[i].recovery_pid].into_iter().flatten() {
            signal(pid, "STOP");
        }
    }

    /// Lets a node frozen by [`LocalCluster::pause_node`] run again (SIGCONT).
    pub fn resume_node(&self, i: usize) {
        for pid in [self.nodes[i].sync_pid, self.nodes[i].recovery_pid].into_iter().flatten() {
            signal(pid, "CONT");
        }
    }

    /// SIGKILLs only one service of node `i`.
    pub fn kill_service(&mut self, i: usize, service: &str) -> anyhow::Result<()> {
        let slot =
            if service == "sync-service" { &mut self.nodes[i].sync_pid } else { &mut self.nodes[i].recovery_pid };
        if let Some(pid) = slot.take() {
            kill_pid(pid)?;
        }
        self.save()
    }

    /// Stops node `i` and deletes its stores, so it must recover when started again.
    pub fn wipe_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_node(i)?;
        for store in ["sync-store", "recovery-store"] {
            let path = self.node_dir(i).join(store);
            if path.exists() {
                std::fs::remove_dir_all(&path)?;
            }
        }
        Ok(())
    }

    /// Stops everything and removes the state file (logs and data stay for inspection).
    pub fn down(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.stop_node(i)?;
        }
        if let Some(pid) = self.etcd_pid.take() {
            stop_pid(pid, Duration::from_secs(5))?;
        }
        let _ = std::fs::remove_file(self.dir.join(STATE_FILE));
        Ok(())
    }

    /// Stops etcd (SIGTERM) and starts it again on the same data and ports: the nodes lose
    /// their watches and connections for a moment.
    pub async fn restart_etcd(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.etcd_pid.take() {
            stop_pid(pid, Duration::from_secs(5))?;
        }
        self.start_etcd()?;
        self.save()?;
        self.wait_for_etcd().await.map(|_| ())
    }

    /// `GetStatus` of node `i`'s sync-service, or `None` if it cannot be asked now.
    pub async fn sync_status(&self, i: usize) -> Option<ferry_proto::v1::GetStatusResponse> {
        let n = &self.nodes[i];
        let channel = self
            .connector()
            .ok()?
            .channel(&format!("127.0.0.1:{}", n.sync_port), &n.id, Some(Duration::from_secs(5)))
            .ok()?;
        let mut client = ferry_proto::v1::sync_service_client::SyncServiceClient::new(channel);
        client.get_status(ferry_proto::v1::GetStatusRequest {}).await.ok().map(|r| r.into_inner())
    }

    /// Whether node `i`'s sync-service process is alive.
    pub fn sync_alive(&self, i: usize) -> bool {
        self.nodes[i].sync_pid.is_some_and(pid_alive)
    }
}

/// A `/proc/<pid>/status` memory field (`VmRSS:`, `VmHWM:`, ...) in bytes, 0 if the process or
/// field is gone.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The fatal error a service printed before exiting (from its last `Error:` line, with the
/// causes, without the backtrace), or the last line of the log.
pub fn fatal_error(log: &str) -> String {
    match log.rfind("Error:") {
        Some(at) => log[at..]
            .lines()
            .take_while(|l| !l.contains("backtrace"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        None => log.lines().last().unwrap_or("").to_string(),
    }
}
