//! `ReadinessFallbackPoller`: the safety net. Every `fallback_polling_interval_seconds`
//! (jittered) while the deployment mode polls, it looks for tasks whose steps have been ready
//! longer than `age_threshold_seconds` and sends them the same `ProcessTaskReadiness` command
//! as events do (`triggered_by = fallback_polling`). In every mode it also runs catch-up
//! sweeps on request (listener connected, commands refused, mode changed) with no age
//! threshold (`triggered_by = catch_up`).
//!
//! ```text
//!  idle ──tick (mode polls)──> round(fallback_polling, ready_before = now - age) ──> idle
//!    └───sweep requested─────> round(catch_up, no age limit) ───────────────────────┘
//!  round: query up to batch_size ready tasks (best first) -> commands, waiting for room and
//!         for their results -> again while the batch was full and brought new tasks
//! ```
//!
//! The age threshold is a lower bound only: no task is ever too old to be found. Commands are
//! sent with backpressure and awaited, so a round never floods the processor and the next
//! query sees the effect of the last. In Hybrid mode under normal operation every periodic
//! round finds nothing, which is the proof that events do the work. A round that finds
//! nothing gets no span, only the `fallback_polls_executed` metric.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{DeploymentMode, TaskReadinessConfig};
use crate::model::command::TriggeredBy;
use crate::model::namespaces::NamespaceSelector;
use crate::readiness::commands::{CommandOutcome, CommandProcessorHandle, OrchestrationCommand};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// A period with up to 10% jitter either way, so instances do not poll in lockstep.
fn jittered(period: Duration) -> Duration {
    period.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// A round stops after this many batches even if tasks keep coming; the next round continues.
const MAX_BATCHES_PER_ROUND: usize = 100;

/// What the poller did last, for status reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollerStatus {
    /// Periodic rounds are on (the mode polls).
    pub periodic: bool,
    pub last_round_at: Option<DateTime<Utc>>,
    pub last_round_tasks_found: u64,
    pub rounds: u64,
    pub catch_up_sweeps: u64,
    /// Tasks found by periodic rounds since start: in Hybrid, > 0 means events missed work.
    pub fallback_tasks_found_total: u64,
}

pub struct ReadinessFallbackPoller {
    store: Store,
    commands: CommandProcessorHandle,
    selector: NamespaceSelector,
    interval: Duration,
    age_threshold: Duration,
    batch_size: i64,
    mode: watch::Receiver<DeploymentMode>,
    sweeps: SweepRequester,
    status: watch::Sender<PollerStatus>,
    metrics: Metrics,
}

impl ReadinessFallbackPoller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        commands: CommandProcessorHandle,
        selector: NamespaceSelector,
        cfg: &TaskReadinessConfig,
        mode: watch::Receiver<DeploymentMode>,
        sweeps: SweepRequester,
        status: watch::Sender<PollerStatus>,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            commands,
            selector,
            interval: cfg.fallback_polling_interval,
            age_threshold: cfg.age_threshold,
            batch_size: i64::from(cfg.batch_size),
            mode,
            sweeps,
            status,
            metrics,
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut next_tick = Instant::now() + jittered(self.interval);
        // After a catch-up sweep that failed (its query, or a command it sent), the next one
        // waits for this back-off instead of following the next request at once: a database
        // that refuses would otherwise be swept in a tight loop.
        let mut retry: Option<(Instant, u32)> = None;
        loop {
            let periodic = self.mode.borrow_and_update().polls();
            self.status
                .send_if_modified(|s| std::mem::replace(&mut s.periodic, periodic) != periodic);
            let retry_at = retry.map(|(at, _)| at);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = self.sweeps.requested(), if retry.is_none() => {
                    if !self.round(TriggeredBy::CatchUp).await.complete {
                        retry = Some((Instant::now() + SWEEP_RETRY_BASE, 1));
                    }
                }
                _ = sleep_until_opt(retry_at) => {
                    let failures = retry.map_or(0, |(_, n)| n);
                    retry = if self.round(TriggeredBy::CatchUp).await.complete {
                        None
                    } else {
                        let delay = SWEEP_RETRY_BASE
                            .saturating_mul(1 << failures.min(8))
                            .min(self.interval.max(SWEEP_RETRY_BASE));
                        Some((Instant::now() + delay, failures + 1))
                    };
                }
                _ = tokio::time::sleep_until(next_tick), if periodic => {
                    self.round(TriggeredBy::FallbackPolling).await;
                    next_tick = Instant::now() + jittered(self.interval);
                }
                changed = self.mode.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if !periodic {
                        // polling (re)starts: a full interval from now (the mode change itself
                        // requested a catch-up sweep)
                        next_tick = Instant::now() + jittered(self.interval);
                    }
                }
            }
        }
    }

    /// One round: a periodic poll or a catch-up sweep.
    pub async fn round(&self, kind: TriggeredBy) -> RoundResult {
        let ready_before = match kind {
            TriggeredBy::FallbackPolling => Some(
                Utc::now() - chrono::Duration::from_std(self.age_threshold).unwrap_or_default(),
            ),
            _ => None,
        };
        let mut seen = HashSet::new();
        let mut found = 0u64;
        let failed = std::sync::atomic::AtomicBool::new(false);
        for _ in 0..MAX_BATCHES_PER_ROUND {
            let rows = match self
                .store
                .ready_tasks(self.selector.patterns(), self.batch_size, ready_before, 0)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, kind = kind.as_str(), "readiness sweep query failed; retrying later");
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            };
            let full = rows.len() as i64 >= self.batch_size;
            let fresh: Vec<_> = rows
                .into_iter()
                .filter(|r| seen.insert(r.task_uuid))
                .collect();
            if fresh.is_empty() {
                break;
            }
            found += fresh.len() as u64;
            let span =
                tracing::info_span!("poller.round", kind = kind.as_str(), tasks = fresh.len());
            let sends = fresh.into_iter().map(|r| {
                let command = OrchestrationCommand::process_task(r.task_uuid, r.namespace, kind);
                let commands = self.commands.clone();
                let metrics = self.metrics.clone();
                let failed = &failed;
                async move {
                    match commands.execute_waiting(command).await {
                        Ok(result) => {
                            metrics.command_sent(kind.as_str());
                            if matches!(result.outcome, CommandOutcome::Failed(_)) {
                                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Err(_) => failed.store(true, std::sync::atomic::Ordering::Relaxed),
                    }
                }
            });
            join_all(sends).instrument(span).await;
            if !full {
                break;
            }
        }
        self.metrics.poll_executed(kind.as_str(), found);
        if kind == TriggeredBy::FallbackPolling && found > 0 {
            tracing::info!(
                tasks = found,
                "fallback poller found ready tasks that no event had handled"
            );
        }
        self.status.send_modify(|s| {
            if kind == TriggeredBy::FallbackPolling {
                s.rounds += 1;
                s.fallback_tasks_found_total += found;
            } else {
                s.catch_up_sweeps += 1;
            }
            s.last_round_at = Some(Utc::now());
            s.last_round_tasks_found = found;
        });
        RoundResult {
            found,
            complete: !failed.into_inner(),
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundResult {
    /// Tasks found with ready steps.
    pub found: u64,
    /// false: the query failed, or a command it sent failed; the tasks may still be ready.
    pub complete: bool,
}

/// The first back-off after a failed catch-up sweep; it doubles up to the polling interval.
const SWEEP_RETRY_BASE: Duration = Duration::from_secs(1);

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Asks the poller for a catch-up sweep. Requests made while one is pending fold into it.
#[derive(Clone, Default, Debug)]
pub struct SweepRequester {
    notify: Arc<Notify>,
}

impl SweepRequester {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.notify.notify_one();
    }

    pub(crate) async fn requested(&self) {
        self.notify.notified().await
    }
}
