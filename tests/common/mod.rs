//! Shared test helpers: building tasks, acting as a worker, waiting on notifications.
//! Every test gets its own fresh database from `#[sqlx::test]` with the crate's migrator.

#![allow(dead_code)]

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgPool;
use tasker::dag::TaskSpec;
use tasker::store::{CreatedTask, LeasedStep, Store};
use uuid::Uuid;

/// How long a test waits for something it expects before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn create(store: &Store, spec: TaskSpec) -> CreatedTask {
    let task = spec.into_new_task().expect("valid spec");
    store
        .create_task(&task, &json!({}))
        .await
        .expect("create task")
}

pub fn step(created: &CreatedTask, name: &str) -> Uuid {
    created
        .steps
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no step {name}"))
        .1
}

/// Enqueue what is ready, lease everything queued in the namespace.
pub async fn enqueue_and_lease(store: &Store, task: Uuid, namespace: &str) -> Vec<LeasedStep> {
    store
        .enqueue_ready_steps(task, &json!({}))
        .await
        .expect("enqueue");
    store
        .fetch_steps(namespace, "test-worker", 1000, 60_000)
        .await
        .expect("fetch")
}

pub async fn complete(store: &Store, leased: &LeasedStep) {
    store
        .complete_step(
            leased.step_uuid,
            leased.attempt,
            &json!({"by": leased.name}),
            &json!({}),
            None,
        )
        .await
        .expect("complete");
}

/// Lease the named step (enqueueing first) and complete it.
pub async fn run_named(store: &Store, task: Uuid, namespace: &str, name: &str) {
    let leased = enqueue_and_lease(store, task, namespace).await;
    let l = leased
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("step {name} was not leasable; got {:?}", names(&leased)));
    complete(store, l).await;
}

pub fn names(leased: &[LeasedStep]) -> Vec<String> {
    leased.iter().map(|l| l.name.clone()).collect()
}

pub async fn ready_names(store: &Store, task: Uuid) -> Vec<String> {
    store
        .step_readiness(task)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.ready)
        .map(|r| r.name)
        .collect()
}

pub async fn listener(pool: &PgPool, channels: &[&str]) -> PgListener {
    let mut l = PgListener::connect_with(pool).await.expect("listener");
    l.listen_all(channels.iter().copied())
        .await
        .expect("listen");
    l
}

pub async fn recv(l: &mut PgListener) -> PgNotification {
    tokio::time::timeout(WAIT, l.recv())
        .await
        .expect("timed out waiting for a notification")
        .expect("listener error")
}

/// Everything delivered on `channels` before a sentinel sent now: notifications are delivered
/// in commit order, so once the sentinel arrives nothing earlier is still on its way.
pub async fn drain_until_sentinel(
    pool: &PgPool,
    l: &mut PgListener,
    channels: &[&str],
) -> Vec<PgNotification> {
    let sentinel = format!("sentinel-{}", Uuid::now_v7());
    let mut tx = pool.begin().await.unwrap();
    for c in channels {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(c)
            .bind(&sentinel)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let mut got = Vec::new();
    let mut sentinels = 0;
    while sentinels < channels.len() {
        let n = recv(l).await;
        if n.payload() == sentinel {
            sentinels += 1;
        } else {
            got.push(n);
        }
    }
    got
}

pub fn failure(
    error: serde_json::Value,
    retryable: bool,
    backoff_ms: i64,
) -> tasker::store::StepFailure {
    tasker::store::StepFailure {
        error,
        retryable,
        backoff_ms,
    }
}
