//! Notifications: exactly the expected ones, on one channel per kind, with the exact payload.

mod common;

use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;
use tasker::testkit::Store;
use tasker::testkit::TaskSpec;

const NS: &str = "triggers";
const READY: &str = "tasker_task_ready";

fn payload(n: &sqlx::postgres::PgNotification) -> Value {
    serde_json::from_str(n.payload()).expect("payload is JSON")
}

/// Complete the first step of a 2-step chain through `store`: the one readiness notification
/// it sends, and the task.
async fn completion_notification(store: &Store, pool: &PgPool) -> (Value, uuid::Uuid) {
    let t = create(store, TaskSpec::chain(NS, 2)).await;
    let leased = enqueue_and_lease(store, t.task_uuid, NS).await;
    let mut l = listener(pool, &[READY]).await;
    complete(store, &leased[0]).await;
    let got = drain_until_sentinel(pool, &mut l, &[READY]).await;
    assert_eq!(got.len(), 1);
    (payload(&got[0]), t.task_uuid)
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn completing_a_parent_notifies_once_with_exact_payload(pool: PgPool) {
    let (got, task) = completion_notification(&Store::new(pool.clone()), &pool).await;
    assert_eq!(
        got,
        json!({
            "task_uuid": task,
            "namespace": NS,
            "triggered_by": "step_transition",
        })
    );
}

/// A replica's connections announce its id: the readiness its transactions cause names it,
/// so it claims the task first (the claim split).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_replica_s_completion_names_the_replica(pool: PgPool) {
    let replica = uuid::Uuid::now_v7();
    let store = Store::connect_as(
        &database_url(&pool),
        &tasker::config::DatabaseConfig::default(),
        Some(replica),
    )
    .await
    .expect("connect");
    let (got, task) = completion_notification(&store, &pool).await;
    assert_eq!(
        got,
        json!({
            "task_uuid": task,
            "namespace": NS,
            "triggered_by": "step_transition",
            "replica": replica,
        })
    );
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn no_notification_while_the_child_waits_for_another_parent(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::diamond(NS)).await;
    run_named(&store, t.task_uuid, NS, "a").await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    let mut l = listener(&pool, &[READY]).await;
    complete(&store, &leased[0]).await; // b: d still waits for c
    assert!(drain_until_sentinel(&pool, &mut l, &[READY])
        .await
        .is_empty());
    complete(&store, &leased[1]).await; // c: d is ready now
    let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(payload(&got[0])["task_uuid"], json!(t.task_uuid));
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn fan_in_of_50_notifies_only_for_the_last_parent(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::fan(NS, 50)).await;
    run_named(&store, t.task_uuid, NS, "root").await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    let mut l = listener(&pool, &[READY]).await;
    for (i, s) in leased.iter().enumerate() {
        complete(&store, s).await;
        let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
        let expected = usize::from(i == leased.len() - 1);
        assert_eq!(got.len(), expected, "after {} of 50 leaves", i + 1);
    }
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["join"]);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn task_creation_notifies_once(pool: PgPool) {
    let store = Store::new(pool.clone());
    let mut l = listener(&pool, &[READY]).await;
    let t = create(&store, TaskSpec::fan(NS, 3)).await;
    let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        payload(&got[0]),
        json!({"task_uuid": t.task_uuid, "namespace": NS, "triggered_by": "task_start"})
    );
    // a second task in the same namespace: one more
    create(&store, TaskSpec::chain(NS, 1)).await;
    assert_eq!(drain_until_sentinel(&pool, &mut l, &[READY]).await.len(), 1);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn task_state_changes_notify(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 1)).await;
    let chans = ["tasker_task_state"];
    let mut l = listener(&pool, &chans).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await; // pending -> in_progress
    complete(&store, &leased[0]).await; // in_progress -> complete
    let got = drain_until_sentinel(&pool, &mut l, &chans).await;
    assert_eq!(got.len(), 2);
    let transitions: Vec<(Value, Value)> = got
        .iter()
        .map(|n| {
            (
                payload(n)["from_state"].clone(),
                payload(n)["to_state"].clone(),
            )
        })
        .collect();
    assert_eq!(
        transitions,
        vec![
            (json!("pending"), json!("in_progress")),
            (json!("in_progress"), json!("complete"))
        ]
    );
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn retry_return_to_pending_notifies_for_the_step_itself(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 1)).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    let mut l = listener(&pool, &[READY]).await;
    store
        .fail_step(
            leased[0].held(),
            &failure(json!({"message": "again"}), true, 0),
            &json!({}),
            None,
        )
        .await
        .unwrap();
    let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(payload(&got[0])["task_uuid"], json!(t.task_uuid));
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["s0"]);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn payload_stays_small_for_the_longest_legal_names(pool: PgPool) {
    let store = Store::new(pool.clone());
    let ns = "n".repeat(tasker::config::MAX_NAMESPACE_BYTES);
    assert_eq!(
        format!("tasker_task_ready.{ns}").len(),
        63,
        "a channel named after the longest namespace still fits"
    );
    let mut spec = TaskSpec::chain(&ns, 2);
    spec.name = "t".repeat(255);
    spec.steps[0].name = "x".repeat(255);
    spec.steps[1].name = "y".repeat(255);
    spec.steps[1].depends_on = vec!["x".repeat(255)];
    spec.priority = -1000;
    let t = create(&store, spec).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, &ns).await;
    let mut l = listener(&pool, &[READY]).await;
    let traceparent = format!("00-{}-{}-01", "a".repeat(32), "b".repeat(16));
    store
        .complete_step(
            leased[0].held(),
            &json!({"big": "z".repeat(100_000)}),
            &json!({}),
            Some(&traceparent),
        )
        .await
        .unwrap();
    let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
    assert_eq!(got.len(), 1);
    for n in &got {
        assert!(
            n.payload().len() < 1000,
            "payload is {} bytes",
            n.payload().len()
        );
        assert_eq!(payload(n)["traceparent"], json!(traceparent));
    }
    let too_long = "n".repeat(tasker::config::MAX_NAMESPACE_BYTES + 1);
    let err = store
        .create_task(
            &TaskSpec::chain("ok", 1)
                .into_new_task()
                .map(|mut t| {
                    t.namespace = too_long;
                    t
                })
                .unwrap(),
            &json!({}),
            None,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at most 45 bytes"), "{err}");
}

/// Two parents of a join completing at the same moment in two transactions: the join is
/// announced exactly once (completions of one task are serialized, so the second sees the first).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn concurrent_parent_completions_announce_the_join_exactly_once(pool: PgPool) {
    let store = Store::new(pool.clone());
    let mut l = listener(&pool, &[READY]).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let t = create(&store, TaskSpec::diamond(NS)).await;
        run_named(&store, t.task_uuid, NS, "a").await;
        tasks.push(t);
    }
    drain_until_sentinel(&pool, &mut l, &[READY]).await;
    for t in &tasks {
        let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
        let (b, c) = (&leased[0], &leased[1]);
        tokio::join!(complete(&store, b), complete(&store, c));
    }
    let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
    let mut announced: Vec<Value> = got
        .iter()
        .map(|n| payload(n)["task_uuid"].clone())
        .collect();
    announced.sort_by_key(|v| v.to_string());
    let mut expected: Vec<Value> = tasks.iter().map(|t| json!(t.task_uuid)).collect();
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(announced, expected, "each join announced exactly once");
}

/// An operator's ResolveStep and RetryTask make steps ready like a completion does, and their
/// announcement carries the caller's trace as a completion's does, so the command they cause
/// joins the operator's trace.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_operator_s_resolve_and_retry_carry_the_caller_s_trace(pool: PgPool) {
    let store = Store::new(pool.clone());
    let traceparent = format!("00-{}-{}-01", "c".repeat(32), "d".repeat(16));
    let (resolved, first) = in_error(&store, TaskSpec::chain(NS, 2)).await;
    let (retried, _) = in_error(&store, TaskSpec::chain(NS, 2)).await;
    let mut l = listener(&pool, &[READY]).await;
    store
        .resolve_step_manually(first, "fixed by hand", None, Some(&traceparent))
        .await
        .unwrap();
    store
        .retry_task(retried.task_uuid, 1, &json!({}), Some(&traceparent))
        .await
        .unwrap();
    let got = drain_until_sentinel(&pool, &mut l, &[READY]).await;
    let announced: Vec<(Value, Value)> = got
        .iter()
        .map(|n| {
            (
                payload(n)["task_uuid"].clone(),
                payload(n)["traceparent"].clone(),
            )
        })
        .collect();
    assert_eq!(
        announced,
        [
            (json!(resolved.task_uuid), json!(traceparent)),
            (json!(retried.task_uuid), json!(traceparent)),
        ]
    );
}
