//! What the benchmark and operators measure, read from the database: the server's settings,
//! the completion -> enqueue latency of recent hops (from the history), a soak's snapshot,
//! and the physical floor of one hop (commit of an UPDATE + `pg_notify`, received by a
//! LISTEN connection). Also emptying a scratch database between benchmark scenarios.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgListener;

use super::{Store, StoreError};

/// Server settings that decide what a measurement means.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServerSettings {
    pub server_version: String,
    pub synchronous_commit: String,
    pub autovacuum: String,
}

/// One soak interval's view of the database.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SoakSnapshot {
    /// Connections to this database.
    pub connections: i64,
    /// `pg_notification_queue_usage()`: a listener that falls behind fills this.
    pub notification_queue_usage: f64,
    /// Queued steps not yet leased.
    pub backlog_steps: i64,
}

impl Store {
    pub async fn server_settings(&self) -> Result<ServerSettings, StoreError> {
        let (server_version, synchronous_commit, autovacuum): (String, String, String) =
            sqlx::query_as(
                "SELECT current_setting('server_version'), current_setting('synchronous_commit'),
                        current_setting('autovacuum')",
            )
            .fetch_one(&self.pool)
            .await?;
        Ok(ServerSettings {
            server_version,
            synchronous_commit,
            autovacuum,
        })
    }

    /// Empty every Tasker table. For the benchmark's scratch database only: the caller makes
    /// sure it is not a database anyone uses. Every table of the schema, as found in the
    /// catalog, so that it also empties the database of an older build measured beside this
    /// one (`tasker bench --server-bin`). The replica registry is kept: the replicas under
    /// test are running, and a TRUNCATE beside their heartbeats deadlocks (it locks the tables
    /// in another order than a heartbeat does). Their catch-up sweeps (they run one whenever
    /// a replica joins) can deadlock with it too: PostgreSQL then cancels one side, and a
    /// cancelled TRUNCATE is tried again, up to five times.
    pub async fn truncate_all(&self) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let done = sqlx::raw_sql(
                "DO $$ BEGIN
                     EXECUTE (SELECT 'TRUNCATE ' || string_agg(format('%I.%I', schemaname, tablename), ', ')
                              FROM pg_tables
                              WHERE schemaname = 'tasker'
                                AND tablename NOT IN ('replicas', 'fleet_settings'));
                 END $$",
            )
            .execute(&self.pool)
            .await;
            match done {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 5 && super::error::is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "emptying the tables: retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Completion -> enqueue latency (ms, database clock) of every step enqueued between
    /// `from` and `to` that has a parent: its `enqueued_at` minus its last parent's
    /// `completed_at`.
    pub async fn completion_to_enqueue_ms(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<f64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT (extract(epoch FROM c.enqueued_at - p.last) * 1000)::float8
             FROM tasker.workflow_steps c
             JOIN LATERAL (SELECT max(ps.completed_at) AS last
                           FROM tasker.step_edges e JOIN tasker.workflow_steps ps ON ps.step_uuid = e.parent_step_uuid
                           WHERE e.child_step_uuid = c.step_uuid) p ON p.last IS NOT NULL
             WHERE c.enqueued_at BETWEEN $1 AND $2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Completion -> enqueue latencies (ms) of the enqueues recorded in the history after
    /// history row `after`, and the last row id seen. Windowed by the append-only history's
    /// identity key: a scan of every step ever made, growing through a soak, was itself a load
    /// on the machine being measured (over a second per report at 5 minutes).
    pub async fn enqueue_latencies_since(&self, after: i64) -> Result<(Vec<f64>, i64), StoreError> {
        let rows: Vec<(i64, f64)> = sqlx::query_as(
            "SELECT st.id, (extract(epoch FROM c.enqueued_at - p.last) * 1000)::float8
             FROM tasker.step_transitions st
             JOIN tasker.workflow_steps c ON c.step_uuid = st.step_uuid
             JOIN LATERAL (SELECT max(ps.completed_at) AS last
                           FROM tasker.step_edges e JOIN tasker.workflow_steps ps ON ps.step_uuid = e.parent_step_uuid
                           WHERE e.child_step_uuid = c.step_uuid) p ON p.last IS NOT NULL
             WHERE st.id > $1 AND st.to_state = 'enqueued'",
        )
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let last = rows.iter().map(|r| r.0).max().unwrap_or(after);
        Ok((rows.into_iter().map(|r| r.1).collect(), last))
    }

    /// Tasks not yet complete, in error or cancelled.
    pub async fn count_unfinished_tasks(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM tasker.tasks WHERE state NOT IN ('complete', 'error', 'cancelled')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Steps stored, whatever their state.
    pub async fn count_steps(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM tasker.workflow_steps")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Rewrite every `tasker` table compactly (`VACUUM FULL`): their sizes are then what is
    /// live. Takes each table's exclusive lock: for a benchmark's idle database only.
    pub async fn compact_tables(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        sqlx::query("VACUUM (FULL, ANALYZE) tasker.tasks, tasker.workflow_steps, tasker.step_edges, tasker.ready_steps, tasker.step_queue, tasker.step_transitions, tasker.task_transitions")
            .execute(&mut *conn)
            .await?;
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Per `tasker` table: its heap with TOAST, its indexes' bytes and how many indexes.
    pub async fn table_sizes(&self) -> Result<Vec<(String, i64, i64, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT c.relname::text, pg_table_size(c.oid), pg_indexes_size(c.oid),
                    (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid)
             FROM pg_class c
             WHERE c.relnamespace = 'tasker'::regnamespace AND c.relkind = 'r'
             ORDER BY pg_total_relation_size(c.oid) DESC",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Tasks stored, whatever their state.
    pub async fn count_tasks(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn soak_snapshot(&self) -> Result<SoakSnapshot, StoreError> {
        let (connections, notification_queue_usage, backlog_steps): (i64, f64, i64) =
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()),
                        pg_notification_queue_usage(),
                        (SELECT count(*) FROM tasker.step_queue WHERE leased_by IS NULL)",
            )
            .fetch_one(&self.pool)
            .await?;
        Ok(SoakSnapshot {
            connections,
            notification_queue_usage,
            backlog_steps,
        })
    }

    /// The physical floor of one hop, `rounds` times: commit an UPDATE + `pg_notify` on one
    /// connection, wait for it on a LISTEN connection. Milliseconds per round. Uses (and then
    /// drops) a scratch table `tasker_floor` in the public schema.
    pub async fn notify_floor_ms(&self, rounds: usize) -> Result<Vec<f64>, StoreError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS tasker_floor (id int PRIMARY KEY, v int)")
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO tasker_floor VALUES (1, 0) ON CONFLICT DO NOTHING")
            .execute(&self.pool)
            .await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("tasker_floor").await?;
        let mut conn = self.pool.acquire().await?;
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let t0 = Instant::now();
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            sqlx::query("UPDATE tasker_floor SET v = v + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_notify('tasker_floor', $1)")
                .bind(i.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            listener.recv().await?;
            samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        drop(listener);
        drop(conn);
        sqlx::query("DROP TABLE tasker_floor")
            .execute(&self.pool)
            .await?;
        Ok(samples)
    }
}

/// Cumulative activity counters of this database, for per-step budgets: read before and
/// after a run (with the server idle, so the statistics have been flushed), subtract.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ActivityCounters {
    pub commits: i64,
    /// Per Tasker table: rows inserted, updated (of them HOT), deleted.
    pub tables: Vec<TableActivity>,
    /// Statements executed, when `pg_stat_statements` is loaded: (sent by clients, and all
    /// of them including those run inside functions when `pg_stat_statements.track = all`).
    pub statements: Option<(i64, i64)>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, sqlx::FromRow)]
pub struct TableActivity {
    pub table: String,
    pub inserted: i64,
    pub updated: i64,
    pub hot_updated: i64,
    pub deleted: i64,
}

impl Store {
    pub async fn activity_counters(&self) -> Result<ActivityCounters, StoreError> {
        let commits: i64 = sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        let tables: Vec<TableActivity> = sqlx::query_as(
            "SELECT relname::text AS table, n_tup_ins AS inserted, n_tup_upd AS updated,
                    n_tup_hot_upd AS hot_updated, n_tup_del AS deleted
             FROM pg_stat_user_tables WHERE schemaname = 'tasker' ORDER BY relname",
        )
        .fetch_all(&self.pool)
        .await?;
        let has_statements: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')",
        )
        .fetch_one(&self.pool)
        .await?;
        let statements = if has_statements {
            sqlx::query_as(
                "SELECT coalesce(sum(calls) FILTER (WHERE toplevel), 0)::bigint,
                        coalesce(sum(calls), 0)::bigint
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&self.pool)
            .await
            .ok()
        } else {
            None
        };
        Ok(ActivityCounters {
            commits,
            tables,
            statements,
        })
    }

    /// The backend pid of one of this pool's connections (to find the server's processes).
    pub async fn backend_pid(&self) -> Result<i32, StoreError> {
        Ok(sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&self.pool)
            .await?)
    }
}

impl Store {
    /// Fill an empty database with `blocked` pending steps that wait for an unfinished parent
    /// (as 2-step chains whose first step is in progress) and `ready` ready ones, in namespace
    /// `scale`, written directly in one transaction (triggers off, for speed). For measuring
    /// the poller's query at scale.
    pub async fn seed_blocked_and_ready(&self, blocked: i64, ready: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO tasker.namespaces (name) VALUES ('scale') ON CONFLICT DO NOTHING")
            .execute(&mut *tx)
            .await?;
        // task i: step 0 in progress, step 1 pending behind it; the first `ready` tasks have
        // step 0 complete instead, so their step 1 is ready
        sqlx::query(
            "INSERT INTO tasker.tasks (task_uuid, namespace, name, state, remaining_steps)
             SELECT md5('scale' || i)::uuid, 'scale', 't', 'in_progress', 2
             FROM generate_series(1, $1) i",
        )
        .bind(blocked + ready)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, state,
                                                unfinished_parents, ready_at, attempts)
             SELECT md5('scale' || i || '-' || k)::uuid, md5('scale' || i)::uuid, 's' || k, k,
                    CASE WHEN k = 1 THEN 'pending' WHEN i <= $2 THEN 'complete' ELSE 'in_progress' END,
                    CASE WHEN k = 1 AND i > $2 THEN 1 ELSE 0 END,
                    clock_timestamp(), CASE WHEN k = 0 THEN 1 ELSE 0 END
             FROM generate_series(1, $1) i, generate_series(0, 1) k",
        )
        .bind(blocked + ready)
        .bind(ready)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tasker.ready_steps (step_uuid, task_uuid)
             SELECT md5('scale' || i || '-1')::uuid, md5('scale' || i)::uuid
             FROM generate_series(1, $1) i",
        )
        .bind(ready)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        sqlx::query("ANALYZE tasker.workflow_steps, tasker.tasks")
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
