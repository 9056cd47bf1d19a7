//! Lanes (a namespace's queues) as an operator sees and changes them: the in-flight limit,
//! pausing, and what is leased and waiting. The enforcement is in the database, where steps
//! are leased (`sql/queues.sql`).

use super::{Store, StoreError};

/// A lane's settings and load. `queue` empty: the namespace as a whole.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LaneSettings {
    pub namespace: String,
    pub queue: String,
    pub max_in_flight: Option<i32>,
    pub paused: bool,
    /// The namespace as a whole is paused.
    pub namespace_paused: bool,
    /// Its steps leased now.
    pub in_flight: i32,
    /// Its steps queued and not leased, counted up to [`QUEUED_COUNTED`].
    pub queued: i32,
    /// Of the queued, those its pause or in-flight limit keeps from being leased now (the
    /// rest wait for a worker).
    pub held: i32,
}

/// Lanes reported in metrics at most: the gauges' attribute sets stay bounded.
pub const LANES_REPORTED: i64 = 1_000;

/// Queued steps counted at most per lane: a status read stays cheap whatever the backlog.
pub const QUEUED_COUNTED: i64 = 10_000;

impl Store {
    /// A lane's settings and load (a lane never configured: no limit, not paused).
    pub async fn lane_settings(
        &self,
        namespace: &str,
        queue: &str,
    ) -> Result<LaneSettings, StoreError> {
        self.require_namespace(namespace).await?;
        let mut lanes = self
            .lanes_with_load(&[(namespace.to_string(), queue.to_string())])
            .await?;
        Ok(lanes.remove(0))
    }

    /// Settings and load of each lane, in the order given, in one query.
    async fn lanes_with_load(
        &self,
        lanes: &[(String, String)],
    ) -> Result<Vec<LaneSettings>, StoreError> {
        let (namespaces, queues): (Vec<String>, Vec<String>) = lanes.iter().cloned().unzip();
        Ok(sqlx::query_as::<_, LaneSettings>(
            "SELECT lane.*,
                    -- what the lane could lease now is the hop's own rule (tasker.lane_room)
                    lane.queued - tasker.lane_room(lane.namespace, lane.queue, lane.queued) AS held
             FROM (
             SELECT l.namespace, l.queue, l.ord,
                    g.max_in_flight,
                    coalesce(g.paused, false) AS paused,
                    coalesce((SELECT n.paused FROM tasker.queue_settings n
                              WHERE n.namespace = l.namespace AND n.queue = ''), false) AS namespace_paused,
                    (SELECT count(*)::int FROM tasker.step_queue q
                     WHERE q.namespace = l.namespace AND (l.queue = '' OR q.queue = l.queue)
                       AND q.leased_by IS NOT NULL) AS in_flight,
                    (SELECT count(*)::int FROM (SELECT 1 FROM tasker.step_queue q
                     WHERE q.namespace = l.namespace AND (l.queue = '' OR q.queue = l.queue)
                       AND q.leased_by IS NULL LIMIT $3) w) AS queued
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(namespace, queue, ord)
             LEFT JOIN tasker.queue_settings g ON g.namespace = l.namespace AND g.queue = l.queue
             ) lane
             ORDER BY lane.ord",
        )
        .bind(namespaces)
        .bind(queues)
        .bind(QUEUED_COUNTED)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Set (or with `None` remove) a lane's in-flight limit, fleet-wide. The leases running
    /// count against a new limit; raising it wakes the steps that waited.
    pub async fn set_queue_limit(
        &self,
        namespace: &str,
        queue: &str,
        max_in_flight: Option<i32>,
    ) -> Result<LaneSettings, StoreError> {
        self.require_namespace(namespace).await?;
        self.set_queue_limit_unchecked(namespace, queue, max_in_flight)
            .await?;
        self.lane_settings(namespace, queue).await
    }

    /// [`Store::set_queue_limit`] without requiring the namespace to exist yet (the benchmark
    /// sets a limit on tables it has just emptied).
    pub async fn set_queue_limit_unchecked(
        &self,
        namespace: &str,
        queue: &str,
        max_in_flight: Option<i32>,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT tasker.set_queue_limit($1, $2, $3)")
            .bind(namespace)
            .bind(queue)
            .bind(max_in_flight)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Pause or resume a lane (`queue` empty: the whole namespace), fleet-wide; a resume
    /// wakes the lane's parked fetches on every replica.
    pub async fn set_queue_paused(
        &self,
        namespace: &str,
        queue: &str,
        paused: bool,
    ) -> Result<LaneSettings, StoreError> {
        self.require_namespace(namespace).await?;
        sqlx::query("SELECT tasker.set_queue_paused($1, $2, $3)")
            .bind(namespace)
            .bind(queue)
            .bind(paused)
            .execute(&self.pool)
            .await?;
        self.lane_settings(namespace, queue).await
    }

    /// Every lane with work (steps queued or leased) or settings, up to [`LANES_REPORTED`],
    /// for the metrics. The lanes with queued steps are found by skipping through the fetch
    /// index (one probe per lane, whatever the backlog); the leased steps are few (one per
    /// busy worker).
    pub async fn active_lanes(&self) -> Result<Vec<LaneSettings>, StoreError> {
        let lanes: Vec<(String, String)> = sqlx::query_as(
            "WITH RECURSIVE queued AS (
                 (SELECT q.namespace, q.queue FROM tasker.step_queue q
                  WHERE q.leased_by IS NULL ORDER BY q.namespace, q.queue LIMIT 1)
                 UNION ALL
                 SELECT n.namespace, n.queue FROM queued l
                 CROSS JOIN LATERAL (
                     SELECT q.namespace, q.queue FROM tasker.step_queue q
                     WHERE q.leased_by IS NULL AND (q.namespace, q.queue) > (l.namespace, l.queue)
                     ORDER BY q.namespace, q.queue LIMIT 1) n
             )
             SELECT namespace, queue FROM queued
             UNION SELECT q.namespace, q.queue FROM tasker.step_queue q WHERE q.leased_by IS NOT NULL
             UNION SELECT g.namespace, g.queue FROM tasker.queue_settings g
             ORDER BY 1, 2 LIMIT $1",
        )
        .bind(LANES_REPORTED)
        .fetch_all(&self.pool)
        .await?;
        self.lanes_with_load(&lanes).await
    }

    /// Every lane with settings (limits and pauses), for status.
    pub async fn configured_lanes(&self) -> Result<Vec<LaneSettings>, StoreError> {
        let lanes: Vec<(String, String)> = sqlx::query_as(
            "SELECT namespace, queue FROM tasker.queue_settings ORDER BY namespace, queue",
        )
        .fetch_all(&self.pool)
        .await?;
        self.lanes_with_load(&lanes).await
    }

    /// A namespace's limit of tasks per concurrency key, and how many tasks wait for a slot
    /// (counted up to [`QUEUED_COUNTED`]).
    pub async fn namespace_settings(
        &self,
        namespace: &str,
    ) -> Result<(Option<i32>, i32), StoreError> {
        self.require_namespace(namespace).await?;
        Ok(sqlx::query_as(
            "SELECT (SELECT n.max_tasks_per_key FROM tasker.namespaces n WHERE n.name = $1),
                    (SELECT count(*)::int FROM (SELECT 1 FROM tasker.key_waiters w
                     WHERE w.namespace = $1 LIMIT $2) c)",
        )
        .bind(namespace)
        .bind(QUEUED_COUNTED)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Set (or with `None` remove) a namespace's limit of tasks per concurrency key; raising
    /// or removing it starts the tasks that waited.
    pub async fn set_max_tasks_per_key(
        &self,
        namespace: &str,
        max: Option<i32>,
    ) -> Result<(Option<i32>, i32), StoreError> {
        let found: bool = sqlx::query_scalar("SELECT tasker.set_max_tasks_per_key($1, $2)")
            .bind(namespace)
            .bind(max)
            .fetch_one(&self.pool)
            .await?;
        if !found {
            return Err(StoreError::not_found(format!("namespace {namespace:?}")));
        }
        self.namespace_settings(namespace).await
    }

    async fn require_namespace(&self, namespace: &str) -> Result<(), StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tasker.namespaces WHERE name = $1)")
                .bind(namespace)
                .fetch_one(&self.pool)
                .await?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::not_found(format!("namespace {namespace:?}")))
        }
    }
}
