//! `CreateTaskRequest` as a [`TaskSpec`]: the API's requests and the ones a schedule stores
//! (each of its ticks makes one) are read the same way. Validation happens on the spec.

use crate::model::dag::{StepSpec, TaskSpec, Violation};
use crate::model::retry::{RetryPolicy, MAX_BACKOFF_MS};
use crate::proto::{self, struct_to_json, v1};

impl TaskSpec {
    /// The request as a spec, and what could not be converted (a timestamp out of range).
    pub fn from_request(r: v1::CreateTaskRequest) -> (Self, Vec<Violation>) {
        let mut problems = Vec::new();
        let start_at = r.start_at.as_ref().and_then(|t| {
            let at = proto::datetime(t);
            if at.is_none() {
                problems.push(Violation {
                    field: "start_at".into(),
                    message: "is not a valid timestamp".into(),
                });
            }
            at
        });
        let spec = TaskSpec {
            namespace: r.namespace,
            name: r.name,
            priority: r.priority,
            context: struct_to_json(r.context),
            idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
            concurrency_key: (!r.concurrency_key.is_empty()).then_some(r.concurrency_key),
            retry: r.retry.map(retry_policy),
            start_at,
            steps: r
                .steps
                .into_iter()
                .map(|s| StepSpec {
                    name: s.name,
                    depends_on: s.depends_on,
                    max_attempts: s.max_attempts,
                    retryable: s.retryable.unwrap_or(true),
                    inputs: struct_to_json(s.inputs),
                    queue: s.queue,
                    retry: s.retry.map(retry_policy),
                    timeout_ms: s.timeout.as_ref().map(proto::duration_ms),
                    schedule_to_start_ms: s.schedule_to_start.as_ref().map(proto::duration_ms),
                })
                .collect(),
        };
        (spec, problems)
    }
}

/// A requested retry policy with its defaults filled in (multiplier 0: 1; no max_backoff: the
/// longest allowed); an absent initial_backoff is 0, which validation refuses by name.
fn retry_policy(p: v1::RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        initial_ms: p.initial_backoff.as_ref().map_or(0, proto::duration_ms),
        multiplier: if p.multiplier == 0.0 {
            1.0
        } else {
            p.multiplier
        },
        max_ms: p
            .max_backoff
            .as_ref()
            .map_or(MAX_BACKOFF_MS, proto::duration_ms),
        jitter: p.jitter,
    }
}
