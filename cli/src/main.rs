//! `ferryctl`: store and read blobs, change epochs, watch cluster progress, run a local
//! cluster and the demo. Run `ferryctl <command> --help` for each command's options.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ferry_proto::v1::{self as pb, recovery_service_client::RecoveryServiceClient};
use ferry_shared::{
    Committee, Member,
    client::BlobClient,
    control_plane::ControlPlane,
    crypto::NodeKeypair,
    grpc::Connector,
    tls::{ClusterCa, PeerIdentity, TlsConfig, TlsMaterial},
    types::{BlobId, NodeId},
};
use ferryctl::{
    audit, bench, chaos, demo, epoch,
    local::{LocalCluster, UpOptions},
    status,
};
use tracing::Instrument as _;

#[derive(Parser, Debug)]
#[command(name = "ferryctl", version, about = "Operate a Ferry cluster: blobs, epochs, status, local clusters.")]
struct Cli {
    /// Local cluster directory (made by `cluster up`); used unless --etcd is given.
    #[arg(long, global = true, default_value = ".ferry-cluster", env = "FERRY_DIR")]
    dir: PathBuf,
    /// etcd endpoint of an existing cluster (e.g. http://10.0.0.5:2379).
    #[arg(long, global = true, env = "FERRY_ETCD")]
    etcd: Option<String>,
    /// Cluster name under /ferry/ in etcd (with --etcd).
    #[arg(long, global = true, default_value = "ferry", env = "FERRY_CLUSTER")]
    cluster: String,
    /// Directory with `ca.pem` and this client's certificate (`<tls-name>.pem`, `.key`), as
    /// written by `ferryctl certs`. Default: the local cluster's `tls/`.
    #[arg(long, global = true, env = "FERRY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Name of the client certificate in --tls-dir.
    #[arg(long, global = true, default_value = "ferryctl", env = "FERRY_TLS_NAME")]
    tls_name: String,
    /// Talk plaintext to nodes (only for clusters configured with `tls.enabled = false`).
    #[arg(long, global = true)]
    plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a new node key (ed25519 seed, hex) to a file and prints its public keys.
    #[command(
        after_help = "Examples:\n  ferryctl keygen --out node-4.key\n  ferryctl keygen --out /var/lib/ferry/identity/node.key --keep-existing   # a pod's init step"
    )]
    Keygen {
        /// Output file (must not exist, unless --keep-existing).
        #[arg(long)]
        out: PathBuf,
        /// If the file exists, keep it and print its public keys: a node generates its key on
        /// its own volume once, at first start, and it never leaves the node.
        #[arg(long)]
        keep_existing: bool,
    },
    /// Writes a cluster CA and certificates for nodes and clients (PEM files in --out).
    #[command(
        after_help = "A node certificate names <node>.node.ferry, which peers verify. A client certificate\nnames <name>.client.ferry and may store and read blobs; an operator certificate names\n<name>.operator.ferry and may also pause and resume recovery, retry shard syncs and set\nthe sync concurrency. An existing ca.pem/ca.key in --out is reused, so nodes can be added\nlater. Keep ca.key and the operator key out of the cluster.\n\nExample:\n  ferryctl certs --out secrets --node ferry-0 --node ferry-1 --san '*.ferry-peers.ferry.svc.cluster.local' --operator ferryctl --client app"
    )]
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Node ids to issue certificates for.
        #[arg(long)]
        node: Vec<String>,
        /// Extra DNS names or IP addresses for every node certificate (for tools that verify
        /// by address, such as grpcurl without -servername).
        #[arg(long)]
        san: Vec<String>,
        /// Application-client names to issue certificates for (store and read).
        #[arg(long)]
        client: Vec<String>,
        /// Operator names to issue certificates for (what a client may do, and operate nodes).
        #[arg(long)]
        operator: Vec<String>,
        /// DNS names or IP addresses of etcd: issues `etcd.pem`/`etcd.key`, etcd's server
        /// certificate from the same CA (names no Ferry identity).
        #[arg(long)]
        etcd_san: Vec<String>,
    },
    /// Sets up etcd's own access control for the cluster: a user per certificate, holding its
    /// role, then turns etcd's authentication on. Idempotent: run it again to add parties.
    #[command(
        after_help = "etcd must serve https with --client-cert-auth and the cluster CA (see the README,\n\"Control plane\"). Nodes read the cluster's keys and write only attestations, the\nphase flip and their own status record; application clients only read; operators\nread and write the cluster's keys and hold etcd's root role. Run it with an operator\ncertificate (--tls-dir, --tls-name).\n\nExample:\n  ferryctl --etcd https://etcd-0:2379 --tls-dir secrets --tls-name ops etcd-access \\\n    --node ferry-0 --node ferry-1 --node ferry-2 --node ferry-3 --client app --operator ops"
    )]
    EtcdAccess {
        #[command(flatten)]
        parties: EtcdParties,
    },
    /// Takes etcd access away: deletes the etcd users of a node that left the cluster or of a
    /// client or operator whose certificate should no longer work.
    #[command(
        after_help = "A node is revoked only once no epoch needs it: it is not in the current committee\nand no epoch change is running (a node that leaves serves its shards to their new owners\nuntil the change is done). Refusals are FERRY-CP-010. Run it with an operator certificate.\n\nExample:\n  ferryctl --etcd https://etcd-0:2379 --tls-dir secrets --tls-name ops etcd-revoke --node ferry-4"
    )]
    EtcdRevoke {
        #[command(flatten)]
        parties: EtcdParties,
    },
    /// Stores files as blobs and prints each one's id once certified. Directories are walked;
    /// many files are stored in batches, several at once, with a throughput summary.
    #[command(
        after_help = "One file prints its id; several print `ID  PATH` per file and a summary on stderr.\n\nExamples:\n  ferryctl store ./photo.jpg\n  ferryctl store ./photos/ --concurrency 8"
    )]
    Store {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Batches (of up to 256 files or 32 MiB) stored at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Reads a blob into a file.
    #[command(after_help = "Example:\n  ferryctl read 3fa1...e9 -o photo.jpg")]
    Read {
        /// Blob id (64 hex characters).
        blob_id: String,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Shows epoch and phase, nodes, shards with sync and recovery progress, attestations.
    #[command(
        after_help = "Examples:\n  ferryctl status\n  ferryctl status --json | jq .nodes\n  ferryctl status --watch"
    )]
    Status {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Checks that every node holds a verified sliver of every certified blob in every shard it
    /// owns; prints what is missing per node and shard. Exit code 1 on any hole.
    #[command(
        after_help = "Examples:\n  ferryctl audit\n  ferryctl audit --json | jq '.nodes[] | select(.problem != null)'"
    )]
    Audit {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Epoch changes.
    #[command(subcommand)]
    Epoch(EpochCommand),
    /// Lists the epoch-sync-done attestations of an epoch.
    #[command(after_help = "Example:\n  ferryctl attestations 1")]
    Attestations {
        /// The epoch.
        epoch: u64,
    },
    /// Pauses or resumes a node's recovery.
    #[command(subcommand)]
    Recovery(RecoveryCommand),
    /// A local cluster on 127.0.0.1.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Controls one node of the local cluster.
    #[command(
        after_help = "Examples:\n  ferryctl node kill node-2   # SIGKILL both services\n  ferryctl node wipe node-2   # stop and delete its stores\n  ferryctl node start node-2"
    )]
    Node {
        /// stop | kill | start | wipe
        action: NodeAction,
        /// Node id, e.g. node-2.
        node: String,
    },
    /// Measures the throughput targets on local clusters: shard sync against per-blob recovery
    /// and the machine's limits, `ferryctl store`, and clients' latency under background load
    /// with the throttle off and on; every figure over --runs runs. Prints a table with each
    /// target met or missed (and writes JSON with --json).
    #[command(
        after_help = "Example:\n  ferryctl bench --json bench.json   # about 13 minutes with the defaults (make bench)"
    )]
    Bench {
        /// Working directory for the benchmark clusters (deleted first).
        #[arg(long, default_value = ".ferry-bench")]
        bench_dir: PathBuf,
        /// Where sync-service and recovery-service are (default: next to ferryctl).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Blobs per workload of blobs under 1 MiB.
        #[arg(long, default_value_t = 8000)]
        blobs: usize,
        /// Blobs per workload of blobs of 1 MiB or more.
        #[arg(long, default_value_t = 128)]
        large_blobs: usize,
        /// Blob sizes (comma-separated bytes).
        #[arg(long, value_delimiter = ',', default_value = "32768,4194304")]
        blob_sizes: Vec<usize>,
        /// Shard counts of the 4-node clusters (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        shards: Vec<u32>,
        /// Runs of every figure (each is reported with its spread).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Files of 1,000 bytes in the `ferryctl store` run.
        #[arg(long, default_value_t = 5000)]
        store_small_files: usize,
        /// Files of 4 MiB in the `ferryctl store` run.
        #[arg(long, default_value_t = 32)]
        store_large_files: usize,
        /// Only these sections (comma-separated: workloads, store, throttle, resume, memory).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Fills a 4-node local cluster with many small blobs (a million by default) and measures
    /// what must not grow with them (etcd, node memory, `ferryctl status`), then a shard sync
    /// and a wiped node's recovery at that size.
    #[command(after_help = "Example:\n  ferryctl bench-scale --blobs 1000000 --json scale.json")]
    BenchScale {
        /// Working directory for the cluster (deleted first).
        #[arg(long, default_value = ".ferry-bench/scale")]
        bench_dir: PathBuf,
        /// Where sync-service and recovery-service are (default: next to ferryctl).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Blobs to store.
        #[arg(long, default_value_t = 1_000_000)]
        blobs: usize,
        /// Bytes per blob.
        #[arg(long, default_value_t = 1024)]
        blob_size: usize,
        /// Shards of the cluster.
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Store batches (of up to 256 blobs) in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Blobs between samples.
        #[arg(long, default_value_t = 50_000)]
        sample_every: usize,
        /// Skip wiping and recovering a node at the end.
        #[arg(long)]
        skip_recovery: bool,
        /// Write the report as JSON to this file (rewritten after every sample).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Random histories on a real local cluster (store, SIGKILL, wipe, outages across epochs,
    /// weight changes, removal and re-adding, pause and resume, etcd restarts); after each, the
    /// cluster must come to rest and pass the audit, the attestation checks and a read-back.
    /// Prints the seed of every violation, which replays it. Exit code 1 on any violation.
    #[command(
        after_help = "Examples:\n  ferryctl chaos --seeds 50\n  ferryctl chaos --first-seed 1234 --seeds 1   # replay one"
    )]
    Chaos {
        /// First seed.
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        /// Number of histories.
        #[arg(long, default_value_t = 10)]
        seeds: u64,
        /// Steps per history.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Working directory (a failing history's cluster is left there).
        #[arg(long, default_value = ".ferry-chaos")]
        chaos_dir: PathBuf,
        /// Where sync-service and recovery-service are (default: next to ferryctl).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Runs the whole scenario on a fresh local cluster and prints a report.
    #[command(after_help = "Example:\n  ferryctl demo --bin-dir target/debug")]
    Demo {
        /// Directory for the demo cluster (deleted first).
        #[arg(long, default_value = ".ferry-demo")]
        demo_dir: PathBuf,
        /// Where sync-service and recovery-service are (default: next to ferryctl).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Blobs to store.
        #[arg(long, default_value_t = 300)]
        blobs: usize,
    },
}

#[derive(Subcommand, Debug)]
enum EpochCommand {
    /// Publishes the first committee (epoch 0) of a new cluster.
    #[command(
        after_help = "Example:\n  ferryctl --etcd http://etcd:2379 epoch genesis --shards 16 \\\n    --member ferry-0=<pubkey-hex>@ferry-0.ferry-peers:7400,ferry-0.ferry-peers:7410 ..."
    )]
    Genesis {
        /// Number of shards (fixed for the cluster's life).
        #[arg(long)]
        shards: u32,
        /// A member: ID=PUBKEY_HEX@SYNC_ADDR,RECOVERY_ADDR (weight 1).
        #[arg(long, required = true)]
        member: Vec<String>,
    },
    /// Plans the next epoch from member changes and, with --yes, applies it.
    #[command(
        after_help = "Examples:\n  ferryctl epoch next --weight node-3=3\n  ferryctl epoch next --remove-node node-1 --yes\n  ferryctl epoch next --add-node node-4=<pubkey-hex>@127.0.0.1:7500,127.0.0.1:7510 --yes"
    )]
    Next {
        /// Add a member: ID=PUBKEY_HEX@SYNC_ADDR,RECOVERY_ADDR (weight 1).
        #[arg(long)]
        add_node: Vec<String>,
        /// Remove a member.
        #[arg(long)]
        remove_node: Vec<String>,
        /// Set a member's weight: ID=W.
        #[arg(long)]
        weight: Vec<String>,
        /// Apply the plan (otherwise only print it).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RecoveryCommand {
    /// Pause: in-flight blobs finish, no new ones start.
    Pause {
        /// Node id.
        node: String,
    },
    /// Resume a paused recovery.
    Resume {
        /// Node id.
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Starts etcd and N nodes on free loopback ports under --dir.
    #[command(after_help = "Example:\n  ferryctl cluster up --nodes 4 --dir /tmp/ferry")]
    Up {
        /// Nodes.
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Shards.
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Where sync-service and recovery-service are (default: next to ferryctl).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Stops every process of the cluster.
    Down,
}

#[derive(clap::ValueEnum, Clone, Debug)]
enum NodeAction {
    Stop,
    Kill,
    Start,
    Wipe,
}

/// Files at least this large get a progress bar on stderr.
const PROGRESS_FROM_BYTES: usize = 4 * 1024 * 1024;

fn progress_bar(sent: u64, total: u64) {
    let width = 30;
    let filled = (sent * width).checked_div(total).unwrap_or(width).min(width) as usize;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprint!(
        "\rstoring [{}{}] {:5.1}/{:.1} MiB of slivers",
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        mib(sent),
        mib(total)
    );
}

fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("ferryctl has no parent directory")?.to_path_buf())
}

/// How `ferryctl` reaches nodes: --plaintext, --tls-dir, or the local cluster's certificates.
fn connector(cli: &Cli) -> anyhow::Result<Connector> {
    if cli.plaintext {
        return Ok(Connector::plaintext());
    }
    if let Some(dir) = &cli.tls_dir {
        return Ok(Connector::new(TlsConfig::from_dir(dir, &cli.tls_name).load(None)?));
    }
    if cli.etcd.is_some() {
        bail!(
            "nodes speak mutual TLS: pass --tls-dir with ca.pem and {}.pem/.key (ferryctl certs), or --plaintext for a plaintext cluster",
            cli.tls_name
        );
    }
    LocalCluster::load(&cli.dir)?.connector()
}

fn parse_member(spec: &str, flag: &str) -> anyhow::Result<Member> {
    let (id, rest) = parse_kv(spec, flag)?;
    let (keys, addrs) =
        rest.split_once('@').with_context(|| format!("{flag} must look like ID=KEYS@SYNC_ADDR,RECOVERY_ADDR"))?;
    let (key, bls_key) = keys
        .split_once(':')
        .with_context(|| format!("{flag}: KEYS is what `ferryctl keygen` prints: ED25519_KEY:BLS_KEY"))?;
    let (sync, recovery) =
        addrs.split_once(',').with_context(|| format!("{flag} needs both addresses: SYNC_ADDR,RECOVERY_ADDR"))?;
    Ok(Member {
        node_id: NodeId::new(id)?,
        public_key: key.into(),
        bls_key: bls_key.into(),
        sync_address: sync.into(),
        recovery_address: recovery.into(),
        weight: 1,
    })
}

async fn control_plane(cli: &Cli) -> anyhow::Result<ControlPlane> {
    match &cli.etcd {
        Some(e) => {
            let identity = etcd_identity(cli, e)?;
            Ok(ControlPlane::connect_etcd(std::slice::from_ref(e), &cli.cluster, identity.as_deref()).await?)
        }
        None => LocalCluster::load(&cli.dir)?.control_plane().await,
    }
}

/// The certificate `ferryctl` presents to an `https://` etcd: the one in --tls-dir.
fn etcd_identity(cli: &Cli, endpoint: &str) -> anyhow::Result<Option<std::sync::Arc<TlsMaterial>>> {
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    let dir = cli.tls_dir.as_ref().with_context(|| {
        format!(
            "{endpoint} authenticates by certificate: pass --tls-dir with ca.pem and {}.pem/.key (ferryctl certs)",
            cli.tls_name
        )
    })?;
    Ok(TlsConfig::from_dir(dir, &cli.tls_name).load(None)?)
}

/// The etcd endpoint, cluster and operator certificate that `command` runs with: --etcd with
/// the certificate in --tls-dir, or the local cluster's own.
fn etcd_operator(cli: &Cli, command: &str) -> anyhow::Result<(String, String, std::sync::Arc<TlsMaterial>)> {
    let (endpoint, cluster, identity) = match &cli.etcd {
        Some(e) => (e.clone(), cli.cluster.clone(), etcd_identity(cli, e)?),
        None => {
            let local = LocalCluster::load(&cli.dir)?;
            (local.etcd_endpoint(), local.name.clone(), local.operator_identity()?)
        }
    };
    let identity = identity.with_context(|| format!("{command} needs an https:// etcd and an operator certificate"))?;
    if !matches!(identity.own_identity(), PeerIdentity::Operator(_)) {
        bail!("{command} must run with an operator certificate; {} is {}", cli.tls_name, identity.own_identity());
    }
    Ok((endpoint, cluster, identity))
}

/// Parties of the cluster named on the command line.
#[derive(Debug, clap::Args)]
struct EtcdParties {
    /// Node ids.
    #[arg(long)]
    node: Vec<String>,
    /// Application-client names.
    #[arg(long)]
    client: Vec<String>,
    /// Operator names (`etcd-access` always includes the one running it).
    #[arg(long)]
    operator: Vec<String>,
}

impl EtcdParties {
    fn identities(&self) -> anyhow::Result<Vec<PeerIdentity>> {
        let mut parties = Vec::new();
        for n in &self.node {
            parties.push(PeerIdentity::Node(NodeId::new(n.as_str())?));
        }
        // Client and operator names follow the node-id rules: they become DNS labels.
        for c in &self.client {
            NodeId::new(c.as_str())?;
            parties.push(PeerIdentity::Client(c.clone()));
        }
        for o in &self.operator {
            NodeId::new(o.as_str())?;
            parties.push(PeerIdentity::Operator(o.clone()));
        }
        Ok(parties)
    }
}

fn parse_kv<'a>(s: &'a str, what: &str) -> anyhow::Result<(&'a str, &'a str)> {
    s.split_once('=').with_context(|| format!("{what} must look like ID=VALUE, got {s:?}"))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    ferry_shared::tls::install_crypto_provider();
    // Quiet by default (RUST_LOG overrides); with OTEL_EXPORTER_OTLP_ENDPOINT set, each command
    // is a trace root whose context every call to a node carries.
    let telemetry =
        ferry_shared::telemetry::init_with_default_filter("ferryctl", ferry_shared::telemetry::LogFormat::Text, "warn");
    let command = format!("{:?}", cli.command).split([' ', '(', '{']).next().unwrap_or("ferryctl").to_lowercase();
    let result = run(cli).instrument(tracing::info_span!("ferryctl", command = %command)).await;
    drop(telemetry); // flushes exported spans before exit
    if let Err(e) = result {
        eprintln!("ferryctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Keygen { out, keep_existing } => {
            let key = if out.exists() {
                if !*keep_existing {
                    bail!(
                        "{} exists; refusing to overwrite a key (--keep-existing prints its public keys)",
                        out.display()
                    );
                }
                NodeKeypair::load(out)?
            } else {
                if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                }
                let key = NodeKeypair::generate();
                key.save(out)?;
                key
            };
            // What `--member ID=KEYS@...` takes: the ed25519 key, then the BLS key with its
            // proof of possession.
            println!("{}:{}", key.public_hex(), key.bls_key_hex());
        }
        Command::Store { paths, concurrency } => {
            let files = ferryctl::store::expand(paths)?;
            let mut client = BlobClient::new(control_plane(&cli).await?, connector(&cli)?, Duration::from_secs(30));
            if let [(file, len)] = files.as_slice() {
                let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
                if *len as usize >= PROGRESS_FROM_BYTES {
                    client = client.with_progress(std::sync::Arc::new(progress_bar));
                }
                let id = client.store(&data).await?;
                if data.len() >= PROGRESS_FROM_BYTES {
                    eprintln!();
                }
                println!("{id}");
                return Ok(());
            }
            let summary = ferryctl::store::store_files(&client, files, *concurrency, |path, outcome| match outcome {
                Ok(id) => println!("{id}  {}", path.display()),
                Err(e) => eprintln!("FAILED {}: {e}", path.display()),
            })
            .await?;
            eprintln!(
                "stored {} blobs ({:.1} MiB) in {:.1} s: {:.0} blobs/s, {:.1} MiB/s{}",
                summary.stored,
                summary.bytes as f64 / (1024.0 * 1024.0),
                summary.elapsed.as_secs_f64(),
                summary.blobs_per_sec(),
                summary.mib_per_sec(),
                if summary.failed.is_empty() { String::new() } else { format!("; {} FAILED", summary.failed.len()) }
            );
            if !summary.failed.is_empty() {
                bail!("{} of the files were not stored", summary.failed.len());
            }
        }
        Command::Read { blob_id, output } => {
            let id: BlobId = blob_id.parse()?;
            let client = BlobClient::new(control_plane(&cli).await?, connector(&cli)?, Duration::from_secs(30));
            let data = client.read(&id).await?;
            std::fs::write(output, &data).with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!("wrote {} bytes to {}", data.len(), output.display());
        }
        Command::Status { json, watch } => {
            let cp = control_plane(&cli).await?;
            let connector = connector(&cli)?;
            loop {
                let report = status::collect(&cp, &connector).await?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    if *watch {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", status::render(&report));
                }
                if !*watch {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Command::Chaos { first_seed, seeds, steps, chaos_dir, bin_dir } => {
            let bin_dir = match bin_dir {
                Some(b) => b.clone(),
                None => default_bin_dir()?,
            };
            let options = chaos::ChaosOptions {
                first_seed: *first_seed,
                seeds: *seeds,
                steps: *steps,
                dir: chaos_dir.clone(),
                bin_dir,
            };
            let started = std::time::Instant::now();
            let outcomes = chaos::run(&options).await?;
            let violations: Vec<u64> = outcomes.iter().filter(|o| o.violation.is_some()).map(|o| o.seed).collect();
            println!("{} histories, {} violations, {:.0?} in all", outcomes.len(), violations.len(), started.elapsed());
            if !violations.is_empty() {
                bail!("violations with seeds {violations:?} (replay one with --first-seed S --seeds 1)");
            }
        }
        Command::Audit { json } => {
            let report = audit::run(&control_plane(&cli).await?, &connector(&cli)?).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", audit::render(&report));
            }
            if report.holes() > 0 {
                bail!("{} holes found", report.holes());
            }
        }
        Command::Epoch(EpochCommand::Next { add_node, remove_node, weight, yes }) => {
            let cp = control_plane(&cli).await?;
            let mut changes = epoch::MemberChanges::default();
            for a in add_node {
                changes.add.push(parse_member(a, "--add-node")?);
            }
            for r in remove_node {
                changes.remove.push(NodeId::new(r.as_str())?);
            }
            for w in weight {
                let (id, w) = parse_kv(w, "--weight")?;
                changes.weights.push((
                    NodeId::new(id)?,
                    w.parse().with_context(|| format!("weight {w:?} is not a whole number"))?,
                ));
            }
            let mut plan = epoch::plan(&cp, &changes).await?;
            epoch::measure(&mut plan, &cp, &connector(&cli)?).await?;
            print!("{}", epoch::render(&plan));
            if *yes {
                cp.propose_epoch(&plan.next).await?;
                println!("epoch {} started", plan.next.epoch);
            } else {
                println!("(dry run: add --yes to apply)");
            }
        }
        Command::Epoch(EpochCommand::Genesis { shards, member }) => {
            let members = member.iter().map(|m| parse_member(m, "--member")).collect::<anyhow::Result<Vec<_>>>()?;
            let genesis = Committee::genesis(*shards, members)?;
            let cp = control_plane(&cli).await?;
            if cp.current().await?.is_some() {
                bail!("the cluster already has a committee; use `ferryctl epoch next` to change it");
            }
            cp.propose_epoch(&genesis).await?;
            println!("epoch 0 published: {} shards over {} nodes", genesis.n_shards, genesis.members.len());
        }
        Command::Certs { out, node, san, client, operator, etcd_san } => {
            if node.is_empty() && client.is_empty() && operator.is_empty() && etcd_san.is_empty() {
                bail!("nothing to issue: pass --node, --client, --operator or --etcd-san");
            }
            let ca = if out.join("ca.key").exists() {
                ClusterCa::load(out)?
            } else {
                let ca = ClusterCa::generate()?;
                ca.write(out)?;
                println!(
                    "wrote {} and {} (keep the key out of the cluster)",
                    out.join("ca.pem").display(),
                    out.join("ca.key").display()
                );
                ca
            };
            for n in node {
                let id = NodeId::new(n.as_str())?;
                if out.join(format!("{id}.pem")).exists() {
                    bail!("{} exists; refusing to overwrite a certificate", out.join(format!("{id}.pem")).display());
                }
                ca.issue_node(&id, san)?.write(out, id.as_str())?;
                println!("wrote {id}.pem and {id}.key (names {})", ferry_shared::tls::node_server_name(&id));
            }
            let people = client
                .iter()
                .map(|c| (c, ferry_shared::tls::CLIENT_SUFFIX))
                .chain(operator.iter().map(|o| (o, ferry_shared::tls::OPERATOR_SUFFIX)));
            for (name, suffix) in people {
                if out.join(format!("{name}.pem")).exists() {
                    bail!("{} exists; refusing to overwrite a certificate", out.join(format!("{name}.pem")).display());
                }
                let issued = if suffix == ferry_shared::tls::OPERATOR_SUFFIX {
                    ca.issue_operator(name)?
                } else {
                    ca.issue_client(name)?
                };
                issued.write(out, name)?;
                println!("wrote {name}.pem and {name}.key (names {name}{suffix})");
            }
            if !etcd_san.is_empty() {
                if out.join("etcd.pem").exists() {
                    bail!("{} exists; refusing to overwrite a certificate", out.join("etcd.pem").display());
                }
                ca.issue_etcd_server(etcd_san)?.write(out, "etcd")?;
                println!("wrote etcd.pem and etcd.key (etcd's server certificate for {})", etcd_san.join(", "));
            }
        }
        Command::EtcdAccess { parties } => {
            let (endpoint, cluster, identity) = etcd_operator(&cli, "etcd-access")?;
            let parties = parties.identities()?;
            let report = ferry_shared::control_plane::access::apply(&[endpoint], &identity, &cluster, &parties).await?;
            println!(
                "etcd access for cluster {cluster}: {} parties, {} users created; authentication on",
                parties.len() + 1,
                report.users_created.len()
            );
        }
        Command::EtcdRevoke { parties } => {
            let (endpoint, cluster, identity) = etcd_operator(&cli, "etcd-revoke")?;
            let parties = parties.identities()?;
            if parties.is_empty() {
                bail!("name at least one --node, --client or --operator to revoke");
            }
            let report =
                ferry_shared::control_plane::access::revoke(&[endpoint], &identity, &cluster, &parties).await?;
            println!(
                "etcd access revoked in cluster {cluster}: {} users deleted ({} had none)",
                report.users_deleted.len(),
                parties.len() - report.users_deleted.len()
            );
        }
        Command::Attestations { epoch } => {
            let cp = control_plane(&cli).await?;
            let all = cp.attestations(*epoch).await?;
            if all.is_empty() {
                println!("no attestations for epoch {epoch}");
            }
            for a in all {
                println!(
                    "{} epoch {} by {} at {} ms: {} shards",
                    a.node_id,
                    a.epoch,
                    a.attested_by,
                    a.created_at_ms,
                    a.evidence.len()
                );
            }
        }
        Command::Recovery(cmd) => {
            let (node, pause) = match cmd {
                RecoveryCommand::Pause { node } => (node, true),
                RecoveryCommand::Resume { node } => (node, false),
            };
            let cp = control_plane(&cli).await?;
            let committee = cp.current_committee().await?.context("the cluster has no committee; is it up?")?;
            let member = committee
                .member(&NodeId::new(node.as_str())?)
                .with_context(|| format!("{node} is not a member of the current committee"))?;
            let channel = connector(&cli)?
                .channel(&member.recovery_address, &member.node_id, Some(Duration::from_secs(10)))
                .map_err(|s| anyhow::anyhow!(s.message().to_string()))?;
            let mut client = RecoveryServiceClient::new(channel);
            if pause {
                client.pause_recovery(pb::PauseRecoveryRequest {}).await?;
            } else {
                client.resume_recovery(pb::ResumeRecoveryRequest {}).await?;
            }
            println!("recovery of {node} {}", if pause { "paused" } else { "resumed" });
        }
        Command::Cluster(ClusterCommand::Up { nodes, shards, bin_dir }) => {
            if *nodes == 0 || *shards == 0 {
                bail!("--nodes and --shards must be at least 1");
            }
            let bin_dir = match bin_dir {
                Some(b) => b.clone(),
                None => default_bin_dir()?,
            };
            let options = UpOptions {
                nodes: *nodes,
                shards: *shards,
                dir: cli.dir.clone(),
                bin_dir,
                sync_extra: String::new(),
                recovery_extra: String::new(),
                tls: !cli.plaintext,
            };
            let cluster = LocalCluster::up(&options).await?;
            println!(
                "cluster up in {}: etcd {}, {}",
                cluster.dir.display(),
                cluster.etcd_endpoint(),
                if cluster.tls {
                    format!("mutual TLS (certificates in {})", cluster.tls_dir().display())
                } else {
                    "PLAINTEXT".into()
                }
            );
            for n in &cluster.nodes {
                println!(
                    "  {} sync 127.0.0.1:{} (health {}, metrics {}) recovery 127.0.0.1:{} (metrics {})",
                    n.id,
                    n.sync_port,
                    n.sync_health_port,
                    n.sync_metrics_port,
                    n.recovery_port,
                    n.recovery_metrics_port
                );
            }
        }
        Command::Cluster(ClusterCommand::Down) => {
            let mut cluster = LocalCluster::load(&cli.dir)?;
            cluster.down()?;
            println!("cluster in {} stopped", cli.dir.display());
        }
        Command::Node { action, node } => {
            let mut cluster = LocalCluster::load(&cli.dir)?;
            let i = cluster.index(node)?;
            match action {
                NodeAction::Stop => cluster.stop_node(i)?,
                NodeAction::Kill => cluster.kill_node(i)?,
                NodeAction::Wipe => cluster.wipe_node(i)?,
                NodeAction::Start => {
                    cluster.start_node(i)?;
                    cluster.wait_healthy(i).await?;
                }
            }
            println!("{node}: {action:?} done");
        }
        Command::Bench {
            bench_dir,
            bin_dir,
            blobs,
            large_blobs,
            blob_sizes,
            shards,
            runs,
            store_small_files,
            store_large_files,
            only,
            json,
        } => {
            let bin_dir = match bin_dir {
                Some(b) => b.clone(),
                None => default_bin_dir()?,
            };
            let options = bench::BenchOptions {
                dir: bench_dir.clone(),
                bin_dir,
                blobs: *blobs,
                large_blobs: *large_blobs,
                blob_sizes: blob_sizes.clone(),
                shards: shards.clone(),
                runs: *runs,
                store_small_files: *store_small_files,
                store_large_files: *store_large_files,
                only: only.clone(),
            };
            let report = bench::run(&options).await?;
            print!("{}", bench::render(&report));
            if let Some(path) = json {
                std::fs::write(path, bench::to_json(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::BenchScale {
            bench_dir,
            bin_dir,
            blobs,
            blob_size,
            shards,
            concurrency,
            sample_every,
            skip_recovery,
            json,
        } => {
            let bin_dir = match bin_dir {
                Some(b) => b.clone(),
                None => default_bin_dir()?,
            };
            let options = bench::scale::ScaleOptions {
                dir: bench_dir.clone(),
                bin_dir,
                blobs: *blobs,
                blob_size: *blob_size,
                shards: *shards,
                concurrency: *concurrency,
                sample_every: *sample_every,
                skip_recovery: *skip_recovery,
                json: json.clone(),
            };
            let report = bench::scale::run(&options).await?;
            print!("{}", bench::scale::render(&report));
        }
        Command::Demo { demo_dir, bin_dir, blobs } => {
            let bin_dir = match bin_dir {
                Some(b) => b.clone(),
                None => default_bin_dir()?,
            };
            demo::run(&demo::DemoOptions { dir: demo_dir.clone(), bin_dir, blobs: *blobs }).await?;
        }
    }
    Ok(())
}
