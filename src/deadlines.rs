//! `DeadlineScheduler`: precise wake-ups for work that becomes ready with no event. A step in
//! retry backoff becomes ready at `next_retry_at`; a leased step whose worker went silent must
//! be retried when its lease runs out. Rather than leaving both to the next fallback poll (up
//! to 30 s late), the scheduler sleeps until the earliest such deadline, then promotes due
//! retries (`waiting_for_retry -> pending`, which also notifies) and expires dead leases, and
//! sends `ProcessTaskReadiness` (`triggered_by = retry_timer`) for each affected task, so
//! retries are just as prompt in PollingOnly mode.
//!
//! ```text
//!  sleep until min(next deadline, poll interval) ──or poked (an earlier retry or lease)─┐
//!     ^                                                                                 v
//!     └──── commands(retry_timer) <── promote_due_retries + expire_leases <──── wake ───┘
//! ```
//! The sleep is capped at the poll interval because other instances create deadlines too.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::commands::{CommandProcessorHandle, OrchestrationCommand};
use crate::metrics::Metrics;
use crate::namespaces::NamespaceSelector;
use crate::store::{Store, TaskRef};
use crate::vocabulary::TriggeredBy;
use crate::wakeups::DeadlinePoke;

const BATCH: i32 = 500;

pub struct DeadlineScheduler {
    store: Store,
    commands: CommandProcessorHandle,
    selector: NamespaceSelector,
    max_sleep: Duration,
    poke: DeadlinePoke,
    metrics: Metrics,
}

impl DeadlineScheduler {
    pub fn new(
        store: Store,
        commands: CommandProcessorHandle,
        selector: NamespaceSelector,
        max_sleep: Duration,
        poke: DeadlinePoke,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            commands,
            selector,
            max_sleep,
            poke,
            metrics,
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let sleep = match self.store.next_deadline(self.selector.patterns()).await {
                Ok(Some(at)) => (at - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(self.max_sleep),
                Ok(None) => self.max_sleep,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the next retry/lease deadline failed");
                    Duration::from_secs(1).min(self.max_sleep)
                }
            };
            self.poke
                .plan(Utc::now() + chrono::Duration::from_std(sleep).unwrap_or_default());
            if !sleep.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(sleep) => {}
                    _ = self.poke.poked() => continue,
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            self.wake().await;
        }
    }

    /// Promote due retries, expire dead leases, and send a command per affected task.
    pub async fn wake(&self) {
        let mut tasks: HashMap<uuid::Uuid, TaskRef> = HashMap::new();
        match self
            .store
            .promote_due_retries(BATCH, self.selector.patterns())
            .await
        {
            Ok(rows) => {
                self.metrics.steps_promoted("retry", rows.len() as u64);
                tasks.extend(rows.into_iter().map(|r| (r.task_uuid, r)));
            }
            Err(e) => tracing::warn!(error = %e, "promoting due retries failed"),
        }
        match self
            .store
            .expire_leases(BATCH, self.selector.patterns())
            .await
        {
            Ok(rows) => {
                if !rows.is_empty() {
                    tracing::info!(steps = rows.len(), "leases expired; attempts ended");
                }
                self.metrics
                    .steps_promoted("lease_expired", rows.len() as u64);
                tasks.extend(rows.into_iter().map(|r| (r.task_uuid, r)));
            }
            Err(e) => tracing::warn!(error = %e, "expiring leases failed"),
        }
        for t in tasks.into_values() {
            let command = OrchestrationCommand::process_task(
                t.task_uuid,
                t.namespace,
                TriggeredBy::RetryTimer,
            );
            if self.commands.submit_waiting(command).await.is_ok() {
                self.metrics.command_sent(TriggeredBy::RetryTimer.as_str());
            }
        }
    }
}
