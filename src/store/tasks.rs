//! Tasks: creation with their DAG, look-up, cancellation, manual resolution.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::answers::{CancelAnswer, NamespaceAnswer, ResolveAnswer, RetryAnswer};
use super::{Store, StoreError};
use crate::model::dag::NewTask;
use crate::model::states::{StepState, TaskState};

/// One state change of a task, from its history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskTransition {
    pub id: i64,
    pub from_state: Option<TaskState>,
    pub to_state: TaskState,
    pub created_at: DateTime<Utc>,
}

/// A step's state and attempt, as WatchTask compares them between looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSnapshot {
    pub step_uuid: Uuid,
    pub name: String,
    pub state: StepState,
    pub attempts: i32,
}

/// Which tasks `list_tasks` returns: the filters (each `None` or empty: any), the order, and
/// the page: tasks after `after` (the previous page's last task's creation time and uuid) in
/// that order, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct TaskListQuery {
    pub namespace: Option<String>,
    pub states: Vec<TaskState>,
    pub name: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    pub newest_first: bool,
    /// Only tasks still waiting for their start.
    pub scheduled: bool,
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// What a cancel did: cancelled the task now, or found it cancelled before (a retried call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    AlreadyCancelled,
}

/// What `create_task` returns: the task and its steps' uuids by name.
#[derive(Debug, Clone)]
pub struct CreatedTask {
    pub task_uuid: Uuid,
    /// false when an existing task was returned for the same idempotency key
    pub created: bool,
    pub steps: Vec<(String, Uuid)>,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct TaskRecord {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub name: String,
    pub priority: i32,
    pub state: TaskState,
    pub context: Value,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The start it was created with (`None`: at creation).
    pub start_at: Option<DateTime<Utc>>,
    /// It still waits for `start_at`.
    pub scheduled: bool,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct StepRecord {
    pub step_uuid: Uuid,
    pub task_uuid: Uuid,
    pub name: String,
    /// Place in the task's topological order (unique within the task).
    pub position: i32,
    pub state: StepState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub retryable: bool,
    pub next_retry_at: Option<DateTime<Utc>>,
    /// `None` when not asked for.
    pub inputs: Option<Value>,
    pub results: Option<Value>,
    pub last_error: Option<Value>,
    pub depends_on: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub queue: String,
    /// Its declared retry policy (its own or the task's), as stored.
    pub retry_policy: Option<sqlx::types::Json<crate::model::retry::RetryPolicy>>,
    /// Its attempts' execution limit (ms).
    pub timeout_ms: Option<i32>,
    /// How long it may wait for a worker once queued (ms).
    pub schedule_to_start_ms: Option<i32>,
}

/// Whether task `t` still waits for its start (a row of `tasker.task_starts` exists exactly
/// while it does).
const SCHEDULED: &str =
    "EXISTS (SELECT 1 FROM tasker.task_starts ts WHERE ts.task_uuid = t.task_uuid)";

/// Bytes a task takes in a response besides its context, at most (ids, names, key, times):
/// what a page of tasks is cut by before their contexts are read.
const TASK_ROW_BYTES: i64 = 768;

/// A row of a page, and how many rows the page had before it was cut to its budget.
#[derive(sqlx::FromRow)]
struct Paged<T> {
    #[sqlx(flatten)]
    row: T,
    page_rows: i64,
}

impl Store {
    /// Create a task and its DAG in one transaction; with an idempotency key already used in
    /// the namespace, return that task instead and write nothing. Steps come back in their
    /// topological order.
    pub async fn create_task(
        &self,
        task: &NewTask,
        metadata: &Value,
        traceparent: Option<&str>,
    ) -> Result<CreatedTask, StoreError> {
        // a large task is the one request that can run long: if its client gives up, so does
        // the database
        let mut held = self.hot().await?;
        held.cancel_if_abandoned().await?;
        let created = self
            .create_task_on(held.conn(), task, metadata, traceparent)
            .await;
        held.finished(created)
    }

    /// [`create_task`](Self::create_task) on `conn`, in its transaction if it has one (a
    /// schedule's tick creates its task in the transaction that advances the schedule).
    pub(super) async fn create_task_on(
        &self,
        conn: &mut sqlx::PgConnection,
        task: &NewTask,
        metadata: &Value,
        traceparent: Option<&str>,
    ) -> Result<CreatedTask, StoreError> {
        let steps = serde_json::to_value(&task.steps).expect("steps serialize");
        let rows: Vec<(Uuid, bool, String, Uuid)> = sqlx::query_as(
            "SELECT c.task_uuid, c.created, c.step_name, c.step_uuid
             FROM (SELECT set_config('tasker.traceparent', coalesce($9, ''), true)) tp,
                  tasker.create_task($1, $2, $3, $4, $5, $6, $7, $8, $10, $11, $12, $13, $14) c",
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
        .fetch_all(conn)
        .await?;

        let first = rows
            .first()
            .ok_or_else(|| StoreError::invalid("steps", "a task needs at least one step"))?;
        Ok(CreatedTask {
            task_uuid: first.0,
            created: first.1,
            steps: rows.iter().map(|r| (r.2.clone(), r.3)).collect(),
        })
    }

    pub async fn get_task(&self, task_uuid: Uuid) -> Result<TaskRecord, StoreError> {
        sqlx::query_as::<_, TaskRecord>(&format!(
            "SELECT task_uuid, namespace, name, priority, state, context, idempotency_key, created_at, updated_at, completed_at,
                    start_at, {SCHEDULED} AS scheduled
             FROM tasker.tasks t WHERE task_uuid = $1",
        ))
        .bind(task_uuid)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("task {task_uuid}")))
    }

    /// The task as it is now and the id of its last state transition, read in one snapshot:
    /// every transition with a higher id happened after what the record shows.
    pub async fn task_with_last_transition(
        &self,
        task_uuid: Uuid,
    ) -> Result<(TaskRecord, i64), StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            task: TaskRecord,
            last_transition: i64,
        }
        let row = sqlx::query_as::<_, Row>(&format!(
            "SELECT t.task_uuid, t.namespace, t.name, t.priority, t.state, t.context, t.idempotency_key,
                    t.created_at, t.updated_at, t.completed_at, t.start_at, {SCHEDULED} AS scheduled,
                    coalesce((SELECT max(x.id) FROM tasker.task_transitions x
                              WHERE x.task_uuid = t.task_uuid), 0) AS last_transition
             FROM tasker.tasks t WHERE t.task_uuid = $1",
        ))
        .bind(task_uuid)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found(format!("task {task_uuid}")))?;
        Ok((row.task, row.last_transition))
    }

    /// The task's state transitions after transition `after`, in order. A task's transitions
    /// are made under its row lock, so they commit in the order of their ids: reading on from
    /// the last one seen misses none.
    pub async fn task_transitions_after(
        &self,
        task_uuid: Uuid,
        after: i64,
    ) -> Result<Vec<TaskTransition>, StoreError> {
        Ok(sqlx::query_as::<_, TaskTransition>(
            "SELECT id, from_state, to_state, created_at FROM tasker.task_transitions
             WHERE task_uuid = $1 AND id > $2 ORDER BY id",
        )
        .bind(task_uuid)
        .bind(after)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The state and attempt of the task's steps updated since `since` (all of them when
    /// `None`), and the database's time of this read, for the next one. A look at what
    /// changed, for WatchTask: one read per look, shared by every stream of the task.
    pub async fn step_states_since(
        &self,
        task_uuid: Uuid,
        since: Option<DateTime<Utc>>,
    ) -> Result<(Vec<StepSnapshot>, DateTime<Utc>), StoreError> {
        let rows: Vec<(Uuid, String, StepState, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT s.step_uuid, s.name, s.state, s.attempts, now()
             FROM tasker.workflow_steps s
             WHERE s.task_uuid = $1 AND ($2::timestamptz IS NULL OR s.updated_at >= $2)",
        )
        .bind(task_uuid)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let now = match rows.first() {
            Some(r) => r.4,
            None => {
                sqlx::query_scalar("SELECT now()")
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        Ok((
            rows.into_iter()
                .map(|(step_uuid, name, state, attempts, _)| StepSnapshot {
                    step_uuid,
                    name,
                    state,
                    attempts,
                })
                .collect(),
            now,
        ))
    }

    /// A page of tasks matching `q`, in creation order (see [`TaskListQuery`]), cut in the
    /// query to the first tasks whose contexts fit `budget` bytes as sent (at least one): only
    /// the contexts of the tasks returned are read, whatever the page size. The tasks, and
    /// whether more may follow (the page came back full, or was cut).
    pub async fn list_tasks(
        &self,
        q: &TaskListQuery,
        budget: usize,
    ) -> Result<(Vec<TaskRecord>, bool), StoreError> {
        let (beyond, direction) = if q.newest_first {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let order = format!("created_at {direction}, task_uuid {direction}");
        let mut sql = sqlx::QueryBuilder::new(format!(
            "SELECT w.task_uuid, w.namespace, w.name, w.priority, w.state, w.context,
                    w.idempotency_key, w.created_at, w.updated_at, w.completed_at, w.start_at,
                    w.scheduled, w.page_rows
             FROM (SELECT p.*,
                          sum(coalesce(p.context_bytes, octet_length(p.context::text)) + {TASK_ROW_BYTES})
                              OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) AS upto,
                          row_number() OVER (ORDER BY {order}) AS rn,
                          count(*) OVER () AS page_rows
                   FROM (SELECT task_uuid, namespace, name, priority, state, context, context_bytes,
                                idempotency_key, created_at, updated_at, completed_at, start_at,
                                {SCHEDULED} AS scheduled
                         FROM tasker.tasks t WHERE true"
        ));
        if let Some(ns) = &q.namespace {
            sql.push(" AND namespace = ").push_bind(ns);
        }
        if !q.states.is_empty() {
            sql.push(" AND state = ANY(").push_bind(&q.states).push(")");
        }
        if q.scheduled {
            sql.push(format_args!(" AND start_at IS NOT NULL AND {SCHEDULED}"));
        }
        if let Some(name) = &q.name {
            sql.push(" AND name = ").push_bind(name);
        }
        if let Some(t) = q.created_after {
            sql.push(" AND created_at >= ").push_bind(t);
        }
        if let Some(t) = q.created_before {
            sql.push(" AND created_at < ").push_bind(t);
        }
        if let Some(t) = q.updated_after {
            sql.push(" AND updated_at >= ").push_bind(t);
        }
        if let Some(t) = q.updated_before {
            sql.push(" AND updated_at < ").push_bind(t);
        }
        if let Some((created_at, task_uuid)) = q.after {
            sql.push(format_args!(" AND (created_at, task_uuid) {beyond} ("))
                .push_bind(created_at)
                .push(", ")
                .push_bind(task_uuid)
                .push(")");
        }
        sql.push(format_args!(" ORDER BY {order} LIMIT "))
            .push_bind(q.limit)
            .push(") p) w WHERE w.rn = 1 OR w.upto <= ")
            .push_bind(i64::try_from(budget).unwrap_or(i64::MAX))
            .push(format_args!(" ORDER BY {order}"));
        let rows = sql
            .build_query_as::<Paged<TaskRecord>>()
            .fetch_all(&self.pool)
            .await?;
        let more = rows
            .first()
            .is_some_and(|r| r.page_rows >= q.limit || r.page_rows > rows.len() as i64);
        Ok((rows.into_iter().map(|r| r.row).collect(), more))
    }

    /// Up to `limit` steps of a task after topological position `after`, in that order.
    /// Without `with_data`, their inputs, results and last errors are not read; with it, the
    /// steps are cut in the query to the first whose data fit `budget` bytes as sent (at least
    /// one), so only their data are read. The steps, and whether more may follow (the page
    /// came back full, or was cut).
    pub async fn get_steps(
        &self,
        task_uuid: Uuid,
        after: Option<i32>,
        limit: i64,
        with_data: bool,
        budget: usize,
    ) -> Result<(Vec<StepRecord>, bool), StoreError> {
        let budget = if with_data {
            i64::try_from(budget).unwrap_or(i64::MAX)
        } else {
            i64::MAX
        };
        let rows = sqlx::query_as::<_, Paged<StepRecord>>(
            "SELECT w.step_uuid, w.task_uuid, w.name, w.position, w.state, w.attempts,
                    w.max_attempts, w.retryable, w.next_retry_at,
                    CASE WHEN $4 THEN w.inputs END AS inputs,
                    CASE WHEN $4 THEN w.results END AS results,
                    CASE WHEN $4 THEN w.last_error END AS last_error,
                    coalesce((SELECT array_agg(p.name ORDER BY p.name)
                              FROM tasker.step_edges e JOIN tasker.workflow_steps p ON p.step_uuid = e.parent_step_uuid
                              WHERE e.child_step_uuid = w.step_uuid), '{}') AS depends_on,
                    w.created_at, w.enqueued_at, w.started_at, w.completed_at, w.queue,
                    w.retry_policy, w.timeout_ms, w.schedule_to_start_ms, w.page_rows
             FROM (SELECT p.*,
                          CASE WHEN $4 THEN
                              sum(coalesce(p.data_bytes,
                                           octet_length(p.inputs::text)
                                           + coalesce(octet_length(p.results::text), 0)
                                           + coalesce(octet_length(p.last_error::text), 0)))
                                  OVER (ORDER BY p.position ROWS UNBOUNDED PRECEDING)
                          ELSE 0 END AS upto,
                          row_number() OVER (ORDER BY p.position) AS rn,
                          count(*) OVER () AS page_rows
                   FROM (SELECT s.* FROM tasker.workflow_steps s
                         WHERE s.task_uuid = $1 AND s.position > coalesce($2, -1)
                         ORDER BY s.position LIMIT $3) p) w
             WHERE w.rn = 1 OR w.upto <= $5
             ORDER BY w.position",
        )
        .bind(task_uuid)
        .bind(after)
        .bind(limit)
        .bind(with_data)
        .bind(budget)
        .fetch_all(&self.pool)
        .await?;
        let more = rows
            .first()
            .is_some_and(|r| r.page_rows >= limit || r.page_rows > rows.len() as i64);
        Ok((rows.into_iter().map(|r| r.row).collect(), more))
    }

    /// Cancel a task and every step not yet finished; their queue messages are removed.
    pub async fn cancel_task(
        &self,
        task_uuid: Uuid,
        reason: &str,
        metadata: &Value,
        traceparent: Option<&str>,
    ) -> Result<CancelOutcome, StoreError> {
        let outcome: CancelAnswer = sqlx::query_scalar(
            "SELECT tasker.cancel_task($1, $2, $3) FROM (SELECT set_config('tasker.traceparent', coalesce($4, ''), true)) tp",
        )
        .bind(task_uuid)
        .bind(reason)
        .bind(metadata)
        .bind(traceparent)
            .fetch_one(&self.pool)
            .await?;
        match outcome {
            CancelAnswer::Cancelled => Ok(CancelOutcome::Cancelled),
            CancelAnswer::TaskNotFound => Err(StoreError::not_found(format!("task {task_uuid}"))),
            CancelAnswer::TaskAlreadyFinal => {
                // final states are final: what this reads cannot change any more
                let state: TaskState =
                    sqlx::query_scalar("SELECT state FROM tasker.tasks WHERE task_uuid = $1")
                        .bind(task_uuid)
                        .fetch_one(&self.pool)
                        .await?;
                if state == TaskState::Cancelled {
                    // a retried cancel (its first answer lost) is answered as done
                    Ok(CancelOutcome::AlreadyCancelled)
                } else {
                    Err(StoreError::FailedPrecondition(format!(
                        "task {task_uuid} cannot be cancelled: it is already {state}"
                    )))
                }
            }
        }
    }

    /// The request digest the task's creation recorded (its first history row's metadata),
    /// if any: tasks created before digests were recorded have none.
    pub async fn creation_digest(&self, task_uuid: Uuid) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT t.metadata ->> 'request_digest' FROM tasker.task_transitions t
             WHERE t.task_uuid = $1 AND t.from_state IS NULL ORDER BY t.id LIMIT 1",
        )
        .bind(task_uuid)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// Mark a step as done by hand; dependents treat it as complete.
    pub async fn resolve_step_manually(
        &self,
        step_uuid: Uuid,
        reason: &str,
        results: Option<&Value>,
        traceparent: Option<&str>,
    ) -> Result<(), StoreError> {
        let outcome: ResolveAnswer = sqlx::query_scalar(
            "SELECT tasker.resolve_step_manually($1, $2, $3, $6, $4, $7) FROM (SELECT set_config('tasker.traceparent', coalesce($5, ''), true)) tp",
        )
        .bind(step_uuid)
        .bind(reason)
        .bind(results)
        .bind(json!({"source": "manual"}))
        .bind(traceparent)
        .bind(results.map(super::steps::results_bytes))
        .bind(self.parent_results_budget())
        .fetch_one(&self.pool)
        .await?;
        match outcome {
            ResolveAnswer::Resolved => Ok(()),
            ResolveAnswer::ParentResultsTooLarge => Err(super::steps::parent_results_too_large(
                step_uuid,
                self.limits.max_parent_results_bytes,
            )),
            ResolveAnswer::StepNotFound => Err(StoreError::not_found(format!("step {step_uuid}"))),
            ResolveAnswer::IllegalTransition => Err(StoreError::FailedPrecondition(format!(
                "step {step_uuid} cannot be resolved manually from its current state"
            ))),
        }
    }

    /// Retry a task in error: each errored step gets `extra_attempts` more attempts and is
    /// ready again; the task goes back to in progress.
    pub async fn retry_task(
        &self,
        task_uuid: Uuid,
        extra_attempts: i32,
        metadata: &Value,
        traceparent: Option<&str>,
    ) -> Result<(), StoreError> {
        let outcome: RetryAnswer = sqlx::query_scalar(
            "SELECT tasker.retry_task($1, $2, $3) FROM (SELECT set_config('tasker.traceparent', coalesce($4, ''), true)) tp",
        )
        .bind(task_uuid)
        .bind(extra_attempts)
        .bind(metadata)
        .bind(traceparent)
        .fetch_one(&self.pool)
        .await?;
        match outcome {
            RetryAnswer::Retried => Ok(()),
            RetryAnswer::TaskNotFound => Err(StoreError::not_found(format!("task {task_uuid}"))),
            RetryAnswer::TaskNotInError => Err(StoreError::FailedPrecondition(format!(
                "task {task_uuid} is not in error: only a task in error can be retried"
            ))),
            RetryAnswer::AttemptsExhausted => Err(StoreError::FailedPrecondition(format!(
                "a failed step of task {task_uuid} would need more than {} attempts in all",
                crate::model::limits::MAX_ATTEMPTS
            ))),
        }
    }

    /// The task a step belongs to.
    pub async fn step_task(&self, step_uuid: Uuid) -> Result<Uuid, StoreError> {
        sqlx::query_scalar("SELECT task_uuid FROM tasker.workflow_steps WHERE step_uuid = $1")
            .bind(step_uuid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("step {step_uuid}")))
    }

    /// Namespaces that exist, oldest first.
    pub async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .namespace_records()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Namespaces that exist with their creation times, oldest first.
    pub async fn namespace_records(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT name, created_at FROM tasker.namespaces ORDER BY created_at, name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Create a namespace (within `database.max_namespaces`): whether it was created now
    /// (false: it existed).
    pub async fn create_namespace(&self, name: &str) -> Result<bool, StoreError> {
        let outcome: NamespaceAnswer = sqlx::query_scalar("SELECT tasker.create_namespace($1, $2)")
            .bind(name)
            .bind(self.limits.max_namespaces.map(|n| n as i32))
            .fetch_one(&self.pool)
            .await?;
        match outcome {
            NamespaceAnswer::Created => Ok(true),
            NamespaceAnswer::Exists => Ok(false),
            other => Err(StoreError::unexpected("tasker.create_namespace", other)),
        }
    }

    /// Delete a namespace that holds no task.
    pub async fn delete_namespace(&self, name: &str) -> Result<(), StoreError> {
        let outcome: NamespaceAnswer = sqlx::query_scalar("SELECT tasker.delete_namespace($1)")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        match outcome {
            NamespaceAnswer::Deleted => Ok(()),
            NamespaceAnswer::NotFound => Err(StoreError::not_found(format!("namespace {name:?}"))),
            NamespaceAnswer::NotEmpty => Err(StoreError::FailedPrecondition(format!(
                "namespace {name:?} holds tasks: only an empty namespace can be deleted"
            ))),
            other => Err(StoreError::unexpected("tasker.delete_namespace", other)),
        }
    }
}
