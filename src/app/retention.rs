//! `RetentionPurger`: removes finished tasks once their namespace's retention has passed, on
//! every replica (each batch claims its tasks in the database, so replicas never purge the same
//! rows), without hurting the hop.
//!
//! ```text
//!  sleep (purge_interval when caught up; as long as the last round took when behind)
//!     └─> round: batch, pause as long as the batch took, batch, ... until a batch comes back
//!         short (caught up) or purge_round_budget is spent; before each batch, wait while the
//!         command processor has readiness work queued (the hop goes first)
//!     └─> look (at most once per purge_interval): what each namespace keeps, the schema's size
//!         -> gauges; a warning when a namespace keeps a finished task for more than twice its
//!         retention
//! ```
//! The pauses bound the purge to half of one connection's time while it is behind, and to
//! nothing while the service has commands waiting; a batch is one transaction of at most
//! `purge_batch_size` tasks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::metrics::ObservableGauge;
use opentelemetry::KeyValue;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::model::retention::age;
use crate::readiness::commands::CommandProcessorHandle;
use crate::store::retention::{NamespaceRetention, PurgeTotals};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// How often a purge waiting for the command processor looks again.
const BUSY_RECHECK: Duration = Duration::from_millis(10);

/// How a round ended.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// The last batch came back short: nothing more is due now.
    CaughtUp,
    /// The budget ran out (or the service stayed busy) with more due.
    Behind,
    /// The database refused; try again after the interval.
    Failed,
}

/// What the last look found, for the gauges.
#[derive(Default)]
struct Kept {
    namespaces: Vec<NamespaceRetention>,
    schema_bytes: i64,
}

pub struct RetentionPurger {
    store: Store,
    config: RetentionConfig,
    /// Namespaces this replica serves (`None`: all).
    namespaces: Option<Vec<String>>,
    commands: CommandProcessorHandle,
    metrics: Metrics,
    totals: PurgeTotals,
    kept: Arc<Mutex<Kept>>,
    _gauges: Vec<ObservableGauge<u64>>,
}

impl RetentionPurger {
    pub fn new(
        store: Store,
        config: RetentionConfig,
        namespaces: Option<Vec<String>>,
        commands: CommandProcessorHandle,
        metrics: Metrics,
        totals: PurgeTotals,
    ) -> Self {
        let kept: Arc<Mutex<Kept>> = Arc::default();
        let meter = metrics.meter();
        let (ages, size) = (kept.clone(), kept.clone());
        let gauges = vec![
            meter
                .u64_observable_gauge("retention_oldest_finished_age")
                .with_description("How long ago the oldest finished task still kept finished, per namespace and state (finished: complete or cancelled; error)")
                .with_unit("s")
                .with_callback(move |o| {
                    let now = chrono::Utc::now();
                    let kept = ages.lock().unwrap_or_else(|p| p.into_inner());
                    for n in &kept.namespaces {
                        for (state, oldest) in
                            [("finished", n.oldest_finished), ("error", n.oldest_error)]
                        {
                            if let Some(t) = oldest {
                                o.observe(
                                    age(t, now).as_secs(),
                                    &[
                                        KeyValue::new("namespace", n.namespace.clone()),
                                        KeyValue::new("state", state),
                                    ],
                                );
                            }
                        }
                    }
                })
                .build(),
            meter
                .u64_observable_gauge("retention_schema_size")
                .with_description("Bytes of the tasker schema: tables, indexes and TOAST")
                .with_unit("By")
                .with_callback(move |o| {
                    let bytes = size.lock().unwrap_or_else(|p| p.into_inner()).schema_bytes;
                    o.observe(u64::try_from(bytes).unwrap_or(0), &[]);
                })
                .build(),
        ];
        Self {
            store,
            config,
            namespaces,
            commands,
            metrics,
            totals,
            kept,
            _gauges: gauges,
        }
    }

    pub async fn run(self, stop: CancellationToken) {
        if !self.config.purge {
            return;
        }
        let mut wait = self.config.purge_interval;
        let mut looked: Option<Instant> = None;
        let mut warned_behind = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let started = Instant::now();
            let round = self.round(&stop).await;
            wait = match round {
                Round::CaughtUp | Round::Failed => self.config.purge_interval,
                // as long again as the round took: at most half the time purging while behind
                Round::Behind => started.elapsed().max(BUSY_RECHECK),
            };
            if looked.is_none_or(|t| t.elapsed() >= self.config.purge_interval) {
                looked = Some(Instant::now());
                warned_behind = self.look(warned_behind).await;
            }
        }
    }

    /// Purge batches until caught up or out of budget.
    async fn round(&self, stop: &CancellationToken) -> Round {
        let budget = self.config.purge_round_budget;
        let started = Instant::now();
        loop {
            // the hop goes first: while readiness commands wait, so does the purge
            while self.commands.queue_depth() > 0 {
                if started.elapsed() >= budget || stop.is_cancelled() {
                    return Round::Behind;
                }
                tokio::time::sleep(BUSY_RECHECK).await;
            }
            let batch_started = Instant::now();
            let batch = match self
                .store
                .purge_finished_tasks(
                    self.config.defaults(),
                    self.config.purge_batch_size,
                    self.namespaces.as_deref(),
                )
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "purging finished tasks failed; will retry");
                    return Round::Failed;
                }
            };
            if batch.tasks > 0 {
                self.totals.add(batch);
                self.metrics.purged(
                    u64::try_from(batch.tasks).unwrap_or(0),
                    u64::try_from(batch.rows_removed).unwrap_or(0),
                );
                tracing::debug!(
                    tasks = batch.tasks,
                    steps = batch.steps,
                    rows = batch.rows_removed,
                    took_ms = batch_started.elapsed().as_millis() as u64,
                    "purged finished tasks"
                );
            }
            if u32::try_from(batch.tasks).unwrap_or(0) < self.config.purge_batch_size {
                return Round::CaughtUp;
            }
            if started.elapsed() >= budget || stop.is_cancelled() {
                return Round::Behind;
            }
            // as long as the batch took: the purge never takes more than half of the time
            tokio::time::sleep(batch_started.elapsed()).await;
        }
    }

    /// Read what each namespace keeps and the schema's size for the gauges; warn when a
    /// namespace keeps a finished task for more than twice its retention (once, until it
    /// catches up). Answers whether it is behind.
    async fn look(&self, warned_behind: bool) -> bool {
        let namespaces = match self
            .store
            .retention_status(self.config.defaults(), self.namespaces.as_deref())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reading what retention keeps failed");
                return warned_behind;
            }
        };
        let schema_bytes = self.store.schema_bytes().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the schema's size failed");
            0
        });
        let now = chrono::Utc::now();
        let behind: Vec<&NamespaceRetention> =
            namespaces.iter().filter(|n| n.behind(now)).collect();
        if !behind.is_empty() && !warned_behind {
            for n in &behind {
                tracing::warn!(
                    namespace = %n.namespace,
                    retention_s = n.retention.as_secs(),
                    error_retention_s = n.error_retention.as_secs(),
                    oldest_finished_age_s = n.oldest_finished.map(|t| age(t, now).as_secs()),
                    oldest_error_age_s = n.oldest_error.map(|t| age(t, now).as_secs()),
                    "the retention purge is behind: a finished task is kept for more than twice its retention"
                );
            }
        }
        let is_behind = !behind.is_empty();
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Kept {
            namespaces,
            schema_bytes,
        };
        is_behind
    }
}
