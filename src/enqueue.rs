//! `TaskClaimStepEnqueuer`: claim a task and enqueue its ready steps in one transaction, then
//! wake the workers waiting on that namespace.
//!
//! The transaction itself is `tasker.enqueue_ready_steps` (migrations): task row lock with
//! SKIP LOCKED, CAS `pending -> enqueued` for every ready step, one queue row per step attempt
//! (unique), history rows, commit. One round trip.
//!
//! Durability: that transaction commits with `synchronous_commit = off`. Enqueue state is
//! derivable: if a crash loses the commit, the steps are still `pending` and ready, and the
//! start-up catch-up sweep or the fallback poller enqueues them again. Anything that builds on
//! an enqueue (a worker's fetch, a completion) commits synchronously, which flushes the WAL up
//! to and including the enqueue's commit record; so no durable state can depend on a lost
//! enqueue. This takes the fsync off the hop's critical path.

use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::store::{EnqueueResult, Store, StoreError};
use crate::vocabulary::TriggeredBy;
use crate::wakeups::StepWakeups;

#[derive(Clone)]
pub struct TaskClaimStepEnqueuer {
    store: Store,
    wakeups: StepWakeups,
    metrics: Metrics,
}

impl TaskClaimStepEnqueuer {
    pub fn new(store: Store, wakeups: StepWakeups, metrics: Metrics) -> Self {
        Self {
            store,
            wakeups,
            metrics,
        }
    }

    /// One claim-and-enqueue pass. `metadata` goes into the history rows.
    pub async fn claim_and_enqueue(
        &self,
        task_uuid: Uuid,
        metadata: &Value,
        triggered_by: TriggeredBy,
    ) -> Result<EnqueueResult, StoreError> {
        let span = tracing::info_span!(
            "enqueue.claim_and_enqueue",
            task_uuid = %task_uuid,
            outcome = tracing::field::Empty,
            steps_enqueued = tracing::field::Empty,
        );
        let traceparent = span.in_scope(crate::telemetry::current_traceparent);
        let result = self
            .store
            .enqueue_ready_steps(task_uuid, metadata, traceparent.as_deref())
            .instrument(span.clone())
            .await?;
        span.record("outcome", result.outcome.as_str());
        span.record("steps_enqueued", result.enqueued_steps.len());
        if !result.enqueued_steps.is_empty() {
            if let Some(ns) = &result.namespace {
                self.wakeups.notify(ns, result.enqueued_steps.len());
            }
            if let Some(ms) = result.max_ready_wait_ms {
                self.metrics
                    .completion_to_enqueue(ms, triggered_by.as_str());
            }
        }
        Ok(result)
    }
}
