//! `tasker.v1.TaskService`: create a task with its DAG, get it, cancel it, list tasks, watch
//! one.

use prost::Message;
use serde_json::json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::context::ApiContext;
use super::convert::{document, repeated_entry_len, text, uuid};
use super::error::{self, Violations};
use super::task_list::TaskListRequest;
use super::task_watch::{watch_task, WatchStream};
use super::worker_api::{eagerly_leased, AskedNext};
use crate::model::dag::{name_problem, TaskSpec, Violation};
use crate::model::retry::RetryPolicy;
use crate::proto::{self, struct_to_json, v1, words};
use crate::store::{CancelOutcome, StepRecord, TaskRecord};

pub struct TaskApi {
    ctx: ApiContext,
}

impl TaskApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    /// The task with one page of its steps (as many as `page_size` and the response budget
    /// allow), and the token of the next page if steps remain.
    async fn task_page(
        &self,
        task: TaskRecord,
        page: StepPage,
    ) -> Result<(v1::Task, String), Status> {
        // one more than the page, to know whether another follows; with their data, only the
        // steps whose data fit the response are read
        let (mut steps, more) = self
            .ctx
            .store
            .get_steps(
                task.task_uuid,
                page.after,
                i64::from(page.size) + 1,
                page.with_data,
                self.ctx.max_response_bytes,
            )
            .await?;
        steps.truncate(page.size as usize);
        let mut message = task_to_proto(task);
        let mut used = prost::Message::encoded_len(&message) + RESPONSE_OVERHEAD;
        let (mut last, mut cut) = (None, false);
        for s in steps {
            let position = s.position;
            let step = step_to_proto(s);
            let size = repeated_entry_len(&step);
            if !message.steps.is_empty() && used + size > self.ctx.max_response_bytes {
                cut = true;
                break;
            }
            used += size;
            message.steps.push(step);
            last = Some(position);
        }
        let token = if more || cut {
            page_token(message.task_uuid.as_str(), last)
        } else {
            String::new()
        };
        Ok((message, token))
    }
}

/// The longest reason an operator may give (CancelTask, ResolveStep).
const MAX_REASON_BYTES: usize = 1024;

/// Room for the response's own fields (the page token) beyond the task.
const RESPONSE_OVERHEAD: usize = 64;
/// Steps per GetTask page unless asked for fewer: every step of the largest task.
const MAX_STEPS_PER_PAGE: i32 = crate::model::limits::MAX_STEPS as i32;

/// Which steps a GetTask response carries.
struct StepPage {
    /// Topological position of the last step of the previous page.
    after: Option<i32>,
    size: i32,
    with_data: bool,
}

impl StepPage {
    /// The first page of every step, without their data (what CancelTask answers with).
    const SUMMARY: Self = Self {
        after: None,
        size: MAX_STEPS_PER_PAGE,
        with_data: false,
    };

    /// The page a GetTask for `task` asks for; a token issued for another task is refused.
    fn from_request(r: &v1::GetTaskRequest, task: Uuid) -> Result<Self, Status> {
        let size = match r.page_size {
            0 => MAX_STEPS_PER_PAGE,
            n if (1..=MAX_STEPS_PER_PAGE).contains(&n) => n,
            n => {
                return Err(error::invalid(
                    "page_size",
                    format!("must be between 0 and {MAX_STEPS_PER_PAGE}, is {n}"),
                ))
            }
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            let (issued_for, position) = r
                .page_token
                .strip_prefix(PAGE_TOKEN_PREFIX)
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(f, p)| Some((f, p.parse::<i32>().ok().filter(|p| *p >= 0)?)))
                .ok_or_else(|| {
                    error::invalid(
                        "page_token",
                        "is not a next_page_token this server returned",
                    )
                })?;
            if issued_for != task_fingerprint(&task.to_string()) {
                return Err(error::invalid(
                    "page_token",
                    "was issued for another task: send it with the task it came from",
                ));
            }
            Some(position)
        };
        Ok(Self {
            after,
            size,
            with_data: r.include_step_data,
        })
    }
}

/// Page tokens name the task they were issued for (a fingerprint) and the last step's
/// topological position; the prefix makes them recognisable (and versioned) without promising
/// their form.
const PAGE_TOKEN_PREFIX: &str = "steps-v2.";

fn task_fingerprint(task_uuid: &str) -> String {
    super::task_list::fingerprint(&["get_task", task_uuid])
}

fn page_token(task_uuid: &str, last_position: Option<i32>) -> String {
    last_position
        .map(|p| format!("{PAGE_TOKEN_PREFIX}{}.{p}", task_fingerprint(task_uuid)))
        .unwrap_or_default()
}

pub(super) fn step_to_proto(s: StepRecord) -> v1::Step {
    v1::Step {
        step_uuid: s.step_uuid.to_string(),
        name: s.name,
        state: words::raw::<v1::StepState>(&s.state),
        attempts: s.attempts,
        max_attempts: s.max_attempts,
        depends_on: s.depends_on,
        inputs: deliverable(s.inputs.as_ref()),
        results: deliverable(s.results.as_ref()),
        last_error: deliverable(s.last_error.as_ref()),
        next_retry_at: proto::opt_timestamp(s.next_retry_at),
        enqueued_at: proto::opt_timestamp(s.enqueued_at),
        started_at: proto::opt_timestamp(s.started_at),
        completed_at: proto::opt_timestamp(s.completed_at),
        queue: s.queue,
        retry: s.retry_policy.map(|p| retry_policy_to_proto(p.0)),
        timeout: s.timeout_ms.map(|t| proto::duration_from_ms(i64::from(t))),
        schedule_to_start: s
            .schedule_to_start_ms
            .map(|t| proto::duration_from_ms(i64::from(t))),
    }
}

fn retry_policy_to_proto(p: RetryPolicy) -> v1::RetryPolicy {
    v1::RetryPolicy {
        initial_backoff: Some(proto::duration_from_ms(p.initial_ms)),
        multiplier: p.multiplier,
        max_backoff: Some(proto::duration_from_ms(p.max_ms)),
        jitter: p.jitter,
    }
}

/// A stored document as a response carries it (see [`crate::model::limits::deliverable_document`]).
fn deliverable(doc: Option<&serde_json::Value>) -> Option<prost_types::Struct> {
    doc.map(|d| proto::json_to_struct(&crate::model::limits::deliverable_document(d)))
}

/// The task without its steps: `task_page` adds them within the response budget.
pub(super) fn task_to_proto(t: TaskRecord) -> v1::Task {
    v1::Task {
        task_uuid: t.task_uuid.to_string(),
        namespace: t.namespace,
        name: t.name,
        priority: t.priority,
        state: words::raw::<v1::TaskState>(&t.state),
        context: deliverable(Some(&t.context)),
        idempotency_key: t.idempotency_key.unwrap_or_default(),
        created_at: Some(proto::timestamp(t.created_at)),
        updated_at: Some(proto::timestamp(t.updated_at)),
        completed_at: proto::opt_timestamp(t.completed_at),
        steps: Vec::new(),
        start_at: proto::opt_timestamp(t.start_at),
        scheduled: t.scheduled,
    }
}

/// `CreateTaskRequest.next` with its `worker_id`, checked: the worker and what it asks for
/// when `next` is given, and the broken rules (named by field) of either.
fn eager_start(
    next: Option<v1::NextSteps>,
    worker_id: String,
) -> (Option<(String, AskedNext)>, Vec<Violation>) {
    let mut bad = Violations::default();
    let Some(next) = next else {
        if !worker_id.is_empty() {
            bad.check::<()>(Err(error::invalid(
                "worker_id",
                "is only allowed with next (eager start): a task is created for any worker",
            )));
        }
        return (None, bad.into_vec());
    };
    let worker = bad.check(match name_problem(&worker_id) {
        Some(p) => Err(error::invalid(
            "worker_id",
            format!("{p} (required with next: the worker its steps are leased to)"),
        )),
        None => Ok(worker_id),
    });
    let next = bad.check(AskedNext::parse(next));
    let problems = bad.into_vec();
    (worker.zip(next), problems)
}

#[tonic::async_trait]
impl v1::task_service_server::TaskService for TaskApi {
    async fn create_task(
        &self,
        request: Request<v1::CreateTaskRequest>,
    ) -> Result<Response<v1::CreateTaskResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let mut r = request.into_inner();
        // eager start: the steps the task makes ready leased to this worker (not part of the
        // task, so not of its idempotency digest either)
        let (next, mut problems) = eager_start(r.next.take(), std::mem::take(&mut r.worker_id));
        let (spec, spec_problems) = TaskSpec::from_request(r);
        problems.extend(spec_problems);
        let digest = spec.request_digest();
        problems.extend(spec.start_problem(chrono::Utc::now(), self.ctx.max_start_delay));
        let task = match spec.into_new_task() {
            Ok(task) if problems.is_empty() => task,
            Ok(_) => return Err(error::violations(problems)),
            Err(mut violations) => {
                violations.extend(problems);
                return Err(error::violations(violations));
            }
        };
        let metadata = json!({"source": "api", "request_digest": digest});
        let started = tokio::time::Instant::now();
        let (created, eager) = match &next {
            Some((worker_id, next)) => {
                self.ctx
                    .workers
                    .create_and_lease(
                        &task,
                        &metadata,
                        traceparent.as_deref(),
                        worker_id,
                        next.steps(),
                    )
                    .await?
            }
            None => {
                let created = self
                    .ctx
                    .store
                    .create_task(&task, &metadata, traceparent.as_deref())
                    .await?;
                (created, None)
            }
        };
        if !created.created {
            // the key names a task already: only the same request may be answered with it
            let recorded = self.ctx.store.creation_digest(created.task_uuid).await?;
            if recorded.is_some_and(|d| d != digest) {
                return Err(Status::already_exists(format!(
                    "idempotency_key {:?} already names task {} in namespace {:?}, created by a different request (name, priority, context or steps differ); use a new key for a new task",
                    task.idempotency_key.as_deref().unwrap_or_default(),
                    created.task_uuid,
                    task.namespace
                )));
            }
        }
        let mut response = v1::CreateTaskResponse {
            task_uuid: created.task_uuid.to_string(),
            created: created.created,
            steps: created
                .steps
                .into_iter()
                .map(|(name, id)| v1::CreatedStep {
                    name,
                    step_uuid: id.to_string(),
                })
                .collect(),
            next_steps: Vec::new(),
        };
        if let Some((_, next)) = &next {
            // the steps leased share the response with the task's: those it leaves no room
            // for go back on the queue
            let taken = response.encoded_len();
            response.next_steps =
                eagerly_leased(&self.ctx, eager, next.queues(), started, taken).await;
        }
        Ok(Response::new(response))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::GetTaskResponse>, Status> {
        let r = request.into_inner();
        let task_uuid = uuid("task_uuid", &r.task_uuid)?;
        let page = StepPage::from_request(&r, task_uuid)?;
        let task = self.ctx.store.get_task(task_uuid).await?;
        let (task, next_page_token) = self.task_page(task, page).await?;
        Ok(Response::new(v1::GetTaskResponse {
            task: Some(task),
            next_page_token,
        }))
    }

    async fn resolve_step(
        &self,
        request: Request<v1::ResolveStepRequest>,
    ) -> Result<Response<v1::ResolveStepResponse>, Status> {
        let r = request.into_inner();
        let step = uuid("step_uuid", &r.step_uuid)?;
        if r.reason.trim().is_empty() {
            return Err(error::invalid(
                "reason",
                format!(
                    "must be 1 to {MAX_REASON_BYTES} bytes: say why the step is resolved by hand"
                ),
            ));
        }
        text("reason", &r.reason, MAX_REASON_BYTES, true)?;
        let results = r
            .results
            .map(|s| document("results", struct_to_json(Some(s))))
            .transpose()?;
        // the readiness this announces carries the caller's trace, as a completion's does
        let traceparent = crate::telemetry::current_traceparent();
        self.ctx
            .store
            .resolve_step_manually(step, &r.reason, results.as_ref(), traceparent.as_deref())
            .await?;
        let task = self
            .ctx
            .store
            .get_task(self.ctx.store.step_task(step).await?)
            .await?;
        Ok(Response::new(v1::ResolveStepResponse {
            task: Some(self.task_page(task, StepPage::SUMMARY).await?.0),
        }))
    }

    async fn retry_task(
        &self,
        request: Request<v1::RetryTaskRequest>,
    ) -> Result<Response<v1::RetryTaskResponse>, Status> {
        let r = request.into_inner();
        let task_uuid = uuid("task_uuid", &r.task_uuid)?;
        let extra = match r.extra_attempts {
            0 => 1,
            n if (1..=crate::model::limits::MAX_ATTEMPTS).contains(&n) => n,
            n => {
                return Err(error::invalid(
                    "extra_attempts",
                    format!(
                        "must be between 0 and {}, is {n}",
                        crate::model::limits::MAX_ATTEMPTS
                    ),
                ))
            }
        };
        text("reason", &r.reason, MAX_REASON_BYTES, false)?;
        let traceparent = crate::telemetry::current_traceparent();
        self.ctx
            .store
            .retry_task(
                task_uuid,
                extra,
                &json!({"source": "api", "reason": r.reason}),
                traceparent.as_deref(),
            )
            .await?;
        let task = self.ctx.store.get_task(task_uuid).await?;
        Ok(Response::new(v1::RetryTaskResponse {
            task: Some(self.task_page(task, StepPage::SUMMARY).await?.0),
        }))
    }

    type WatchTaskStream = WatchStream;

    async fn watch_task(
        &self,
        request: Request<v1::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let caller = super::auth::Caller::of(&request);
        let task_uuid = uuid("task_uuid", &request.into_inner().task_uuid)?;
        Ok(Response::new(
            watch_task(&self.ctx, task_uuid, &caller.0).await?,
        ))
    }

    async fn list_tasks(
        &self,
        request: Request<v1::ListTasksRequest>,
    ) -> Result<Response<v1::ListTasksResponse>, Status> {
        let list = TaskListRequest::parse(request.into_inner())?;
        // only the tasks whose contexts fit the response are read
        let (mut found, more) = self
            .ctx
            .store
            .list_tasks(&list.query, self.ctx.max_response_bytes)
            .await?;
        found.truncate(list.page_size);
        let mut tasks = Vec::with_capacity(found.len());
        let mut used = RESPONSE_OVERHEAD;
        let (mut last, mut cut) = (None, false);
        for t in found {
            let key = (t.created_at, t.task_uuid);
            let task = task_to_proto(t);
            let size = repeated_entry_len(&task);
            if !tasks.is_empty() && used + size > self.ctx.max_response_bytes {
                cut = true;
                break;
            }
            used += size;
            tasks.push(task);
            last = Some(key);
        }
        let next_page_token = match last {
            Some((created_at, task_uuid)) if more || cut => list.next_token(created_at, task_uuid),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<v1::CancelTaskRequest>,
    ) -> Result<Response<v1::CancelTaskResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let r = request.into_inner();
        let task_uuid = uuid("task_uuid", &r.task_uuid)?;
        text("reason", &r.reason, MAX_REASON_BYTES, false)?;
        let reason = if r.reason.is_empty() {
            "cancelled through the API"
        } else {
            &r.reason
        };
        let outcome = self
            .ctx
            .store
            .cancel_task(
                task_uuid,
                reason,
                &json!({"source": "api"}),
                traceparent.as_deref(),
            )
            .await?;
        let task = self.ctx.store.get_task(task_uuid).await?;
        Ok(Response::new(v1::CancelTaskResponse {
            task: Some(self.task_page(task, StepPage::SUMMARY).await?.0),
            already_cancelled: outcome == CancelOutcome::AlreadyCancelled,
        }))
    }
}
