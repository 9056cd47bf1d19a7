//! `tasker.v1.TaskService`: create a task with its DAG, get it, cancel it.

use serde_json::json;
use tonic::{Request, Response, Status};

use super::context::ApiContext;
use super::convert::uuid;
use super::error;
use crate::dag::{StepSpec, TaskSpec};
use crate::proto::struct_to_json;
use crate::proto::{self, v1};
use crate::store::{StepRecord, TaskRecord};

pub struct TaskApi {
    ctx: ApiContext,
}

impl TaskApi {
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    async fn task_message(&self, task: TaskRecord) -> Result<v1::Task, Status> {
        let steps = self.ctx.store.get_steps(task.task_uuid).await?;
        Ok(task_to_proto(task, steps))
    }
}

fn task_to_proto(t: TaskRecord, steps: Vec<StepRecord>) -> v1::Task {
    v1::Task {
        task_uuid: t.task_uuid.to_string(),
        namespace: t.namespace,
        name: t.name,
        priority: t.priority,
        state: t.state,
        context: Some(proto::json_to_struct(&t.context)),
        idempotency_key: t.idempotency_key.unwrap_or_default(),
        created_at: Some(proto::timestamp(t.created_at)),
        updated_at: Some(proto::timestamp(t.updated_at)),
        completed_at: proto::opt_timestamp(t.completed_at),
        steps: steps
            .into_iter()
            .map(|s| v1::Step {
                step_uuid: s.step_uuid.to_string(),
                name: s.name,
                state: s.state,
                attempts: s.attempts,
                max_attempts: s.max_attempts,
                depends_on: s.depends_on,
                inputs: Some(proto::json_to_struct(&s.inputs)),
                results: proto::opt_json_to_struct(s.results.as_ref()),
                last_error: proto::opt_json_to_struct(s.last_error.as_ref()),
                next_retry_at: proto::opt_timestamp(s.next_retry_at),
                enqueued_at: proto::opt_timestamp(s.enqueued_at),
                started_at: proto::opt_timestamp(s.started_at),
                completed_at: proto::opt_timestamp(s.completed_at),
            })
            .collect(),
    }
}

/// The request as a [`TaskSpec`]; validation happens on the spec, all violations at once.
pub fn spec_from_request(r: v1::CreateTaskRequest) -> TaskSpec {
    TaskSpec {
        namespace: r.namespace,
        name: r.name,
        priority: r.priority,
        context: struct_to_json(r.context),
        idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
        steps: r
            .steps
            .into_iter()
            .map(|s| StepSpec {
                name: s.name,
                depends_on: s.depends_on,
                max_attempts: s.max_attempts,
                retryable: s.retryable.unwrap_or(true),
                inputs: struct_to_json(s.inputs),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl v1::task_service_server::TaskService for TaskApi {
    async fn create_task(
        &self,
        request: Request<v1::CreateTaskRequest>,
    ) -> Result<Response<v1::CreateTaskResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let task = spec_from_request(request.into_inner())
            .into_new_task()
            .map_err(error::violations)?;
        let created = self
            .ctx
            .store
            .create_task(&task, &json!({"source": "api"}), traceparent.as_deref())
            .await?;
        Ok(Response::new(v1::CreateTaskResponse {
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
        }))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::GetTaskResponse>, Status> {
        let task_uuid = uuid("task_uuid", &request.get_ref().task_uuid)?;
        let task = self.ctx.store.get_task(task_uuid).await?;
        Ok(Response::new(v1::GetTaskResponse {
            task: Some(self.task_message(task).await?),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<v1::CancelTaskRequest>,
    ) -> Result<Response<v1::CancelTaskResponse>, Status> {
        let traceparent = crate::telemetry::current_traceparent();
        let r = request.into_inner();
        let task_uuid = uuid("task_uuid", &r.task_uuid)?;
        if r.reason.len() > 1024 {
            return Err(error::invalid("reason", "must be at most 1024 bytes"));
        }
        let reason = if r.reason.is_empty() {
            "cancelled through the API"
        } else {
            &r.reason
        };
        self.ctx
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
            task: Some(self.task_message(task).await?),
        }))
    }
}
