//! Concurrency keys: at most `max_tasks_per_key` tasks with the same key in progress at once;
//! the others wait, pending, oldest first, and a finishing task's slot starts the next one of
//! its key by an event, not a poll.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::proto::v1;
use tasker::testkit::{Store, TaskSpec};

/// max_tasks_per_key = 1: 20 one-step tasks on 4 keys, created key by key (5 of "a", then 5
/// of "b", ...). Never two tasks of one key in progress at once (from the tasks' history),
/// the first 4 tasks started have 4 different keys, each key's tasks start oldest first, and
/// all 20 finish with no poller.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn one_task_per_key_at_a_time_keys_interleave_and_freed_slots_start_the_next(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut admin = Admin::new(ch.clone());
    admin
        .create_namespace(v1::CreateNamespaceRequest {
            namespace: "billing".into(),
        })
        .await
        .unwrap();
    let settings = admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: "billing".into(),
            max_tasks_per_key: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settings.max_tasks_per_key, Some(1));
    let mut tasks = Tasks::new(ch.clone());
    let mut created = Vec::new();
    for key in ["a", "b", "c", "d"] {
        for i in 0..5 {
            let mut request = task("billing")
                .named(&format!("invoice-{key}-{i}"))
                .step("send")
                .build();
            request.concurrency_key = format!("customer-{key}");
            created.push(
                tasks
                    .create_task(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .task_uuid,
            );
        }
    }
    let mut workers = Workers::new(ch.clone());
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut done = 0;
        while done < created.len() {
            let steps = workers
                .fetch_steps(fetch_request("billing", 2, 5000, 30))
                .await
                .unwrap()
                .into_inner()
                .steps;
            for s in steps {
                complete_leased(&mut workers, &s).await;
                done += 1;
            }
        }
    })
    .await
    .expect("all 20 tasks finish by events alone");

    // from the history: when each task started (-> in_progress) and finished (-> complete)
    let spans: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT t.concurrency_key,
                    (SELECT h.created_at FROM tasker.task_transitions h
                     WHERE h.task_uuid = t.task_uuid AND h.to_state = 'in_progress'),
                    (SELECT h.created_at FROM tasker.task_transitions h
                     WHERE h.task_uuid = t.task_uuid AND h.to_state = 'complete')
             FROM tasker.tasks t ORDER BY 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(spans.len(), 20);
    for (i, (key, start, end)) in spans.iter().enumerate() {
        for (other_key, other_start, other_end) in &spans[i + 1..] {
            if key == other_key {
                assert!(
                    other_start >= end || other_end <= start,
                    "two tasks of {key} in progress at once"
                );
            }
        }
    }
    let first_four: std::collections::HashSet<&str> =
        spans[..4].iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(first_four.len(), 4, "the first four started have four keys");
    // oldest first within a key: start order is creation order
    let started: Vec<String> = sqlx::query_scalar(
        "SELECT t.name FROM tasker.tasks t JOIN tasker.task_transitions h
           ON h.task_uuid = t.task_uuid AND h.to_state = 'in_progress'
         WHERE t.concurrency_key = 'customer-c' ORDER BY h.created_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        started,
        (0..5).map(|i| format!("invoice-c-{i}")).collect::<Vec<_>>()
    );
    server.stop().await;
}

/// Raising the limit starts the waiting tasks at once; a bad key or limit is INVALID_ARGUMENT
/// naming the field.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn raising_the_limit_starts_waiting_tasks_and_bad_input_is_refused(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut admin = Admin::new(ch.clone());
    admin
        .create_namespace(v1::CreateNamespaceRequest {
            namespace: "reports".into(),
        })
        .await
        .unwrap();
    admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: "reports".into(),
            max_tasks_per_key: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tasks = Tasks::new(ch.clone());
    for i in 0..3 {
        let mut request = task("reports")
            .named(&format!("r{i}"))
            .step("build")
            .build();
        request.concurrency_key = "tenant-1".into();
        tasks.create_task(request).await.unwrap();
    }
    let mut workers = Workers::new(ch.clone());
    let first = workers
        .fetch_steps(fetch_request("reports", 3, 5000, 30))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(first.len(), 1, "one task of the key at a time");
    admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: "reports".into(),
            max_tasks_per_key: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut more = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while more.len() < 2 {
            more.extend(
                workers
                    .fetch_steps(fetch_request("reports", 3, 5000, 30))
                    .await
                    .unwrap()
                    .into_inner()
                    .steps,
            );
        }
    })
    .await
    .expect("raising the limit starts the two waiting tasks");

    for (max, field) in [
        (Some(0), "max_tasks_per_key"),
        (Some(-1), "max_tasks_per_key"),
    ] {
        let refused = admin
            .set_namespace_settings(v1::SetNamespaceSettingsRequest {
                namespace: "reports".into(),
                max_tasks_per_key: max,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains(field), "{refused:?}");
    }
    let mut request = task("reports").step("x").build();
    request.concurrency_key = "k".repeat(300);
    let refused = tasks.create_task(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("concurrency_key"), "{refused:?}");
    server.stop().await;
}

/// Oldest first holds against a newer task whose claim comes first, at the SQL level (no
/// service: the test orders the claims). Limit 2 on one key, tasks t1..t4 created in order:
/// - t2 claimed before t1 (t1's readiness not yet handled) waits in line behind t1, and t1's
///   start, with a slot still free, admits t2 at once;
/// - t3 waits (two running); t1 finishing admits t3 to its slot, and t4, claimed before t3's
///   admission is handled, waits behind it instead of taking the slot;
/// - a task waiting for its start time holds back no newer one.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_newer_task_claimed_first_waits_behind_an_older_one_that_may_start(pool: PgPool) {
    let store = Store::new(pool.clone());
    let keyed = |name: &str| {
        let mut spec = TaskSpec::chain("billing", 1);
        spec.name = name.into();
        spec.concurrency_key = Some("customer-a".into());
        spec
    };
    let t1 = create(&store, keyed("t1")).await;
    store
        .set_max_tasks_per_key("billing", Some(2))
        .await
        .unwrap();
    let t2 = create(&store, keyed("t2")).await;
    let t3 = create(&store, keyed("t3")).await;
    let t4 = create(&store, keyed("t4")).await;
    let claim = |task: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT outcome FROM tasker.claim_and_enqueue($1)")
                .bind(task)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let admitted = |task: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM tasker.ready_steps r WHERE r.task_uuid = $1)",
            )
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    assert_eq!(claim(t2.task_uuid).await, "waiting_on_key", "t1 is older");
    assert!(!admitted(t2.task_uuid).await);
    assert_eq!(claim(t1.task_uuid).await, "enqueued");
    assert!(
        admitted(t2.task_uuid).await,
        "t1's start admits t2 to the free slot"
    );
    assert_eq!(claim(t2.task_uuid).await, "enqueued");
    assert_eq!(claim(t3.task_uuid).await, "waiting_on_key", "two running");

    let leased = store
        .fetch_steps(
            "billing",
            &[tasker::testkit::DEFAULT_QUEUE.to_string()],
            "w",
            10,
            60_000,
        )
        .await
        .unwrap();
    let first = leased
        .iter()
        .find(|s| s.task_uuid == t1.task_uuid)
        .expect("t1's step leased");
    complete(&store, first).await;
    assert!(admitted(t3.task_uuid).await, "t1's slot admits t3");
    assert_eq!(
        claim(t4.task_uuid).await,
        "waiting_on_key",
        "t4 is newer than the admitted t3"
    );
    assert_eq!(claim(t3.task_uuid).await, "enqueued");

    // a start time: an older task that waits for it does not hold back a newer one
    let mut later = keyed("later");
    later.concurrency_key = Some("customer-b".into());
    later.start_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    create(&store, later).await;
    let mut now = keyed("now");
    now.concurrency_key = Some("customer-b".into());
    let now = create(&store, now).await;
    assert_eq!(claim(now.task_uuid).await, "enqueued");
}

/// Cancelling a pending keyed task that held back a newer one admits that one to the free
/// slot (else it would wait until some task of the key finished, maybe never).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn cancelling_an_older_pending_task_admits_the_one_waiting_behind_it(pool: PgPool) {
    let store = Store::new(pool.clone());
    let keyed = |name: &str| {
        let mut spec = TaskSpec::chain("billing", 1);
        spec.name = name.into();
        spec.concurrency_key = Some("customer-a".into());
        spec
    };
    let t1 = create(&store, keyed("t1")).await;
    store
        .set_max_tasks_per_key("billing", Some(1))
        .await
        .unwrap();
    let t2 = create(&store, keyed("t2")).await;
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM tasker.claim_and_enqueue($1)")
        .bind(t2.task_uuid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "waiting_on_key");
    store
        .cancel_task(t1.task_uuid, "not needed", &serde_json::json!({}), None)
        .await
        .unwrap();
    let admitted: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tasker.ready_steps r WHERE r.task_uuid = $1)",
    )
    .bind(t2.task_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(admitted, "t1's cancel admits t2: its step is ready again");
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM tasker.claim_and_enqueue($1)")
        .bind(t2.task_uuid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "enqueued");
}
