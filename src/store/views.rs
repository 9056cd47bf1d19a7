//! Readiness queries: per-step readiness, a task's execution context, ready tasks.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::model::states::{ExecutionStatus, StepState, TaskState};

#[derive(Debug, Clone, sqlx::FromRow, Serialize, PartialEq)]
pub struct StepReadiness {
    pub step_uuid: Uuid,
    pub name: String,
    pub state: StepState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub total_parents: i32,
    pub completed_parents: i32,
    pub dependencies_satisfied: bool,
    pub retry_eligible: bool,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub ready: bool,
    pub ready_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, PartialEq)]
pub struct ExecutionContext {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub task_state: TaskState,
    pub priority: i32,
    pub total_steps: i32,
    pub pending_steps: i32,
    pub enqueued_steps: i32,
    pub in_progress_steps: i32,
    pub complete_steps: i32,
    pub failed_steps: i32,
    pub waiting_for_retry_steps: i32,
    pub cancelled_steps: i32,
    pub ready_steps: i32,
    pub execution_status: ExecutionStatus,
}

#[derive(Debug, Clone, sqlx::FromRow, Serialize, PartialEq)]
pub struct ReadyTask {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub priority: i32,
    pub computed_priority: i32,
    pub ready_steps: i32,
    pub ready_since: DateTime<Utc>,
    pub task_state: TaskState,
}

/// A task's place in a ranking of ready tasks: computed priority, ready since, uuid.
pub type ReadyRank = (i32, DateTime<Utc>, Uuid);

impl Store {
    /// Per task of `tasks` and per queue: steps ready or enqueued and not yet leased.
    pub async fn ready_per_queue(
        &self,
        tasks: &[Uuid],
    ) -> Result<Vec<(Uuid, String, i32)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT s.task_uuid, s.queue, count(*)::int
             FROM tasker.workflow_steps s
             WHERE s.task_uuid = ANY($1)
               AND (s.state = 'enqueued'
                    OR (s.state = 'pending' AND s.unfinished_parents = 0
                        AND EXISTS (SELECT 1 FROM tasker.ready_steps r WHERE r.step_uuid = s.step_uuid)))
             GROUP BY s.task_uuid, s.queue
             ORDER BY s.task_uuid, s.queue",
        )
        .bind(tasks)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn step_readiness(&self, task_uuid: Uuid) -> Result<Vec<StepReadiness>, StoreError> {
        Ok(
            sqlx::query_as::<_, StepReadiness>("SELECT * FROM tasker.step_readiness($1)")
                .bind(task_uuid)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn execution_context(&self, task_uuid: Uuid) -> Result<ExecutionContext, StoreError> {
        sqlx::query_as::<_, ExecutionContext>("SELECT * FROM tasker.task_execution_context($1)")
            .bind(task_uuid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("task {task_uuid}")))
    }

    /// A page of tasks with ready steps for ListReadyTasks, ranked as of `as_of` (so that the
    /// pages of one listing share one ranking), after the task `after` of that ranking
    /// (its computed priority, ready since, uuid).
    pub async fn ready_tasks_page(
        &self,
        namespaces: Option<&[String]>,
        limit: i64,
        as_of: DateTime<Utc>,
        after: Option<ReadyRank>,
    ) -> Result<Vec<ReadyTask>, StoreError> {
        Ok(sqlx::query_as::<_, ReadyTask>(
            "SELECT * FROM tasker.ready_tasks_page($1, $2::int, $3, $4, $5, $6)",
        )
        .bind(namespaces)
        .bind(limit)
        .bind(as_of)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(after.map(|a| a.2))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Tasks with ready steps, best first. `namespaces`: `None` for all, or namespace patterns
    /// (exact names, or prefixes ending in `*`). `ready_before` keeps only those ready since
    /// before it (the poller's age threshold); `offset` pages.
    pub async fn ready_tasks(
        &self,
        namespaces: Option<&[String]>,
        limit: i64,
        ready_before: Option<DateTime<Utc>>,
        offset: i64,
    ) -> Result<Vec<ReadyTask>, StoreError> {
        Ok(sqlx::query_as::<_, ReadyTask>(
            "SELECT * FROM tasker.ready_tasks($1, $2::int, coalesce($3, 'infinity'::timestamptz), $4::int)",
        )
        .bind(namespaces)
        .bind(limit)
        .bind(ready_before)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?)
    }
}
