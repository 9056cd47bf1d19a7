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
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::commands::{CommandProcessorHandle, OrchestrationCommand};
use crate::config::{DeploymentMode, TaskReadinessConfig};
use crate::metrics::Metrics;
use crate::namespaces::NamespaceSelector;
use crate::store::Store;
use crate::vocabulary::TriggeredBy;
use crate::wakeups::SweepRequester;

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
        loop {
            let periodic = self.mode.borrow_and_update().polls();
            self.status
                .send_if_modified(|s| std::mem::replace(&mut s.periodic, periodic) != periodic);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = self.sweeps.requested() => {
                    self.round(TriggeredBy::CatchUp).await;
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

    /// One round: a periodic poll or a catch-up sweep. Returns the tasks found.
    pub async fn round(&self, kind: TriggeredBy) -> u64 {
        let ready_before = match kind {
            TriggeredBy::FallbackPolling => Some(
                Utc::now() - chrono::Duration::from_std(self.age_threshold).unwrap_or_default(),
            ),
            _ => None,
        };
        let mut seen = HashSet::new();
        let mut found = 0u64;
        for _ in 0..MAX_BATCHES_PER_ROUND {
            let rows = match self
                .store
                .ready_tasks(self.selector.patterns(), self.batch_size, ready_before, 0)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, kind = kind.as_str(), "readiness sweep query failed; next round retries");
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
                async move {
                    if commands.execute_waiting(command).await.is_ok() {
                        metrics.command_sent(kind.as_str());
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
        found
    }
}
