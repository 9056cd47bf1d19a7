//! The state machine in the database: illegal transitions and cyclic edges are refused and
//! change nothing; every transition leaves a history row; bad names get clear errors.

mod common;

use common::*;
use serde_json::json;
use sqlx::PgPool;
use tasker::testkit::TaskSpec;
use tasker::testkit::{HeldLease, Refusal, Store, StoreError};
use uuid::Uuid;

const NS: &str = "transitions";

async fn state_of(pool: &PgPool, step: Uuid) -> (String, i32, i64) {
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM tasker.workflow_steps WHERE step_uuid = $1")
            .bind(step)
            .fetch_one(pool)
            .await
            .unwrap();
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.step_transitions WHERE step_uuid = $1")
            .bind(step)
            .fetch_one(pool)
            .await
            .unwrap();
    (state, attempts, history)
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn illegal_step_transitions_are_refused_and_change_nothing(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 2)).await;
    let s0 = step(&t, "s0");
    let before = state_of(&pool, s0).await;
    for to in ["complete", "in_progress", "waiting_for_retry", "error"] {
        let err = sqlx::query("UPDATE tasker.workflow_steps SET state = $1 WHERE step_uuid = $2")
            .bind(to)
            .bind(s0)
            .execute(&pool)
            .await
            .unwrap_err();
        let e = StoreError::from(err);
        assert!(
            matches!(e, StoreError::FailedPrecondition(_)),
            "{to}: {e:?}"
        );
        assert!(
            e.to_string()
                .contains(&format!("illegal step transition pending -> {to}")),
            "{e}"
        );
    }
    assert_eq!(state_of(&pool, s0).await, before);
    let bogus = sqlx::query("UPDATE tasker.workflow_steps SET state = 'done' WHERE step_uuid = $1")
        .bind(s0)
        .execute(&pool)
        .await;
    assert!(bogus.is_err(), "states outside the vocabulary are refused");
    let task_err = sqlx::query("UPDATE tasker.tasks SET state = 'complete' WHERE task_uuid = $1")
        .bind(t.task_uuid)
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(task_err
        .to_string()
        .contains("illegal task transition pending -> complete"));
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn every_transition_writes_history_and_history_is_append_only(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 1)).await;
    run_named(&store, t.task_uuid, NS, "s0").await;
    let rows: Vec<(Option<String>, String, i32)> = sqlx::query_as(
        "SELECT from_state, to_state, attempt FROM tasker.step_transitions WHERE step_uuid = $1 ORDER BY id",
    )
    .bind(step(&t, "s0"))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (None, "pending".into(), 0),
            (Some("pending".into()), "enqueued".into(), 1),
            (Some("enqueued".into()), "in_progress".into(), 1),
            (Some("in_progress".into()), "complete".into(), 1),
        ]
    );
    // an update that names the state and leaves it as it was writes none
    sqlx::query(
        "UPDATE tasker.workflow_steps SET state = state, attempts = attempts WHERE step_uuid = $1",
    )
    .bind(step(&t, "s0"))
    .execute(&pool)
    .await
    .unwrap();
    let after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.step_transitions WHERE step_uuid = $1")
            .bind(step(&t, "s0"))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(after, 4, "an unchanged state wrote a history row");
    let tasks: Vec<(Option<String>, String)> = sqlx::query_as(
        "SELECT from_state, to_state FROM tasker.task_transitions WHERE task_uuid = $1 ORDER BY id",
    )
    .bind(t.task_uuid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(tasks.len(), 3);
    assert!(sqlx::query("DELETE FROM tasker.step_transitions")
        .execute(&pool)
        .await
        .is_err());
    assert!(
        sqlx::query("UPDATE tasker.task_transitions SET to_state = 'x'")
            .execute(&pool)
            .await
            .is_err()
    );
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn cyclic_and_cross_task_edges_are_refused(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 3)).await;
    let (s0, s2) = (step(&t, "s0"), step(&t, "s2"));
    let err = sqlx::query("INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid) VALUES ($1, $2, $3)")
        .bind(t.task_uuid)
        .bind(s2)
        .bind(s0)
        .execute(&pool)
        .await
        .unwrap_err();
    let e = StoreError::from(err);
    assert!(e.to_string().contains("cycle"), "{e}");
    let self_edge = sqlx::query("INSERT INTO tasker.step_edges VALUES ($1, $2, $2)")
        .bind(t.task_uuid)
        .bind(s0)
        .execute(&pool)
        .await;
    assert!(self_edge.is_err());
    let other = create(&store, TaskSpec::chain(NS, 1)).await;
    let cross = sqlx::query("INSERT INTO tasker.step_edges VALUES ($1, $2, $3)")
        .bind(t.task_uuid)
        .bind(s2)
        .bind(step(&other, "s0"))
        .execute(&pool)
        .await;
    assert!(cross.is_err(), "an edge cannot join two tasks");
    let edges: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.step_edges")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(edges, 2);
}

/// What the foreign keys guaranteed holds without them (migration 38 checks it once per
/// statement): a step names a task that exists, both ends of an edge are steps of the edge's
/// task, and a task or step still referred to is not deleted. Each write is refused as
/// `foreign_key_violation` under the constraint it replaced, and changes nothing.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn keys_between_tasks_steps_and_edges_hold_for_any_write(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 2)).await;
    let other = create(&store, TaskSpec::chain(NS, 1)).await;
    let (s0, s1, o0) = (step(&t, "s0"), step(&t, "s1"), step(&other, "s0"));
    let tables = ["tasks", "workflow_steps", "step_edges"];
    let mut before = Vec::new();
    for table in tables {
        before.push(rows_of(&pool, table).await);
    }
    let cases: [(&str, Uuid, Uuid, &str); 6] = [
        (
            "INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, unfinished_parents)
             VALUES (gen_random_uuid(), $1, 'orphan', 0, 0), (gen_random_uuid(), $2, 'fine', 9, 0)",
            Uuid::now_v7(),
            t.task_uuid,
            "workflow_steps_task_uuid_fkey",
        ),
        (
            "INSERT INTO tasker.step_edges VALUES ($1, $2, $3)",
            t.task_uuid,
            o0,
            "step_edges_parent_same_task",
        ),
        (
            "INSERT INTO tasker.step_edges VALUES ($1, $3, $2)",
            t.task_uuid,
            o0,
            "step_edges_child_same_task",
        ),
        (
            "DELETE FROM tasker.tasks WHERE task_uuid = $1 OR task_uuid = $2",
            other.task_uuid,
            t.task_uuid,
            "workflow_steps_task_uuid_fkey",
        ),
        (
            "DELETE FROM tasker.workflow_steps WHERE step_uuid = $1 OR step_uuid = $2",
            o0,
            s0,
            "step_edges_parent_same_task",
        ),
        (
            "DELETE FROM tasker.workflow_steps WHERE step_uuid = $2",
            o0,
            s1,
            "step_edges_child_same_task",
        ),
    ];
    for (sql, a, b, constraint) in cases {
        let mut q = sqlx::query(sql).bind(a).bind(b);
        if sql.contains("$3") {
            q = q.bind(s1);
        }
        let err = q.execute(&pool).await.unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("23503"), "{sql}: {db}");
        assert_eq!(db.constraint(), Some(constraint), "{sql}: {db}");
    }
    let mut after = Vec::new();
    for table in tables {
        after.push(rows_of(&pool, table).await);
    }
    assert_eq!(after, before, "a refused write changed nothing");
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn bad_requests_write_nothing(pool: PgPool) {
    let store = Store::new(pool.clone());
    // the database's own checks, bypassing the service's validation
    let mut dup = TaskSpec::chain(NS, 2).into_new_task().unwrap();
    dup.steps[1].name = "s0".into();
    dup.steps[1].parents.clear();
    let e = store.create_task(&dup, &json!({}), None).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::InvalidArgument { field, .. } if field == "steps.name"),
        "{e:?}"
    );
    let mut unknown = TaskSpec::chain(NS, 2).into_new_task().unwrap();
    unknown.steps[1].parents = vec![Uuid::now_v7()];
    let e = store
        .create_task(&unknown, &json!({}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::InvalidArgument { field, .. } if field == "steps.depends_on"),
        "{e:?}"
    );
    let mut cyclic = TaskSpec::chain(NS, 2).into_new_task().unwrap();
    cyclic.steps[0].parents = vec![cyclic.steps[1].step_uuid];
    let e = store
        .create_task(&cyclic, &json!({}), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    let mut bad_ns = TaskSpec::chain(NS, 1).into_new_task().unwrap();
    bad_ns.namespace = "Has Spaces".into();
    let e = store
        .create_task(&bad_ns, &json!({}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::InvalidArgument { field, .. } if field == "namespace"),
        "{e:?}"
    );
    assert!(e.to_string().contains("must match"), "{e}");
    for table in [
        "tasks",
        "workflow_steps",
        "step_edges",
        "namespaces",
        "step_transitions",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM tasker.{table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} has rows after rejected requests");
    }
}

/// A step's and a task's row rules hold for a write that bypasses the service: refused as
/// `check_violation` under the rule's name (the service maps it to the field), nothing changed.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn row_rules_refuse_writes_that_bypass_the_service(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 2)).await;
    let s0 = step(&t, "s0");
    let before = (
        rows_of(&pool, "tasks").await,
        rows_of(&pool, "workflow_steps").await,
    );
    let cases: [(&str, &str, &str); 9] = [
        (
            "UPDATE tasker.workflow_steps SET unfinished_parents = -1 WHERE step_uuid = $1",
            "workflow_steps_valid",
            "steps",
        ),
        (
            "UPDATE tasker.workflow_steps SET attempts = max_attempts + 1 WHERE step_uuid = $1",
            "workflow_steps_valid",
            "steps",
        ),
        (
            "UPDATE tasker.workflow_steps SET max_attempts = 101 WHERE step_uuid = $1",
            "workflow_steps_valid",
            "steps",
        ),
        (
            "UPDATE tasker.workflow_steps SET timeout_ms = 0 WHERE step_uuid = $1",
            "workflow_steps_timeout_valid",
            "steps",
        ),
        (
            "UPDATE tasker.workflow_steps SET schedule_to_start_ms = 604800001 WHERE step_uuid = $1",
            "workflow_steps_schedule_to_start_valid",
            "steps",
        ),
        (
            "INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, unfinished_parents)
             SELECT gen_random_uuid(), task_uuid, '', 9, 0 FROM tasker.workflow_steps WHERE step_uuid = $1",
            "workflow_steps_valid",
            "steps",
        ),
        (
            "UPDATE tasker.tasks SET priority = 1001
             WHERE task_uuid = (SELECT task_uuid FROM tasker.workflow_steps WHERE step_uuid = $1)",
            "tasks_valid",
            "request",
        ),
        (
            "UPDATE tasker.tasks SET concurrency_key = ''
             WHERE task_uuid = (SELECT task_uuid FROM tasker.workflow_steps WHERE step_uuid = $1)",
            "tasks_concurrency_key_valid",
            "concurrency_key",
        ),
        (
            "INSERT INTO tasker.tasks (task_uuid, namespace, name, remaining_steps)
             SELECT $1, namespace, name, -1 FROM tasker.tasks",
            "tasks_valid",
            "request",
        ),
    ];
    for (sql, rule, field) in cases {
        let err = sqlx::query(sql).bind(s0).execute(&pool).await.unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("23514"), "{sql}: {db}");
        assert_eq!(db.constraint(), Some(rule), "{sql}: {db}");
        let e = StoreError::from(err);
        assert!(
            matches!(&e, StoreError::InvalidArgument { field: f, .. } if f == field),
            "{sql}: {e:?}"
        );
    }
    let after = (
        rows_of(&pool, "tasks").await,
        rows_of(&pool, "workflow_steps").await,
    );
    assert_eq!(after, before, "a refused write changed nothing");
}

/// Every row of a table as JSON text, in a stable order.
async fn rows_of(pool: &PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT row_to_json(x)::text FROM tasker.{table} x ORDER BY row_to_json(x)::text"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn idempotency_key_returns_the_same_task(pool: PgPool) {
    let store = Store::new(pool.clone());
    let mut spec = TaskSpec::diamond(NS);
    spec.idempotency_key = Some("order-42".into());
    let first = create(&store, spec.clone()).await;
    let second = create(&store, spec).await;
    assert!(first.created && !second.created);
    assert_eq!(first.task_uuid, second.task_uuid);
    assert_eq!(first.steps, second.steps);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn stale_attempts_and_expired_leases_change_nothing(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 1)).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    let held = leased[0].held();
    let s = held.step_uuid;
    let before = state_of(&pool, s).await;
    let stale = store
        .complete_step(
            HeldLease { attempt: 7, ..held },
            &json!({}),
            &json!({}),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        stale.to_string().contains("not the current attempt"),
        "{stale}"
    );
    // whoever does not hold the lease (it knows the step and the attempt, not the token)
    let not_held = HeldLease {
        lease_token: Uuid::new_v4(),
        ..held
    };
    let refused = store
        .complete_step(not_held, &json!({}), &json!({}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            StoreError::Refused {
                refusal: Refusal::LeaseNotHeld,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(store.extend_lease(not_held, 60_000).await.is_err());
    assert!(store
        .fail_step(not_held, &failure(json!({}), false, 0), &json!({}), None)
        .await
        .is_err());
    assert_eq!(
        state_of(&pool, s).await,
        before,
        "a wrong token changed nothing"
    );
    sqlx::query(
        "UPDATE tasker.step_queue SET visible_at = clock_timestamp() - interval '1 second'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let expired = store
        .complete_step(held, &json!({}), &json!({}), None)
        .await
        .unwrap_err();
    assert!(expired.to_string().contains("expired"), "{expired}");
    assert!(store.extend_lease(held, 1000).await.is_err());
    assert_eq!(state_of(&pool, s).await, before);
    // the lease reaper ends the attempt; the step comes back as attempt 2
    let expired = store.expire_leases(10, None).await.unwrap();
    assert_eq!(expired.len(), 1);
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    assert_eq!(leased[0].attempt, 2);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.step_queue")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 1, "one message per live attempt");
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn migrating_again_is_a_no_op(pool: PgPool) {
    let store = Store::new(pool.clone());
    assert_eq!(
        store.migrate().await.unwrap(),
        0,
        "already migrated by the test harness"
    );
    assert_eq!(store.migrate().await.unwrap(), 0);
}

/// A database migrated by a build from before the baseline (a migration this build does not
/// have) gets a message that says what to do, and `tasker db reset` recreates it.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_pre_baseline_database_is_named_and_reset(pool: PgPool) {
    let store = Store::new(pool.clone());
    create(&store, TaskSpec::diamond(NS)).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (20261120000001, 'readiness functions', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = store.migrate().await.unwrap_err().to_string();
    assert!(
        err.contains("20261120000001") && err.contains("tasker db reset"),
        "{err}"
    );
    assert!(store.reset().await.unwrap() >= 1);
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tasks, 0, "the schema was recreated");
    assert_eq!(store.migrate().await.unwrap(), 0, "and is current");
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_batch_of_completions_keeps_each_items_outcome(pool: PgPool) {
    use tasker::testkit::Completion;
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::diamond(NS)).await;
    run_named(&store, t.task_uuid, NS, "a").await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await; // b and c
    let mut l = listener(&pool, &["tasker_task_ready"]).await;
    let item = |lease: HeldLease| Completion {
        lease,
        results: json!({"ok": true}),
        traceparent: None,
        next: None,
    };
    let (b, c) = (leased[0].held(), leased[1].held());
    let outcomes = store
        .complete_steps(&[
            item(b),
            item(HeldLease { attempt: 7, ..c }), // stale attempt
            item(HeldLease {
                step_uuid: Uuid::now_v7(), // no such step
                ..c
            }),
            item(c),
        ])
        .await
        .unwrap();
    assert!(outcomes[0].is_ok() && outcomes[3].is_ok());
    assert!(matches!(
        outcomes[1],
        Err(StoreError::Refused {
            refusal: Refusal::StaleAttempt,
            ..
        })
    ));
    assert!(matches!(outcomes[2], Err(StoreError::NotFound { .. })));
    // both parents of the join completed in one transaction: the join is announced once
    let got = drain_until_sentinel(&pool, &mut l, &["tasker_task_ready"]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["d"]);
}

/// In one batch, an item asking for its next steps (eager dispatch) claims its task and leases
/// what it made ready to its own worker, with no readiness notification; a plain item of the
/// same batch is answered as before.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_batch_leases_an_eager_items_successors_to_its_worker(pool: PgPool) {
    use tasker::testkit::{Completion, Taker};
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::diamond(NS)).await;
    run_named(&store, t.task_uuid, NS, "a").await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await; // b and c
    let mut l = listener(&pool, &["tasker_task_ready"]).await;
    let item = |lease: HeldLease, next: Option<Taker>| Completion {
        lease,
        results: json!({"ok": true}),
        traceparent: None,
        next,
    };
    let ask = Taker {
        worker_id: String::new(),
        max: 1,
        lease_ms: 60_000,
        queues: None,
    };
    let outcomes = store
        .complete_steps(&[
            item(leased[0].held(), None),
            item(leased[1].held(), Some(ask)),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap(), &None);
    // the second completion made the join ready: leased in the batch to its worker
    let eager = outcomes[1].as_ref().unwrap().as_ref().expect("an enqueue");
    assert_eq!(eager.task_uuid, t.task_uuid);
    assert_eq!(eager.worker_id, "test-worker");
    assert_eq!(
        names(
            &eager
                .result
                .leased
                .iter()
                .map(|(_, s)| s.clone())
                .collect::<Vec<_>>()
        ),
        ["d"]
    );
    let got = drain_until_sentinel(&pool, &mut l, &["tasker_task_ready"]).await;
    assert!(got.is_empty(), "the batch enqueued the join itself");
    assert_exactly_once_in_order(&pool).await;
}

/// Cancelling a task removes its queue rows by step: it reads only them, however long the
/// queue is (it used to read every queued step of every namespace, holding the task's lock).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn cancelling_reads_only_the_task_s_own_queue_rows(pool: PgPool) {
    let store = Store::new(pool.clone());
    // a backlog: 300 queued steps of another task
    let backlog = create(&store, TaskSpec::fan(NS, 300)).await;
    run_named(&store, backlog.task_uuid, NS, "root").await;
    store
        .claim_and_enqueue(backlog.task_uuid, &json!({}), None, &[], None)
        .await
        .unwrap();
    // the task cancelled: one step leased, one queued
    let mut spec = TaskSpec::fan("cancelled", 2);
    spec.steps.pop(); // no join: two roots after the first
    let t = create(&store, spec).await;
    run_named(&store, t.task_uuid, "cancelled", "root").await;
    store
        .claim_and_enqueue(t.task_uuid, &json!({}), None, &[], None)
        .await
        .unwrap();
    store
        .fetch_steps(
            "cancelled",
            &[tasker::testkit::DEFAULT_QUEUE.to_string()],
            "w",
            1,
            60_000,
        )
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let outcome: String = sqlx::query_scalar("SELECT tasker.cancel_task($1, 'superseded')")
        .bind(t.task_uuid)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(outcome, "cancelled");
    // this transaction's own reads of the queue, before any statistics are flushed
    let (seq_read, idx_fetched): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0)
         FROM pg_stat_xact_user_tables WHERE relid = 'tasker.step_queue'::regclass",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(
        seq_read + idx_fetched <= 10,
        "the cancel read {seq_read} queue rows by scan and fetched {idx_fetched} by index"
    );
    let left: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT q.task_uuid FROM tasker.step_queue q WHERE q.namespace = 'cancelled'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(left.is_empty(), "the task's queue rows are gone: {left:?}");
    let backlog_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.step_queue")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(backlog_rows, 300, "the others' stay");
}

/// A step cancelled or resolved by hand while it waited for a retry keeps no retry time: the
/// deadline look-up walks the retry times, and every one left behind made it slower for ever.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn cancelling_or_resolving_a_waiting_retry_clears_its_time(pool: PgPool) {
    let store = Store::new(pool.clone());
    let waiting = || async {
        let t = create(&store, TaskSpec::chain(NS, 1)).await;
        let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
        store
            .fail_step(
                leased[0].held(),
                &failure(json!({"message": "later"}), true, 3_600_000),
                &json!({}),
                None,
            )
            .await
            .unwrap();
        (t.task_uuid, leased[0].step_uuid)
    };
    let retry_times = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasker.workflow_steps WHERE next_retry_at IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let (cancelled, _) = waiting().await;
    let (_, resolved) = waiting().await;
    assert_eq!(retry_times().await, 2);
    store
        .cancel_task(cancelled, "no longer needed", &json!({}), None)
        .await
        .unwrap();
    store
        .resolve_step_manually(resolved, "done by hand", None, None)
        .await
        .unwrap();
    assert_eq!(retry_times().await, 0, "a retry time was left behind");
    assert_eq!(store.next_deadline(None).await.unwrap(), None);
}
