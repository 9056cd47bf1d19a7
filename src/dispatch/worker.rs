//! `WorkerQueue`: the workers' side of the loop. Lease ready steps from a namespace's queue
//! (long-polling until one is enqueued), complete them, fail them (retry with backoff, or
//! final), extend a lease. Completing a step is what fires the readiness trigger.
//!
//! A long-poll that finds the queue empty parks on its namespace; the next enqueue of that
//! namespace leases its steps to the parked fetches in its own transaction and hands them over
//! (`parked::ParkedFetches`), so a waiting worker receives its step without a transaction of
//! its own. The hand-off is in-process: a step another replica enqueued wakes the fetches
//! parked here through its announcement (`tasker_steps_enqueued`, see `announce`), and they
//! read the queue; the periodic re-read (`orchestration.workers.fetch_recheck_interval_ms`)
//! only bounds the wait when an announcement was lost.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::announce::StepAnnouncer;
use crate::dispatch::completions::CompletionBatcher;
use crate::dispatch::deadlines::DeadlinePoke;
use crate::dispatch::enqueue::{release_undelivered, TaskClaimStepEnqueuer};
use crate::dispatch::parked::ParkedFetches;
use crate::dispatch::parked::{Queues, Ticket};
use crate::dispatch::quota::{Limit, Place, Quota};
use crate::model::dag::NewTask;
use crate::store::{
    Completion, CreatedTask, EagerEnqueue, FailOutcome, HeldLease, LeasedStep, Refusal,
    StepFailure, Store, StoreError, Taker,
};

/// A span for a step handed to a worker, in the trace of the enqueue that queued it (and so,
/// for a step made ready by a completion, in the completing request's trace), linked to the
/// fetch request that took it.
fn lease_span(step: &LeasedStep, worker_id: &str) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(cx) = step
        .traceparent
        .as_deref()
        .and_then(|tp| crate::telemetry::context_from_traceparent(tp, None))
    else {
        return;
    };
    let fetch = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .clone();
    let span = tracing::info_span!(
        parent: None,
        "step.lease",
        step_uuid = %step.step_uuid,
        task_uuid = %step.task_uuid,
        step_name = %step.name,
        attempt = step.attempt,
        worker_id = %worker_id,
    );
    let _ = span.set_parent(cx);
    if fetch.is_valid() {
        span.add_link(fetch);
    }
}

/// What a completion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    Recorded,
    /// The same attempt had completed with the same results before (a retried call).
    AlreadyRecorded,
}

#[derive(Clone)]
pub struct WorkerQueue {
    store: Store,
    handoff: ParkedFetches,
    /// Told of the steps fetches here take from the queue (see `announce`).
    announcer: StepAnnouncer,
    deadlines: DeadlinePoke,
    /// `None`: every completion commits on its own (max_batch = 1).
    batcher: Option<CompletionBatcher>,
    /// Wakes the fetches for what a completion's own enqueue left queued (eager dispatch).
    enqueuer: TaskClaimStepEnqueuer,
    recheck: Duration,
    /// Fetches parked waiting for a step, in all, per namespace and per caller: one caller or
    /// one namespace cannot take every place and block long-polling everywhere else.
    parking: Arc<Quota>,
    /// Set when the core shuts down: every worker call answers `ShuttingDown` (UNAVAILABLE:
    /// retry on another instance) and parked fetches return.
    stopped: CancellationToken,
}

/// What a completing worker asks for next (`CompleteStepRequest.next`).
#[derive(Debug, Clone, Copy)]
pub struct NextSteps<'a> {
    /// The queues of the task's namespace it takes steps of (not empty).
    pub queues: &'a [String],
    /// Steps leased at most.
    pub max: i32,
    pub lease: Duration,
}

/// A long-poll for steps.
pub struct Fetch<'a> {
    pub namespace: &'a str,
    /// The queues of the namespace it takes steps of, in order (not empty).
    pub queues: &'a [String],
    pub worker_id: &'a str,
    /// Who asks (a token's name, or a peer's address): parked fetches are capped per caller.
    pub caller: &'a str,
    /// Steps leased at most.
    pub max: i32,
    /// How long to wait for the first step.
    pub wait: Duration,
    pub lease: Duration,
}

/// An idle parked fetch re-reads the queue at the recheck interval, then at twice it, and so
/// on up to this many times it: long idle waits cost few queries.
const MAX_RECHECK_BACKOFF: u32 = 8;

impl WorkerQueue {
    pub fn new(
        store: Store,
        handoff: ParkedFetches,
        announcer: StepAnnouncer,
        deadlines: DeadlinePoke,
        enqueuer: TaskClaimStepEnqueuer,
        cfg: &crate::config::OrchestrationConfig,
    ) -> Self {
        let c = &cfg.completions;
        let batcher = (c.max_batch > 1)
            .then(|| CompletionBatcher::spawn(store.clone(), c.max_batch, c.executors));
        Self {
            store,
            handoff,
            announcer,
            deadlines,
            batcher,
            enqueuer,
            recheck: cfg.workers.fetch_recheck_interval,
            parking: Quota::new(
                Limit {
                    max: cfg.workers.max_parked_fetches,
                    setting: "orchestration.workers.max_parked_fetches",
                },
                &[
                    Limit {
                        max: cfg.workers.max_parked_fetches_per_namespace,
                        setting: "orchestration.workers.max_parked_fetches_per_namespace",
                    },
                    Limit {
                        max: cfg.workers.max_parked_fetches_per_caller,
                        setting: "orchestration.workers.max_parked_fetches_per_caller",
                    },
                ],
            ),
            stopped: CancellationToken::new(),
        }
    }

    /// Refuse new calls, let parked fetches return, commit the completions already queued.
    pub async fn shutdown(&self) {
        self.stopped.cancel();
        if let Some(b) = &self.batcher {
            b.shutdown().await;
        }
    }

    fn check_running(&self) -> Result<(), StoreError> {
        if self.stopped.is_cancelled() {
            return Err(StoreError::ShuttingDown);
        }
        Ok(())
    }

    /// How many fetches are parked waiting for a step right now.
    pub fn parked_fetches(&self) -> watch::Receiver<usize> {
        self.parking.held()
    }

    /// Lease up to `max` steps, waiting up to `wait` for the first to be enqueued (the worker
    /// counts as its own caller for the parking limits).
    pub async fn fetch(
        &self,
        namespace: &str,
        worker_id: &str,
        max: i32,
        wait: Duration,
        lease: Duration,
    ) -> Result<Vec<LeasedStep>, StoreError> {
        let request = Fetch {
            namespace,
            queues: &[crate::model::namespaces::DEFAULT_QUEUE.to_string()],
            worker_id,
            caller: worker_id,
            max,
            wait,
            lease,
        };
        self.fetch_until(request, std::future::pending()).await
    }

    /// [`WorkerQueue::fetch`], whose waiting (never a query in flight, so no lease is lost)
    /// also ends when `stop` resolves.
    pub async fn fetch_until(
        &self,
        request: Fetch<'_>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Vec<LeasedStep>, StoreError> {
        let Fetch {
            namespace,
            queues,
            worker_id,
            caller,
            max,
            wait,
            lease,
        } = request;
        let queues: Queues = queues.into();
        self.check_running()?;
        tokio::pin!(stop);
        let deadline = Instant::now() + wait;
        let lease_ms = lease.as_millis() as i64;
        // held from the first time this fetch parks until it returns
        let mut slot: Option<Place> = None;
        let mut recheck = self.recheck;
        loop {
            let epoch = match self.handoff.known_empty(namespace, &queues, self.recheck) {
                // a read found the queue empty and nothing was queued here since: wait for
                // the next enqueue without reading it again
                Some(epoch) if Instant::now() < deadline => epoch,
                _ => {
                    let epoch = self.handoff.epoch(namespace);
                    let steps = self
                        .store
                        .fetch_steps(namespace, &queues, worker_id, max, lease_ms)
                        .await?;
                    // taken here: no need to tell the other replicas of them
                    for queue in queues.iter() {
                        let n = steps.iter().filter(|s| &s.queue == queue).count();
                        if n > 0 {
                            self.announcer.taken(namespace, queue, n);
                        }
                    }
                    if !steps.is_empty() || Instant::now() >= deadline {
                        return Ok(self.leased(steps, worker_id));
                    }
                    self.handoff.found_empty(namespace, &queues, epoch);
                    epoch
                }
            };
            if slot.is_none() {
                slot = Some(self.parking.take(&[namespace, caller]).map_err(|full| {
                    StoreError::ResourceExhausted(format!(
                        "{} FetchSteps calls are waiting already{} ({}); retry later",
                        full.count,
                        match full.key {
                            Some(_) if full.setting.ends_with("per_caller") =>
                                " from this caller".to_string(),
                            Some(key) => format!(" in namespace {key:?}"),
                            None => String::new(),
                        },
                        full.setting
                    ))
                })?);
            }
            let now = Instant::now();
            let mut ticket = self
                .handoff
                .park(namespace, &queues, worker_id, max, lease_ms);
            if self.handoff.epoch(namespace) != epoch && ticket.withdraw() {
                // steps were queued since the queue was found empty: read it
                continue;
            }
            let slice = (deadline - now).min(recheck);
            let woken = tokio::select! {
                d = &mut ticket.delivery => Some(d),
                _ = tokio::time::sleep(slice) => None,
                _ = &mut stop => return Ok(self.on_leaving(ticket, worker_id).await),
                _ = self.stopped.cancelled() => return Ok(self.on_leaving(ticket, worker_id).await),
            };
            match woken {
                // leased to this fetch in the enqueue's own transaction
                Some(Ok(steps)) => return Ok(self.leased(steps, worker_id)),
                // a plain wake-up: steps were queued; read the queue
                Some(Err(_)) => continue,
                // the periodic re-read (an announcement of another replica's steps was
                // lost), or the deadline;
                // the next one comes later, while nothing turns up
                None => {
                    let steps = self.on_leaving(ticket, worker_id).await;
                    if !steps.is_empty() {
                        return Ok(steps);
                    }
                    recheck = (recheck * 2).min(self.recheck * MAX_RECHECK_BACKOFF);
                }
            }
        }
    }

    /// Steps leased to `worker_id` that its response cannot carry (over the response budget):
    /// back on the queue at the same attempt, for the next fetch.
    pub async fn give_back(&self, namespace: &str, worker_id: &str, steps: Vec<LeasedStep>) {
        let undelivered = steps
            .into_iter()
            .map(|s| (s, worker_id.to_string()))
            .collect();
        release_undelivered(
            &self.store,
            &self.handoff,
            &self.announcer,
            namespace,
            undelivered,
        )
        .await;
    }

    /// A step leased for a fetch that no response can carry: it fails for good (retrying
    /// cannot help), with `why` as its error, so that its task goes into error where an
    /// operator sees it, instead of the step being leased and lost attempt after attempt.
    pub async fn fail_undeliverable(&self, step: &LeasedStep, why: &str) {
        tracing::warn!(step_uuid = %step.step_uuid, task_uuid = %step.task_uuid, reason = why, "a leased step cannot be delivered; failing it");
        let failure = StepFailure {
            error: serde_json::json!({ "message": format!("undeliverable: {why}") }),
            retryable: false,
            backoff_ms: None,
        };
        let metadata = serde_json::json!({ "reason": "undeliverable" });
        if let Err(e) = self
            .store
            .fail_step(step.held(), &failure, &metadata, None)
            .await
        {
            // the lease runs out and the step is retried: the next delivery tries again
            tracing::warn!(step_uuid = %step.step_uuid, error = %e, "failing an undeliverable step failed");
        }
    }

    /// Leaving the queue of parked fetches: if an enqueue took this fetch meanwhile, its steps
    /// are on their way, leased to this worker: wait for them rather than strand them.
    async fn on_leaving(&self, mut ticket: Ticket, worker_id: &str) -> Vec<LeasedStep> {
        if ticket.withdraw() {
            return Vec::new();
        }
        match (&mut ticket.delivery).await {
            Ok(steps) => self.leased(steps, worker_id),
            Err(_) => Vec::new(),
        }
    }

    /// Steps leased to this worker: their trace spans, and the lease deadline for the
    /// scheduler (a dead worker's steps must come back when their lease runs out).
    fn leased(&self, steps: Vec<LeasedStep>, worker_id: &str) -> Vec<LeasedStep> {
        for s in &steps {
            lease_span(s, worker_id);
        }
        if let Some(first_expiry) = steps.iter().map(|s| s.lease_expires_at).min() {
            self.deadlines.deadline_at(first_expiry);
        }
        steps
    }

    pub async fn complete(
        &self,
        lease: HeldLease,
        results: &Value,
        worker_id: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<CompleteOutcome, StoreError> {
        self.check_running()?;
        let done = match &self.batcher {
            Some(b) => b
                .complete(Completion {
                    lease,
                    results: results.clone(),
                    traceparent: traceparent.map(str::to_string),
                    next: None,
                })
                .await
                .map(|_| ()),
            None => {
                let metadata = serde_json::json!({ "worker_id": worker_id });
                self.store
                    .complete_step(lease, results, &metadata, traceparent)
                    .await
            }
        };
        self.recorded(done, lease, results).await
    }

    /// Eager dispatch: complete the attempt and lease the steps it made ready to this worker
    /// in the same transaction, as far as `next` asks (see `enqueue`), batched with the
    /// completions waiting like any other. The steps leased (none for a retried completion
    /// already recorded), and what the enqueue did.
    pub async fn complete_and_lease(
        &self,
        lease: HeldLease,
        results: &Value,
        traceparent: Option<&str>,
        next: NextSteps<'_>,
    ) -> Result<(CompleteOutcome, Option<EagerEnqueue>), StoreError> {
        self.check_running()?;
        let completion = Completion {
            lease,
            results: results.clone(),
            traceparent: traceparent.map(str::to_string),
            next: Some(Taker {
                // the completed lease's holder, filled in by the database
                worker_id: String::new(),
                max: next.max,
                lease_ms: next.lease.as_millis() as i64,
                queues: Some(next.queues.into()),
            }),
        };
        let done = match &self.batcher {
            Some(b) => b.complete(completion).await,
            None => self.store.complete_step_and_claim(&completion).await,
        };
        match done {
            Ok(eager) => {
                if let Some(e) = &eager {
                    self.leased_eagerly(e);
                }
                Ok((CompleteOutcome::Recorded, eager))
            }
            Err(e) => Ok((self.recorded(Err(e), lease, results).await?, None)),
        }
    }

    /// Eager start: create the task and lease the steps it makes ready to `worker_id` in the
    /// creation's transaction, as far as `next` asks. The task as `Store::create_task`
    /// returns it, and what the enqueue did (none for an existing task its idempotency key
    /// named, or one that starts later).
    pub async fn create_and_lease(
        &self,
        task: &NewTask,
        metadata: &Value,
        traceparent: Option<&str>,
        worker_id: &str,
        next: NextSteps<'_>,
    ) -> Result<(CreatedTask, Option<EagerEnqueue>), StoreError> {
        self.check_running()?;
        let taker = Taker {
            worker_id: worker_id.to_string(),
            max: next.max,
            lease_ms: next.lease.as_millis() as i64,
            queues: Some(next.queues.into()),
        };
        let (created, eager) = self
            .store
            .create_task_and_claim(task, metadata, traceparent, &taker)
            .await?;
        if let Some(e) = &eager {
            self.leased_eagerly(e);
        }
        Ok((created, eager))
    }

    /// After an enqueue in a completion's or a creation's own transaction: the steps it did
    /// not lease wake their queues' fetches; the leased ones get their trace spans, and their
    /// lease deadline goes to the scheduler.
    fn leased_eagerly(&self, e: &EagerEnqueue) {
        self.enqueuer.enqueued_eagerly(e);
        let steps = e.result.leased.iter().map(|(_, s)| s.clone()).collect();
        self.leased(steps, &e.worker_id);
    }

    /// A completion's answer: a refusal because the attempt is over is, if this very
    /// completion was recorded before, a retry whose answer was lost, answered as done.
    async fn recorded(
        &self,
        done: Result<(), StoreError>,
        lease: HeldLease,
        results: &Value,
    ) -> Result<CompleteOutcome, StoreError> {
        match done {
            Ok(()) => Ok(CompleteOutcome::Recorded),
            Err(StoreError::Refused {
                refusal: Refusal::NotInProgress,
                message,
            }) => {
                if self
                    .store
                    .completed_with(lease.step_uuid, lease.attempt, results)
                    .await?
                {
                    Ok(CompleteOutcome::AlreadyRecorded)
                } else {
                    Err(StoreError::Refused {
                        refusal: Refusal::NotInProgress,
                        message,
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    pub async fn fail(
        &self,
        lease: HeldLease,
        failure: &StepFailure,
        traceparent: Option<&str>,
    ) -> Result<FailOutcome, StoreError> {
        self.check_running()?;
        let outcome = self
            .store
            .fail_step(lease, failure, &serde_json::json!({}), traceparent)
            .await?;
        if let FailOutcome::RetryScheduled { next_retry_at } = &outcome {
            // the scheduler may be sleeping past this retry's due time
            self.deadlines.deadline_at(*next_retry_at);
        }
        Ok(outcome)
    }

    pub async fn extend_lease(
        &self,
        lease: HeldLease,
        duration: Duration,
    ) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
        self.check_running()?;
        let until = self
            .store
            .extend_lease(lease, duration.as_millis() as i64)
            .await?;
        self.deadlines.deadline_at(until);
        Ok(until)
    }
}
