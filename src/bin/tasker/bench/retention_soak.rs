//! `tasker bench --soak --retention-secs N`: retention under a constant load, through gRPC
//! workers, beside the same load with retention off, in one run.
//!
//! ```text
//!  bench ──> tasker serve (retention N s) ── database A      (both at once, the same load:
//!        ──> tasker serve (purge off)     ── database A_noretention    --rate steps/s each)
//!        ──> tasker bench-worker (paced) x2 ── CreateTask, FetchSteps, CompleteStep
//! ```
//! Every interval, per arm: steps/s, the completion -> enqueue latency of the interval
//! (database clock, p50 and p99), the `tasker` schema's size and the tasks kept. At the end:
//! the schema's size after minute 5 relative to its size at minute 5 (flat storage), and the
//! hop p50 after the warm-up with the purge running over the p50 with retention off.
//! The arms run at once so that the machine's swings (disk, neighbours) hit both alike.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tasker::config::DeploymentMode;
use tasker::testkit::{with_database, Store};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::remote::{spawn_server, stop_service};
use super::worker::{Shape, WorkerSpec};
use super::LatencyStats;

/// Chains of this many steps.
const CHAIN: usize = 10;
/// The size series is compared from here on: the purge has caught up by then (retention plus
/// a round).
const FLAT_FROM: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct RetentionSoakOptions {
    pub duration: Duration,
    pub rate: f64,
    pub interval: Duration,
    pub workers: usize,
    pub retention: Duration,
    /// Latencies before this are left out of the p50s (the tables are empty at the start).
    pub warmup: Duration,
    pub server_bin: std::path::PathBuf,
    pub server_config_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakPoint {
    pub at_secs: f64,
    pub steps_per_sec: f64,
    pub completion_to_enqueue: LatencyStats,
    pub schema_bytes: i64,
    pub tasks_kept: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakArm {
    pub name: String,
    pub points: Vec<SoakPoint>,
    /// Completion -> enqueue over every interval after the warm-up.
    pub hop: LatencyStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetentionSoakReport {
    pub offered_steps_per_sec: f64,
    pub retention_secs: f64,
    pub arms: Vec<SoakArm>,
    /// The retention arm's schema size at minute 5, and its smallest and largest after.
    pub schema_bytes_at_5_min: Option<i64>,
    pub schema_min_ratio_after_5_min: Option<f64>,
    pub schema_max_ratio_after_5_min: Option<f64>,
    /// Hop p50 with the purge running over the p50 with retention off.
    pub hop_p50_ratio: f64,
}

/// One arm's service, workers and measurements.
struct Arm {
    name: String,
    store: Store,
    service: super::remote::Service,
    worker: tokio::process::Child,
    completed: Arc<AtomicU64>,
    last_completed: u64,
    last_transition: i64,
    points: Vec<SoakPoint>,
    after_warmup: Vec<f64>,
}

/// Create `url`'s database if it is missing (through the server's `postgres` database).
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let name = url
        .split('?')
        .next()
        .and_then(|b| b.rsplit('/').next())
        .filter(|n| !n.is_empty() && !n.contains(':') && !n.contains('@'))
        .ok_or_else(|| anyhow::anyhow!("{url}: no database name"))?
        .to_string();
    let mut admin = sqlx::PgConnection::connect(&with_database(url, "postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(&format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        ))
        .execute(&mut admin)
        .await?;
    }
    Ok(())
}

async fn start_arm(
    name: &str,
    url: &str,
    env: &[(&str, String)],
    opts: &RetentionSoakOptions,
    base: &tasker::config::TaskerConfig,
) -> anyhow::Result<Arm> {
    ensure_database(url).await?;
    let log = std::env::temp_dir().join(format!(
        "tasker-soak-{}-{}.log",
        name.replace(' ', "-"),
        std::process::id()
    ));
    let service = spawn_server(
        &opts.server_bin,
        &opts.server_config_dir,
        url,
        DeploymentMode::Hybrid,
        env,
        &log,
    )
    .await?;
    // the service migrated the database; it is idle: start from empty tables
    let store = Store::connect(url, &base.database).await?;
    store.truncate_all().await?;
    let spec = WorkerSpec {
        endpoints: vec![format!("http://{}", service.addr)],
        shape: Shape::Paced {
            rate: opts.rate,
            length: CHAIN,
            workers: opts.workers,
        },
        warmup_ms: 0,
        window_ms: opts.duration.as_millis() as u64,
        namespace: "soak".into(),
        eager: false,
        stream: false,
    };
    let mut worker = Command::new(std::env::current_exe()?)
        .arg("bench-worker")
        .arg("--spec")
        .arg(serde_json::to_string(&spec)?)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let completed = Arc::new(AtomicU64::new(0));
    let mut lines = BufReader::new(worker.stdout.take().expect("piped")).lines();
    let progress = completed.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line.strip_prefix("progress ") {
                if let Ok(n) = n.parse() {
                    progress.store(n, Ordering::Relaxed);
                }
            }
        }
    });
    Ok(Arm {
        name: name.to_string(),
        store,
        service,
        worker,
        completed,
        last_completed: 0,
        last_transition: 0,
        points: Vec::new(),
        after_warmup: Vec::new(),
    })
}

pub async fn run(
    url: &str,
    compare_url: &str,
    base: &tasker::config::TaskerConfig,
    opts: &RetentionSoakOptions,
) -> anyhow::Result<RetentionSoakReport> {
    let retention = vec![
        (
            "TASKER_ORCHESTRATION__RETENTION__RETENTION_SECONDS",
            opts.retention.as_secs().max(1).to_string(),
        ),
        (
            "TASKER_ORCHESTRATION__RETENTION__PURGE_INTERVAL_MS",
            "1000".to_string(),
        ),
    ];
    let off = vec![(
        "TASKER_ORCHESTRATION__RETENTION__PURGE",
        "false".to_string(),
    )];
    let mut arms = vec![
        start_arm("retention", url, &retention, opts, base).await?,
        start_arm("retention off", compare_url, &off, opts, base).await?,
    ];
    let started = Instant::now();
    let mut last = started;
    while started.elapsed() < opts.duration {
        tokio::time::sleep(opts.interval).await;
        let now = Instant::now();
        for arm in &mut arms {
            let done = arm.completed.load(Ordering::Relaxed);
            let (latencies, last_id) = arm
                .store
                .enqueue_latencies_since(arm.last_transition)
                .await?;
            arm.last_transition = last_id;
            if started.elapsed() >= opts.warmup {
                arm.after_warmup.extend(latencies.iter().copied());
            }
            let point = SoakPoint {
                at_secs: started.elapsed().as_secs_f64(),
                steps_per_sec: done.saturating_sub(arm.last_completed) as f64
                    / (now - last).as_secs_f64(),
                completion_to_enqueue: LatencyStats::from_ms(latencies),
                schema_bytes: arm.store.schema_bytes().await?,
                tasks_kept: arm.store.count_tasks().await?,
            };
            eprintln!(
                "{:>7.0} s  {:<13} {:>6.1} steps/s  enqueue p50 {:>6.2} ms p99 {:>7.2} ms  schema {:>7.1} MiB  tasks kept {}",
                point.at_secs,
                arm.name,
                point.steps_per_sec,
                point.completion_to_enqueue.p50_ms,
                point.completion_to_enqueue.p99_ms,
                point.schema_bytes as f64 / 1048576.0,
                point.tasks_kept
            );
            arm.points.push(point);
            arm.last_completed = done;
        }
        last = now;
    }
    for arm in &mut arms {
        let _ = arm.worker.wait().await;
    }
    let mut out = Vec::new();
    for arm in arms {
        stop_service(arm.service).await;
        arm.store.pool().close().await;
        out.push(SoakArm {
            name: arm.name,
            points: arm.points,
            hop: LatencyStats::from_ms(arm.after_warmup),
        });
    }
    let at_5 = out[0]
        .points
        .iter()
        .find(|p| p.at_secs >= FLAT_FROM.as_secs_f64())
        .map(|p| p.schema_bytes);
    let after: Vec<f64> = match at_5 {
        Some(b) if b > 0 => out[0]
            .points
            .iter()
            .filter(|p| p.at_secs > FLAT_FROM.as_secs_f64())
            .map(|p| p.schema_bytes as f64 / b as f64)
            .collect(),
        _ => Vec::new(),
    };
    Ok(RetentionSoakReport {
        offered_steps_per_sec: opts.rate,
        retention_secs: opts.retention.as_secs_f64(),
        schema_bytes_at_5_min: at_5,
        schema_min_ratio_after_5_min: after.iter().copied().reduce(f64::min),
        schema_max_ratio_after_5_min: after.iter().copied().reduce(f64::max),
        hop_p50_ratio: out[0].hop.p50_ms / out[1].hop.p50_ms,
        arms: out,
    })
}

/// One paragraph for people.
pub fn summary(r: &RetentionSoakReport) -> String {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mut s = format!(
        "retention soak at {} steps/s per arm, retention {} s: schema at 5 min {} MiB, after it {}..{} of that; hop p50 with the purge {:.2} ms vs {:.2} ms retention off (ratio {:.3})",
        r.offered_steps_per_sec,
        r.retention_secs,
        r.schema_bytes_at_5_min
            .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0)),
        fmt(r.schema_min_ratio_after_5_min),
        fmt(r.schema_max_ratio_after_5_min),
        r.arms[0].hop.p50_ms,
        r.arms[1].hop.p50_ms,
        r.hop_p50_ratio
    );
    for arm in &r.arms {
        s.push_str(&format!(
            "\n{}: hop p50 {:.2} ms p99 {:.2} ms over {} steps",
            arm.name, arm.hop.p50_ms, arm.hop.p99_ms, arm.hop.samples
        ));
    }
    s
}
