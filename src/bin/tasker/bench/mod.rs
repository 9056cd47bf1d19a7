//! `tasker bench`: what users see, measured.
//!
//! - default: the remote benchmark (`remote`): the service as its own process, workers in
//!   another, through the public gRPC API; scenarios of chains and a fan-out, CPU per step,
//!   the per-step database budget, beside the machine's commit + NOTIFY floor;
//! - `--in-process` (`inprocess`): the service's own floor, workers inside the process (no
//!   gRPC), every deployment mode;
//! - `--soak` (`soak`): one mode at a sustained rate for a long time.
//!
//! The benchmark uses (and empties) database `tasker_bench` on the local server or an
//! embedded cluster, or the database given with `--database-url` together with
//! `--allow-emptying`.

mod alternation;
pub mod inprocess;
mod procstat;
pub mod remote;
mod retention_soak;
pub mod soak;
mod storage;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tasker::config::{DeploymentMode, TaskerConfig};
use tasker::testkit::Store;

/// The benchmark's command line.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measurement window per scenario, in seconds (after the warm-up).
    #[arg(long, default_value_t = 8)]
    pub duration_secs: u64,
    /// Warm-up before each window, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    pub warmup_ms: u64,
    /// Remote scenarios, comma-separated: chains:<count>x<length>, fan:<width>x<workers>.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chains:1x10,chains:1x1000,chains:8x10,chains:64x10,fan:200x8"
    )]
    pub scenarios: Vec<String>,
    /// Deployment modes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "Hybrid")]
    pub modes: Vec<String>,
    /// Remote: replica processes on one database, comma-separated counts.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub replicas: Vec<usize>,
    /// Remote: the service binary to measure (default: this one), e.g. an older build for a
    /// before/after in one run.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Remote: that binary's configuration directory (default: this process's).
    #[arg(long)]
    pub server_config_dir: Option<PathBuf>,
    /// Remote: set this in-flight limit on the benchmark's queue in every scenario (to price
    /// a configured limit that is not reached).
    #[arg(long)]
    pub queue_limit: Option<i32>,
    /// Remote: the workers' clients, comma-separated, each scenario run with each: rust
    /// (tasker::client), rust-eager (completions ask for the next step,
    /// CompleteStepRequest.next, and chains are created asking for their first,
    /// CreateTaskRequest.next), rust-stream (eager, every call a message on one
    /// WorkerService/Work stream), node, node-eager and node-stream (the same with Node.js and
    /// @grpc/grpc-js, chains only; needs `npm install` in scripts/peer).
    #[arg(long, value_delimiter = ',', default_value = "rust")]
    pub clients: Vec<String>,
    /// Remote: also run every chains scenario on graphile-worker (a PostgreSQL job queue) in
    /// the same database, right after Tasker's clients. auto: when Node.js and the peer's
    /// packages (`npm install` in scripts/peer) are there.
    #[arg(long, value_enum, default_value_t = PeerChoice::Auto, num_args = 0..=1, default_missing_value = "on")]
    pub peer: PeerChoice,
    /// Remote: run each scenario's clients and the peer this many times in turn, each repeat
    /// beside a notify floor of its own, and add medians over the repeats (of each figure, and
    /// of each repeat's ratio to the peer and to the floor): on a machine whose speed drifts,
    /// each comparison is then made between neighbouring runs.
    #[arg(long = "repeat", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub repeat: u64,
    /// Where the Node.js workers and the peer are (`npm install`ed).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/peer"))]
    pub peer_dir: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run the in-process benchmark instead: the service's floor without gRPC.
    #[arg(long)]
    pub in_process: bool,
    /// In-process: concurrent chains, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub concurrency: Vec<usize>,
    /// Soak instead: the first of --modes at --rate steps/s for --duration-secs, reported
    /// every --interval-secs (memory, latency, connections, notification queue).
    #[arg(long)]
    pub soak: bool,
    /// Soak: offered steps per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Soak: reporting interval in seconds.
    #[arg(long, default_value_t = 10)]
    pub interval_secs: u64,
    /// Soak: through gRPC workers, with finished tasks kept this long, beside the same load
    /// with retention off (on --compare-database-url) in the same run.
    #[arg(long, requires = "soak")]
    pub retention_secs: Option<u64>,
    /// Soak with --retention-secs: the retention-off arm's database (created if missing;
    /// emptied like --database-url's). Default: --database-url's, named `<name>_noretention`.
    #[arg(long, requires = "retention_secs")]
    pub compare_database_url: Option<String>,
    /// Instead: the bytes kept per finished step, over this many 10-step chains run to
    /// completion in process (the tables compacted first).
    #[arg(long)]
    pub storage: Option<usize>,
    /// Soak: concurrent workers.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// With --database-url: yes, empty that database's Tasker tables.
    #[arg(long)]
    pub allow_emptying: bool,
    /// Instead: time the fallback poller's query with this many pending steps blocked behind
    /// unfinished parents and 10 ready ones.
    #[arg(long)]
    pub poller_scale: Option<i64>,
}

/// Whether the remote benchmark runs the job-queue peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerChoice {
    Auto,
    On,
    Off,
}

/// Whether Node.js runs here and `dir` has the packages the Node.js workers and the peer need.
fn node_ready(dir: &std::path::Path) -> bool {
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    node && dir.join("node_modules").join("graphile-worker").is_dir()
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencyStats {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyStats {
    pub fn from_ms(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Self {
            samples: v.len(),
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: *v.last().expect("non-empty"),
        }
    }
}

/// Rounds of the commit + NOTIFY floor measured in every run.
pub const FLOOR_ROUNDS: usize = 500;

#[derive(Debug, Serialize)]
struct RemoteReport {
    server_version: String,
    synchronous_commit: String,
    notify_floor: LatencyStats,
    scenarios: Vec<remote::RemoteScenario>,
    /// With --repeat above 1: per scenario and client, medians over the repeats.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    summary: Vec<alternation::Summary>,
}

/// Run what the arguments ask for against `url` (a database the benchmark may empty).
pub async fn run(args: BenchArgs, url: &str, base: &TaskerConfig) -> anyhow::Result<()> {
    let modes = args
        .modes
        .iter()
        .map(|m| m.parse::<DeploymentMode>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let duration = Duration::from_secs(args.duration_secs);
    if let Some(chains) = args.storage {
        let report = storage::run(url, base, chains.max(1)).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", storage::render(&report));
        }
        return Ok(());
    }
    if let (true, Some(retention)) = (args.soak, args.retention_secs) {
        let compare = match &args.compare_database_url {
            Some(u) => u.clone(),
            None => {
                let name = url
                    .split('?')
                    .next()
                    .and_then(|b| b.rsplit('/').next())
                    .unwrap_or("tasker");
                tasker::testkit::with_database(url, &format!("{name}_noretention"))
            }
        };
        let opts = retention_soak::RetentionSoakOptions {
            duration,
            rate: args.rate,
            interval: Duration::from_secs(args.interval_secs.max(1)),
            workers: args.workers.max(1),
            retention: Duration::from_secs(retention),
            warmup: Duration::from_secs(60).min(duration / 4),
            server_bin: match args.server_bin {
                Some(b) => b,
                None => std::env::current_exe()?,
            },
            server_config_dir: match args.server_config_dir {
                Some(d) => d,
                None => tasker::config::ConfigSources::from_process_env()
                    .config_dir
                    .canonicalize()?,
            },
        };
        let report = retention_soak::run(url, &compare, base, &opts).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", retention_soak::summary(&report));
        }
        return Ok(());
    }
    if args.soak {
        let opts = soak::SoakOptions {
            mode: modes.first().copied().unwrap_or_default(),
            duration,
            rate: args.rate,
            interval: Duration::from_secs(args.interval_secs.max(1)),
            workers: args.workers.max(1),
        };
        let report = soak::soak(url, base, &opts).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", soak::summary(&report));
        }
        return Ok(());
    }
    if let Some(blocked) = args.poller_scale {
        let store = Store::connect(url, &base.database).await?;
        store.migrate().await?;
        store.truncate_all().await?;
        eprintln!("seeding {blocked} blocked and 10 ready steps ...");
        store.seed_blocked_and_ready(blocked, 10).await?;
        let mut samples = Vec::new();
        for _ in 0..200 {
            let t0 = std::time::Instant::now();
            let found = store.ready_tasks(None, 100, None, 0).await?;
            samples.push(t0.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(
                found.len() == 10,
                "found {} ready tasks, not 10",
                found.len()
            );
        }
        let s = LatencyStats::from_ms(samples);
        println!(
            "ready_tasks with {blocked} blocked pending steps and 10 ready ones (client round trip, 200 calls): p50 {:.3} ms, p99 {:.3} ms",
            s.p50_ms, s.p99_ms
        );
        store.truncate_all().await?;
        return Ok(());
    }
    if args.in_process {
        let opts = inprocess::BenchOptions {
            modes,
            concurrency: args.concurrency,
            duration,
        };
        let report = inprocess::run(url, base, &opts).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", inprocess::render(&report));
        }
        return Ok(());
    }
    let scenarios = args
        .scenarios
        .iter()
        .map(|s| remote::parse_scenario(s).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let clients = args
        .clients
        .iter()
        .map(|c| remote::Client::parse(c).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ready = node_ready(&args.peer_dir);
    let peer = match args.peer {
        PeerChoice::On => true,
        PeerChoice::Off => false,
        PeerChoice::Auto => {
            if !ready {
                eprintln!(
                    "the graphile-worker peer is skipped: it needs Node.js and `npm install` in {}",
                    args.peer_dir.display()
                );
            }
            ready
        }
    };
    let node = peer
        || clients
            .iter()
            .any(|c| matches!(c, remote::Client::Node { .. }));
    if node && !ready {
        anyhow::bail!(
            "the Node.js workers and the peer need Node.js and their packages: cd {} && npm install",
            args.peer_dir.display()
        );
    }
    // the services migrate the database themselves (a build given with --server-bin carries
    // its own schema), so this connection only measures
    let store = Store::connect(url, &base.database).await?;
    let settings = store.server_settings().await?;
    let notify_floor = LatencyStats::from_ms(store.notify_floor_ms(FLOOR_ROUNDS).await?);
    eprintln!(
        "notify floor: p50 {:.3} ms p99 {:.3} ms (PostgreSQL {}, synchronous_commit = {})",
        notify_floor.p50_ms,
        notify_floor.p99_ms,
        settings.server_version,
        settings.synchronous_commit
    );
    let opts = remote::RemoteOptions {
        scenarios,
        modes,
        warmup: Duration::from_millis(args.warmup_ms),
        window: duration,
        server_bin: match args.server_bin {
            Some(b) => b,
            None => std::env::current_exe()?,
        },
        server_config_dir: match args.server_config_dir {
            Some(d) => d,
            None => tasker::config::ConfigSources::from_process_env()
                .config_dir
                .canonicalize()?,
        },
        replicas: args.replicas,
        queue_limit: args.queue_limit,
        clients,
        peer,
        proto_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/proto")),
        peer_dir: args.peer_dir,
        repeats: args.repeat as usize,
    };
    let scenarios = remote::run(&store, url, &opts).await?;
    store.pool().close().await;
    let summary = if opts.repeats > 1 {
        alternation::summarize(&scenarios)
    } else {
        Vec::new()
    };
    if args.json {
        let report = RemoteReport {
            server_version: settings.server_version,
            synchronous_commit: settings.synchronous_commit,
            notify_floor,
            scenarios,
            summary,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "PostgreSQL {} | synchronous_commit = {} | notify floor (commit + NOTIFY -> received): p50 {:.3} ms, p99 {:.3} ms\n",
            settings.server_version, settings.synchronous_commit, notify_floor.p50_ms, notify_floor.p99_ms
        );
        println!("{}", remote::render(&scenarios, &notify_floor));
        if !summary.is_empty() {
            println!("{}", alternation::render(&summary));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = LatencyStats::from_ms((1..=100).map(f64::from).collect());
        assert_eq!(
            (s.samples, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 51.0, 99.0, 100.0)
        );
        assert_eq!(LatencyStats::from_ms(vec![]).samples, 0);
    }
}
