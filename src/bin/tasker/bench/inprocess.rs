//! `tasker bench --in-process`: the service's own floor, all modes in one run, with workers
//! inside the process (no gRPC, no second process: what the service itself costs).
//!
//! For each deployment mode and each concurrency C, it starts an `Engine` in that
//! mode against a scratch database, runs C chains at once (each in its own namespace, with
//! one in-process worker long-polling that namespace, so a "hop" is unambiguous), replaces a
//! chain with a new one when it finishes, and measures over a fixed window after a warm-up:
//!
//! - completion -> enqueue latency, from database timestamps: a step's `enqueued_at` minus its
//!   parent's `completed_at` (both `clock_timestamp()`; the parent's includes its commit);
//! - worker hop latency: `CompleteStep` returned -> the successor step received by the worker;
//! - throughput: steps completed per second in the window.
//!
//! The same run measures the physical floor of one hop (commit of an UPDATE + `pg_notify`,
//! received by a LISTEN connection), like `shared/tools/notify_floor.py`, and reports each
//! mode as a ratio to PollingOnly. Absolute times on a shared machine swing with its disk;
//! ratios within one run hold.
//!
//! PollingOnly runs with the most aggressive polling the configuration allows (1 s interval,
//! no age threshold) so the comparison is against polling at its best, not at its default.
//! At every concurrency above 1 the run adds EventDrivenOnly with completion batching off
//! (`orchestration.completions.max_batch = 1`): the before/after of batching, in one run.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tasker::config::{DeploymentMode, TaskerConfig};
use tasker::testkit::{Engine, Metrics, Store, StoreError, TaskSpec, WorkerQueue};

use super::{LatencyStats, FLOOR_ROUNDS};

/// Steps per chain; a finished chain is replaced by a new one.
const CHAIN_LENGTH: usize = 50;
const WARM_UP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub modes: Vec<DeploymentMode>,
    pub concurrency: Vec<usize>,
    /// Measurement window per scenario (after the warm-up).
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub mode: String,
    pub concurrency: usize,
    pub window_secs: f64,
    pub completed_steps: u64,
    pub throughput_steps_per_sec: f64,
    pub completion_to_enqueue: LatencyStats,
    pub worker_hop: LatencyStats,
    /// Tasks the periodic poller found (in Hybrid: work events missed).
    pub poller_tasks_found: u64,
    /// This mode divided by PollingOnly at the same concurrency (p50s and throughput).
    pub vs_polling_only: Option<Ratios>,
    /// p50 completion -> enqueue divided by the floor's p50.
    pub enqueue_p50_vs_floor: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub completion_to_enqueue_p50: f64,
    pub worker_hop_p50: f64,
    pub throughput: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub synchronous_commit: String,
    pub server_version: String,
    /// Commit of UPDATE + pg_notify -> received by a listener.
    pub notify_floor: LatencyStats,
    pub scenarios: Vec<ScenarioReport>,
}

/// Run every scenario against `url` (a database the benchmark may empty).
pub async fn run(
    url: &str,
    base: &TaskerConfig,
    opts: &BenchOptions,
) -> anyhow::Result<BenchReport> {
    let max_c = opts.concurrency.iter().copied().max().unwrap_or(1);
    let mut db_cfg = base.database.clone();
    db_cfg.max_connections = (max_c as u32 + 24).max(db_cfg.max_connections);
    let store = Store::connect(url, &db_cfg).await?;
    store.migrate().await?;
    let settings = store.server_settings().await?;
    let (synchronous_commit, server_version) =
        (settings.synchronous_commit, settings.server_version);
    let notify_floor = LatencyStats::from_ms(store.notify_floor_ms(FLOOR_ROUNDS).await?);
    eprintln!(
        "notify floor: p50 {:.3} ms p99 {:.3} ms (synchronous_commit = {synchronous_commit})",
        notify_floor.p50_ms, notify_floor.p99_ms
    );

    let mut scenarios = Vec::new();
    for &c in &opts.concurrency {
        // the same run without completion batching, for before/after at this concurrency
        let unbatched = (c > 1).then_some((DeploymentMode::EventDrivenOnly, false));
        let variants = opts.modes.iter().map(|m| (*m, true)).chain(unbatched);
        for (mode, batched) in variants {
            store.truncate_all().await?;
            let mut cfg = base.clone();
            cfg.database = db_cfg.clone();
            cfg.orchestration.deployment.mode = mode;
            cfg.orchestration.command_processor.max_concurrent_commands = cfg
                .orchestration
                .command_processor
                .max_concurrent_commands
                .max(8);
            if mode == DeploymentMode::PollingOnly {
                cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(1);
                cfg.orchestration.task_readiness.age_threshold = Duration::from_secs(0);
            }
            if !batched {
                cfg.orchestration.completions.max_batch = 1;
            }
            let mut report = scenario(&store, &cfg, mode, c, opts.duration, &notify_floor).await?;
            if !batched {
                report.mode = format!("{} (completions unbatched)", mode.as_str());
            }
            eprintln!(
                "{:>15} x{:<3} {:>8.1} steps/s  enqueue p50 {:>7.2} ms p99 {:>7.2} ms  hop p50 {:>7.2} ms p99 {:>7.2} ms",
                report.mode,
                c,
                report.throughput_steps_per_sec,
                report.completion_to_enqueue.p50_ms,
                report.completion_to_enqueue.p99_ms,
                report.worker_hop.p50_ms,
                report.worker_hop.p99_ms
            );
            scenarios.push(report);
        }
    }
    // ratios to PollingOnly at the same concurrency
    let polling: Vec<(usize, ScenarioReport)> = scenarios
        .iter()
        .filter(|s| s.mode == DeploymentMode::PollingOnly.as_str())
        .map(|s| (s.concurrency, s.clone()))
        .collect();
    for s in &mut scenarios {
        if let Some((_, p)) = polling.iter().find(|(c, _)| *c == s.concurrency) {
            let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            s.vs_polling_only = Some(Ratios {
                completion_to_enqueue_p50: div(
                    s.completion_to_enqueue.p50_ms,
                    p.completion_to_enqueue.p50_ms,
                ),
                worker_hop_p50: div(s.worker_hop.p50_ms, p.worker_hop.p50_ms),
                throughput: div(s.throughput_steps_per_sec, p.throughput_steps_per_sec),
            });
        }
    }
    store.pool().close().await;
    Ok(BenchReport {
        synchronous_commit,
        server_version,
        notify_floor,
        scenarios,
    })
}

async fn scenario(
    store: &Store,
    cfg: &TaskerConfig,
    mode: DeploymentMode,
    concurrency: usize,
    duration: Duration,
    floor: &LatencyStats,
) -> anyhow::Result<ScenarioReport> {
    let core = Engine::start(store.clone(), cfg, Metrics::noop());
    if !core.wait_ready(Duration::from_secs(10)).await {
        anyhow::bail!("core did not become ready in {mode}");
    }
    let start = Instant::now();
    let window_start = start + WARM_UP;
    let window_end = window_start + duration;
    let db_window_start = chrono::Utc::now() + chrono::Duration::from_std(WARM_UP)?;
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let namespace = format!("bench-{i}");
        let core_store = store.clone();
        let queue = core.workers.clone();
        let stop = stop.clone();
        workers.spawn(async move {
            chain_worker(core_store, queue, namespace, stop, window_start, window_end).await
        });
    }
    tokio::time::sleep_until((window_end).into()).await;
    let db_window_end = chrono::Utc::now();
    stop.cancel();
    let mut hops = Vec::new();
    let mut completed = 0u64;
    while let Some(r) = workers.join_next().await {
        let (h, c) = r??;
        hops.extend(h);
        completed += c;
    }
    let poller_tasks_found = core
        .mode_controller
        .status()
        .poller
        .fallback_tasks_found_total;
    core.shutdown().await;

    let enqueue = store
        .completion_to_enqueue_ms(db_window_start, db_window_end)
        .await?;
    let completion_to_enqueue = LatencyStats::from_ms(enqueue);
    let window_secs = duration.as_secs_f64();
    Ok(ScenarioReport {
        mode: mode.as_str().to_string(),
        concurrency,
        window_secs,
        completed_steps: completed,
        throughput_steps_per_sec: completed as f64 / window_secs,
        enqueue_p50_vs_floor: if floor.p50_ms > 0.0 {
            completion_to_enqueue.p50_ms / floor.p50_ms
        } else {
            f64::NAN
        },
        completion_to_enqueue,
        worker_hop: LatencyStats::from_ms(hops),
        poller_tasks_found,
        vs_polling_only: None,
    })
}

/// One worker driving one chain at a time in its own namespace. Returns the hop latencies
/// and the steps completed inside the window.
async fn chain_worker(
    store: Store,
    queue: WorkerQueue,
    namespace: String,
    stop: CancellationToken,
    window_start: Instant,
    window_end: Instant,
) -> Result<(Vec<f64>, u64), StoreError> {
    let last_name = format!("s{}", CHAIN_LENGTH - 1);
    let new_chain = |store: Store, ns: String| async move {
        let task = TaskSpec::chain(&ns, CHAIN_LENGTH)
            .into_new_task()
            .expect("a chain is a valid task");
        store.create_task(&task, &json!({}), None).await.map(|_| ())
    };
    new_chain(store.clone(), namespace.clone()).await?;
    let mut hops = Vec::new();
    let mut completed = 0u64;
    let mut last: Option<(Uuid, Instant)> = None;
    loop {
        let fetched = tokio::select! {
            _ = stop.cancelled() => break,
            r = queue.fetch(&namespace, "bench", 1, Duration::from_secs(5), Duration::from_secs(60)) => r?,
        };
        let received = Instant::now();
        for step in fetched {
            if let Some((task, done)) = last {
                if task == step.task_uuid && done >= window_start && received <= window_end {
                    hops.push((received - done).as_secs_f64() * 1000.0);
                }
            }
            queue
                .complete(step.held(), &json!({"ok": true}), Some("bench"), None)
                .await?;
            let done = Instant::now();
            if done >= window_start && done <= window_end {
                completed += 1;
            }
            last = Some((step.task_uuid, done));
            if step.name == last_name {
                last = None;
                new_chain(store.clone(), namespace.clone()).await?;
            }
        }
    }
    Ok((hops, completed))
}

/// The report as a table for people.
pub fn render(report: &BenchReport) -> String {
    let mut out = format!(
        "PostgreSQL {} | synchronous_commit = {} | notify floor (commit + NOTIFY -> received): p50 {:.3} ms, p99 {:.3} ms\n\n",
        report.server_version, report.synchronous_commit, report.notify_floor.p50_ms, report.notify_floor.p99_ms
    );
    out.push_str("| mode | chains | steps/s | enqueue p50 | p95 | p99 | max | hop p50 | p95 | p99 | max | x floor (enqueue p50) | enqueue p50 vs polling | hop p50 vs polling | throughput vs polling | poller found |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in &report.scenarios {
        let r = s.vs_polling_only.as_ref();
        let e = &s.completion_to_enqueue;
        let h = &s.worker_hop;
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} |\n",
            s.mode,
            s.concurrency,
            s.throughput_steps_per_sec,
            e.p50_ms,
            e.p95_ms,
            e.p99_ms,
            e.max_ms,
            h.p50_ms,
            h.p95_ms,
            h.p99_ms,
            h.max_ms,
            s.enqueue_p50_vs_floor,
            r.map(|r| format!("{:.4}", r.completion_to_enqueue_p50)).unwrap_or_default(),
            r.map(|r| format!("{:.4}", r.worker_hop_p50)).unwrap_or_default(),
            r.map(|r| format!("{:.1}", r.throughput)).unwrap_or_default(),
            s.poller_tasks_found,
        ));
    }
    out.push_str("\nlatencies in ms; enqueue = database clock from a step's completion to its successor's enqueue; hop = worker's CompleteStep returned -> successor received\n");
    out
}
