//! `tasker bench --storage N`: the bytes the database keeps per finished step. N chains of 10
//! steps are created and run to completion in process (the service's engine, workers taking
//! what is ready), the tables are compacted (`VACUUM FULL`: what is live, not what churn left
//! behind), and each table's heap (TOAST included) and indexes are divided by the steps.

use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use tasker::config::TaskerConfig;
use tasker::testkit::{Engine, Metrics, Store, StoreError, TaskSpec};

const CHAIN: usize = 10;
const NAMESPACE: &str = "storage";

#[derive(Debug, Clone, Serialize)]
pub struct TableBytes {
    pub table: String,
    /// Heap and TOAST, per finished step.
    pub heap_per_step: f64,
    pub indexes_per_step: f64,
    pub indexes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageReport {
    pub steps: i64,
    pub tables: Vec<TableBytes>,
    pub total_per_step: f64,
}

pub async fn run(url: &str, base: &TaskerConfig, chains: usize) -> anyhow::Result<StorageReport> {
    let mut cfg = base.clone();
    // nothing leaves while it is measured
    cfg.orchestration.retention.purge = false;
    let store = Store::connect(url, &cfg.database).await?;
    store.migrate().await?;
    store.truncate_all().await?;
    let core = Engine::start(store.clone(), &cfg, Metrics::noop());
    anyhow::ensure!(
        core.wait_ready(Duration::from_secs(10)).await,
        "core did not become ready"
    );
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (queue, stop) = (core.workers.clone(), stop.clone());
        workers.spawn(async move {
            let id = format!("storage-{i}");
            loop {
                let steps = tokio::select! {
                    _ = stop.cancelled() => return Ok::<(), StoreError>(()),
                    r = queue.fetch(NAMESPACE, &id, 8, Duration::from_secs(1), Duration::from_secs(60)) => r?,
                };
                for s in steps {
                    queue
                        .complete(s.held(), &json!({"ok": true}), Some(&id), None)
                        .await?;
                }
            }
        });
    }
    for _ in 0..chains {
        // as CreateTask stores it: the request's source and digest in the creation history
        let spec = TaskSpec::chain(NAMESPACE, CHAIN);
        let digest = spec.request_digest();
        let task = spec.into_new_task().expect("a valid chain");
        store
            .create_task(
                &task,
                &json!({"source": "api", "request_digest": digest}),
                None,
            )
            .await?;
    }
    while store.count_unfinished_tasks().await? > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    while let Some(r) = workers.join_next().await {
        r??;
    }
    core.shutdown().await;
    store.compact_tables().await?;
    let steps = store.count_steps().await?;
    anyhow::ensure!(steps > 0, "no step was stored");
    let per = |b: i64| b as f64 / steps as f64;
    let tables: Vec<TableBytes> = store
        .table_sizes()
        .await?
        .into_iter()
        .filter(|(_, heap, idx, _)| heap + idx > 0)
        .map(|(table, heap, idx, n)| TableBytes {
            table,
            heap_per_step: per(heap),
            indexes_per_step: per(idx),
            indexes: n,
        })
        .collect();
    let total_per_step = tables
        .iter()
        .map(|t| t.heap_per_step + t.indexes_per_step)
        .sum();
    store.truncate_all().await?;
    store.pool().close().await;
    Ok(StorageReport {
        steps,
        tables,
        total_per_step,
    })
}

/// A table for people.
pub fn render(r: &StorageReport) -> String {
    let mut s = format!(
        "bytes kept per finished step ({} steps, {CHAIN}-step chains, after VACUUM FULL)\n{:<18} {:>10} {:>10} {:>8}\n",
        r.steps, "table", "heap+toast", "indexes", "(count)"
    );
    for t in &r.tables {
        s.push_str(&format!(
            "{:<18} {:>10.1} {:>10.1} {:>8}\n",
            t.table, t.heap_per_step, t.indexes_per_step, t.indexes
        ));
    }
    s.push_str(&format!("{:<18} {:>21.1}", "total", r.total_per_step));
    s
}
