//! `tasker.v1.WorkerService`: lease steps (long-poll), complete, fail, extend a lease; the
//! same calls on one stream in `work_stream`.

use std::time::Duration;

use serde_json::json;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Caller;
use super::context::ApiContext;
use super::convert::{self, bounded, repeated_entry_len, uuid};
use super::error::{invalid, Violations};
use crate::dispatch::worker::{CompleteOutcome, Fetch, NextSteps};
use crate::model::command::TriggeredBy;
use crate::model::dag::name_problem;
use crate::model::namespaces::{namespace_name_problem, queue_name_problem, DEFAULT_QUEUE};
use crate::model::retry::MAX_BACKOFF_MS;
use crate::proto::struct_to_json;
use crate::proto::{self, v1};
use crate::readiness::commands::OrchestrationCommand;
use crate::store::{EagerEnqueue, FailOutcome, HeldLease, LeasedStep, StepFailure};
use uuid::Uuid;

const MAX_STEPS_PER_FETCH: i64 = 100;
/// Queues one fetch may name: a worker serves a few services' steps, not a catalogue.
const MAX_QUEUES_PER_FETCH: usize = 32;
const DEFAULT_LEASE_SECONDS: i64 = 30;
const MAX_LEASE_SECONDS: i64 = 3600;
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

#[derive(Clone)]
pub struct WorkerApi {
    ctx: ApiContext,
}

impl WorkerApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    pub fn ctx(&self) -> &ApiContext {
        &self.ctx
    }
}

/// The steps leased to `worker_id` (by a fetch, or eagerly by its completion or its task's
/// creation) as its response carries them. Every step leased is delivered: those past the
/// response budget go back on the queue at the same attempt instead of failing the whole
/// response at encoding, and one that no response could carry fails for good, once, instead
/// of being leased and lost attempt after attempt.
/// `taken`: the bytes of the response's other fields.
pub(super) async fn hand_over(
    ctx: &ApiContext,
    namespace: &str,
    worker_id: &str,
    queues: &[String],
    steps: Vec<LeasedStep>,
    taken: usize,
) -> Vec<v1::LeasedStep> {
    let Delivery {
        steps,
        excess,
        undeliverable,
    } = deliver(
        steps,
        ctx.max_response_bytes,
        super::work_stream::ANSWER_OVERHEAD,
        taken,
    );
    if !excess.is_empty() {
        ctx.workers.give_back(namespace, worker_id, excess).await;
    }
    for (step, why) in undeliverable {
        ctx.workers.fail_undeliverable(&step, &why).await;
    }
    for queue in queues {
        let n = steps.iter().filter(|s| &s.queue == queue).count() as u64;
        if n > 0 {
            ctx.metrics.steps_leased(namespace, queue, n);
        }
    }
    steps
}

/// The steps an enqueue in a request's own transaction leased to its worker (eager dispatch,
/// eager start), as the response carries them; the pass is published on the command stream
/// as the processor's would be. A claim held elsewhere ran no pass here (no namespace read):
/// the notification it sent makes the processor's pass, which the command stream shows.
pub(super) async fn eagerly_leased(
    ctx: &ApiContext,
    eager: Option<EagerEnqueue>,
    queues: &[String],
    started: tokio::time::Instant,
    taken: usize,
) -> Vec<v1::LeasedStep> {
    let Some((e, namespace)) = eager.and_then(|e| {
        let ns = e.result.namespace.clone()?;
        Some((e, ns))
    }) else {
        return Vec::new();
    };
    ctx.commands.record_inline(
        &OrchestrationCommand::process_task(
            e.task_uuid,
            namespace.clone(),
            TriggeredBy::EagerDispatch,
        ),
        &e.result,
        started,
    );
    let steps = e.result.leased.into_iter().map(|(_, s)| s).collect();
    hand_over(ctx, &namespace, &e.worker_id, queues, steps, taken).await
}

/// What a worker asks for next (`CompleteStepRequest.next`, `CreateTaskRequest.next`),
/// checked: every bad field reported, named under `next.`.
pub(super) struct AskedNext {
    queues: Vec<String>,
    max: i32,
    lease: Duration,
}

impl AskedNext {
    pub(super) fn parse(next: v1::NextSteps) -> Result<Self, Status> {
        let mut bad = Violations::default();
        let max = bad.check(bounded(
            "next.max_steps",
            i64::from(next.max_steps),
            1,
            1,
            MAX_STEPS_PER_FETCH,
        ));
        let lease_seconds = bad.check(bounded(
            "next.lease_seconds",
            i64::from(next.lease_seconds),
            DEFAULT_LEASE_SECONDS,
            1,
            MAX_LEASE_SECONDS,
        ));
        let queues = bad.check(fetch_queues("next.queues", next.queues));
        bad.into_result()?;
        match (max, lease_seconds, queues) {
            (Some(max), Some(lease_seconds), Some(queues)) => Ok(Self {
                queues,
                max: max as i32,
                lease: Duration::from_secs(lease_seconds as u64),
            }),
            _ => unreachable!("a field that failed its check is a violation"),
        }
    }

    pub(super) fn queues(&self) -> &[String] {
        &self.queues
    }

    pub(super) fn steps(&self) -> NextSteps<'_> {
        NextSteps {
            queues: &self.queues,
            max: self.max,
            lease: self.lease,
        }
    }
}

/// The attempt a report names, and the token proving its lease; every bad field reported.
fn held_lease(step_uuid: &str, attempt: i32, lease_token: &str) -> Result<HeldLease, Status> {
    let mut bad = Violations::default();
    let step_uuid = bad.check(uuid("step_uuid", step_uuid));
    let attempt = bad.check(if attempt < 1 {
        Err(invalid(
            "attempt",
            format!("must be >= 1 (the attempt the step was leased as), is {attempt}"),
        ))
    } else {
        Ok(attempt)
    });
    let lease_token = bad.check(if lease_token.is_empty() {
        Err(invalid(
            "lease_token",
            "is required: send the lease_token of the LeasedStep this attempt was leased as",
        ))
    } else {
        Uuid::parse_str(lease_token)
            .map_err(|_| invalid("lease_token", "is not a lease token this service issued"))
    });
    bad.into_result()?;
    match (step_uuid, attempt, lease_token) {
        (Some(step_uuid), Some(attempt), Some(lease_token)) => Ok(HeldLease {
            step_uuid,
            attempt,
            lease_token,
        }),
        _ => unreachable!("a field that failed its check is a violation"),
    }
}

/// The queues a fetch (or a completion's `next`) names in `field`, checked (every bad name
/// reported), in order without repeats; none named: the default queue.
fn fetch_queues(field: &str, named: Vec<String>) -> Result<Vec<String>, Status> {
    if named.is_empty() {
        return Ok(vec![DEFAULT_QUEUE.to_string()]);
    }
    let mut bad = Violations::default();
    if named.len() > MAX_QUEUES_PER_FETCH {
        bad.check::<()>(Err(invalid(
            field,
            format!(
                "at most {MAX_QUEUES_PER_FETCH} queues per fetch, got {}",
                named.len()
            ),
        )));
    }
    let mut queues: Vec<String> = Vec::with_capacity(named.len());
    for (i, q) in named.into_iter().enumerate() {
        if let Some(p) = queue_name_problem(&q) {
            bad.check::<()>(Err(invalid(&format!("{field}[{i}]"), p)));
        } else if !queues.contains(&q) {
            queues.push(q);
        }
    }
    bad.into_result()?;
    Ok(queues)
}

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for WorkerApi {
    type WorkStream = super::work_stream::WorkAnswers;

    async fn work(
        &self,
        request: Request<Streaming<v1::WorkRequest>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        Ok(Response::new(super::work_stream::serve(
            self.clone(),
            request,
        )))
    }

    async fn fetch_steps(
        &self,
        request: Request<v1::FetchStepsRequest>,
    ) -> Result<Response<v1::FetchStepsResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        if let Some(p) = namespace_name_problem(&r.namespace) {
            return Err(invalid("namespace", p));
        }
        if let Some(p) = name_problem(&r.worker_id) {
            return Err(invalid("worker_id", p));
        }
        let max = bounded(
            "max_steps",
            i64::from(r.max_steps),
            1,
            1,
            MAX_STEPS_PER_FETCH,
        )?;
        let max_wait = self.ctx.max_fetch_wait.as_millis() as i64;
        if r.wait_ms < 0 || i64::from(r.wait_ms) > max_wait {
            return Err(invalid(
                "wait_ms",
                format!("must be between 0 and {max_wait}, is {}", r.wait_ms),
            ));
        }
        let lease = bounded(
            "lease_seconds",
            i64::from(r.lease_seconds),
            DEFAULT_LEASE_SECONDS,
            1,
            MAX_LEASE_SECONDS,
        )?;
        let queues = fetch_queues("queues", r.queues)?;
        // the wait (never a query in flight) ends early when the server begins to shut down
        let steps = self
            .ctx
            .workers
            .fetch_until(
                Fetch {
                    namespace: &r.namespace,
                    queues: &queues,
                    worker_id: &r.worker_id,
                    caller: &caller.0,
                    max: max as i32,
                    wait: Duration::from_millis(r.wait_ms as u64),
                    lease: Duration::from_secs(lease as u64),
                },
                self.ctx.drained(),
            )
            .await?;
        let steps = hand_over(&self.ctx, &r.namespace, &r.worker_id, &queues, steps, 0).await;
        Ok(Response::new(v1::FetchStepsResponse { steps }))
    }

    async fn complete_step(
        &self,
        request: Request<v1::CompleteStepRequest>,
    ) -> Result<Response<v1::CompleteStepResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let r = request.into_inner();
        let lease = held_lease(&r.step_uuid, r.attempt, &r.lease_token)?;
        let results = convert::document("results", struct_to_json(r.results))?;
        let Some(next) = r.next else {
            let outcome = self
                .ctx
                .workers
                .complete(lease, &results, None, traceparent.as_deref())
                .await?;
            return Ok(Response::new(v1::CompleteStepResponse {
                already_recorded: outcome == CompleteOutcome::AlreadyRecorded,
                next_steps: Vec::new(),
            }));
        };
        let next = AskedNext::parse(next)?;
        let started = tokio::time::Instant::now();
        let (outcome, eager) = self
            .ctx
            .workers
            .complete_and_lease(lease, &results, traceparent.as_deref(), next.steps())
            .await?;
        let next_steps = eagerly_leased(&self.ctx, eager, next.queues(), started, 0).await;
        Ok(Response::new(v1::CompleteStepResponse {
            already_recorded: outcome == CompleteOutcome::AlreadyRecorded,
            next_steps,
        }))
    }

    async fn fail_step(
        &self,
        request: Request<v1::FailStepRequest>,
    ) -> Result<Response<v1::FailStepResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let r = request.into_inner();
        let lease = held_lease(&r.step_uuid, r.attempt, &r.lease_token)?;
        convert::text(
            "error_message",
            &r.error_message,
            MAX_ERROR_MESSAGE_BYTES,
            true,
        )?;
        if let Some(b) = r.backoff_ms.filter(|b| !(0..=MAX_BACKOFF_MS).contains(b)) {
            return Err(invalid(
                "backoff_ms",
                format!("must be between 0 and {MAX_BACKOFF_MS}, is {b}"),
            ));
        }
        let details = convert::document("error_details", struct_to_json(r.error_details))?;
        let failure = StepFailure {
            error: json!({"message": r.error_message, "details": details}),
            retryable: r.retryable,
            backoff_ms: r.backoff_ms,
        };
        let outcome = self
            .ctx
            .workers
            .fail(lease, &failure, traceparent.as_deref())
            .await?;
        Ok(Response::new(match outcome {
            FailOutcome::RetryScheduled { next_retry_at } => v1::FailStepResponse {
                outcome: v1::FailStepOutcome::RetryScheduled.into(),
                next_retry_at: Some(proto::timestamp(next_retry_at)),
            },
            FailOutcome::Failed => v1::FailStepResponse {
                outcome: v1::FailStepOutcome::Failed.into(),
                next_retry_at: None,
            },
        }))
    }

    async fn extend_lease(
        &self,
        request: Request<v1::ExtendLeaseRequest>,
    ) -> Result<Response<v1::ExtendLeaseResponse>, Status> {
        let r = request.into_inner();
        let held = held_lease(&r.step_uuid, r.attempt, &r.lease_token)?;
        let lease = bounded(
            "lease_seconds",
            i64::from(r.lease_seconds),
            DEFAULT_LEASE_SECONDS,
            1,
            MAX_LEASE_SECONDS,
        )?;
        let until = self
            .ctx
            .workers
            .extend_lease(held, Duration::from_secs(lease as u64))
            .await?;
        Ok(Response::new(v1::ExtendLeaseResponse {
            lease_expires_at: Some(proto::timestamp(until)),
        }))
    }
}

/// What a FetchSteps response carries of the steps leased for it.
struct Delivery {
    steps: Vec<v1::LeasedStep>,
    /// Leased, but past the response budget: back on the queue for the next fetch.
    excess: Vec<LeasedStep>,
    /// Steps no response can carry (too large or too deeply nested for any client to
    /// decode), each with the reason. Only data stored before the limits that prevent them
    /// (documents' size and nesting as sent, the parent-results budget) can be such.
    undeliverable: Vec<(LeasedStep, String)>,
}

/// The leased steps as the response carries them: as many as fit `limit` bytes less
/// `overhead` (what a Work stream's answer wraps around the response) and less `taken` (the
/// response's other fields: a step they leave no room for goes back, it is not undeliverable),
/// in order.
fn deliver(steps: Vec<LeasedStep>, limit: usize, overhead: usize, taken: usize) -> Delivery {
    let budget = limit.saturating_sub(overhead);
    let room = budget.saturating_sub(taken);
    use crate::model::limits::{document_depth, MAX_DOCUMENT_DEPTH};
    let mut d = Delivery {
        steps: Vec::with_capacity(steps.len()),
        excess: Vec::new(),
        undeliverable: Vec::new(),
    };
    let mut used = 0;
    for s in steps {
        // parent_results nests each parent's results one level down
        if document_depth(&s.inputs) > MAX_DOCUMENT_DEPTH
            || document_depth(&s.parent_results) > MAX_DOCUMENT_DEPTH + 1
        {
            let why = format!(
                "its inputs or its parents' results nest deeper than {MAX_DOCUMENT_DEPTH} levels, more than clients can decode"
            );
            d.undeliverable.push((s, why));
            continue;
        }
        let message = v1::LeasedStep {
            step_uuid: s.step_uuid.to_string(),
            task_uuid: s.task_uuid.to_string(),
            name: s.name.clone(),
            attempt: s.attempt,
            inputs: Some(proto::json_to_struct(&s.inputs)),
            parent_results: Some(proto::json_to_struct(&s.parent_results)),
            lease_expires_at: Some(proto::timestamp(s.lease_expires_at)),
            lease_token: s.lease_token.simple().to_string(),
            queue: s.queue.clone(),
        };
        let size = repeated_entry_len(&message);
        if size > budget {
            let why = format!(
                "it takes {size} bytes as sent, more than a response may (grpc.max_response_bytes = {limit}, less {overhead} for a Work stream's answer)"
            );
            d.undeliverable.push((s, why));
            continue;
        }
        if !d.excess.is_empty() || used + size > room {
            d.excess.push(s);
            continue;
        }
        used += size;
        d.steps.push(message);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(name_len: usize) -> LeasedStep {
        LeasedStep {
            step_uuid: Uuid::nil(),
            task_uuid: Uuid::nil(),
            name: "x".repeat(name_len),
            attempt: 1,
            inputs: json!({}),
            parent_results: json!({}),
            lease_expires_at: chrono::Utc::now(),
            enqueued_at: chrono::Utc::now(),
            traceparent: None,
            lease_token: Uuid::nil(),
            queue: "default".into(),
        }
    }

    /// The room the response's other fields take (a created task's steps) sends a step back
    /// to the queue; only a step no response could carry is undeliverable.
    #[test]
    fn a_step_the_other_fields_leave_no_room_for_goes_back_not_failed() {
        let limit = 4096;
        let alone = deliver(vec![leased(2000)], limit, 32, 0);
        assert_eq!((alone.steps.len(), alone.excess.len()), (1, 0));
        let crowded = deliver(vec![leased(2000), leased(10)], limit, 32, 3000);
        assert_eq!(crowded.steps.len(), 0);
        assert_eq!(crowded.excess.len(), 2, "back on the queue, in order");
        assert!(crowded.undeliverable.is_empty());
        let too_big = deliver(vec![leased(5000)], limit, 32, 0);
        assert_eq!(too_big.undeliverable.len(), 1);
    }
}
