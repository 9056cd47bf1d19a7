//! `TaskClaimStepEnqueuer`: claim a task and enqueue its ready steps in one transaction, then
//! wake the workers waiting on each of their queues.
//!
//! The transaction itself is `tasker.claim_and_enqueue` (sql/steps.sql): the task's claim (an
//! advisory lock tried without waiting), CAS `pending -> enqueued` for every ready step, one
//! queue row per step attempt (unique) in the step's queue, the leases to the parked fetches
//! that take each queue, history rows, commit. One round trip.
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

use crate::dispatch::announce::StepAnnouncer;
use crate::dispatch::parked::{ParkedFetches, Waiter};
use crate::model::command::TriggeredBy;
use crate::model::namespaces::DEFAULT_QUEUE;
use crate::store::{EagerEnqueue, EnqueueResult, LeasedStep, Store, StoreError, Taker};
use crate::telemetry::metrics::Metrics;

/// Parked fetches one enqueue takes at most: a task rarely makes more steps ready at once,
/// and the rest are queued for the next fetches.
const MAX_TAKERS: usize = 64;

#[derive(Clone)]
pub struct TaskClaimStepEnqueuer {
    store: Store,
    handoff: ParkedFetches,
    announcer: StepAnnouncer,
    metrics: Metrics,
}

impl TaskClaimStepEnqueuer {
    pub fn new(
        store: Store,
        handoff: ParkedFetches,
        announcer: StepAnnouncer,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            handoff,
            announcer,
            metrics,
        }
    }

    /// One claim-and-enqueue pass for a task of `namespace`. The fetches parked on the
    /// namespace are taken first and given the steps in the same transaction; those that got
    /// nothing go back, and steps left on the queue wake that many others. `metadata` goes
    /// into the history rows.
    pub async fn claim_and_enqueue(
        &self,
        task_uuid: Uuid,
        namespace: &str,
        metadata: &Value,
        triggered_by: TriggeredBy,
    ) -> Result<EnqueueResult, StoreError> {
        let span = tracing::info_span!(
            "enqueue.claim_and_enqueue",
            task_uuid = %task_uuid,
            outcome = tracing::field::Empty,
            steps_enqueued = tracing::field::Empty,
            steps_handed_off = tracing::field::Empty,
        );
        let traceparent = span.in_scope(crate::telemetry::current_traceparent);
        let waiters = self.handoff.take(namespace, MAX_TAKERS);
        let takers: Vec<Taker> = waiters
            .iter()
            .map(|w| Taker {
                worker_id: w.worker_id.clone(),
                max: w.max,
                lease_ms: w.lease_ms,
                // the default queue alone is what the database assumes: not sent
                queues: (w.queues.len() != 1 || w.queues[0] != DEFAULT_QUEUE)
                    .then(|| w.queues.clone()),
            })
            .collect();
        let result = match self
            .store
            .claim_and_enqueue(
                task_uuid,
                metadata,
                traceparent.as_deref(),
                &takers,
                // announced below, after a grace, only if no fetch here takes them
                None,
            )
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.handoff.give_back(namespace, waiters);
                return Err(e);
            }
        };
        span.record("outcome", result.outcome.as_str());
        span.record("steps_enqueued", result.enqueued_steps.len());
        span.record("steps_handed_off", result.leased.len());
        self.deliver(namespace, waiters, &result.leased).await;
        for (queue, steps) in &result.queued {
            steps_queued(&self.handoff, &self.announcer, namespace, queue, *steps);
        }
        if !result.enqueued_steps.is_empty() {
            if let Some(ms) = result.max_ready_wait_ms {
                self.metrics
                    .completion_to_enqueue(ms, triggered_by.as_str());
            }
        }
        Ok(result)
    }

    /// After a completion's own transaction enqueued what it made ready (alone, or in a
    /// batch): the steps it did not lease wake the fetches of their queues like any enqueue's.
    pub fn enqueued_eagerly(&self, eager: &EagerEnqueue) {
        let result = &eager.result;
        if let Some(namespace) = &result.namespace {
            for (queue, steps) in &result.queued {
                steps_queued(&self.handoff, &self.announcer, namespace, queue, *steps);
            }
        }
        if !result.enqueued_steps.is_empty() {
            if let Some(ms) = result.max_ready_wait_ms {
                self.metrics
                    .completion_to_enqueue(ms, TriggeredBy::EagerDispatch.as_str());
            }
        }
    }

    /// Hand each taken fetch its leased steps; give back those that got none. A fetch that
    /// went away meanwhile cannot receive its steps: they go back on the queue (same attempt)
    /// for the next fetch.
    async fn deliver(&self, namespace: &str, waiters: Vec<Waiter>, leased: &[(usize, LeasedStep)]) {
        let mut unused = Vec::new();
        let mut undelivered = Vec::new();
        for (i, waiter) in waiters.into_iter().enumerate() {
            let steps: Vec<LeasedStep> = leased
                .iter()
                .filter(|(taker, _)| *taker == i)
                .map(|(_, s)| s.clone())
                .collect();
            if steps.is_empty() {
                unused.push(waiter);
                continue;
            }
            let worker_id = waiter.worker_id.clone();
            if let Err(steps) = waiter.deliver(steps) {
                undelivered.extend(steps.into_iter().map(|s| (s, worker_id.clone())));
            }
        }
        self.handoff.give_back(namespace, unused);
        release_undelivered(
            &self.store,
            &self.handoff,
            &self.announcer,
            namespace,
            undelivered,
        )
        .await;
    }
}

/// Put leased steps that never reached their worker back on the queue, at the same attempt
/// (the worker never had them), and wake the namespace's fetches for them, here and (through
/// the announcer, unless a fetch here takes them first) on the other replicas. A release that
/// fails leaves the lease to run out; the deadline scheduler then retries the step.
pub(crate) async fn release_undelivered(
    store: &Store,
    handoff: &ParkedFetches,
    announcer: &StepAnnouncer,
    namespace: &str,
    undelivered: Vec<(LeasedStep, String)>,
) {
    let mut released: Vec<String> = Vec::new();
    for (step, worker_id) in undelivered {
        match store
            .release_lease(step.step_uuid, step.attempt, &worker_id)
            .await
        {
            Ok(true) => released.push(step.queue),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, step_uuid = %step.step_uuid, "releasing an undelivered lease failed")
            }
        }
    }
    if !released.is_empty() {
        tracing::debug!(
            released = released.len(),
            "undelivered leases were put back on the queue"
        );
    }
    released.sort();
    for queue in released.chunk_by(|a, b| a == b) {
        steps_queued(handoff, announcer, namespace, &queue[0], queue.len());
    }
}

/// `steps` of a queue of `namespace` went onto the queue with no fetch holding them: wake as
/// many of the fetches parked here for that queue, and have the other replicas told unless a
/// fetch here takes them first.
fn steps_queued(
    handoff: &ParkedFetches,
    announcer: &StepAnnouncer,
    namespace: &str,
    queue: &str,
    steps: usize,
) {
    if steps > 0 {
        handoff.queued(namespace, Some(queue), steps);
        announcer.queued(namespace, queue, u32::try_from(steps).unwrap_or(u32::MAX));
    }
}
