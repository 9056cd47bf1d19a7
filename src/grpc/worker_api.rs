//! `tasker.v1.WorkerService`: lease steps (long-poll), complete, fail, extend a lease.

use std::time::Duration;

use serde_json::json;
use tonic::{Request, Response, Status};

use super::context::ApiContext;
use super::convert::{self, bounded, repeated_entry_len, uuid};
use super::error::invalid;
use crate::dag::name_problem;
use crate::limits::MAX_DOCUMENT_BYTES;
use crate::namespaces::namespace_name_problem;
use crate::proto::struct_to_json;
use crate::proto::{self, v1};
use crate::store::{FailOutcome, LeasedStep, StepFailure};
use crate::worker::CompleteOutcome;

const MAX_STEPS_PER_FETCH: i64 = 100;
const DEFAULT_LEASE_SECONDS: i64 = 30;
const MAX_LEASE_SECONDS: i64 = 3600;
const MAX_BACKOFF_MS: i64 = 24 * 3600 * 1000;
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

pub struct WorkerApi {
    ctx: ApiContext,
}

impl WorkerApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }
}

fn attempt(value: i32) -> Result<i32, Status> {
    if value < 1 {
        return Err(invalid(
            "attempt",
            format!("must be >= 1 (the attempt the step was leased as), is {value}"),
        ));
    }
    Ok(value)
}

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for WorkerApi {
    async fn fetch_steps(
        &self,
        request: Request<v1::FetchStepsRequest>,
    ) -> Result<Response<v1::FetchStepsResponse>, Status> {
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
        // the wait (never a query in flight) ends early when the server begins to shut down
        let steps = self
            .ctx
            .workers
            .fetch_until(
                &r.namespace,
                &r.worker_id,
                max as i32,
                Duration::from_millis(r.wait_ms as u64),
                Duration::from_secs(lease as u64),
                self.ctx.drained(),
            )
            .await?;
        // Every step leased here is delivered: those past the response budget go back on
        // the queue at the same attempt instead of failing the whole response at encoding.
        let (steps, excess) = within_budget(steps, self.ctx.max_response_bytes);
        if !excess.is_empty() {
            self.ctx
                .workers
                .give_back(&r.namespace, &r.worker_id, excess)
                .await;
        }
        Ok(Response::new(v1::FetchStepsResponse { steps }))
    }

    async fn complete_step(
        &self,
        request: Request<v1::CompleteStepRequest>,
    ) -> Result<Response<v1::CompleteStepResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let r = request.into_inner();
        let step = uuid("step_uuid", &r.step_uuid)?;
        let attempt = attempt(r.attempt)?;
        let results =
            convert::bounded_document("results", struct_to_json(r.results), MAX_DOCUMENT_BYTES)?;
        let outcome = self
            .ctx
            .workers
            .complete(step, attempt, &results, None, traceparent.as_deref())
            .await?;
        Ok(Response::new(v1::CompleteStepResponse {
            already_recorded: outcome == CompleteOutcome::AlreadyRecorded,
        }))
    }

    async fn fail_step(
        &self,
        request: Request<v1::FailStepRequest>,
    ) -> Result<Response<v1::FailStepResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let r = request.into_inner();
        let step = uuid("step_uuid", &r.step_uuid)?;
        let attempt = attempt(r.attempt)?;
        if r.error_message.trim().is_empty() || r.error_message.len() > MAX_ERROR_MESSAGE_BYTES {
            return Err(invalid(
                "error_message",
                format!("must be 1 to {MAX_ERROR_MESSAGE_BYTES} bytes"),
            ));
        }
        if r.backoff_ms < 0 || r.backoff_ms > MAX_BACKOFF_MS {
            return Err(invalid(
                "backoff_ms",
                format!(
                    "must be between 0 and {MAX_BACKOFF_MS}, is {}",
                    r.backoff_ms
                ),
            ));
        }
        let details = convert::bounded_document(
            "error_details",
            struct_to_json(r.error_details),
            MAX_DOCUMENT_BYTES,
        )?;
        let failure = StepFailure {
            error: json!({"message": r.error_message, "details": details}),
            retryable: r.retryable,
            backoff_ms: r.backoff_ms,
        };
        let outcome = self
            .ctx
            .workers
            .fail(step, attempt, &failure, traceparent.as_deref())
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
        let step = uuid("step_uuid", &r.step_uuid)?;
        let attempt = attempt(r.attempt)?;
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
            .extend_lease(step, attempt, Duration::from_secs(lease as u64))
            .await?;
        Ok(Response::new(v1::ExtendLeaseResponse {
            lease_expires_at: Some(proto::timestamp(until)),
        }))
    }
}

/// The leased steps as the response carries them, as many as fit `budget` bytes (at least
/// one: the configuration guarantees that one step's inputs and parent results fit), and the
/// ones that did not fit.
fn within_budget(steps: Vec<LeasedStep>, budget: usize) -> (Vec<v1::LeasedStep>, Vec<LeasedStep>) {
    let mut out = Vec::with_capacity(steps.len());
    let mut excess = Vec::new();
    let mut used = 0;
    for s in steps {
        if !excess.is_empty() {
            excess.push(s);
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
        };
        let size = repeated_entry_len(&message);
        if !out.is_empty() && used + size > budget {
            excess.push(s);
            continue;
        }
        used += size;
        out.push(message);
    }
    (out, excess)
}
