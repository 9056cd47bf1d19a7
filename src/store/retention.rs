//! Retention as the store sees it: removing finished tasks past their namespace's retention
//! (`tasker.purge_finished_tasks`, one batch per call, its tasks claimed so that replicas never
//! purge the same rows), what is kept (the oldest finished task per namespace, the schema's
//! size), and a namespace's own retention periods.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Store, StoreError};
use crate::model::retention::overdue;
pub use crate::model::retention::RetentionDefaults;

/// What one purge batch removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct PurgedBatch {
    pub tasks: i32,
    pub steps: i32,
    /// Rows of every table, the tasks, steps and history included.
    pub rows_removed: i64,
}

/// A namespace's retention: the periods that apply and its oldest finished tasks still kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRetention {
    pub namespace: String,
    pub retention: Duration,
    pub error_retention: Duration,
    /// When its oldest complete or cancelled task still kept finished.
    pub oldest_finished: Option<DateTime<Utc>>,
    /// When its oldest task in error still kept failed.
    pub oldest_error: Option<DateTime<Utc>>,
}

impl NamespaceRetention {
    /// The purge is behind here: a finished task is kept for more than twice its period.
    pub fn behind(&self, now: DateTime<Utc>) -> bool {
        overdue(self.oldest_finished, self.retention, now)
            || overdue(self.oldest_error, self.error_retention, now)
    }
}

/// Totals of what this process purged, shared by the purger (which adds) and the status and
/// metrics (which read).
#[derive(Debug, Clone, Default)]
pub struct PurgeTotals(Arc<[AtomicU64; 3]>);

impl PurgeTotals {
    pub fn add(&self, batch: PurgedBatch) {
        let [tasks, steps, rows] = &*self.0;
        tasks.fetch_add(u64::try_from(batch.tasks).unwrap_or(0), Ordering::Relaxed);
        steps.fetch_add(u64::try_from(batch.steps).unwrap_or(0), Ordering::Relaxed);
        rows.fetch_add(
            u64::try_from(batch.rows_removed).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    /// (tasks, steps, rows) purged so far.
    pub fn get(&self) -> (u64, u64, u64) {
        let [tasks, steps, rows] = &*self.0;
        (
            tasks.load(Ordering::Relaxed),
            steps.load(Ordering::Relaxed),
            rows.load(Ordering::Relaxed),
        )
    }
}

/// A namespace's own periods, changed by `SetNamespaceSettings`: `None` leaves one as it is,
/// `Some(None)` returns it to the fleet's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionChange {
    pub retention: Option<Option<Duration>>,
    pub error_retention: Option<Option<Duration>>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Store {
    /// Remove up to `limit` finished tasks past their retention, with every row that refers
    /// to them, in one transaction (namespaces `None`: all).
    pub async fn purge_finished_tasks(
        &self,
        defaults: RetentionDefaults,
        limit: u32,
        namespaces: Option<&[String]>,
    ) -> Result<PurgedBatch, StoreError> {
        Ok(
            sqlx::query_as("SELECT * FROM tasker.purge_finished_tasks($1, $2, $3, $4)")
                .bind(millis(defaults.retention))
                .bind(millis(defaults.error_retention))
                .bind(i32::try_from(limit).unwrap_or(i32::MAX))
                .bind(namespaces)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Per namespace (namespaces `None`: all): the periods that apply and its oldest
    /// finished tasks still kept.
    pub async fn retention_status(
        &self,
        defaults: RetentionDefaults,
        namespaces: Option<&[String]>,
    ) -> Result<Vec<NamespaceRetention>, StoreError> {
        type Row = (
            String,
            i64,
            i64,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as("SELECT * FROM tasker.retention_status($1, $2, $3)")
            .bind(millis(defaults.retention))
            .bind(millis(defaults.error_retention))
            .bind(namespaces)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(namespace, keep, keep_error, oldest_finished, oldest_error)| NamespaceRetention {
                    namespace,
                    retention: from_millis(keep),
                    error_retention: from_millis(keep_error),
                    oldest_finished,
                    oldest_error,
                },
            )
            .collect())
    }

    /// Bytes the `tasker` schema takes on disk: its tables with their indexes and TOAST.
    pub async fn schema_bytes(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
             FROM pg_class c
             WHERE c.relnamespace = 'tasker'::regnamespace AND c.relkind IN ('r', 'm', 'p')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// A namespace's own retention periods (`None`: the fleet's default).
    pub async fn namespace_retention(
        &self,
        namespace: &str,
    ) -> Result<(Option<Duration>, Option<Duration>), StoreError> {
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT retention_ms, error_retention_ms FROM tasker.namespaces WHERE name = $1",
        )
        .bind(namespace)
        .fetch_optional(&self.pool)
        .await?;
        let (keep, keep_error) =
            row.ok_or_else(|| StoreError::not_found(format!("namespace {namespace:?}")))?;
        Ok((keep.map(from_millis), keep_error.map(from_millis)))
    }

    /// Change a namespace's own retention periods.
    pub async fn set_namespace_retention(
        &self,
        namespace: &str,
        change: RetentionChange,
    ) -> Result<(), StoreError> {
        if change == RetentionChange::default() {
            return Ok(());
        }
        let found = sqlx::query(
            "UPDATE tasker.namespaces
             SET retention_ms = CASE WHEN $2 THEN $3 ELSE retention_ms END,
                 error_retention_ms = CASE WHEN $4 THEN $5 ELSE error_retention_ms END
             WHERE name = $1",
        )
        .bind(namespace)
        .bind(change.retention.is_some())
        .bind(change.retention.flatten().map(millis))
        .bind(change.error_retention.is_some())
        .bind(change.error_retention.flatten().map(millis))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if found == 0 {
            return Err(StoreError::not_found(format!("namespace {namespace:?}")));
        }
        Ok(())
    }
}
