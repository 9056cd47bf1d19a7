//! The headline benchmark: what users see. The service runs as its own process (`tasker serve`,
//! or any other build given with `--server-bin`), the workers as another (`tasker
//! bench-worker`), talking over loopback TCP through the public gRPC API.
//!
//! ```text
//!  bench ──spawns──> tasker serve (1..n replicas) ──── PostgreSQL ──── graphile-worker (--peer)
//!    │                    ^ gRPC (loopback)
//!    └──spawns──> workers: tasker bench-worker (Rust), or scripts/peer/tasker-chains.mjs
//!         (Node.js, @grpc/grpc-js): CreateTask, FetchSteps (long-poll), CompleteStep (both
//!         with `next` when eager); reads "window-start" / "window-end" / report from its stdout
//! ```
//!
//! With `--peer`, every chains scenario also runs on graphile-worker (a PostgreSQL job queue,
//! `scripts/peer/graphile-chains.mjs`) on the same database and server, right after Tasker's
//! clients, measured the same way: same-run figures, never figures from another day. With
//! `--repeat N`, the clients and the peer run N times in turn, each repeat after a notify floor
//! of its own (summed up by `alternation`).
//!
//! Per scenario it reports the worker-observed latency (next step starts, or fan-out/fan-in),
//! steps/s in the window, and CPU per step of the service processes, of PostgreSQL (its
//! postmaster and every child, from `/proc`) and of the worker process, measured between the
//! worker's window marks; and the per-step database budget over the whole run (commits, rows
//! written by table and how many updates were HOT, statements when `pg_stat_statements` is
//! loaded), read from PostgreSQL's statistics with the service idle before and after.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tasker::config::DeploymentMode;
use tasker::testkit::{ActivityCounters, Store};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::procstat;
use super::worker::{Shape, WorkerReport, WorkerSpec};
use super::LatencyStats;

/// The namespace the remote scenarios run in.
const BENCH_NAMESPACE: &str = "bench";

#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub scenarios: Vec<Shape>,
    pub modes: Vec<DeploymentMode>,
    pub warmup: Duration,
    pub window: Duration,
    /// The service binary to benchmark (this one by default).
    pub server_bin: PathBuf,
    /// Its configuration directory (this checkout's by default).
    pub server_config_dir: PathBuf,
    /// Replica processes per scenario, each on its own port; workers spread over them.
    pub replicas: Vec<usize>,
    /// An in-flight limit on the benchmark's queues (the default queue of every namespace a
    /// scenario uses), set in every scenario: what a configured limit costs the hop.
    pub queue_limit: Option<i32>,
    /// The worker clients each scenario runs with, one after the other.
    pub clients: Vec<Client>,
    /// Run graphile-worker beside every chains scenario.
    pub peer: bool,
    /// `scripts/peer` (the Node.js workers and the peer, `npm install`ed) and `proto/`.
    pub peer_dir: PathBuf,
    pub proto_dir: PathBuf,
    /// Times each scenario runs its clients and the peer, in turn (at least 1).
    pub repeats: usize,
}

/// Who works a scenario's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// `tasker bench-worker`: `tasker::client`, the Rust client.
    Rust { eager: bool, stream: bool },
    /// `scripts/peer/tasker-chains.mjs`: Node.js with `@grpc/grpc-js` (chains only).
    Node { eager: bool, stream: bool },
}

/// Every client: its `--clients` name, its row label, and what it is.
const CLIENTS: [(&str, &str, Client); 6] = [
    (
        "rust",
        "Rust",
        Client::Rust {
            eager: false,
            stream: false,
        },
    ),
    (
        "rust-eager",
        "Rust, eager",
        Client::Rust {
            eager: true,
            stream: false,
        },
    ),
    (
        "rust-stream",
        "Rust, eager, stream",
        Client::Rust {
            eager: true,
            stream: true,
        },
    ),
    (
        "node",
        "Node.js",
        Client::Node {
            eager: false,
            stream: false,
        },
    ),
    (
        "node-eager",
        "Node.js, eager",
        Client::Node {
            eager: true,
            stream: false,
        },
    ),
    (
        "node-stream",
        "Node.js, eager, stream",
        Client::Node {
            eager: true,
            stream: true,
        },
    ),
];

impl Client {
    pub fn parse(s: &str) -> Result<Self, String> {
        CLIENTS
            .iter()
            .find(|(name, ..)| *name == s)
            .map(|&(.., client)| client)
            .ok_or_else(|| {
                let names: Vec<&str> = CLIENTS.iter().map(|(name, ..)| *name).collect();
                format!("client {s:?}: expected one of {}", names.join(", "))
            })
    }

    pub fn label(self) -> &'static str {
        CLIENTS
            .iter()
            .find(|(.., client)| *client == self)
            .map(|&(_, label, _)| label)
            .expect("every client is in the table")
    }

    fn eager(self) -> bool {
        match self {
            Self::Rust { eager, .. } | Self::Node { eager, .. } => eager,
        }
    }

    fn stream(self) -> bool {
        match self {
            Self::Rust { stream, .. } | Self::Node { stream, .. } => stream,
        }
    }
}

/// The peer's row label.
pub const PEER: &str = "graphile-worker 0.17.3 (Node.js)";

#[derive(Debug, Clone, Serialize)]
pub struct RemoteScenario {
    pub scenario: String,
    /// The workers' client (or the peer job queue).
    pub client: String,
    pub mode: String,
    pub replicas: usize,
    /// Which of the scenario's repeats (from 1).
    pub repeat: usize,
    /// The commit + NOTIFY floor's p50, measured just before this repeat of the scenario.
    pub floor_p50_ms: f64,
    pub window_secs: f64,
    pub steps_per_sec: f64,
    /// Chains: CompleteStep sent -> successor received.
    pub next_step: LatencyStats,
    pub fan_out: LatencyStats,
    pub fan_in: LatencyStats,
    /// CPU milliseconds per step completed in the window.
    pub cpu_ms_per_step: CpuPerStep,
    /// Per step over the whole run (warm-up included).
    pub budget: Budget,
    /// Claim attempts that found the claim held by another, summed over the replicas, per
    /// step over the whole run (GetStatus `claims_lost`).
    pub claims_lost_per_step: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuPerStep {
    pub service: f64,
    pub postgres: f64,
    /// service + postgres: what the target counts.
    pub service_and_postgres: f64,
    /// The worker process (the client side).
    pub workers: f64,
    /// Every core of the machine, whatever ran.
    pub machine: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Budget {
    pub steps: u64,
    pub commits: f64,
    /// Statements sent by clients per step, and all statements (inside functions too).
    pub statements: Option<(f64, f64)>,
    /// table -> (inserted, updated, of them HOT, deleted) per step.
    pub rows: Vec<(String, f64, f64, f64, f64)>,
}

pub fn scenario_name(s: &Shape) -> String {
    match s {
        Shape::Chains { count, length } => format!("chains {count} x {length} steps"),
        Shape::Fan { width, workers } => format!("fan-out 1 -> {width} -> 1, {workers} workers"),
        Shape::Paced {
            rate,
            length,
            workers,
        } => format!("{length}-step chains at {rate} steps/s, {workers} workers"),
    }
}

/// Parse `chains:8x10` or `fan:200x8`.
pub fn parse_scenario(s: &str) -> Result<Shape, String> {
    let bad =
        || format!("scenario {s:?}: expected chains:<count>x<length> or fan:<width>x<workers>");
    let (kind, dims) = s.split_once(':').ok_or_else(bad)?;
    let (a, b) = dims.split_once('x').ok_or_else(bad)?;
    let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b == 0 {
        return Err(bad());
    }
    match kind {
        "chains" => Ok(Shape::Chains {
            count: a,
            length: b,
        }),
        "fan" => Ok(Shape::Fan {
            width: a,
            workers: b,
        }),
        _ => Err(bad()),
    }
}

pub async fn run(
    store: &Store,
    url: &str,
    opts: &RemoteOptions,
) -> anyhow::Result<Vec<RemoteScenario>> {
    let mut out = Vec::new();
    let progress = |r: &RemoteScenario| {
        eprintln!(
            "{:>15} {:<34} {:<16} x{} {:>7.0} steps/s  next step p50 {:>6.2} p99 {:>7.2} ms  fan-out p50 {:>7.2} fan-in p50 {:>6.2} ms  cpu/step svc {:.2} pg {:.2} ms  claims lost/step {:.2}",
            r.mode,
            r.scenario,
            r.client,
            r.replicas,
            r.steps_per_sec,
            r.next_step.p50_ms,
            r.next_step.p99_ms,
            r.fan_out.p50_ms,
            r.fan_in.p50_ms,
            r.cpu_ms_per_step.service,
            r.cpu_ms_per_step.postgres,
            r.claims_lost_per_step
        );
    };
    let mut peer_done: Vec<(Shape, usize)> = Vec::new();
    for &mode in &opts.modes {
        for &replicas in &opts.replicas {
            for shape in &opts.scenarios {
                for repeat in 1..=opts.repeats.max(1) {
                    // the floor beside this repeat: the machine's speed drifts over minutes
                    let floor =
                        LatencyStats::from_ms(store.notify_floor_ms(super::FLOOR_ROUNDS).await?)
                            .p50_ms;
                    let mut ran = |mut r: RemoteScenario| {
                        r.repeat = repeat;
                        r.floor_p50_ms = floor;
                        progress(&r);
                        out.push(r);
                    };
                    for &client in &opts.clients {
                        if matches!(client, Client::Node { .. })
                            && !matches!(shape, Shape::Chains { .. })
                        {
                            continue; // the Node.js worker runs chains only
                        }
                        ran(scenario(store, url, opts, mode, replicas, shape, client).await?);
                    }
                    // the peer once per chains shape and repeat, right after Tasker's runs
                    let key = (shape.clone(), repeat);
                    if opts.peer
                        && matches!(shape, Shape::Chains { .. })
                        && !peer_done.contains(&key)
                    {
                        ran(peer_scenario(store, url, opts, shape).await?);
                        peer_done.push(key);
                    }
                }
            }
        }
    }
    Ok(out)
}

pub(super) struct Service {
    pub child: Child,
    pub addr: String,
}

async fn spawn_service(
    opts: &RemoteOptions,
    url: &str,
    mode: DeploymentMode,
    log: &std::path::Path,
) -> anyhow::Result<Service> {
    spawn_server(
        &opts.server_bin,
        &opts.server_config_dir,
        url,
        mode,
        &[],
        log,
    )
    .await
}

/// `server_bin serve` on a free loopback port, configured from `config_dir` (development)
/// with `env` on top; returns once it is SERVING.
pub(super) async fn spawn_server(
    server_bin: &std::path::Path,
    config_dir: &std::path::Path,
    url: &str,
    mode: DeploymentMode,
    env: &[(&str, String)],
    log: &std::path::Path,
) -> anyhow::Result<Service> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new(server_bin)
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TASKER_CONFIG_DIR", config_dir)
        .env("TASKER_ENV", "development")
        .env("DATABASE_URL", url)
        .env("TASKER_GRPC__BIND", &addr)
        .env("TASKER_ORCHESTRATION__DEPLOYMENT__MODE", mode.as_str())
        .env("RUST_LOG", "warn")
        .env_remove("TASKER_DATABASE__URL")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let service = Service { child, addr };
    wait_serving(&service.addr).await?;
    Ok(service)
}

async fn wait_serving(addr: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            let serving = h
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|r| {
                    r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                })
                .unwrap_or(false);
            if serving {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the service on {addr} did not become SERVING within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stop a service gracefully (SIGTERM), killing it if it does not stop.
pub(super) async fn stop_service(mut s: Service) {
    if let Some(pid) = s.child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(20), s.child.wait())
        .await
        .is_err()
    {
        let _ = s.child.kill().await;
    }
}

impl CpuPerStep {
    /// CPU milliseconds per step between two samples, over `steps` steps.
    fn between(start: &CpuSample, end: &CpuSample, steps: u64) -> Self {
        let steps = steps.max(1) as f64;
        let per_step = |a: f64, b: f64| (b - a) * 1000.0 / steps;
        Self {
            service: per_step(start.services, end.services),
            postgres: per_step(start.postgres, end.postgres),
            service_and_postgres: per_step(
                start.services + start.postgres,
                end.services + end.postgres,
            ),
            workers: per_step(start.worker, end.worker),
            machine: per_step(start.machine, end.machine),
        }
    }
}

#[derive(Default)]
struct CpuSample {
    services: f64,
    postgres: f64,
    worker: f64,
    machine: f64,
}

fn sample_cpu(services: &[u32], worker: u32, backend: u32) -> CpuSample {
    CpuSample {
        services: services
            .iter()
            .filter_map(|p| procstat::process_cpu_secs(*p))
            .sum(),
        postgres: procstat::postgres_cpu_secs(backend).unwrap_or(f64::NAN),
        worker: procstat::process_cpu_secs(worker).unwrap_or(f64::NAN),
        machine: procstat::machine_busy_secs().unwrap_or(f64::NAN),
    }
}

/// Let PostgreSQL flush the statistics of the connections that just went idle (it does so
/// within a second of a backend going idle).
const STATS_FLUSH: Duration = Duration::from_millis(1500);

async fn scenario(
    store: &Store,
    url: &str,
    opts: &RemoteOptions,
    mode: DeploymentMode,
    replicas: usize,
    shape: &Shape,
    client: Client,
) -> anyhow::Result<RemoteScenario> {
    let log = std::env::temp_dir().join(format!("tasker-bench-{}.log", std::process::id()));
    let mut services = Vec::new();
    for _ in 0..replicas {
        services.push(spawn_service(opts, url, mode, &log).await?);
    }
    // the services have migrated the database (a build under test may carry its own schema);
    // they are idle: start from empty tables
    store.truncate_all().await?;
    if let Some(limit) = opts.queue_limit {
        // on every namespace the scenario's workers use (a chain each, or the fan's one)
        let namespaces: Vec<String> = match shape {
            Shape::Chains { count, .. } => (0..*count)
                .map(|i| format!("{BENCH_NAMESPACE}-{i}"))
                .collect(),
            Shape::Fan { .. } | Shape::Paced { .. } => vec![BENCH_NAMESPACE.to_string()],
        };
        for ns in &namespaces {
            store
                .set_queue_limit_unchecked(ns, "default", Some(limit))
                .await?;
        }
    }
    tokio::time::sleep(STATS_FLUSH).await;
    let before = store.activity_counters().await?;
    let backend = store.backend_pid().await? as u32;
    let spec = WorkerSpec {
        endpoints: services
            .iter()
            .map(|s| format!("http://{}", s.addr))
            .collect(),
        shape: shape.clone(),
        warmup_ms: opts.warmup.as_millis() as u64,
        window_ms: opts.window.as_millis() as u64,
        namespace: BENCH_NAMESPACE.into(),
        eager: client.eager(),
        stream: client.stream(),
    };
    let spec = serde_json::to_string(&spec)?;
    let mut command = match client {
        Client::Rust { .. } => {
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("bench-worker").arg("--spec").arg(&spec);
            c
        }
        Client::Node { .. } => {
            let mut c = Command::new("node");
            c.arg(opts.peer_dir.join("tasker-chains.mjs"))
                .arg(&opts.proto_dir)
                .arg(&spec);
            c
        }
    };
    command.env("RUST_LOG", "warn");
    let service_pids: Vec<u32> = services.iter().filter_map(|s| s.child.id()).collect();
    let (report, start, end) = measure(command, &service_pids, backend)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}; server log: {}", log.display()))?;
    tokio::time::sleep(STATS_FLUSH).await;
    let after = store.activity_counters().await?;
    let mut claims_lost = 0;
    for s in &services {
        claims_lost += claims_lost_on(&s.addr).await?;
    }
    for s in services {
        stop_service(s).await;
    }
    let cpu = CpuPerStep::between(&start, &end, report.steps_in_window);
    Ok(RemoteScenario {
        scenario: scenario_name(shape),
        client: client.label().to_string(),
        mode: mode.as_str().to_string(),
        replicas,
        repeat: 1,
        floor_p50_ms: 0.0,
        window_secs: report.window_secs,
        steps_per_sec: report.steps_in_window as f64 / report.window_secs,
        next_step: LatencyStats::from_ms(report.next_step_ms),
        fan_out: LatencyStats::from_ms(report.fan_out_ms),
        fan_in: LatencyStats::from_ms(report.fan_in_ms),
        cpu_ms_per_step: cpu,
        budget: budget(&before, &after, report.steps_total),
        claims_lost_per_step: claims_lost as f64 / report.steps_total.max(1) as f64,
    })
}

/// Run a worker process that speaks the bench protocol (`window-start`, `window-end`, then
/// its report as JSON on stdout), sampling CPU at the two marks.
async fn measure(
    mut command: Command,
    service_pids: &[u32],
    backend: u32,
) -> anyhow::Result<(WorkerReport, CpuSample, CpuSample)> {
    let mut worker = command.stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
    let worker_pid = worker.id().unwrap_or(0);
    let mut lines = BufReader::new(worker.stdout.take().expect("piped")).lines();
    let (mut start, mut end) = (CpuSample::default(), CpuSample::default());
    let mut report: Option<WorkerReport> = None;
    while let Some(line) = lines.next_line().await? {
        match line.as_str() {
            "window-start" => start = sample_cpu(service_pids, worker_pid, backend),
            "window-end" => end = sample_cpu(service_pids, worker_pid, backend),
            json => report = Some(serde_json::from_str(json)?),
        }
    }
    let status = worker.wait().await?;
    let report = report
        .filter(|_| status.success())
        .ok_or_else(|| anyhow::anyhow!("the worker process failed ({status})"))?;
    Ok((report, start, end))
}

/// The same chains on graphile-worker, in the benchmark's database (its own schema), measured
/// as Tasker's are: the peer's Node.js process is the "workers" column, PostgreSQL the
/// same, no service.
async fn peer_scenario(
    store: &Store,
    url: &str,
    opts: &RemoteOptions,
    shape: &Shape,
) -> anyhow::Result<RemoteScenario> {
    let Shape::Chains { count, length } = shape else {
        anyhow::bail!("the peer runs chains only");
    };
    store.truncate_all().await?;
    tokio::time::sleep(STATS_FLUSH).await;
    let before = store.activity_counters().await?;
    let backend = store.backend_pid().await? as u32;
    let mut command = Command::new("node");
    command
        .arg(opts.peer_dir.join("graphile-chains.mjs"))
        .arg(url)
        .arg(count.to_string())
        .arg(length.to_string())
        .arg(opts.warmup.as_millis().to_string())
        .arg(opts.window.as_millis().to_string());
    let (report, start, end) = measure(command, &[], backend).await?;
    tokio::time::sleep(STATS_FLUSH).await;
    let after = store.activity_counters().await?;
    Ok(RemoteScenario {
        scenario: scenario_name(shape),
        client: PEER.to_string(),
        mode: "-".into(),
        replicas: 0,
        repeat: 1,
        floor_p50_ms: 0.0,
        window_secs: report.window_secs,
        steps_per_sec: report.steps_in_window as f64 / report.window_secs,
        next_step: LatencyStats::from_ms(report.next_step_ms),
        fan_out: LatencyStats::default(),
        fan_in: LatencyStats::default(),
        // no service: its column is 0
        cpu_ms_per_step: CpuPerStep::between(&start, &end, report.steps_in_window),
        budget: budget(&before, &after, report.steps_total),
        claims_lost_per_step: 0.0,
    })
}

/// A replica's count of claim attempts that found the claim held elsewhere.
async fn claims_lost_on(addr: &str) -> anyhow::Result<u64> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(
        tasker::proto::v1::admin_service_client::AdminServiceClient::new(channel)
            .get_status(tasker::proto::v1::GetStatusRequest {})
            .await?
            .into_inner()
            .claims_lost,
    )
}

fn budget(before: &ActivityCounters, after: &ActivityCounters, steps: u64) -> Budget {
    let n = steps.max(1) as f64;
    let rows = after
        .tables
        .iter()
        .map(|a| {
            let b = before
                .tables
                .iter()
                .find(|b| b.table == a.table)
                .cloned()
                .unwrap_or_default();
            (
                a.table.clone(),
                (a.inserted - b.inserted) as f64 / n,
                (a.updated - b.updated) as f64 / n,
                (a.hot_updated - b.hot_updated) as f64 / n,
                (a.deleted - b.deleted) as f64 / n,
            )
        })
        .filter(|r| r.1 + r.2 + r.4 > 0.0)
        .collect();
    Budget {
        steps,
        commits: (after.commits - before.commits) as f64 / n,
        statements: after
            .statements
            .zip(before.statements)
            .map(|(a, b)| ((a.0 - b.0) as f64 / n, (a.1 - b.1) as f64 / n)),
        rows,
    }
}

/// The scenarios as a table, the notify floor and ratios to it included (each repeat's own
/// floor, measured beside it).
pub fn render(scenarios: &[RemoteScenario], floor: &LatencyStats) -> String {
    let mut out = String::from(
        "| scenario | client | mode | replicas | repeat | steps/s | next step p50 / p95 / p99 (ms) | p50 vs floor | fan-out / fan-in p50 (ms) | CPU ms/step: service + PostgreSQL (workers) | commits / statements per step | claims lost per step |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in scenarios {
        let floor_p50 = if s.floor_p50_ms > 0.0 {
            s.floor_p50_ms
        } else {
            floor.p50_ms
        };
        let next = if s.next_step.samples > 0 {
            format!(
                "{:.2} / {:.2} / {:.2}",
                s.next_step.p50_ms, s.next_step.p95_ms, s.next_step.p99_ms
            )
        } else {
            "-".into()
        };
        let vs_floor = if s.next_step.samples > 0 && floor_p50 > 0.0 {
            format!("{:.1}x ({floor_p50:.3})", s.next_step.p50_ms / floor_p50)
        } else {
            "-".into()
        };
        let fan = if s.fan_out.samples > 0 {
            format!("{:.1} / {:.2}", s.fan_out.p50_ms, s.fan_in.p50_ms)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.2} + {:.2} = {:.2} ({:.2}) | {:.2} / {} | {:.2} |\n",
            s.scenario,
            s.client,
            s.mode,
            s.replicas,
            s.repeat,
            s.steps_per_sec,
            next,
            vs_floor,
            fan,
            s.cpu_ms_per_step.service,
            s.cpu_ms_per_step.postgres,
            s.cpu_ms_per_step.service_and_postgres,
            s.cpu_ms_per_step.workers,
            s.budget.commits,
            s.budget
                .statements
                .map(|(top, all)| format!("{top:.2} ({all:.1} with nested)"))
                .unwrap_or_else(|| "-".into()),
            s.claims_lost_per_step,
        ));
    }
    out.push_str("\nRows written per step (whole run):\n\n| scenario | client | repeat | table | inserted | updated | of them HOT | deleted |\n|---|---|---|---|---|---|---|---|\n");
    for s in scenarios {
        for (table, ins, upd, hot, del) in &s.budget.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {table} | {ins:.2} | {upd:.2} | {hot:.2} | {del:.2} |\n",
                s.scenario, s.client, s.repeat
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse() {
        assert_eq!(
            parse_scenario("chains:8x10"),
            Ok(Shape::Chains {
                count: 8,
                length: 10
            })
        );
        assert_eq!(
            parse_scenario("fan:200x8"),
            Ok(Shape::Fan {
                width: 200,
                workers: 8
            })
        );
        assert!(parse_scenario("chains:0x10").is_err());
        assert!(parse_scenario("tree:1x2").is_err());
    }
}
