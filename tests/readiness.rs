//! Readiness SQL on fixtures: which steps are ready, the execution context, ready tasks.

mod common;

use common::*;
use serde_json::json;
use sqlx::PgPool;
use tasker::testkit::{ExecutionStatus, FailOutcome, StepState, Store, TaskState};
use tasker::testkit::{StepSpec, TaskSpec};

const NS: &str = "readiness";

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn linear_chain_is_ready_one_step_at_a_time(pool: PgPool) {
    let store = Store::new(pool);
    let t = create(&store, TaskSpec::chain(NS, 5)).await;
    for i in 0..5 {
        assert_eq!(
            ready_names(&store, t.task_uuid).await,
            vec![format!("s{i}")]
        );
        run_named(&store, t.task_uuid, NS, &format!("s{i}")).await;
    }
    let ctx = store.execution_context(t.task_uuid).await.unwrap();
    assert_eq!((ctx.complete_steps, ctx.total_steps), (5, 5));
    assert_eq!(ctx.execution_status, ExecutionStatus::AllComplete);
    assert_eq!(ctx.task_state, TaskState::Complete);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn diamond_join_waits_for_both_parents(pool: PgPool) {
    let store = Store::new(pool);
    let t = create(&store, TaskSpec::diamond(NS)).await;
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["a"]);
    run_named(&store, t.task_uuid, NS, "a").await;
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["b", "c"]);
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    assert_eq!(names(&leased), vec!["b", "c"]);
    let ctx = store.execution_context(t.task_uuid).await.unwrap();
    assert_eq!(ctx.execution_status, ExecutionStatus::Processing);
    assert_eq!(ctx.in_progress_steps, 2);
    complete(&store, &leased[0]).await;
    let d = store
        .step_readiness(t.task_uuid)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.name == "d")
        .unwrap();
    assert_eq!((d.completed_parents, d.total_parents), (1, 2));
    assert!(!d.dependencies_satisfied && !d.ready);
    complete(&store, &leased[1]).await;
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["d"]);
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    assert_eq!(
        leased[0].parent_results,
        json!({"b": {"by": "b"}, "c": {"by": "c"}})
    );
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn fan_out_fan_in_of_width_50(pool: PgPool) {
    let store = Store::new(pool);
    let t = create(&store, TaskSpec::fan(NS, 50)).await;
    run_named(&store, t.task_uuid, NS, "root").await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    assert_eq!(leased.len(), 50);
    for l in &leased[..49] {
        complete(&store, l).await;
        assert!(ready_names(&store, t.task_uuid).await.is_empty());
    }
    complete(&store, &leased[49]).await;
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["join"]);
    let ctx = store.execution_context(t.task_uuid).await.unwrap();
    assert_eq!(ctx.ready_steps, 1);
    assert_eq!(ctx.execution_status, ExecutionStatus::HasReadySteps);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn retry_backoff_not_elapsed_then_elapsed(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 1)).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    let out = store
        .fail_step(
            leased[0].held(),
            &failure(json!({"message": "flaky"}), true, 3_600_000),
            &json!({}),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(out, FailOutcome::RetryScheduled { .. }));
    let r = &store.step_readiness(t.task_uuid).await.unwrap()[0];
    assert_eq!(r.state, StepState::WaitingForRetry);
    assert!(r.retry_eligible && !r.ready && r.next_retry_at.is_some());
    assert!(
        store
            .promote_due_retries(10, None)
            .await
            .unwrap()
            .is_empty(),
        "backoff has not elapsed"
    );
    assert_eq!(
        store
            .execution_context(t.task_uuid)
            .await
            .unwrap()
            .execution_status,
        ExecutionStatus::WaitingForDependencies
    );

    // let the backoff elapse by moving the deadline, not by sleeping
    sqlx::query(
        "UPDATE tasker.workflow_steps SET next_retry_at = clock_timestamp() - interval '1 second'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(store.promote_due_retries(10, None).await.unwrap().len(), 1);
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["s0"]);
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    assert_eq!(leased[0].attempt, 2);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn attempts_exhausted_blocks_the_task(pool: PgPool) {
    let store = Store::new(pool);
    let spec = TaskSpec::new(
        NS,
        "one-shot",
        vec![
            StepSpec::new("only", &[]).max_attempts(1),
            StepSpec::new("after", &["only"]),
        ],
    );
    let t = create(&store, spec).await;
    let leased = enqueue_and_lease(&store, t.task_uuid, NS).await;
    let out = store
        .fail_step(
            leased[0].held(),
            &failure(json!({"message": "no"}), true, 0),
            &json!({}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out, FailOutcome::Failed);
    let r = &store.step_readiness(t.task_uuid).await.unwrap()[0];
    assert_eq!(r.state, StepState::Error);
    assert!(!r.retry_eligible && !r.ready);
    let ctx = store.execution_context(t.task_uuid).await.unwrap();
    assert_eq!(ctx.failed_steps, 1);
    assert_eq!(ctx.execution_status, ExecutionStatus::BlockedByFailures);
    assert_eq!(ctx.task_state, TaskState::Error);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn parent_resolved_manually_counts_as_complete(pool: PgPool) {
    let store = Store::new(pool);
    let (t, _) = in_error(&store, TaskSpec::diamond(NS)).await;
    assert_eq!(
        store.get_task(t.task_uuid).await.unwrap().state,
        TaskState::Error
    );
    store
        .resolve_step_manually(
            step(&t, "a"),
            "fixed by hand",
            Some(&json!({"manual": true})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_task(t.task_uuid).await.unwrap().state,
        TaskState::InProgress
    );
    assert_eq!(ready_names(&store, t.task_uuid).await, vec!["b", "c"]);
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn cancelled_task_has_nothing_ready(pool: PgPool) {
    let store = Store::new(pool);
    let t = create(&store, TaskSpec::diamond(NS)).await;
    run_named(&store, t.task_uuid, NS, "a").await;
    assert_eq!(
        store
            .ready_tasks(Some(&[NS.to_string()]), 10, None, 0)
            .await
            .unwrap()
            .len(),
        1
    );
    store
        .cancel_task(t.task_uuid, "no longer needed", &json!({}), None)
        .await
        .unwrap();
    assert!(ready_names(&store, t.task_uuid).await.is_empty());
    assert!(store
        .ready_tasks(Some(&[NS.to_string()]), 10, None, 0)
        .await
        .unwrap()
        .is_empty());
    let ctx = store.execution_context(t.task_uuid).await.unwrap();
    assert_eq!(ctx.execution_status, ExecutionStatus::Cancelled);
    assert_eq!(ctx.cancelled_steps, 3);
    assert_eq!(store.queue_depth(NS).await.unwrap(), 0);
    let again = store
        .cancel_task(t.task_uuid, "twice", &json!({}), None)
        .await;
    assert_eq!(
        again.unwrap(),
        tasker::testkit::CancelOutcome::AlreadyCancelled
    );
}

/// A complete task cannot be cancelled, and the refusal names its state.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_complete_task_refuses_cancel(pool: PgPool) {
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::chain(NS, 1)).await;
    run_named(&store, t.task_uuid, NS, "s0").await;
    let refused = store
        .cancel_task(t.task_uuid, "too late", &json!({}), None)
        .await;
    match refused {
        Err(tasker::testkit::StoreError::FailedPrecondition(m)) => {
            assert!(m.contains("already complete"), "{m}")
        }
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn ready_tasks_order_by_priority_with_aging(pool: PgPool) {
    let store = Store::new(pool.clone());
    let mut low = TaskSpec::chain(NS, 1);
    low.priority = 0;
    let mut high = TaskSpec::chain(NS, 1);
    high.priority = 50;
    let low = create(&store, low).await;
    let high = create(&store, high).await;
    let other = create(&store, TaskSpec::chain("elsewhere", 1)).await;
    let order: Vec<_> = store
        .ready_tasks(Some(&[NS.to_string()]), 10, None, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.task_uuid)
        .collect();
    assert_eq!(order, vec![high.task_uuid, low.task_uuid]);
    // the low-priority task has waited two hours: +120 beats +50
    sqlx::query("UPDATE tasker.ready_steps SET ready_at = ready_at - interval '2 hours' WHERE task_uuid = $1")
        .bind(low.task_uuid)
        .execute(&pool)
        .await
        .unwrap();
    let rows = store
        .ready_tasks(Some(&[NS.to_string()]), 10, None, 0)
        .await
        .unwrap();
    assert_eq!(rows[0].task_uuid, low.task_uuid);
    assert_eq!(rows[0].computed_priority, 120);
    assert_eq!(store.ready_tasks(None, 10, None, 0).await.unwrap().len(), 3);
    // age threshold: only tasks ready since before the cut-off
    let cutoff = chrono::Utc::now() - chrono::Duration::hours(1);
    let old: Vec<_> = store
        .ready_tasks(None, 10, Some(cutoff), 0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.task_uuid)
        .collect();
    assert_eq!(old, vec![low.task_uuid]);
    assert!(!old.contains(&other.task_uuid));
    // paging
    let page2 = store.ready_tasks(None, 2, None, 2).await.unwrap();
    assert_eq!(page2.len(), 1);
}

/// The poller's query reads what is ready, not what is pending: with 100,000 pending steps
/// blocked behind unfinished parents (and as many waiting behind those), and 10 ready steps,
/// it reads a handful of rows. (The benchmark's `--poller-scale` measures the time at 1,000,000.)
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn ready_tasks_reads_only_what_is_ready(pool: PgPool) {
    // 100,000 3-step chains with only their first step done: 200,000 pending steps, 100,000
    // of them ready... so first make all but 10 of those wait for another parent
    insert_bulk_chains(&pool, 100_000, 100_000).await;
    sqlx::raw_sql(
        "UPDATE tasker.workflow_steps SET unfinished_parents = 1
         WHERE name = 's1' AND task_uuid NOT IN (SELECT md5(i::text)::uuid FROM generate_series(1, 10) i);
         DELETE FROM tasker.ready_steps
         WHERE task_uuid NOT IN (SELECT md5(i::text)::uuid FROM generate_series(1, 10) i);",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let ready: Vec<(uuid::Uuid, i32)> =
        sqlx::query_as("SELECT task_uuid, ready_steps FROM tasker.ready_tasks(NULL, 100)")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let (seq, idx): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(seq_tup_read), 0)::bigint, coalesce(sum(idx_tup_fetch), 0)::bigint
         FROM pg_stat_xact_user_tables WHERE schemaname = 'tasker'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
    assert_eq!(ready.len(), 10);
    assert!(ready.iter().all(|(_, n)| *n == 1));
    println!("ready_tasks read {seq} rows sequentially and {idx} by index");
    assert_eq!(seq, 0, "a sequential scan");
    assert!(idx <= 40, "{idx} rows read by index for 10 ready steps");
}

/// Bulk fixture in namespace `bulk`: `tasks` 3-step chains written directly (triggers off, for
/// speed). The first `active` tasks are in progress with their first step done (so the second
/// is ready and the third waits for it); the rest are complete.
async fn insert_bulk_chains(pool: &PgPool, tasks: i32, active: i32) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO tasker.namespaces (name) VALUES ('bulk')")
        .execute(&mut *tx)
        .await
        .unwrap();
    for sql in [
        "INSERT INTO tasker.tasks (task_uuid, namespace, name, state, remaining_steps)
         SELECT md5(i::text)::uuid, 'bulk', 't', CASE WHEN i <= $2 THEN 'in_progress' ELSE 'complete' END,
                CASE WHEN i <= $2 THEN 2 ELSE 0 END
         FROM generate_series(1, $1) i",
        "INSERT INTO tasker.workflow_steps (step_uuid, task_uuid, name, position, state,
                                            unfinished_parents, ready_at, completed_at)
         SELECT md5(i::text || '-' || k)::uuid, md5(i::text)::uuid, 's' || k, k,
                CASE WHEN i <= $2 AND k > 0 THEN 'pending' ELSE 'complete' END,
                CASE WHEN i <= $2 AND k = 2 THEN 1 ELSE 0 END,
                clock_timestamp(), clock_timestamp()
         FROM generate_series(1, $1) i, generate_series(0, 2) k",
    ] {
        sqlx::query(sql)
            .bind(tasks)
            .bind(active)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO tasker.step_edges (task_uuid, parent_step_uuid, child_step_uuid)
         SELECT md5(i::text)::uuid, md5(i::text || '-' || (k - 1))::uuid, md5(i::text || '-' || k)::uuid
         FROM generate_series(1, $1) i, generate_series(1, 2) k",
    )
    .bind(tasks)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasker.ready_steps (step_uuid, task_uuid)
         SELECT md5(i::text || '-1')::uuid, md5(i::text)::uuid FROM generate_series(1, $1) i",
    )
    .bind(active)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// One step through the hot path on `conn`: enqueue the task's ready steps, lease them,
/// complete them. Returns how many steps were completed.
async fn hot_path_round(conn: &mut sqlx::PgConnection, task_uuid: uuid::Uuid) -> usize {
    sqlx::query("SELECT * FROM tasker.claim_and_enqueue($1)")
        .bind(task_uuid)
        .execute(&mut *conn)
        .await
        .unwrap();
    let leased: Vec<(uuid::Uuid, i32, uuid::Uuid)> = sqlx::query_as(
        "SELECT step_uuid, attempt, lease_token FROM tasker.fetch_steps('hot', ARRAY['default'], 'w', 8, 60000)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    for (step, attempt, token) in &leased {
        let outcome: String =
            sqlx::query_scalar("SELECT tasker.complete_step($1, $2, $3, '{}'::jsonb, 2)")
                .bind(step)
                .bind(attempt)
                .bind(token)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_eq!(outcome, "completed");
    }
    leased.len()
}

/// A whole chain through the eager path on `conn`: the first step enqueued and leased, then
/// every completion leasing its successor to the same worker in the same call
/// (`complete_step_and_claim`). Returns how many steps were completed.
async fn eager_chain(conn: &mut sqlx::PgConnection, task_uuid: uuid::Uuid) -> usize {
    sqlx::query("SELECT * FROM tasker.claim_and_enqueue($1)")
        .bind(task_uuid)
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut next: Option<(uuid::Uuid, i32, uuid::Uuid)> = sqlx::query_as(
        "SELECT step_uuid, attempt, lease_token FROM tasker.fetch_steps('hot', ARRAY['default'], 'w', 1, 60000)",
    )
    .fetch_optional(&mut *conn)
    .await
    .unwrap();
    let mut done = 0;
    while let Some((step, attempt, token)) = next {
        let (completion, leased): (String, serde_json::Value) = sqlx::query_as(
            "SELECT completion, coalesce(leased, '[]') FROM tasker.complete_step_and_claim(
                 $1, $2, $3, '{}'::jsonb, 2, '{}'::jsonb, NULL, '{}'::jsonb,
                 '[{\"max\": 1, \"lease_ms\": 60000}]'::jsonb)",
        )
        .bind(step)
        .bind(attempt)
        .bind(token)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(completion, "completed");
        done += 1;
        next = leased.as_array().unwrap().first().map(|l| {
            (
                l["step_uuid"].as_str().unwrap().parse().unwrap(),
                l["attempt"].as_i64().unwrap() as i32,
                l["lease_token"].as_str().unwrap().parse().unwrap(),
            )
        });
    }
    done
}

/// Rows a hop (enqueue, lease, complete) reads and writes, over every table of the schema.
/// (On PostgreSQL 15 the `pg_stat_xact_*` views also count earlier transactions whose
/// statistics the session has not flushed yet, hence the difference inside one transaction.)
async fn rows_touched_by_one_hop(conn: &mut sqlx::PgConnection, task_uuid: uuid::Uuid) -> i64 {
    const TOUCHED: &str = "SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)
                                               + n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint
                           FROM pg_stat_xact_user_tables WHERE schemaname = 'tasker'";
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let before: i64 = sqlx::query_scalar(TOUCHED)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(hot_path_round(conn, task_uuid).await, 1);
    let after: i64 = sqlx::query_scalar(TOUCHED)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
    after - before
}

/// Per-hop work depends on the completed step's children and the steps that became ready,
/// never on the size of the task: a hop in the middle of a 1000-step chain touches exactly as
/// many rows as one in a 10-step chain.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_hop_costs_the_same_in_a_1000_step_chain_as_in_a_10_step_chain(pool: PgPool) {
    let store = Store::new(pool.clone());
    let mut conn = pool.acquire().await.unwrap();
    let mut touched = Vec::new();
    for length in [10, 1000] {
        let t = create(&store, TaskSpec::chain("hot", length)).await;
        // the first hops of a chain also move the task to in_progress; measure a later one
        for _ in 0..3 {
            assert_eq!(hot_path_round(&mut conn, t.task_uuid).await, 1);
        }
        touched.push(rows_touched_by_one_hop(&mut conn, t.task_uuid).await);
    }
    println!(
        "rows touched by one hop: 10-step chain {}, 1000-step chain {}",
        touched[0], touched[1]
    );
    assert_eq!(
        touched[0], touched[1],
        "a hop of a 1000-step chain touched {} rows, of a 10-step chain {}",
        touched[1], touched[0]
    );
}

/// The plans a session caches while the tables are nearly empty must still be key look-ups
/// once they are large, for the plain hop (claim, fetch, complete) and the eager one (a
/// completion leasing its successor). (Found in a soak on a server with autovacuum off: the
/// readiness check kept a cached sequential scan of workflow_steps, and every step cost a full
/// scan; and in a benchmark: the claim's move of its steps, planned on tables analyzed while
/// small, scanned every step by index.)
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn hot_path_plans_cached_on_an_empty_database_stay_keyed(pool: PgPool) {
    let store = Store::new(pool.clone());
    let mut conn = pool.acquire().await.unwrap();
    // a plain and an eager 3-step task, created (on the pool), then run through `conn`
    async fn two_tasks(store: &Store) -> (uuid::Uuid, uuid::Uuid) {
        let plain = create(store, TaskSpec::chain("hot", 3)).await;
        let eager = create(store, TaskSpec::chain("hot", 3)).await;
        (plain.task_uuid, eager.task_uuid)
    }
    async fn run_both(conn: &mut sqlx::PgConnection, (plain, eager): (uuid::Uuid, uuid::Uuid)) {
        let mut done = 0;
        while done < 3 {
            done += hot_path_round(conn, plain).await;
        }
        assert_eq!(eager_chain(conn, eager).await, 3);
    }
    // tiny tables with statistics, as autovacuum leaves them soon after a deployment starts
    // (a never-analyzed table is planned as if it had ten pages, which hides a bad plan)
    run_both(&mut conn, two_tasks(&store).await).await;
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    // warm up the session on them: every hot statement runs more than five times, after
    // which PL/pgSQL settles on a cached generic plan
    for _ in 0..4 {
        run_both(&mut conn, two_tasks(&store).await).await;
    }
    // grow the tables behind the cached plans' back: 60,000 finished steps, no ANALYZE
    insert_bulk_chains(&pool, 20_000, 0).await;

    // the two kinds of task through the same session, counting the rows it reads
    let tasks = two_tasks(&store).await;
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    run_both(&mut conn, tasks).await;
    let reads: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_tup_read, coalesce(idx_tup_fetch, 0)
         FROM pg_stat_xact_user_tables
         WHERE schemaname = 'tasker'
           AND relname IN ('workflow_steps', 'step_edges', 'tasks', 'step_queue', 'ready_steps')",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
    for (table, seq, idx) in &reads {
        println!("{table}: {seq} rows read by sequential scans, {idx} by index");
        assert!(
            seq + idx < 500,
            "{table}: two 3-step tasks read {seq} rows sequentially and {idx} by index among 60,000"
        );
    }
}

/// The functions on the hot path, each of which must plan with the full-scan paths off (see
/// the baseline migration's header). Keep in step with the migrations. Trigger functions that
/// read no table (the guards, the notification senders, the history writers) carry no
/// settings: each `SET` clause costs a GUC save and restore per row.
const HOT_PATH_FUNCTIONS: &[&str] = &[
    "claim_and_enqueue",
    "enqueue_ready_steps",
    "fetch_steps",
    "lease_queued",
    "lease_allowance",
    "lane_room",
    "free_slots",
    "wake_lane",
    "check_live_lease",
    "finish_step",
    "complete_step",
    "complete_attempt",
    "complete_steps",
    "record_attempt_failure",
    "fail_step",
    "extend_lease",
    "promote_due_retries",
    "expire_leases",
    "next_deadline",
    "ready_tasks",
    "cancel_task",
    "resolve_step_manually",
    "step_edges_in_order",
];

/// A later `CREATE OR REPLACE FUNCTION` without the `SET` clauses silently drops them; this
/// reads them back from the catalog.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn hot_path_functions_keep_their_planner_settings(pool: PgPool) {
    let rows: Vec<(String, Option<Vec<String>>)> = sqlx::query_as(
        "SELECT p.proname::text, p.proconfig FROM pg_proc p
         JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'tasker' AND p.proname = ANY($1)",
    )
    .bind(HOT_PATH_FUNCTIONS)
    .fetch_all(&pool)
    .await
    .unwrap();
    for name in HOT_PATH_FUNCTIONS {
        let matching: Vec<_> = rows.iter().filter(|(n, _)| n == name).collect();
        assert!(
            !matching.is_empty(),
            "hot-path function tasker.{name} does not exist"
        );
        for (_, config) in matching {
            let config = config.clone().unwrap_or_default();
            for setting in [
                "enable_seqscan=off",
                "enable_bitmapscan=off",
                "enable_hashjoin=off",
                "enable_mergejoin=off",
            ] {
                assert!(
                    config.iter().any(|c| c == setting),
                    "tasker.{name} lost {setting}: proconfig = {config:?}"
                );
            }
        }
    }
}

/// Functions with a statement that takes arrays (the caller's items, a claim's steps): a
/// custom plan knows their lengths, so PostgreSQL prices the generic plan above it and plans
/// the statement again at most calls, unless the function forces generic plans.
const GENERIC_PLAN_FUNCTIONS: &[&str] = &["complete_steps_and_claim", "claim_and_enqueue"];

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn batch_functions_keep_their_generic_plans(pool: PgPool) {
    for name in GENERIC_PLAN_FUNCTIONS {
        let configs: Vec<Option<Vec<String>>> = sqlx::query_scalar(
            "SELECT p.proconfig FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'tasker' AND p.proname = $1",
        )
        .bind(name)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(!configs.is_empty(), "tasker.{name} does not exist");
        for config in configs {
            let config = config.unwrap_or_default();
            assert!(
                config
                    .iter()
                    .any(|c| c == "plan_cache_mode=force_generic_plan"),
                "tasker.{name} lost plan_cache_mode = force_generic_plan: proconfig = {config:?}"
            );
        }
    }
}
