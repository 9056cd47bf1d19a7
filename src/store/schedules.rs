//! Cron schedules' rows: creating, reading, listing, pausing, deleting, and firing a due one
//! (its row locked, its ticks' tasks created and the schedule advanced in one transaction, so
//! each tick makes its task once whatever the number of replicas, and a replica killed midway
//! leaves the tick to the next).

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::model::schedule::{CatchUp, DueSchedule, Overlap, TickOutcome, WakePlan};

/// How many of a schedule's latest runs are kept (GetSchedule shows them).
const RUNS_KEPT: i64 = 100;

/// A schedule to create, as the service checked it.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub namespace: String,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    /// The CreateTaskRequest each tick makes, protobuf-encoded.
    pub task: Vec<u8>,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub paused: bool,
    pub next_fire_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRecord {
    pub namespace: String,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    pub task: Vec<u8>,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub paused: bool,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub buffered_fire_at: Option<DateTime<Utc>>,
    pub last_task_uuid: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One tick's record (the latest first).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRun {
    pub fire_at: DateTime<Utc>,
    pub outcome: String,
    pub task_uuid: Option<Uuid>,
    pub catch_up: bool,
    pub missed: i32,
    pub recorded_at: DateTime<Utc>,
}

/// What firing a due schedule did: the tasks its ticks created (for readiness commands).
#[derive(Debug, Clone)]
pub struct Fired {
    pub namespace: String,
    pub schedule: String,
    pub created: Vec<Uuid>,
}

const COLUMNS: &str = "namespace, name, cron, time_zone, task, overlap, catch_up, paused,
                       next_fire_at, buffered_fire_at, last_task_uuid, created_at, updated_at";

impl Store {
    /// Store a schedule; `AlreadyExists` if the namespace has one of that name. Every
    /// replica's deadline scheduler hears of its first tick.
    pub async fn create_schedule(&self, s: &NewSchedule) -> Result<ScheduleRecord, StoreError> {
        let row = sqlx::query_as::<_, ScheduleRecord>(&format!(
            "WITH made AS (
                 INSERT INTO tasker.schedules (namespace, name, cron, time_zone, task, overlap,
                                               catch_up, paused, next_fire_at, wake_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
                 ON CONFLICT DO NOTHING
                 RETURNING {COLUMNS}
             ),
             announced AS (
                 SELECT pg_notify('tasker_deadlines',
                                  json_build_object('namespace', m.namespace, 'at', m.next_fire_at)::text)
                 FROM made m WHERE NOT m.paused AND m.next_fire_at IS NOT NULL
             )
             SELECT m.* FROM made m LEFT JOIN announced ON true"
        ))
        .bind(&s.namespace)
        .bind(&s.name)
        .bind(&s.cron)
        .bind(&s.time_zone)
        .bind(&s.task)
        .bind(s.overlap)
        .bind(s.catch_up)
        .bind(s.paused)
        .bind(s.next_fire_at)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or_else(|| {
            StoreError::AlreadyExists(format!(
                "namespace {:?} has a schedule named {:?} already (DeleteSchedule first to replace it)",
                s.namespace, s.name
            ))
        })
    }

    pub async fn get_schedule(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ScheduleRecord, StoreError> {
        sqlx::query_as::<_, ScheduleRecord>(&format!(
            "SELECT {COLUMNS} FROM tasker.schedules WHERE namespace = $1 AND name = $2"
        ))
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found(namespace, name))
    }

    /// The schedule's latest `limit` runs, the latest first.
    pub async fn schedule_runs(
        &self,
        namespace: &str,
        name: &str,
        limit: i64,
    ) -> Result<Vec<ScheduleRun>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT fire_at, outcome, task_uuid, catch_up, missed, recorded_at
             FROM tasker.schedule_runs WHERE namespace = $1 AND schedule = $2
             ORDER BY fire_at DESC LIMIT $3",
        )
        .bind(namespace)
        .bind(name)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Schedules by namespace and name after `after`, up to `limit`.
    pub async fn list_schedules(
        &self,
        namespace: Option<&str>,
        after: Option<(&str, &str)>,
        limit: i64,
    ) -> Result<Vec<ScheduleRecord>, StoreError> {
        Ok(sqlx::query_as::<_, ScheduleRecord>(&format!(
            "SELECT {COLUMNS} FROM tasker.schedules
             WHERE ($1::text IS NULL OR namespace = $1)
               AND ($2::text IS NULL OR (namespace, name) > ($2, $3))
             ORDER BY namespace, name LIMIT $4"
        ))
        .bind(namespace)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Pause (`next_fire_at` ignored) or resume (from `next_fire_at`: the ticks of the pause
    /// are not caught up) a schedule; resuming announces its next tick.
    pub async fn set_schedule_paused(
        &self,
        namespace: &str,
        name: &str,
        paused: bool,
        next_fire_at: Option<DateTime<Utc>>,
    ) -> Result<ScheduleRecord, StoreError> {
        sqlx::query_as::<_, ScheduleRecord>(&format!(
            "WITH changed AS (
                 UPDATE tasker.schedules SET paused = $3, updated_at = clock_timestamp(),
                        next_fire_at = CASE WHEN $3 THEN next_fire_at ELSE $4 END,
                        wake_at = CASE WHEN $3 THEN wake_at ELSE $4 END
                 WHERE namespace = $1 AND name = $2
                 RETURNING {COLUMNS}
             ),
             announced AS (
                 SELECT pg_notify('tasker_deadlines',
                                  json_build_object('namespace', c.namespace, 'at', c.next_fire_at)::text)
                 FROM changed c WHERE NOT c.paused AND c.next_fire_at IS NOT NULL
             )
             SELECT c.* FROM changed c LEFT JOIN announced ON true"
        ))
        .bind(namespace)
        .bind(name)
        .bind(paused)
        .bind(next_fire_at)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found(namespace, name))
    }

    /// Delete a schedule and its runs (its tasks stay). `false` if there was none.
    pub async fn delete_schedule(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("DELETE FROM tasker.schedules WHERE namespace = $1 AND name = $2")
                .bind(namespace)
                .bind(name)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }

    /// Create a schedule's task now, outside its ticks (TriggerSchedule): marked as the
    /// schedule's, so that overlap policies see it.
    pub async fn trigger_schedule(
        &self,
        namespace: &str,
        name: &str,
        task: &crate::model::dag::NewTask,
    ) -> Result<Uuid, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM tasker.schedules WHERE namespace = $1 AND name = $2 FOR UPDATE",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Err(not_found(namespace, name));
        }
        let created = self
            .create_task_on(
                &mut tx,
                task,
                &json!({"source": "schedule", "schedule": name, "trigger": true}),
                None,
            )
            .await?;
        mark_task(&mut tx, created.task_uuid, name).await?;
        record_run(
            &mut tx,
            namespace,
            name,
            Run {
                at: Utc::now(),
                outcome: "created",
                task_uuid: Some(created.task_uuid),
                catch_up: false,
                missed: 0,
            },
        )
        .await?;
        trim_runs(&mut tx, namespace, name).await?;
        sqlx::query(
            "UPDATE tasker.schedules SET last_task_uuid = $3, updated_at = clock_timestamp()
             WHERE namespace = $1 AND name = $2",
        )
        .bind(namespace)
        .bind(name)
        .bind(created.task_uuid)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(created.task_uuid)
    }

    /// Fire the most overdue schedule whose wake-up came (of the namespaces matching
    /// `namespaces`), one no other replica is firing: `plan` decides from the locked row what
    /// its ticks do; the tasks, the runs and the schedule's next tick commit together. `None`
    /// when no schedule is due. A plan that fails (a template the database refuses, say)
    /// skips the wake-up's ticks, so that one bad schedule does not spin.
    pub async fn fire_due_schedule(
        &self,
        namespaces: Option<&[String]>,
        plan: impl FnOnce(&DueSchedule) -> Result<WakePlan, String>,
    ) -> Result<Option<Fired>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            namespace: String,
            name: String,
            cron: String,
            time_zone: String,
            task: Vec<u8>,
            overlap: Overlap,
            catch_up: CatchUp,
            next_fire_at: Option<DateTime<Utc>>,
            buffered_fire_at: Option<DateTime<Utc>>,
            previous_running: bool,
            now: DateTime<Utc>,
        }
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let row: Option<Row> = sqlx::query_as(
            "SELECT sc.namespace, sc.name, sc.cron, sc.time_zone, sc.task, sc.overlap, sc.catch_up,
                    sc.next_fire_at, sc.buffered_fire_at, clock_timestamp() AS now,
                    coalesce((SELECT t.state IN ('pending', 'in_progress') FROM tasker.tasks t
                              WHERE t.task_uuid = sc.last_task_uuid), false) AS previous_running
             FROM tasker.schedules sc
             WHERE NOT sc.paused AND sc.wake_at <= clock_timestamp()
               AND tasker.namespace_matches(sc.namespace, $1)
             ORDER BY sc.wake_at
             LIMIT 1
             FOR UPDATE OF sc SKIP LOCKED",
        )
        .bind(namespaces)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let due = DueSchedule {
            namespace: row.namespace,
            name: row.name,
            cron: row.cron,
            time_zone: row.time_zone,
            template: row.task,
            overlap: row.overlap,
            catch_up: row.catch_up,
            next_fire_at: row.next_fire_at,
            buffered_fire_at: row.buffered_fire_at,
            previous_running: row.previous_running,
            now: row.now,
        };
        let (ns, name) = (due.namespace.clone(), due.name.clone());
        let plan = match plan(&due) {
            Ok(plan) => plan,
            Err(problem) => {
                tracing::warn!(namespace = %ns, schedule = %name, %problem,
                               "a schedule cannot make its task; it is paused");
                sqlx::query(
                    "UPDATE tasker.schedules SET paused = true, updated_at = clock_timestamp()
                     WHERE namespace = $1 AND name = $2",
                )
                .bind(&ns)
                .bind(&name)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(Some(Fired {
                    namespace: ns,
                    schedule: name,
                    created: Vec::new(),
                }));
            }
        };
        let mut created = Vec::new();
        let mut last_task = None;
        for tick in &plan.ticks {
            let missed = i32::try_from(tick.missed).unwrap_or(i32::MAX);
            let (outcome, task_uuid) = match &tick.outcome {
                TickOutcome::Create(task) => {
                    let made = self
                        .create_task_on(
                            &mut tx,
                            task,
                            &json!({"source": "schedule", "schedule": name,
                                    "tick": tick.at, "catch_up": tick.catch_up}),
                            None,
                        )
                        .await?;
                    if made.created {
                        created.push(made.task_uuid);
                    }
                    last_task = Some(made.task_uuid);
                    ("created", Some(made.task_uuid))
                }
                TickOutcome::Skipped => ("skipped", None),
                TickOutcome::Buffered => ("buffered", None),
                TickOutcome::Missed => ("missed", None),
            };
            if let Some(task) = task_uuid {
                mark_task(&mut tx, task, &name).await?;
            }
            record_run(
                &mut tx,
                &ns,
                &name,
                Run {
                    at: tick.at,
                    outcome,
                    task_uuid,
                    catch_up: tick.catch_up,
                    missed,
                },
            )
            .await?;
        }
        sqlx::query(
            "UPDATE tasker.schedules
             SET next_fire_at = $3, buffered_fire_at = $4, wake_at = $3,
                 last_task_uuid = coalesce($5, last_task_uuid), updated_at = clock_timestamp()
             WHERE namespace = $1 AND name = $2",
        )
        .bind(&ns)
        .bind(&name)
        .bind(plan.next_fire_at)
        .bind(plan.buffered_fire_at)
        .bind(last_task)
        .execute(&mut *tx)
        .await?;
        trim_runs(&mut tx, &ns, &name).await?;
        tx.commit().await?;
        Ok(Some(Fired {
            namespace: ns,
            schedule: name,
            created,
        }))
    }
}

/// Mark `task` as made by the schedule `name` (its end may release a buffered tick).
async fn mark_task(tx: &mut sqlx::PgConnection, task: Uuid, name: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE tasker.tasks SET schedule_name = $2 WHERE task_uuid = $1 AND schedule_name IS NULL",
    )
    .bind(task)
    .bind(name)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// One tick's record.
struct Run {
    at: DateTime<Utc>,
    outcome: &'static str,
    task_uuid: Option<Uuid>,
    catch_up: bool,
    missed: i32,
}

/// Record a tick's run (a buffered tick's record becomes its task's when it runs).
async fn record_run(
    tx: &mut sqlx::PgConnection,
    namespace: &str,
    name: &str,
    run: Run,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tasker.schedule_runs AS r
             (namespace, schedule, fire_at, outcome, task_uuid, catch_up, missed)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (namespace, schedule, fire_at) DO UPDATE
         SET outcome = EXCLUDED.outcome, task_uuid = EXCLUDED.task_uuid,
             recorded_at = clock_timestamp()",
    )
    .bind(namespace)
    .bind(name)
    .bind(run.at)
    .bind(run.outcome)
    .bind(run.task_uuid)
    .bind(run.catch_up)
    .bind(run.missed)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Keep the schedule's latest [`RUNS_KEPT`] runs.
async fn trim_runs(
    tx: &mut sqlx::PgConnection,
    namespace: &str,
    name: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM tasker.schedule_runs r
         WHERE r.namespace = $1 AND r.schedule = $2
           AND r.fire_at < (SELECT k.fire_at FROM tasker.schedule_runs k
                            WHERE k.namespace = $1 AND k.schedule = $2
                            ORDER BY k.fire_at DESC OFFSET $3 - 1 LIMIT 1)",
    )
    .bind(namespace)
    .bind(name)
    .bind(RUNS_KEPT)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn not_found(namespace: &str, name: &str) -> StoreError {
    StoreError::not_found(format!("schedule {name:?} in namespace {namespace:?}"))
}
