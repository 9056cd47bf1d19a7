//! Step operations: claim-and-enqueue, and the workers' side (fetch with a lease, complete,
//! fail, extend), plus the retry and lease deadlines.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::answers::AttemptAnswer;
use super::{CreatedTask, Store, StoreError};
use crate::model::command::{EnqueueOutcome, TriggeredBy};
use crate::model::dag::NewTask;

#[derive(Debug, Clone, PartialEq)]
pub struct EnqueueResult {
    pub outcome: EnqueueOutcome,
    pub namespace: Option<String>,
    pub enqueued_steps: Vec<Uuid>,
    /// The longest wait, among the steps enqueued, from becoming ready (last parent complete)
    /// to enqueued, by the database clock.
    pub max_ready_wait_ms: Option<f64>,
    /// Steps leased in the same transaction to the parked fetches given as takers: (the
    /// taker's index, the step).
    pub leased: Vec<(usize, LeasedStep)>,
    /// Per queue, steps left on it that a fetch may lease now (a paused or full queue's not
    /// counted).
    pub queued: Vec<(String, usize)>,
    /// Steps enqueued and left waiting on their queue's pause or in-flight limit.
    pub held: usize,
}

/// What the enqueue in a completion's or a creation's own transaction did (eager dispatch,
/// eager start).
#[derive(Debug, Clone, PartialEq)]
pub struct EagerEnqueue {
    /// The completed step's task, or the task created.
    pub task_uuid: Uuid,
    /// The completed lease's worker, or the creating worker: `result.leased` are leased to it.
    pub worker_id: String,
    pub result: EnqueueResult,
}

/// A parked fetch that an enqueue may lease steps to, in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Taker {
    pub worker_id: String,
    /// Steps it takes at most.
    pub max: i32,
    pub lease_ms: i64,
    /// The queues it takes steps of; `None`: the default queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<std::sync::Arc<[String]>>,
}

/// A step whose state a maintenance function changed, with what a command for its task needs.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq, Eq)]
pub struct TaskRef {
    pub task_uuid: Uuid,
    pub step_uuid: Uuid,
    pub namespace: String,
    pub priority: i32,
}

/// A step leased to a worker.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, serde::Deserialize)]
pub struct LeasedStep {
    pub step_uuid: Uuid,
    pub task_uuid: Uuid,
    pub name: String,
    pub attempt: i32,
    pub inputs: Value,
    /// parent step name -> its results
    pub parent_results: Value,
    pub lease_expires_at: DateTime<Utc>,
    pub enqueued_at: DateTime<Utc>,
    /// Trace context of the enqueue that put this step on the queue.
    pub traceparent: Option<String>,
    /// Proves this lease: every report on the attempt must carry it.
    pub lease_token: Uuid,
    pub queue: String,
}

/// An attempt as the worker holding it names it: the step, the attempt, and the lease's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease {
    pub step_uuid: Uuid,
    pub attempt: i32,
    pub lease_token: Uuid,
}

impl LeasedStep {
    /// The lease as its holder reports on it.
    pub fn held(&self) -> HeldLease {
        HeldLease {
            step_uuid: self.step_uuid,
            attempt: self.attempt,
            lease_token: self.lease_token,
        }
    }
}

/// The answer to a worker's report on an attempt: done, or why it was refused (and nothing
/// was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Done,
    StepNotFound,
    Refused(Refusal),
    /// The results would give a child more parent results than the budget allows.
    ParentResultsTooLarge,
}

/// Why a report on an attempt was refused: what the worker should do about it is different
/// for each, so each has a reason a client can read (`google.rpc.ErrorInfo.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The lease token is not the lease's: the caller does not hold it.
    LeaseNotHeld,
    /// The lease ran out; the attempt is retried (or was) by the deadline scheduler.
    LeaseExpired,
    /// A later attempt of the step exists.
    StaleAttempt,
    /// The step's task was cancelled.
    TaskCancelled,
    /// The attempt is over: completed, failed, or resolved by an operator.
    NotInProgress,
    /// The attempt ran past its step's timeout and was ended as TIMED_OUT.
    TimedOut,
}

impl Refusal {
    /// The `ErrorInfo.reason` a client sees.
    pub fn reason(self) -> &'static str {
        match self {
            Self::LeaseNotHeld => "LEASE_NOT_HELD",
            Self::LeaseExpired => "LEASE_EXPIRED",
            Self::StaleAttempt => "STALE_ATTEMPT",
            Self::TaskCancelled => "TASK_CANCELLED",
            Self::NotInProgress => "NOT_IN_PROGRESS",
            Self::TimedOut => "TIMED_OUT",
        }
    }

    fn message(self, step_uuid: Uuid, attempt: i32) -> String {
        match self {
            Self::LeaseNotHeld => format!(
                "the lease_token is not the one attempt {attempt} of step {step_uuid} was leased with: this caller does not hold the lease"
            ),
            Self::LeaseExpired => {
                format!("the lease on attempt {attempt} of step {step_uuid} has expired")
            }
            Self::StaleAttempt => {
                format!("attempt {attempt} of step {step_uuid} is not the current attempt")
            }
            Self::TaskCancelled => format!(
                "the task of step {step_uuid} was cancelled: stop working on attempt {attempt}"
            ),
            Self::NotInProgress => format!("step {step_uuid} is not in progress"),
            Self::TimedOut => format!(
                "attempt {attempt} of step {step_uuid} ran past its timeout (StepDefinition.timeout) and was ended as TIMED_OUT: its result is not taken; the step's retry policy and max_attempts decide what follows"
            ),
        }
    }
}

impl AttemptOutcome {
    /// `done` is what `function` answers on success (`Completed`, `Extended`); any other
    /// answer that is not a refusal is a bug, reported with the word.
    fn of(
        function: &'static str,
        done: AttemptAnswer,
        answer: AttemptAnswer,
    ) -> Result<Self, StoreError> {
        use AttemptAnswer as A;
        Ok(match answer {
            A::StepNotFound => Self::StepNotFound,
            A::StaleAttempt => Self::Refused(Refusal::StaleAttempt),
            A::NotInProgress => Self::Refused(Refusal::NotInProgress),
            A::TaskCancelled => Self::Refused(Refusal::TaskCancelled),
            A::LeaseExpired => Self::Refused(Refusal::LeaseExpired),
            A::LeaseNotHeld => Self::Refused(Refusal::LeaseNotHeld),
            A::TimedOut => Self::Refused(Refusal::TimedOut),
            A::ParentResultsTooLarge => Self::ParentResultsTooLarge,
            a if a == done => Self::Done,
            other => return Err(StoreError::unexpected(function, other)),
        })
    }

    /// `Ok` for success, the matching error otherwise.
    pub fn into_result(self, step_uuid: Uuid, attempt: i32) -> Result<(), StoreError> {
        self.into_result_within(step_uuid, attempt, None)
    }

    /// [`AttemptOutcome::into_result`], naming the parent-results budget when it refused.
    pub fn into_result_within(
        self,
        step_uuid: Uuid,
        attempt: i32,
        parent_results_budget: Option<u32>,
    ) -> Result<(), StoreError> {
        match self {
            Self::Done => Ok(()),
            Self::StepNotFound => Err(StoreError::not_found(format!("step {step_uuid}"))),
            Self::Refused(refusal) => Err(StoreError::Refused {
                refusal,
                message: refusal.message(step_uuid, attempt),
            }),
            Self::ParentResultsTooLarge => {
                Err(parent_results_too_large(step_uuid, parent_results_budget))
            }
        }
    }
}

/// The refusal of results that would give a child of `step_uuid` more parent results than
/// the budget.
pub(super) fn parent_results_too_large(step_uuid: Uuid, budget: Option<u32>) -> StoreError {
    StoreError::invalid(
        "results",
        format!(
            "these results would give a step that depends on {step_uuid} more than {} bytes of its parents' results as sent (orchestration.workers.max_parent_results_bytes); nothing was recorded",
            budget.map_or_else(|| "the allowed".into(), |b| b.to_string())
        ),
    )
}

/// A worker's report that an attempt succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub lease: HeldLease,
    pub results: Value,
    pub traceparent: Option<String>,
    /// Eager dispatch: lease the steps this completion makes ready to the completing worker,
    /// as far as this asks (its worker id is the completed lease's, filled in by the database).
    pub next: Option<Taker>,
}

/// Bytes `results` take in a child's parent results as sent (a protobuf `Value`).
pub(super) fn results_bytes(results: &Value) -> i32 {
    i32::try_from(crate::proto::value_encoded_len(results)).unwrap_or(i32::MAX)
}

/// A worker's report that an attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFailure {
    /// Stored as the step's `last_error`.
    pub error: Value,
    /// false: no retry, whatever attempts remain.
    pub retryable: bool,
    /// Delay before the retry; 0 retries at once; `None`: the step's retry policy decides
    /// (none: at once).
    pub backoff_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailOutcome {
    RetryScheduled { next_retry_at: DateTime<Utc> },
    Failed,
}

/// The history metadata of an enqueue a completion ran itself, in a batch of `batched`.
fn eager_metadata(batched: usize) -> Value {
    let by = TriggeredBy::EagerDispatch.as_str();
    if batched > 1 {
        serde_json::json!({ "triggered_by": by, "batched": batched })
    } else {
        serde_json::json!({ "triggered_by": by })
    }
}

/// `tasker.claim_and_enqueue`'s answer, as selected.
#[derive(sqlx::FromRow)]
struct EnqueueRow {
    outcome: Option<EnqueueOutcome>,
    namespace: Option<String>,
    enqueued_steps: Vec<Uuid>,
    max_ready_wait_ms: Option<f64>,
    leased: Value,
    queued: Value,
    held: Value,
}

/// A completion's answer with the enqueue it ran itself (`tasker.complete_step_and_claim`).
#[derive(sqlx::FromRow)]
struct EagerRow {
    completion: AttemptAnswer,
    task_uuid: Option<Uuid>,
    worker_id: Option<String>,
    #[sqlx(flatten)]
    enqueue: EnqueueRow,
}

impl EagerRow {
    /// The completion's outcome (a refusal as its error), and the enqueue when one ran.
    fn answer(
        self,
        function: &'static str,
        lease: HeldLease,
        budget: Option<u32>,
    ) -> Result<Option<EagerEnqueue>, StoreError> {
        AttemptOutcome::of(function, AttemptAnswer::Completed, self.completion)?
            .into_result_within(lease.step_uuid, lease.attempt, budget)?;
        let (Some(task_uuid), Some(worker_id), Some(_)) =
            (self.task_uuid, self.worker_id, self.enqueue.outcome)
        else {
            return Ok(None);
        };
        Ok(Some(EagerEnqueue {
            task_uuid,
            worker_id,
            result: enqueue_result(function, self.enqueue)?,
        }))
    }
}

/// An enqueue's answer read: the leased steps with their takers, the steps left per queue.
fn enqueue_result(function: &'static str, row: EnqueueRow) -> Result<EnqueueResult, StoreError> {
    #[derive(serde::Deserialize)]
    struct Leased {
        taker: usize,
        #[serde(flatten)]
        step: LeasedStep,
    }
    #[derive(serde::Deserialize)]
    struct Queued {
        queue: String,
        steps: usize,
    }
    let bad = |e: serde_json::Error| StoreError::unexpected(function, e.to_string());
    let leased: Vec<Leased> = serde_json::from_value(row.leased).map_err(bad)?;
    let queued: Vec<Queued> = serde_json::from_value(row.queued).map_err(bad)?;
    let held: Vec<Queued> = serde_json::from_value(row.held).map_err(bad)?;
    Ok(EnqueueResult {
        outcome: row
            .outcome
            .ok_or_else(|| StoreError::unexpected(function, "no outcome"))?,
        namespace: row.namespace,
        enqueued_steps: row.enqueued_steps,
        max_ready_wait_ms: row.max_ready_wait_ms,
        leased: leased.into_iter().map(|l| (l.taker, l.step)).collect(),
        queued: queued.into_iter().map(|q| (q.queue, q.steps)).collect(),
        held: held.iter().map(|q| q.steps).sum(),
    })
}

impl Store {
    /// Claim the task and enqueue its ready steps, in one transaction, leasing the first of
    /// them to `takers` (parked fetches, first come first served). `traceparent` is stored
    /// with the queue messages for the worker's side of the trace.
    pub async fn claim_and_enqueue(
        &self,
        task_uuid: Uuid,
        metadata: &Value,
        traceparent: Option<&str>,
        takers: &[Taker],
        announce_as: Option<Uuid>,
    ) -> Result<EnqueueResult, StoreError> {
        let takers = serde_json::to_value(takers).expect("takers serialize");
        let row = sqlx::query_as(
            "SELECT e.outcome, e.namespace, e.enqueued_steps, e.max_ready_wait_ms, e.leased, e.queued, e.held
             FROM (SELECT set_config('tasker.traceparent', coalesce($3, ''), true)) tp,
                  tasker.claim_and_enqueue($1, $2, $4, $5) e",
        )
        .bind(task_uuid)
        .bind(metadata)
        .bind(traceparent)
        .bind(takers)
        .bind(announce_as);
        let mut held = self.hot().await?;
        let row = row.fetch_one(held.conn()).await;
        let row: EnqueueRow = held.finish(row)?;
        enqueue_result("tasker.claim_and_enqueue", row)
    }

    /// Complete an attempt the caller holds and, in the same transaction, claim its task and
    /// enqueue the steps it made ready, leasing them to the completing worker as far as `next`
    /// asks (its worker id is the completed lease's; eager dispatch,
    /// `tasker.complete_step_and_claim`). `None` when no claim was tried: the completion made
    /// nothing ready.
    pub async fn complete_step_and_claim(
        &self,
        completion: &Completion,
    ) -> Result<Option<EagerEnqueue>, StoreError> {
        let lease = completion.lease;
        let takers = serde_json::to_value([&completion.next]).expect("takers serialize");
        let row = sqlx::query_as(
            "SELECT e.completion, e.task_uuid, e.worker_id, e.outcome, e.namespace, e.enqueued_steps, e.max_ready_wait_ms, e.leased, e.queued, e.held
             FROM (SELECT set_config('tasker.traceparent', coalesce($5, ''), true)) tp,
                  tasker.complete_step_and_claim($1, $2, $3, $4, $6, $7, $8, $9, $10) e",
        )
        .bind(lease.step_uuid)
        .bind(lease.attempt)
        .bind(lease.lease_token)
        .bind(&completion.results)
        .bind(completion.traceparent.as_deref())
        .bind(results_bytes(&completion.results))
        .bind(serde_json::json!({}))
        .bind(self.parent_results_budget())
        .bind(eager_metadata(1))
        .bind(takers);
        let mut held = self.hot().await?;
        let row = row.fetch_one(held.conn()).await;
        let row: EagerRow = held.finish(row)?;
        row.answer(
            "tasker.complete_step_and_claim",
            lease,
            self.limits.max_parent_results_bytes,
        )
    }

    /// Create a task and, in the same transaction, claim it and enqueue its ready steps,
    /// leasing them to `taker` as far as it asks (eager start,
    /// `tasker.create_task_and_claim`): what [`create_task`](Self::create_task) returns, and
    /// the enqueue when one ran (none for an existing task the idempotency key named, or a
    /// task that starts later).
    pub async fn create_task_and_claim(
        &self,
        task: &NewTask,
        metadata: &Value,
        traceparent: Option<&str>,
        taker: &Taker,
    ) -> Result<(CreatedTask, Option<EagerEnqueue>), StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            task_uuid: Uuid,
            created: bool,
            step_names: Vec<String>,
            step_uuids: Vec<Uuid>,
            #[sqlx(flatten)]
            enqueue: EnqueueRow,
        }
        const FUNCTION: &str = "tasker.create_task_and_claim";
        let steps = serde_json::to_value(&task.steps).expect("steps serialize");
        let takers = serde_json::to_value([taker]).expect("takers serialize");
        let query = sqlx::query_as(
            "SELECT c.task_uuid, c.created, c.step_names, c.step_uuids, c.outcome, c.namespace, c.enqueued_steps, c.max_ready_wait_ms, c.leased, c.queued, c.held
             FROM (SELECT set_config('tasker.traceparent', coalesce($9, ''), true)) tp,
                  tasker.create_task_and_claim($1, $2, $3, $4, $5, $6, $7, $8, $10, $11, $12, $13, $14, $15, $16) c",
        )
        .bind(task.task_uuid)
        .bind(&task.namespace)
        .bind(&task.name)
        .bind(task.priority)
        .bind(&task.context)
        .bind(&task.idempotency_key)
        .bind(steps)
        .bind(metadata)
        .bind(traceparent)
        .bind(self.limits.max_namespaces.map(|n| n as i32))
        .bind(task.context_bytes)
        .bind(!self.limits.no_namespaces_on_first_use)
        .bind(&task.concurrency_key)
        .bind(task.start_at)
        .bind(eager_metadata(1))
        .bind(takers);
        // a large task is the one request that can run long: if its client gives up, so does
        // the database (as for create_task)
        let mut held = self.hot().await?;
        held.cancel_if_abandoned().await?;
        let row: Result<Option<Row>, _> = query.fetch_optional(held.conn()).await;
        let row = held
            .finish(row)?
            .ok_or_else(|| StoreError::invalid("steps", "a task needs at least one step"))?;
        let created = CreatedTask {
            task_uuid: row.task_uuid,
            created: row.created,
            steps: row.step_names.into_iter().zip(row.step_uuids).collect(),
        };
        let eager = match row.enqueue.outcome {
            Some(_) => Some(EagerEnqueue {
                task_uuid: row.task_uuid,
                worker_id: taker.worker_id.clone(),
                result: enqueue_result(FUNCTION, row.enqueue)?,
            }),
            None => None,
        };
        Ok((created, eager))
    }

    /// Put back on the queue a step leased to a fetch that went away before receiving it.
    pub async fn release_lease(
        &self,
        step_uuid: Uuid,
        attempt: i32,
        worker_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT tasker.release_lease($1, $2, $3)")
                .bind(step_uuid)
                .bind(attempt)
                .bind(worker_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Lease up to `max` queued steps of `namespace`'s `queues` (in that order) to
    /// `worker_id` for `lease_ms`, as far as each queue's pause and limit allow.
    pub async fn fetch_steps(
        &self,
        namespace: &str,
        queues: &[String],
        worker_id: &str,
        max: i32,
        lease_ms: i64,
    ) -> Result<Vec<LeasedStep>, StoreError> {
        let steps =
            sqlx::query_as::<_, LeasedStep>("SELECT * FROM tasker.fetch_steps($1, $2, $3, $4, $5)")
                .bind(namespace)
                .bind(queues)
                .bind(worker_id)
                .bind(max)
                .bind(lease_ms);
        let mut held = self.hot().await?;
        let steps = steps.fetch_all(held.conn()).await;
        held.finish(steps)
    }

    pub(super) fn parent_results_budget(&self) -> Option<i32> {
        self.limits
            .max_parent_results_bytes
            .map(|b| i32::try_from(b).unwrap_or(i32::MAX))
    }

    /// Complete an attempt the caller holds a live lease on. `traceparent` travels into the
    /// notification the completion causes.
    pub async fn complete_step(
        &self,
        lease: HeldLease,
        results: &Value,
        metadata: &Value,
        traceparent: Option<&str>,
    ) -> Result<(), StoreError> {
        let outcome = sqlx::query_scalar(
            "SELECT c.outcome
             FROM (SELECT set_config('tasker.traceparent', coalesce($5, ''), true)) tp,
                  tasker.complete_attempt($1, $2, $7, $3, $8, $4, $6, true) c",
        )
        .bind(lease.step_uuid)
        .bind(lease.attempt)
        .bind(results)
        .bind(metadata)
        .bind(traceparent)
        .bind(self.parent_results_budget())
        .bind(lease.lease_token)
        .bind(results_bytes(results));
        let mut held = self.hot().await?;
        let outcome = outcome.fetch_one(held.conn()).await;
        let outcome: AttemptAnswer = held.finish(outcome)?;
        AttemptOutcome::of("tasker.complete_step", AttemptAnswer::Completed, outcome)?
            .into_result_within(
                lease.step_uuid,
                lease.attempt,
                self.limits.max_parent_results_bytes,
            )
    }

    /// Whether attempt `attempt` of the step completed with exactly `results` (JSON equality;
    /// no results stand for `{}`, as `complete_step` stores them): a retried completion whose
    /// first answer was lost.
    pub async fn completed_with(
        &self,
        step_uuid: Uuid,
        attempt: i32,
        results: &Value,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tasker.workflow_steps s
                            WHERE s.step_uuid = $1 AND s.state = 'complete' AND s.attempts = $2
                              AND s.results = coalesce($3::jsonb, '{}'::jsonb))",
        )
        .bind(step_uuid)
        .bind(attempt)
        .bind(results)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Complete several attempts in one transaction; each item's outcome, in input order, with
    /// the enqueue an item asking for its next steps ran (`Completion::next`). Items are
    /// independent: a stale one is refused without affecting the others.
    pub async fn complete_steps(
        &self,
        items: &[Completion],
    ) -> Result<Vec<Result<Option<EagerEnqueue>, StoreError>>, StoreError> {
        let steps: Vec<Uuid> = items.iter().map(|c| c.lease.step_uuid).collect();
        let attempts: Vec<i32> = items.iter().map(|c| c.lease.attempt).collect();
        let tokens: Vec<Uuid> = items.iter().map(|c| c.lease.lease_token).collect();
        let results: Vec<Value> = items.iter().map(|c| c.results.clone()).collect();
        let sizes: Vec<i32> = items.iter().map(|c| results_bytes(&c.results)).collect();
        let traces: Vec<Option<String>> = items.iter().map(|c| c.traceparent.clone()).collect();
        let takers: Vec<Option<Value>> = items
            .iter()
            .map(|c| {
                c.next
                    .as_ref()
                    .map(|t| serde_json::to_value(t).expect("taker serializes"))
            })
            .collect();
        #[derive(sqlx::FromRow)]
        struct Row {
            idx: i32,
            #[sqlx(flatten)]
            eager: EagerRow,
        }
        let rows = sqlx::query_as(
            "SELECT idx, completion, task_uuid, worker_id, outcome, namespace, enqueued_steps, max_ready_wait_ms, leased, queued, held
             FROM tasker.complete_steps_and_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&steps)
        .bind(&attempts)
        .bind(&tokens)
        .bind(&results)
        .bind(&sizes)
        .bind(&traces)
        .bind(&takers)
        .bind(serde_json::json!({"batched": items.len()}))
        .bind(eager_metadata(items.len()))
        .bind(self.parent_results_budget());
        let mut held = self.hot().await?;
        let rows = rows.fetch_all(held.conn()).await;
        let rows: Vec<Row> = held.finish(rows)?;
        let mut out: Vec<Result<Option<EagerEnqueue>, StoreError>> = items
            .iter()
            .map(|c| Err(StoreError::not_found(format!("step {}", c.lease.step_uuid))))
            .collect();
        for row in rows {
            let i = (row.idx - 1) as usize;
            out[i] = row.eager.answer(
                "tasker.complete_steps_and_claim",
                items[i].lease,
                self.limits.max_parent_results_bytes,
            );
        }
        Ok(out)
    }

    pub async fn fail_step(
        &self,
        lease: HeldLease,
        failure: &StepFailure,
        metadata: &Value,
        traceparent: Option<&str>,
    ) -> Result<FailOutcome, StoreError> {
        let (outcome, next): (AttemptAnswer, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT f.outcome, f.next_retry_at
             FROM (SELECT set_config('tasker.traceparent', coalesce($7, ''), true)) tp,
                  tasker.fail_step($1, $2, $8, $3, $4, $5, $6) f",
        )
        .bind(lease.step_uuid)
        .bind(lease.attempt)
        .bind(&failure.error)
        .bind(failure.retryable)
        .bind(failure.backoff_ms)
        .bind(metadata)
        .bind(traceparent)
        .bind(lease.lease_token)
        .fetch_one(&self.pool)
        .await?;
        let (step_uuid, attempt) = (lease.step_uuid, lease.attempt);
        match (outcome, next) {
            (AttemptAnswer::RetryScheduled, Some(at)) => {
                Ok(FailOutcome::RetryScheduled { next_retry_at: at })
            }
            (AttemptAnswer::Failed, _) => Ok(FailOutcome::Failed),
            (other, _) => {
                // a refusal is an error here; "retry_scheduled" without a time is not an answer
                AttemptOutcome::of("tasker.fail_step", AttemptAnswer::Failed, other)?
                    .into_result(step_uuid, attempt)?;
                Err(StoreError::unexpected("tasker.fail_step", other))
            }
        }
    }

    pub async fn extend_lease(
        &self,
        lease: HeldLease,
        lease_ms: i64,
    ) -> Result<DateTime<Utc>, StoreError> {
        let (outcome, until): (AttemptAnswer, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT outcome, lease_expires_at FROM tasker.extend_lease($1, $2, $3, $4)",
        )
        .bind(lease.step_uuid)
        .bind(lease.attempt)
        .bind(lease.lease_token)
        .bind(lease_ms)
        .fetch_one(&self.pool)
        .await?;
        AttemptOutcome::of("tasker.extend_lease", AttemptAnswer::Extended, outcome)?
            .into_result(lease.step_uuid, lease.attempt)?;
        until
            .ok_or_else(|| StoreError::unexpected("tasker.extend_lease", "extended without a time"))
    }

    /// Steps whose backoff elapsed go back to pending, in the namespaces matching `namespaces`
    /// (`None`: all).
    pub async fn promote_due_retries(
        &self,
        limit: i32,
        namespaces: Option<&[String]>,
    ) -> Result<Vec<TaskRef>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT task_uuid, step_uuid, namespace, priority FROM tasker.promote_due_retries($1, $2)",
        )
        .bind(limit)
        .bind(namespaces)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Tasks whose start time came: their root steps join the ready set (one row per root),
    /// in the namespaces matching `namespaces` (`None`: all).
    pub async fn promote_due_starts(
        &self,
        limit: i32,
        namespaces: Option<&[String]>,
    ) -> Result<Vec<TaskRef>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT task_uuid, step_uuid, namespace, priority FROM tasker.promote_due_starts($1, $2)",
        )
        .bind(limit)
        .bind(namespaces)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Fail for good the queued steps no worker took within their schedule_to_start, in the
    /// namespaces matching `namespaces` (`None`: all).
    pub async fn fail_unstarted_steps(
        &self,
        limit: i32,
        namespaces: Option<&[String]>,
    ) -> Result<Vec<TaskRef>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT task_uuid, step_uuid, namespace, priority FROM tasker.fail_unstarted_steps($1, $2)",
        )
        .bind(limit)
        .bind(namespaces)
        .fetch_all(&self.pool)
        .await?)
    }

    /// End attempts whose lease ran out (retry or final failure per max_attempts).
    pub async fn expire_leases(
        &self,
        limit: i32,
        namespaces: Option<&[String]>,
    ) -> Result<Vec<TaskRef>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT task_uuid, step_uuid, namespace, priority FROM tasker.expire_leases($1, $2)",
        )
        .bind(limit)
        .bind(namespaces)
        .fetch_all(&self.pool)
        .await?)
    }

    /// When the next retry becomes due or the next lease runs out, if ever.
    pub async fn next_deadline(
        &self,
        namespaces: Option<&[String]>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT tasker.next_deadline($1)")
            .bind(namespaces)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Queue messages waiting (not leased) in a namespace, for status and tests.
    pub async fn queue_depth(&self, namespace: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM tasker.step_queue WHERE namespace = $1 AND leased_by IS NULL",
        )
        .bind(namespace)
        .fetch_one(&self.pool)
        .await?)
    }
}
