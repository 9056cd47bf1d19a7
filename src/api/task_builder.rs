//! [`task`]: a `CreateTaskRequest` written the way a DAG is drawn.
//!
//! ```
//! use tasker::client::task;
//! let request = task("billing")
//!     .named("invoice")
//!     .step("fetch")
//!     .step("price").after("fetch")
//!     .step("tax").after("fetch")
//!     .step("send").after("price").after("tax").max_attempts(5)
//!     .build();
//! assert_eq!(request.steps.len(), 4);
//! assert_eq!(request.steps[3].depends_on, ["price", "tax"]);
//! ```
//!
//! Step options (`after`, `inputs`, `max_attempts`, `retryable`, `queue`, `retry`) apply to the
//! step named last; `default_retry` is the task's.
//! The builder checks nothing: the service validates the request and names every problem.

use serde_json::Value;

use crate::proto::{json_to_struct, v1};

/// A task of `namespace`, named `task` until [`TaskBuilder::named`] says otherwise.
pub fn task(namespace: &str) -> TaskBuilder {
    TaskBuilder {
        request: v1::CreateTaskRequest {
            namespace: namespace.to_string(),
            name: "task".to_string(),
            ..Default::default()
        },
    }
}

/// A chain `s0 -> s1 -> ... -> s(n-1)` in `namespace`, named `chain`.
pub fn chain(namespace: &str, n: usize) -> TaskBuilder {
    let mut t = task(namespace).named("chain");
    for i in 0..n {
        t = t.step(&format!("s{i}"));
        if i > 0 {
            t = t.after(&format!("s{}", i - 1));
        }
    }
    t
}

/// The diamond `a -> (b, c) -> d` in `namespace`, named `diamond`.
pub fn diamond(namespace: &str) -> TaskBuilder {
    task(namespace)
        .named("diamond")
        .step("a")
        .step("b")
        .after("a")
        .step("c")
        .after("a")
        .step("d")
        .after("b")
        .after("c")
}

/// A `CreateTaskRequest` being written; [`TaskBuilder::build`] gives it.
#[derive(Debug, Clone)]
pub struct TaskBuilder {
    request: v1::CreateTaskRequest,
}

impl TaskBuilder {
    pub fn named(mut self, name: &str) -> Self {
        self.request.name = name.to_string();
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.request.priority = priority;
        self
    }

    /// The task's context, a JSON object.
    pub fn context(mut self, context: Value) -> Self {
        self.request.context = Some(json_to_struct(&context));
        self
    }

    pub fn idempotency_key(mut self, key: &str) -> Self {
        self.request.idempotency_key = key.to_string();
        self
    }

    /// One more step, with no parents until [`TaskBuilder::after`] gives it some.
    pub fn step(mut self, name: &str) -> Self {
        self.request.steps.push(v1::StepDefinition {
            name: name.to_string(),
            ..Default::default()
        });
        self
    }

    /// The last step depends on `parent` (call again for more parents).
    pub fn after(self, parent: &str) -> Self {
        self.with_last(|s| s.depends_on.push(parent.to_string()))
    }

    /// The last step's inputs, a JSON object.
    pub fn inputs(self, inputs: Value) -> Self {
        self.with_last(|s| s.inputs = Some(json_to_struct(&inputs)))
    }

    pub fn max_attempts(self, n: i32) -> Self {
        self.with_last(|s| s.max_attempts = n)
    }

    pub fn retryable(self, retryable: bool) -> Self {
        self.with_last(|s| s.retryable = Some(retryable))
    }

    /// The queue whose workers run the last step added.
    pub fn queue(self, queue: &str) -> Self {
        self.with_last(|s| s.queue = queue.to_string())
    }

    /// The last step's retry policy: the backoff between its attempts when a worker's
    /// FailStep names none.
    pub fn retry(self, policy: v1::RetryPolicy) -> Self {
        self.with_last(|s| s.retry = Some(policy))
    }

    /// The last step's execution limit per attempt (ExtendLease cannot carry an attempt past
    /// it; one still running then is a failed attempt, TIMED_OUT).
    pub fn timeout(self, timeout: std::time::Duration) -> Self {
        self.with_last(|s| {
            s.timeout = Some(crate::proto::duration_from_ms(
                i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
            ))
        })
    }

    /// How long the last step, once queued, may wait for a worker before it fails for good
    /// (SCHEDULE_TO_START_TIMED_OUT).
    pub fn schedule_to_start(self, wait: std::time::Duration) -> Self {
        self.with_last(|s| {
            s.schedule_to_start = Some(crate::proto::duration_from_ms(
                i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
            ))
        })
    }

    /// The retry policy of every step that declares none.
    pub fn default_retry(mut self, policy: v1::RetryPolicy) -> Self {
        self.request.retry = Some(policy);
        self
    }

    /// At most the namespace's max_tasks_per_key tasks with this key run at once.
    pub fn concurrency_key(mut self, key: &str) -> Self {
        self.request.concurrency_key = key.to_string();
        self
    }

    /// Its first steps become ready at `at` (not before); a time not in the future: now.
    pub fn start_at(mut self, at: chrono::DateTime<chrono::Utc>) -> Self {
        self.request.start_at = Some(crate::proto::timestamp(at));
        self
    }

    pub fn build(self) -> v1::CreateTaskRequest {
        self.request
    }

    fn with_last(mut self, f: impl FnOnce(&mut v1::StepDefinition)) -> Self {
        let step = self
            .request
            .steps
            .last_mut()
            .expect("a step option follows .step(name)");
        f(step);
        self
    }
}

impl From<TaskBuilder> for v1::CreateTaskRequest {
    fn from(t: TaskBuilder) -> Self {
        t.build()
    }
}
