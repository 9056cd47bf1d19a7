//! `Store`: the connection pool, the migrations, and every SQL statement the service issues,
//! each behind a typed function. Nothing outside this module writes SQL.
//!
//! Layout:
//! - `answers`: the answer words of the SQL functions, typed
//! - `error`: [`StoreError`], SQLSTATE -> domain error, [`is_retryable`]
//! - `tasks`: create, get, cancel, resolve manually
//! - `views`: read-only readiness views: per-step readiness, execution context, ready tasks
//! - `steps`: claim-and-enqueue, the workers' fetch / complete / fail / extend, retry and lease
//!   deadlines
//! - `replicas`: the replica registry's heartbeats and the fleet listing
//! - `schedules`: cron schedules' rows, and firing a due one (its tasks made in its transaction)
//! - `held`: [`HeldConnections`], connections the hop's statements keep between uses, and a
//!   statement cancelled when its request is dropped
//! - `local`: finding or starting a PostgreSQL to run against (the embedded cluster)
//! - `maintenance`: vacuuming the churn tables when autovacuum is off
//! - `diagnostics`: what the benchmark and operators measure (hop latencies from the history,
//!   the commit + NOTIFY floor, server settings), and emptying a scratch database
//!
//! The state machine itself lives in the database (`migrations/`): the functions here call one
//! SQL function per operation, so each operation is one round trip and one transaction.

mod answers;
mod diagnostics;
mod error;
mod held;
pub mod local;
pub mod maintenance;
mod queues;
mod replicas;
pub mod retention;
mod schedules;
mod steps;
mod tasks;
mod views;

use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use uuid::Uuid;

pub use diagnostics::ActivityCounters;
pub use error::{is_retryable, StoreError};
use held::HeldConnections;
pub use queues::LaneSettings;
pub use schedules::{NewSchedule, ScheduleRecord};
pub use steps::{
    Completion, EagerEnqueue, EnqueueResult, FailOutcome, HeldLease, LeasedStep, Refusal,
    StepFailure, Taker, TaskRef,
};
pub use tasks::{
    CancelOutcome, CreatedTask, StepRecord, StepSnapshot, TaskListQuery, TaskRecord, TaskTransition,
};
pub use views::ReadyRank;

use crate::config::DatabaseConfig;

/// Connections the hop's statements keep between uses at most (and at most half the pool).
const HOT_CONNECTIONS: usize = 8;

/// A pooled connection idle this long is pinged before it is handed out.
const CHECK_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The service's pool, sized by configuration.
fn pool_options(cfg: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .min_connections(cfg.min_connections)
        .acquire_timeout(cfg.acquire_timeout)
        // sqlx pings every idle connection it hands out (a round trip to the server before
        // each statement, on the hop's path); only one idle long enough to have been cut
        // meanwhile (a restart, a proxy's idle timeout) is checked now. A connection cut
        // while in use fails its statement, as one cut mid-statement always could: the
        // error is retryable (UNAVAILABLE) and every report is idempotent.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// What the store holds writes to on the service's behalf (from its configuration); a bare
/// [`Store::new`] enforces none of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreLimits {
    /// Namespaces `create_task` may bring the database to (`database.max_namespaces`).
    pub max_namespaces: Option<u32>,
    /// Whether `create_task` creates a namespace it does not know
    /// (`database.create_namespaces_on_first_use`); refused when false.
    pub no_namespaces_on_first_use: bool,
    /// Bytes of parent results a completion may give any child
    /// (`orchestration.workers.max_parent_results_bytes`).
    pub max_parent_results_bytes: Option<u32>,
}

/// Handle to the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Connections the hop's statements keep between uses (`held`).
    hot: Arc<HeldConnections>,
    limits: StoreLimits,
    replica_id: Option<Uuid>,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self {
            hot: Arc::new(HeldConnections::new(&pool, HOT_CONNECTIONS)),
            pool,
            limits: StoreLimits::default(),
            replica_id: None,
        }
    }

    pub fn with_limits(mut self, limits: StoreLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Connect a pool sized by configuration. TCP keepalive is on (sqlx's default for TCP),
    /// every connection gets an application name so operators can find them in
    /// `pg_stat_activity`, and `database.statement_timeout_ms` as its `statement_timeout`.
    pub async fn connect(url: &str, cfg: &DatabaseConfig) -> Result<Self, StoreError> {
        Self::connect_as(url, cfg, None).await
    }

    /// Connect as the replica `replica_id`: every connection announces it
    /// (`tasker.replica_id`), and the notifications its transactions send name it, so the
    /// replica that made steps ready claims the task first (`cluster`).
    pub async fn connect_as(
        url: &str,
        cfg: &DatabaseConfig,
        replica_id: Option<Uuid>,
    ) -> Result<Self, StoreError> {
        // no statement of the service holds a backend longer than this: a request that would
        // is cancelled by the server, whatever its client does
        let mut settings = vec![(
            "statement_timeout",
            format!("{}ms", cfg.statement_timeout.as_millis()),
        )];
        if let Some(id) = replica_id {
            settings.push(("tasker.replica_id", id.to_string()));
        }
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()
            .map_err(StoreError::from)?
            .application_name("tasker")
            .options(settings);
        let pool = pool_options(cfg).connect_with(options).await?;
        let mut store = Self::new(pool);
        store.replica_id = replica_id;
        Ok(store)
    }

    /// The replica id this store's connections announce, if any.
    pub fn replica_id(&self) -> Option<Uuid> {
        self.replica_id
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection for a statement on the hop (a completion, a claim, a fetch): one kept
    /// from an earlier such statement, else the pool's.
    async fn hot(&self) -> Result<held::Held<'_>, StoreError> {
        self.hot.take().await
    }

    /// Apply pending migrations; a no-op when the schema is current. Returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let before = applied_migrations(&self.pool).await.unwrap_or(0);
        // a migration may take longer than a request's statement timeout
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        let result = crate::MIGRATOR.run(&mut *conn).await;
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        drop(conn);
        result.map_err(|e| match e {
            // the database was migrated by a build from before the baseline, whose migrations
            // no longer exist: nothing was released, so such a database is a developer's own
            sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Migration(format!(
                "this database has migration {v} applied, which this build does not have: it \
                 was made by a build from before the baseline migration (or a newer one). \
                 Recreate it with `tasker db reset --yes` (this deletes its Tasker data)"
            )),
            e => StoreError::Migration(e.to_string()),
        })?;
        let after = applied_migrations(&self.pool).await?;
        Ok(after.saturating_sub(before))
    }

    /// Drop the Tasker schema and the migration ledger, then migrate from scratch. Deletes
    /// every task; for a developer's database made by a build from before the baseline.
    pub async fn reset(&self) -> Result<usize, StoreError> {
        sqlx::raw_sql(
            "DROP SCHEMA IF EXISTS tasker CASCADE; DROP TABLE IF EXISTS public._sqlx_migrations",
        )
        .execute(&self.pool)
        .await?;
        self.migrate().await
    }

    /// Whether the server's autovacuum runs (it can be switched off server-wide).
    pub async fn autovacuum_enabled(&self) -> Result<bool, StoreError> {
        let on: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(&self.pool)
            .await?;
        Ok(on == "on")
    }

    /// Vacuum and analyze the tables every step churns through; tables another session is
    /// already working on are skipped.
    pub async fn maintain_churn_tables(&self) -> Result<(), StoreError> {
        // maintenance may take longer than a request's statement timeout
        let mut conn = self.pool.acquire().await?;
        // (three statements: VACUUM refuses to run in a multi-statement string)
        for sql in [
            "SET statement_timeout = 0",
            // with the tables the retention purge deletes from: their space is reused
            "VACUUM (SKIP_LOCKED, ANALYZE) tasker.step_queue, tasker.ready_steps,
                                          tasker.workflow_steps, tasker.tasks, tasker.step_edges,
                                          tasker.step_transitions, tasker.task_transitions",
            "RESET statement_timeout",
        ] {
            sqlx::query(sql).execute(&mut *conn).await?;
        }
        Ok(())
    }
}

async fn applied_migrations(pool: &PgPool) -> Result<usize, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await?;
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool does not ping a connection before every statement (a round trip more on
    /// every hop): only one idle for a while is checked, by the `before_acquire` hook.
    #[test]
    fn the_pool_checks_only_connections_idle_a_while() {
        let options = pool_options(&DatabaseConfig::default());
        assert!(!options.get_test_before_acquire());
    }
}
