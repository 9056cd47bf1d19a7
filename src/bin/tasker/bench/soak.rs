//! `tasker bench --soak`: one mode at a sustained arrival rate for a long time, reported every
//! interval (throughput, completion -> enqueue percentiles, memory, connections, the
//! notification queue, the backlog), then the drift between the first and last intervals.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tasker::config::{DeploymentMode, TaskerConfig};
use tasker::testkit::{Engine, Metrics, Store, StoreError, TaskSpec};

use super::LatencyStats;

/// `tasker bench --soak`: one mode at a sustained arrival rate for a long time.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub mode: DeploymentMode,
    pub duration: Duration,
    /// Steps per second offered (as 10-step chains).
    pub rate: f64,
    /// Report every this long.
    pub interval: Duration,
    pub workers: usize,
}

const SOAK_CHAIN: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct SoakInterval {
    pub at_secs: f64,
    pub completed_steps_per_sec: f64,
    pub completion_to_enqueue: LatencyStats,
    pub rss_mib: f64,
    pub db_connections: i64,
    pub notification_queue_usage: f64,
    /// Steps ready or queued but not yet taken: a backlog that grows means the rate is
    /// above what the machine sustains.
    pub backlog_steps: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub mode: String,
    pub offered_steps_per_sec: f64,
    pub synchronous_commit: String,
    pub intervals: Vec<SoakInterval>,
    /// Last interval minus first (after warm-up): growth in memory and latency.
    pub rss_growth_mib: f64,
    pub p50_drift_ms: f64,
    pub p99_drift_ms: f64,
}

/// The resident set of this process (service, workers and producer run in it), in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

pub async fn soak(
    url: &str,
    base: &TaskerConfig,
    opts: &SoakOptions,
) -> anyhow::Result<SoakReport> {
    let mut cfg = base.clone();
    cfg.database.max_connections = cfg.database.max_connections.max(opts.workers as u32 + 16);
    cfg.orchestration.deployment.mode = opts.mode;
    let store = Store::connect(url, &cfg.database).await?;
    store.migrate().await?;
    store.truncate_all().await?;
    let synchronous_commit = store.server_settings().await?.synchronous_commit;
    let core = Engine::start(store.clone(), &cfg, Metrics::noop());
    if !core.wait_ready(Duration::from_secs(10)).await {
        anyhow::bail!("core did not become ready");
    }
    let stop = CancellationToken::new();
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.workers {
        let (queue, stop, completed) = (core.workers.clone(), stop.clone(), completed.clone());
        tasks.spawn(async move {
            let id = format!("soak-{i}");
            loop {
                let steps = tokio::select! {
                    _ = stop.cancelled() => return Ok::<(), StoreError>(()),
                    r = queue.fetch("soak", &id, 8, Duration::from_secs(1), Duration::from_secs(60)) => r?,
                };
                for s in steps {
                    queue.complete(s.held(), &json!({}), Some(&id), None).await?;
                    completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    // the producer: chains at the offered rate, fractional chains carried over
    {
        let (store, stop) = (store.clone(), stop.clone());
        let per_tick = opts.rate / SOAK_CHAIN as f64 / 10.0;
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut owed = 0.0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                owed += per_tick;
                while owed >= 1.0 {
                    owed -= 1.0;
                    let task = TaskSpec::chain("soak", SOAK_CHAIN)
                        .into_new_task()
                        .expect("valid chain");
                    store.create_task(&task, &json!({}), None).await?;
                }
            }
        });
    }

    let started = Instant::now();
    let mut last_report = started;
    let mut intervals = Vec::new();
    let mut last_completed = 0u64;
    let mut last_transition = 0i64;
    while started.elapsed() < opts.duration {
        tokio::time::sleep(opts.interval).await;
        let now = Instant::now();
        let done = completed.load(std::sync::atomic::Ordering::Relaxed);
        let (latencies, last) = store.enqueue_latencies_since(last_transition).await?;
        last_transition = last;
        let snapshot = store.soak_snapshot().await?;
        let interval = SoakInterval {
            at_secs: started.elapsed().as_secs_f64(),
            // over the time actually elapsed: each report's own queries stretch the interval
            completed_steps_per_sec: (done - last_completed) as f64
                / (now - last_report).as_secs_f64(),
            completion_to_enqueue: LatencyStats::from_ms(latencies),
            rss_mib: rss_mib(),
            db_connections: snapshot.connections,
            notification_queue_usage: snapshot.notification_queue_usage,
            backlog_steps: snapshot.backlog_steps,
        };
        eprintln!(
            "{:>7.0} s  {:>7.1} steps/s  enqueue p50 {:>6.2} ms p99 {:>7.2} ms  rss {:>6.1} MiB  conns {:>3}  notify queue {:.6}  backlog {}",
            interval.at_secs,
            interval.completed_steps_per_sec,
            interval.completion_to_enqueue.p50_ms,
            interval.completion_to_enqueue.p99_ms,
            interval.rss_mib,
            interval.db_connections,
            interval.notification_queue_usage,
            interval.backlog_steps
        );
        intervals.push(interval);
        last_completed = done;
        last_report = now;
    }
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    core.shutdown().await;
    store.pool().close().await;
    // compare the second interval (the first includes warm-up) with the last
    let first = intervals.get(1).or(intervals.first());
    let last = intervals.last();
    let (rss_growth_mib, p50_drift_ms, p99_drift_ms) = match (first, last) {
        (Some(f), Some(l)) => (
            l.rss_mib - f.rss_mib,
            l.completion_to_enqueue.p50_ms - f.completion_to_enqueue.p50_ms,
            l.completion_to_enqueue.p99_ms - f.completion_to_enqueue.p99_ms,
        ),
        _ => (0.0, 0.0, 0.0),
    };
    Ok(SoakReport {
        mode: opts.mode.as_str().to_string(),
        offered_steps_per_sec: opts.rate,
        synchronous_commit,
        intervals,
        rss_growth_mib,
        p50_drift_ms,
        p99_drift_ms,
    })
}

/// One line for people.
pub fn summary(report: &SoakReport) -> String {
    format!(
        "soak {} at {} steps/s offered: rss growth {:+.1} MiB, p50 drift {:+.2} ms, p99 drift {:+.2} ms over {} intervals",
        report.mode,
        report.offered_steps_per_sec,
        report.rss_growth_mib,
        report.p50_drift_ms,
        report.p99_drift_ms,
        report.intervals.len()
    )
}
