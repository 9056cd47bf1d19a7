//! The engine end to end: completion -> trigger -> NOTIFY -> listener -> command ->
//! claim-and-enqueue -> worker, in every deployment mode and under disruption.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sqlx::PgPool;
use tasker::config::DeploymentMode::{self, EventDrivenOnly, Hybrid, PollingOnly};
use tasker::testkit::ListenerState;
use tasker::testkit::{CommandPhase, OrchestrationCommand, SubmitError, TriggeredBy};
use tasker::testkit::{ExecutionStatus, Store, StoreError, TaskState};
use tasker::testkit::{StepSpec, TaskSpec};

const NS: &str = "core";
const LONG: Duration = Duration::from_secs(60);

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn hybrid_diamond_and_chain_complete_by_events_alone(pool: PgPool) {
    let mut cfg = test_config(Hybrid);
    // events act within milliseconds; a task ready for 5 s is one they missed
    cfg.orchestration.task_readiness.age_threshold = Duration::from_secs(5);
    let core = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    let diamond = create(&store, TaskSpec::diamond(NS)).await;
    let chain = create(&store, TaskSpec::chain(NS, 20)).await;
    let leased = work_until_done(
        &core,
        &pool,
        NS,
        &[diamond.task_uuid, chain.task_uuid],
        LONG,
    )
    .await;
    assert_eq!(leased.len(), 24, "every step leased once");
    assert!(leased.iter().all(|l| l.attempt == 1));
    assert_eq!(enqueue_count(&pool).await, 24);
    assert_exactly_once_in_order(&pool).await;
    for t in [&diamond, &chain] {
        assert_eq!(
            store.get_task(t.task_uuid).await.unwrap().state,
            TaskState::Complete
        );
    }
    let chain_order: Vec<String> = leased
        .iter()
        .filter(|l| l.task_uuid == chain.task_uuid)
        .map(|l| l.name.clone())
        .collect();
    assert_eq!(
        chain_order,
        (0..20).map(|i| format!("s{i}")).collect::<Vec<_>>()
    );

    // the poller keeps running and finds nothing: events did all the work
    let mut poller = core.mode_controller.poller_status();
    let before = poller.borrow().rounds;
    poller
        .wait_for(|s| s.rounds >= before + 2)
        .await
        .expect("poller alive");
    assert_eq!(
        core.mode_controller
            .poller_status()
            .borrow()
            .fallback_tasks_found_total,
        0
    );
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn listener_killed_mid_workflow_reconnects_and_catches_up(pool: PgPool) {
    // EventDrivenOnly: no periodic poller to hide a lost notification
    let core = start_core(&pool, &test_config(EventDrivenOnly)).await;
    let store = Store::new(pool.clone());
    let chain = create(&store, TaskSpec::chain(NS, 10)).await;
    let status = core.mode_controller.listener_status();
    let mut kills = 0;
    work_until_done_with(&core, &pool, NS, &[chain.task_uuid], LONG, |s| {
        if kills >= 3 || !s.name.ends_with(['2', '5', '7']) {
            return Box::pin(async {});
        }
        kills += 1;
        // kill the LISTEN connection (once it is back up), then the step completes while
        // the listener is gone
        let (mut status, pool) = (status.clone(), pool.clone());
        Box::pin(async move {
            let pid = status
                .wait_for(|st| st.state == ListenerState::Listening)
                .await
                .unwrap()
                .backend_pid
                .expect("listening");
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&pool)
                .await
                .unwrap();
        })
    })
    .await;
    assert_eq!(kills, 3);
    assert!(core.mode_controller.status().listener.reconnects >= 3);
    assert_eq!(enqueue_count(&pool).await, 10);
    assert_exactly_once_in_order(&pool).await;
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn polling_only_completes_with_nothing_listening(pool: PgPool) {
    let core = start_core(&pool, &test_config(PollingOnly)).await;
    // the start-up sweep is over before the task exists: only periodic rounds can find it
    let mut poller = core.mode_controller.poller_status();
    tokio::time::timeout(WAIT, poller.wait_for(|s| s.catch_up_sweeps >= 1))
        .await
        .expect("start-up sweep")
        .unwrap();
    assert_eq!(
        core.mode_controller.status().listener.state,
        ListenerState::Disabled
    );
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tasker-listener' AND datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(listening, 0);
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::diamond(NS)).await;
    work_until_done(&core, &pool, NS, &[t.task_uuid], LONG).await;
    assert_exactly_once_in_order(&pool).await;
    // a, then b and c, then d: three hops, each found by a periodic round
    assert!(
        core.mode_controller
            .status()
            .poller
            .fallback_tasks_found_total
            >= 3,
        "{:?}",
        core.mode_controller.status().poller
    );
    core.shutdown().await;
}

/// Every ordered pair of distinct modes, one switch per step of a running chain: after each
/// switch the mode is in effect (LISTEN connection present or gone, periodic rounds running
/// or stopped), and the chain completes with every step enqueued once.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn mode_switches_in_every_direction_during_a_workflow(pool: PgPool) {
    let cfg = test_config(Hybrid);
    let interval = cfg.orchestration.task_readiness.fallback_polling_interval;
    let core = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    let chain = create(&store, TaskSpec::chain(NS, 7)).await;
    assert_mode_in_effect(&core, &pool, Hybrid, interval).await;
    let sequence: [DeploymentMode; 7] = [
        Hybrid,
        EventDrivenOnly,
        PollingOnly,
        Hybrid,
        PollingOnly,
        EventDrivenOnly,
        Hybrid,
    ];
    for pair in sequence.windows(2) {
        let leased = core
            .workers
            .fetch(NS, "w", 1, WAIT, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "the chain's next step, in {}", pair[0]);
        assert_eq!(core.mode_controller.set_mode(pair[1]), pair[0]);
        assert_mode_in_effect(&core, &pool, pair[1], interval).await;
        complete(&store, &leased[0]).await;
    }
    let last = core
        .workers
        .fetch(NS, "w", 1, WAIT, Duration::from_secs(60))
        .await
        .unwrap();
    complete(&store, &last[0]).await;
    assert_eq!(core.mode_controller.mode(), Hybrid);
    assert_eq!(
        store.get_task(chain.task_uuid).await.unwrap().state,
        TaskState::Complete
    );
    assert_eq!(enqueue_count(&pool).await, 7);
    assert_exactly_once_in_order(&pool).await;
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn two_cores_racing_on_one_database_never_enqueue_twice(pool: PgPool) {
    let cfg = test_config(Hybrid);
    let a = start_core(&pool, &cfg).await;
    let b = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    let mut tasks = Vec::new();
    for i in 0..15 {
        let spec = if i % 3 == 0 {
            TaskSpec::fan(NS, 6)
        } else {
            TaskSpec::diamond(NS)
        };
        tasks.push(create(&store, spec).await.task_uuid);
    }
    // both cores hear every notification and race for every claim; also inject through both
    for t in &tasks {
        for core in [&a, &b] {
            let _ = core.commands.try_submit(OrchestrationCommand::process_task(
                *t,
                NS,
                TriggeredBy::Api,
            ));
        }
    }
    let (ra, rb) = tokio::join!(
        work_until_done(&a, &pool, NS, &tasks, LONG),
        work_until_done(&b, &pool, NS, &tasks, LONG)
    );
    let total: usize = ra.len() + rb.len();
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.workflow_steps")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        total as i64, steps,
        "each step leased exactly once across both workers"
    );
    assert_eq!(enqueue_count(&pool).await, steps);
    assert_exactly_once_in_order(&pool).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn overload_is_refused_then_everything_is_processed(pool: PgPool) {
    let mut cfg = test_config(EventDrivenOnly);
    cfg.orchestration.command_processor.channel_capacity = 4;
    cfg.orchestration.command_processor.max_concurrent_commands = 1;
    let core = start_core(&pool, &cfg).await;
    let mut events = core.commands.subscribe();
    let store = Store::new(pool.clone());
    let mut tasks = Vec::new();
    for _ in 0..40 {
        tasks.push(create(&store, TaskSpec::chain(NS, 2)).await.task_uuid);
    }
    // a burst 10x the queue, with no await between sends: the processor cannot drain meanwhile
    let mut refused = 0;
    for t in &tasks {
        match core
            .commands
            .try_submit(OrchestrationCommand::process_task(*t, NS, TriggeredBy::Api))
        {
            Err(SubmitError::Overloaded) => refused += 1,
            Err(e) => panic!("{e}"),
            Ok(_) => {}
        }
    }
    assert!(refused >= 30, "only {refused} refused");
    let api_refusal = core
        .commands
        .execute(OrchestrationCommand::process_task(
            tasks[0],
            NS,
            TriggeredBy::Api,
        ))
        .await;
    // nothing awaited since the burst: the queue is still full, so the refusal is immediate
    assert!(matches!(api_refusal, Err(SubmitError::Overloaded)));
    // the poller's catch-up sweeps (requested when events were refused) do the rest
    core.mode_controller.request_catch_up();
    work_until_done(&core, &pool, NS, &tasks, LONG).await;
    assert_exactly_once_in_order(&pool).await;
    let mut rejected = 0;
    while let Ok(e) = events.try_recv() {
        if e.phase == CommandPhase::Rejected {
            rejected += 1;
        }
    }
    assert!(
        rejected >= refused,
        "rejections are published: {rejected} < {refused}"
    );
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn burst_for_one_task_coalesces_into_at_most_two_passes(pool: PgPool) {
    let mut cfg = test_config(EventDrivenOnly);
    cfg.orchestration.command_processor.max_concurrent_commands = 4;
    let core = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    let mut events = core.commands.subscribe();
    let t = create(&store, TaskSpec::fan(NS, 3)).await;
    // the task's start is processed first, so no other pass is in flight during the burst
    tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.unwrap();
            if e.task_uuid == t.task_uuid && e.phase == CommandPhase::Completed {
                return;
            }
        }
    })
    .await
    .expect("the task start was processed");
    let task_uuid = t.task_uuid;
    let command = move || OrchestrationCommand::process_task(task_uuid, NS, TriggeredBy::Api);
    // the first command's pass is held inside its transaction (the ready set locked by this
    // test) until the whole burst has arrived: the burst meets a pass in flight, whatever
    // the machine's speed
    let mut hold = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tasker.ready_steps IN EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    core.commands.try_submit(command()).unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.unwrap();
            if e.task_uuid == t.task_uuid && e.phase == CommandPhase::Started {
                return;
            }
        }
    })
    .await
    .expect("the first pass started");
    // 48 commands with nothing awaited between them, then one whose result is awaited: it
    // comes back when the last pass the burst caused has finished
    for _ in 0..48 {
        core.commands.try_submit(command()).unwrap();
    }
    let commands = core.commands.clone();
    let last = tokio::spawn(async move { commands.execute(command()).await });
    // the burst has reached the processor (each coalesced command is published) before the
    // held pass may go on
    let mut coalesced = 0;
    tokio::time::timeout(WAIT, async {
        while coalesced < 49 {
            let e = events.recv().await.unwrap();
            if e.task_uuid == t.task_uuid && e.phase == CommandPhase::Coalesced {
                coalesced += 1;
            }
        }
    })
    .await
    .expect("the burst coalesced");
    hold.commit().await.unwrap();
    let last = tokio::time::timeout(WAIT, last)
        .await
        .expect("the burst was processed")
        .unwrap()
        .unwrap();
    assert!(last.coalesced);
    let mut passes = 0;
    while let Ok(e) = events.try_recv() {
        if e.task_uuid == t.task_uuid && e.phase == CommandPhase::Started {
            passes += 1;
        }
    }
    // the first command's pass, and one rerun for the 49 that came while it ran (the first
    // pass's Started was read above)
    assert_eq!(passes + 1, 2, "passes for a burst of 50 commands");
    assert_eq!(enqueue_count(&pool).await, 1, "root enqueued once");
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn instance_serving_one_namespace_ignores_the_others(pool: PgPool) {
    let mut cfg = test_config(Hybrid);
    cfg.orchestration.task_readiness.namespaces = vec!["alpha".into()];
    let core = start_core(&pool, &cfg).await;
    let mut events = core.commands.subscribe();
    let store = Store::new(pool.clone());
    let alpha = create(&store, TaskSpec::chain("alpha", 3)).await;
    let beta = create(&store, TaskSpec::chain("beta", 3)).await;
    work_until_done(&core, &pool, "alpha", &[alpha.task_uuid], LONG).await;
    let mut poller = core.mode_controller.poller_status();
    let before = poller.borrow().rounds;
    poller.wait_for(|s| s.rounds >= before + 2).await.unwrap();
    let ctx = store.execution_context(beta.task_uuid).await.unwrap();
    assert_eq!(
        (ctx.task_state.as_str(), ctx.enqueued_steps, ctx.ready_steps),
        ("pending", 0, 1)
    );
    // not even a command was made for it: the notification was dropped at the listener
    while let Ok(e) = events.try_recv() {
        assert_ne!(
            e.task_uuid, beta.task_uuid,
            "a command for another namespace's task"
        );
    }
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn prefix_pattern_picks_up_namespaces_created_at_run_time(pool: PgPool) {
    let mut cfg = test_config(EventDrivenOnly);
    cfg.orchestration.task_readiness.namespaces = vec!["etl-*".into()];
    let core = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    // a namespace that did not exist when the instance started, matched by its pattern
    let t = create(&store, TaskSpec::chain("etl-eu", 3)).await;
    work_until_done(&core, &pool, "etl-eu", &[t.task_uuid], LONG).await;
    assert_exactly_once_in_order(&pool).await;
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn retry_backoff_wakes_precisely_without_waiting_for_the_poller(pool: PgPool) {
    let mut cfg = test_config(PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    let store = Store::new(pool.clone());
    create(&store, TaskSpec::chain(NS, 1)).await;
    // created before start: the start-up sweep enqueues it; after that only the deadline
    // scheduler can help within the test's time
    let core = start_core(&pool, &cfg).await;
    let first = core
        .workers
        .fetch(NS, "w", 1, WAIT, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    core.workers
        .fail(
            first[0].held(),
            &failure(json!({"m": "flaky"}), true, 300),
            None,
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let second = core
        .workers
        .fetch(NS, "w", 1, WAIT, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(second.len(), 1, "retry enqueued by the deadline scheduler");
    assert_eq!(second[0].attempt, 2);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "not the 600 s poller"
    );
    core.shutdown().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn expired_lease_is_retried_and_max_attempts_is_honoured(pool: PgPool) {
    let mut cfg = test_config(Hybrid);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    let core = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    let t = create(
        &store,
        TaskSpec::new(NS, "t", vec![StepSpec::new("only", &[]).max_attempts(2)]),
    )
    .await;
    for attempt in 1..=2 {
        let leased = core
            .workers
            .fetch(NS, "silent", 1, WAIT, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].attempt, attempt);
        // the worker never answers
    }
    let mut events = core.commands.subscribe();
    let done = async {
        loop {
            let ctx = store.execution_context(t.task_uuid).await.unwrap();
            if ctx.task_state == TaskState::Error {
                return ctx;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
        }
    };
    let ctx = tokio::time::timeout(WAIT, done)
        .await
        .expect("task failed after the last lease");
    assert_eq!(ctx.execution_status, ExecutionStatus::BlockedByFailures);
    let err: serde_json::Value = sqlx::query_scalar("SELECT last_error FROM tasker.workflow_steps")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(err["message"], json!("lease expired"));
    core.shutdown().await;
}

/// After shutdown every worker call answers "shutting down" (UNAVAILABLE over gRPC: retry on
/// another instance), never FAILED_PRECONDITION, which a worker reads as "give up".
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn worker_calls_after_shutdown_say_shutting_down(pool: PgPool) {
    let core = start_core(&pool, &test_config(Hybrid)).await;
    let store = Store::new(pool.clone());
    create(&store, TaskSpec::chain(NS, 2)).await;
    let workers = core.workers.clone();
    let leased = workers
        .fetch(NS, "w", 1, WAIT, Duration::from_secs(30))
        .await
        .unwrap();
    core.shutdown().await;
    let done = workers
        .complete(leased[0].held(), &json!({}), None, None)
        .await;
    assert!(matches!(done, Err(StoreError::ShuttingDown)), "{done:?}");
    let fetched = workers
        .fetch(NS, "w", 1, WAIT, Duration::from_secs(30))
        .await;
    assert!(
        matches!(fetched, Err(StoreError::ShuttingDown)),
        "{fetched:?}"
    );
}
