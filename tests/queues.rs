//! Step queues: each step of a DAG goes to the workers of its queue, and only to them; a
//! fetch parked on one queue is woken by that queue's steps only; a queue nobody fetches
//! holds up nothing else.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tokio_stream::StreamExt;

const TASKS: usize = 8;

/// One pool of workers of a queue: fetch (long-poll) and complete until `want` steps were
/// run, recording every step received with its queue.
async fn pool_of(
    workers: Workers,
    queue: &str,
    want: usize,
    concurrency: usize,
) -> Vec<(String, String)> {
    let received = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..concurrency {
        let mut workers = workers.clone();
        let received = received.clone();
        let queue = queue.to_string();
        handles.push(tokio::spawn(async move {
            loop {
                if received.lock().await.len() >= want {
                    return;
                }
                let steps = workers
                    .fetch_steps(v1::FetchStepsRequest {
                        namespace: "shop".into(),
                        worker_id: format!("{queue}-{w}"),
                        max_steps: 1,
                        wait_ms: 1000,
                        lease_seconds: 30,
                        queues: vec![queue.clone()],
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .steps;
                for s in steps {
                    received
                        .lock()
                        .await
                        .push((s.name.clone(), s.queue.clone()));
                    complete_leased(&mut workers, &s).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let r = received.lock().await.clone();
    r
}

/// charge (payments) -> ship (warehouse) -> refund-window (payments), beside an archive step
/// of a queue no worker fetches: the payments pool receives exactly the payments steps, the
/// warehouse pool exactly the warehouse steps, and the unfetched queue delays neither.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn two_worker_pools_on_two_queues_each_receive_exactly_their_own_steps(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    for i in 0..TASKS {
        let request = task("shop")
            .named(&format!("order-{i}"))
            .step("archive")
            .queue("archive")
            .step("charge")
            .queue("payments")
            .step("ship")
            .after("charge")
            .queue("warehouse")
            .step("refund-window")
            .after("ship")
            .queue("payments")
            .build();
        tasks.create_task(request).await.unwrap();
    }
    let (payments, warehouse) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            pool_of(Workers::new(ch.clone()), "payments", 2 * TASKS, 3),
            pool_of(Workers::new(ch.clone()), "warehouse", TASKS, 3),
        )
    })
    .await
    .expect("every payments and warehouse step is run");
    assert_eq!(payments.len(), 2 * TASKS);
    assert_eq!(warehouse.len(), TASKS);
    for (name, queue) in &payments {
        assert_eq!(queue, "payments");
        assert!(
            name == "charge" || name == "refund-window",
            "payments ran {name}"
        );
    }
    for (name, queue) in &warehouse {
        assert_eq!((name.as_str(), queue.as_str()), ("ship", "warehouse"));
    }
    // the archive steps wait, queued, for a worker of their queue
    let archived: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.workflow_steps WHERE name = 'archive' AND queue = 'archive' AND state = 'enqueued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(archived, TASKS as i64);
    // GetTask shows each step's queue
    let one = tasks
        .list_tasks(v1::ListTasksRequest {
            namespace: "shop".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .remove(0);
    let got = tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: one.task_uuid,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let queues: Vec<(String, String)> = got
        .task
        .clone()
        .expect("the task")
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.queue.clone()))
        .collect();
    // readiness counts what waits for a worker, per queue
    let readiness = Readiness::new(ch.clone())
        .get_task_readiness(v1::GetTaskReadinessRequest {
            task_uuid: got.task.as_ref().unwrap().task_uuid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        readiness
            .ready_per_queue
            .iter()
            .map(|q| (q.queue.as_str(), q.steps))
            .collect::<Vec<_>>(),
        [("archive", 1)]
    );
    let ready = Readiness::new(ch.clone())
        .list_ready_tasks(v1::ListReadyTasksRequest {
            namespace: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for t in &ready.tasks {
        assert!(
            t.ready_per_queue.iter().all(|q| q.queue == "archive"),
            "{t:?}"
        );
    }
    for (name, queue) in [
        ("archive", "archive"),
        ("charge", "payments"),
        ("ship", "warehouse"),
        ("refund-window", "payments"),
    ] {
        assert!(
            queues.contains(&(name.to_string(), queue.to_string())),
            "{queues:?}"
        );
    }
    server.stop().await;
}

/// A fetch that names no queue takes the default queue's steps (as before queues existed);
/// one naming an unknown queue gets nothing; a bad queue name is INVALID_ARGUMENT naming the
/// field, and a step's bad queue name refuses the task, nothing created.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_default_queue_and_bad_queue_names(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    tasks
        .create_task(task("plain").step("only").build())
        .await
        .unwrap();
    let nothing = workers
        .fetch_steps(v1::FetchStepsRequest {
            queues: vec!["nobody-uses-this".into()],
            ..fetch_request("plain", 1, 0, 30)
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert!(nothing.is_empty());
    let step = lease_one(&workers, "plain").await;
    assert_eq!(step.queue, "default");

    let refused = workers
        .fetch_steps(v1::FetchStepsRequest {
            queues: vec!["ok".into(), "Not OK".into()],
            ..fetch_request("plain", 1, 0, 30)
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("queues[1]"), "{refused:?}");

    let refused = tasks
        .create_task(task("plain").step("a").queue("bad/queue").build())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("steps[0].queue"), "{refused:?}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "nothing created");
    server.stop().await;
}

/// Pause a queue: its steps stay queued and unleased (2 s of a worker asking), running steps
/// are not touched, new tasks are accepted. Resume: a fetch parked meanwhile receives the
/// step at once, by the resume's wake-up (no re-read runs within the hour).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_paused_queue_leases_nothing_and_a_resume_wakes_its_parked_fetch(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut admin = Admin::new(ch.clone());
    let workers = Workers::new(ch.clone());
    let fetch = |wait_ms: i32| v1::FetchStepsRequest {
        queues: vec!["mail".into()],
        ..fetch_request("ops", 1, wait_ms, 30)
    };
    tasks
        .create_task(
            task("ops")
                .named("first")
                .step("send")
                .queue("mail")
                .build(),
        )
        .await
        .unwrap();
    let running = workers
        .clone()
        .fetch_steps(fetch(5000))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(running.len(), 1);

    let paused = admin
        .pause_queue(v1::PauseQueueRequest {
            namespace: "ops".into(),
            queue: "mail".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused);
    assert_eq!(paused.in_flight, 1, "the running step is not touched");
    let mut events = Readiness::new(ch.clone())
        .stream_command_events(v1::StreamCommandEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let second = tasks
        .create_task(
            task("ops")
                .named("second")
                .step("send")
                .queue("mail")
                .build(),
        )
        .await
        .expect("a paused queue accepts new tasks")
        .into_inner()
        .task_uuid;
    // the command stream says the step waits on the pause
    let held = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.next().await.unwrap().unwrap();
            if e.task_uuid == second && e.phase() == v1::CommandPhase::Completed {
                return e;
            }
        }
    })
    .await
    .expect("the second task's pass completes");
    assert_eq!((held.steps_enqueued, held.steps_held), (1, 1));
    let nothing = workers
        .clone()
        .fetch_steps(fetch(2000))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert!(nothing.is_empty(), "nothing leased while paused");
    let status = admin
        .get_queue_settings(v1::GetQueueSettingsRequest {
            namespace: "ops".into(),
            queue: "mail".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.paused, status.queued, status.held), (true, 1, 1));
    // the running step finishes normally
    complete_leased(&mut workers.clone(), &running[0]).await;

    // a fetch parks; the resume wakes it
    let parked = tokio::spawn({
        let mut w = workers.clone();
        async move {
            let steps = w
                .fetch_steps(fetch(20_000))
                .await
                .unwrap()
                .into_inner()
                .steps;
            (steps, std::time::Instant::now())
        }
    });
    wait_until_parked(&server, 1).await;
    let resumed_at = std::time::Instant::now();
    admin
        .resume_queue(v1::ResumeQueueRequest {
            namespace: "ops".into(),
            queue: "mail".into(),
        })
        .await
        .unwrap();
    let (steps, received_at) = tokio::time::timeout(Duration::from_secs(10), parked)
        .await
        .expect("the resume wakes the parked fetch")
        .unwrap();
    assert_eq!(steps.len(), 1);
    eprintln!(
        "resume -> parked fetch received: {:.1} ms",
        received_at.duration_since(resumed_at).as_secs_f64() * 1000.0
    );
    server.stop().await;
}

/// Until `n` fetches are parked on the server.
async fn wait_until_parked(server: &TestServer, n: usize) {
    let mut parked = server.core.workers.parked_fetches();
    tokio::time::timeout(Duration::from_secs(10), parked.wait_for(|p| *p >= n))
        .await
        .expect("the fetch parks")
        .unwrap();
}

/// max_in_flight = 3 on a queue with 50 ready steps, 10 workers fetching through 3 replicas
/// (round robin): never more than 3 leased at once (from the steps' history), 3 reached, and
/// all 50 finish, each freed slot waking a waiting fetch (no re-reads, no poller).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_in_flight_limit_holds_across_replicas_and_freed_slots_wake_fetches(pool: PgPool) {
    let most = run_under_limit(&pool, 3, 50, 10).await;
    assert_eq!(most, 3, "at most 3 leased at once, and the limit was used");
}

/// A limit of 50 is counted on three slot shards (17 + 17 + 16, one per 16 slots) that
/// concurrent leases take without waiting for each other: 200 steps, 30 workers over 3
/// replicas asking for 2 each, never more than 50 leased at once, more than one shard's worth
/// used at once, and every slot given back at the end.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_sharded_in_flight_limit_is_never_exceeded(pool: PgPool) {
    let most = run_under_limit(&pool, 50, 200, 30).await;
    assert!(most <= 50, "at most 50 leased at once, saw {most}");
    assert!(
        most > 17,
        "more than one shard's slots in use at once, saw {most}"
    );
    let shards: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT cap, in_flight FROM tasker.lane_slots
         WHERE namespace = 'api' AND queue = 'partner' AND cap > 0 ORDER BY shard",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(shards, vec![(17, 0), (17, 0), (16, 0)]);
}

/// `steps` steps of queue `partner` limited to `limit`, run by `workers` workers over three
/// replicas, each fetching 2 at a time and taking 5 ms per step; the most leased at once.
async fn run_under_limit(pool: &PgPool, limit: i32, steps: usize, workers: usize) -> i64 {
    let pool = pool.clone();
    let cfg = events_only_config();
    let replicas = [
        TestServer::start(&pool, &cfg).await,
        TestServer::start(&pool, &cfg).await,
        TestServer::start(&pool, &cfg).await,
    ];
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(r.channel().await);
    }
    let mut tasks = Tasks::new(channels[0].clone());
    tasks
        .create_task(task("api").named("warm-up").step("x").build())
        .await
        .unwrap();
    let set = Admin::new(channels[1].clone())
        .set_queue_settings(v1::SetQueueSettingsRequest {
            namespace: "api".into(),
            queue: "partner".into(),
            max_in_flight: Some(limit),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.max_in_flight, Some(limit));
    let mut builder = task("api").named("burst");
    for i in 0..steps {
        builder = builder.step(&format!("call-{i}")).queue("partner");
    }
    tasks.create_task(builder.build()).await.unwrap();

    // the workers wait long: a step waiting on the limit reaches one only by the wake-up a
    // freed slot sends
    let (finished, mut finishes) = tokio::sync::mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for w in 0..workers {
        let mut workers = Workers::new(channels[w % 3].clone());
        let finished = finished.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let steps = workers
                    .fetch_steps(v1::FetchStepsRequest {
                        worker_id: format!("w{w}"),
                        queues: vec!["partner".into()],
                        ..fetch_request("api", 2, 20_000, 30)
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .steps;
                for s in steps {
                    // the call to the partner's API
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    complete_leased(&mut workers, &s).await;
                    let _ = finished.send(());
                }
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..steps {
            finishes.recv().await.unwrap();
        }
    })
    .await
    .expect("all steps finish");
    for h in &handles {
        h.abort();
    }
    // the most leased at once, from the history: +1 into in_progress, -1 out of it
    let most: i64 = sqlx::query_scalar(
        "SELECT max(running) FROM (
             SELECT sum(CASE WHEN t.to_state = 'in_progress' THEN 1 ELSE -1 END)
                        OVER (ORDER BY t.created_at, t.id) AS running
             FROM tasker.step_transitions t JOIN tasker.workflow_steps s USING (step_uuid)
             WHERE s.queue = 'partner'
               AND (t.to_state = 'in_progress' OR t.from_state = 'in_progress')) r",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let settings = Admin::new(channels[2].clone())
        .get_queue_settings(v1::GetQueueSettingsRequest {
            namespace: "api".into(),
            queue: "partner".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((settings.in_flight, settings.queued), (0, 0));
    for r in replicas {
        r.stop().await;
    }
    most
}

/// A limit of 0, a negative or absurd one, a bad queue name: INVALID_ARGUMENT naming the
/// field, nothing changed; an unknown namespace: NOT_FOUND.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn bad_queue_settings_are_refused(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    Tasks::new(ch.clone())
        .create_task(task("ns").step("a").build())
        .await
        .unwrap();
    let mut admin = Admin::new(ch.clone());
    for (queue, max, field) in [
        ("q", Some(0), "max_in_flight"),
        ("q", Some(-5), "max_in_flight"),
        ("q", Some(2_000_000), "max_in_flight"),
        ("Bad Queue", Some(3), "queue"),
    ] {
        let refused = admin
            .set_queue_settings(v1::SetQueueSettingsRequest {
                namespace: "ns".into(),
                queue: queue.into(),
                max_in_flight: max,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{refused:?}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.queue_settings")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing changed");
    let missing = admin
        .pause_queue(v1::PauseQueueRequest {
            namespace: "nope".into(),
            queue: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    server.stop().await;
}

/// Queue settings are the fleet's and the database's: a pause and a limit set through one
/// replica hold on another, and on a replica started after both are gone.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn queue_settings_reach_every_replica_and_survive_a_restart(pool: PgPool) {
    let cfg = events_only_config();
    let a = TestServer::start(&pool, &cfg).await;
    let b = TestServer::start(&pool, &cfg).await;
    let (ch_a, ch_b) = (a.channel().await, b.channel().await);
    Tasks::new(ch_a.clone())
        .create_task(task("fleet").step("send").queue("mail").build())
        .await
        .unwrap();
    let mut admin = Admin::new(ch_a.clone());
    admin
        .set_queue_settings(v1::SetQueueSettingsRequest {
            namespace: "fleet".into(),
            queue: "mail".into(),
            max_in_flight: Some(7),
        })
        .await
        .unwrap();
    admin
        .pause_queue(v1::PauseQueueRequest {
            namespace: "fleet".into(),
            queue: "mail".into(),
        })
        .await
        .unwrap();
    let fetch = || v1::FetchStepsRequest {
        queues: vec!["mail".into()],
        ..fetch_request("fleet", 1, 500, 30)
    };
    let on_b = Workers::new(ch_b.clone())
        .fetch_steps(fetch())
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert!(on_b.is_empty(), "paused on the other replica too");
    a.stop().await;
    b.stop().await;

    let c = TestServer::start(&pool, &cfg).await;
    let ch_c = c.channel().await;
    let mut admin = Admin::new(ch_c.clone());
    let settings = admin
        .get_queue_settings(v1::GetQueueSettingsRequest {
            namespace: "fleet".into(),
            queue: "mail".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((settings.max_in_flight, settings.paused), (Some(7), true));
    let status = admin
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .queues
            .iter()
            .any(|q| q.namespace == "fleet" && q.queue == "mail" && q.paused),
        "{:?}",
        status.queues
    );
    let on_c = Workers::new(ch_c.clone())
        .fetch_steps(fetch())
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert!(on_c.is_empty(), "still paused after the restart");
    admin
        .resume_queue(v1::ResumeQueueRequest {
            namespace: "fleet".into(),
            queue: "mail".into(),
        })
        .await
        .unwrap();
    let leased = Workers::new(ch_c.clone())
        .fetch_steps(fetch())
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(leased.len(), 1);
    c.stop().await;
}

/// A limit set while a lease is being granted counts that lease: a fetch, and an enqueue
/// handing steps to parked fetches, take the lane's lock before they read the lane's settings.
/// Here the limit's setter holds the lane's lock first; the lease waits for it, then sees the
/// limit and leases under it (its lease holds a slot). Were the settings read before the lock,
/// it would have seen no limit and leased one more step than the limit counts.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_limit_set_while_a_lease_waits_counts_that_lease(pool: PgPool) {
    let fetch = "SELECT count(*) FROM tasker.fetch_steps($1, ARRAY['default'], 'w1', 1, 30000)";
    let enqueue = r#"SELECT jsonb_array_length(leased)::bigint FROM tasker.claim_and_enqueue(
        (SELECT t.task_uuid FROM tasker.tasks t WHERE t.namespace = $1), '{}',
        '[{"worker_id": "w1", "max": 1, "lease_ms": 30000}]')"#;
    for (namespace, lease, enqueued_first) in [("fetch", fetch, true), ("handoff", enqueue, false)]
    {
        let store = tasker::testkit::Store::new(pool.clone());
        let created = create(&store, tasker::testkit::TaskSpec::chain(namespace, 1)).await;
        if enqueued_first {
            sqlx::query("SELECT outcome FROM tasker.claim_and_enqueue($1)")
                .bind(created.task_uuid)
                .execute(&pool)
                .await
                .unwrap();
        }
        let key: i64 = sqlx::query_scalar("SELECT tasker.lane_lock_key($1, 'default')")
            .bind(namespace)
            .fetch_one(&pool)
            .await
            .unwrap();
        let mut setter = pool.acquire().await.unwrap();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *setter)
            .await
            .unwrap();
        let leasing = {
            let pool = pool.clone();
            tokio::spawn(async move {
                sqlx::query_scalar::<_, i64>(lease)
                    .bind(namespace)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            })
        };
        // the lease waits on the lane's lock
        tokio::time::timeout(WAIT, async {
            loop {
                let waiting: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if waiting {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the lease waits for the lane's lock");
        sqlx::query("SELECT tasker.set_queue_limit($1, 'default', 5)")
            .bind(namespace)
            .execute(&mut *setter)
            .await
            .unwrap();
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut *setter)
            .await
            .unwrap();
        let leased = tokio::time::timeout(WAIT, leasing)
            .await
            .expect("the lease returns")
            .unwrap();
        assert_eq!(leased, 1, "{namespace}");
        let (holding, in_flight): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM tasker.step_queue
                     WHERE namespace = $1 AND leased_by IS NOT NULL AND holds_slot),
                    (SELECT coalesce(sum(in_flight), 0) FROM tasker.lane_slots
                     WHERE namespace = $1 AND queue = 'default')",
        )
        .bind(namespace)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            (holding, in_flight),
            (1, 1),
            "{namespace}: the lease is counted against the limit"
        );
    }
}
