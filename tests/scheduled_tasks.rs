//! Tasks that start later (CreateTaskRequest.start_at): nothing of them is ready before the
//! start, any replica starts them on time, they can be listed and cancelled while they wait,
//! and a start beyond the horizon is refused by name.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::Code;

fn epoch_ms(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 * 1000.0 + f64::from(t.nanos) / 1e6
}

/// A task created on replica A to start 1.5 s later, A stopped at once: replica B (poller
/// and deadline cap an hour away) leases its first step no earlier than the start and within
/// 100 ms of it, woken by the start's announcement alone. Until then GetTask shows it
/// scheduled, GetTaskReadiness has nothing ready, and ListTasks(scheduled) lists it.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_task_starts_on_time_on_another_replica(pool: PgPool) {
    let mut cfg = events_only_config();
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(3600);
    let a = TestServer::start(&pool, &cfg).await;
    let b = TestServer::start(&pool, &cfg).await;
    let chb = b.channel().await;
    let start_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let created = Tasks::new(a.channel().await)
        .create_task(
            task("later")
                .step("first")
                .step("second")
                .after("first")
                .start_at(start_at)
                .build(),
        )
        .await
        .unwrap()
        .into_inner();
    a.stop().await;

    let mut tasks = Tasks::new(chb.clone());
    let shown = get_task(&mut tasks, &created.task_uuid).await;
    assert!(shown.scheduled, "{shown:?}");
    assert_eq!(
        shown.start_at.as_ref().map(epoch_ms),
        Some(start_at.timestamp_micros() as f64 / 1000.0)
    );
    let readiness = Readiness::new(chb.clone())
        .get_task_readiness(v1::GetTaskReadinessRequest {
            task_uuid: created.task_uuid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(readiness.execution_status(), v1::ExecutionStatus::Scheduled);
    assert!(readiness.steps.iter().all(|s| !s.ready), "{readiness:?}");
    let listed = tasks
        .list_tasks(v1::ListTasksRequest {
            scheduled: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].task_uuid, created.task_uuid);

    let mut workers = Workers::new(chb.clone());
    let first = workers
        .fetch_steps(fetch_request("later", 1, 5000, 30))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(first.len(), 1, "the first step, after the start");
    assert_eq!(first[0].name, "first");
    let leased_ms: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM s.started_at)::float8 * 1000 FROM tasker.workflow_steps s
         WHERE s.step_uuid = $1::uuid",
    )
    .bind(&first[0].step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    let late_ms = leased_ms - start_at.timestamp_micros() as f64 / 1000.0;
    assert!(
        (0.0..100.0).contains(&late_ms),
        "leased {late_ms:.1} ms after its start"
    );
    let started = get_task(&mut tasks, &created.task_uuid).await;
    assert!(!started.scheduled);
    assert!(tasks
        .list_tasks(v1::ListTasksRequest {
            scheduled: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .is_empty());
    b.stop().await;
}

/// A scheduled task can be cancelled while it waits (its start goes with it); one whose start
/// is not in the future starts at once; a start past the horizon, or not a timestamp, is
/// refused with INVALID_ARGUMENT naming start_at, and nothing is stored.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn scheduled_tasks_cancel_start_at_once_when_due_and_refuse_the_far_future(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());

    let waiting = tasks
        .create_task(
            task("sched")
                .step("a")
                .start_at(Utc::now() + chrono::Duration::hours(1))
                .build(),
        )
        .await
        .unwrap()
        .into_inner();
    let cancelled = tasks
        .cancel_task(v1::CancelTaskRequest {
            task_uuid: waiting.task_uuid.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.state(), v1::TaskState::Cancelled);
    assert!(!cancelled.scheduled);
    let starts: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.task_starts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(starts, 0, "the start went with the cancel");

    // a start in the past: at once
    tasks
        .create_task(
            task("past")
                .step("a")
                .start_at(Utc::now() - chrono::Duration::hours(1))
                .build(),
        )
        .await
        .unwrap();
    let step = lease_one(&Workers::new(ch.clone()), "past").await;
    assert_eq!(step.name, "a");

    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    let too_far = task("sched")
        .step("a")
        .start_at(Utc::now() + chrono::Duration::days(400))
        .build();
    let mut not_a_time = task("sched").step("a").build();
    not_a_time.start_at = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: -5,
    });
    for (request, rule) in [(too_far, "at most 365 days ahead"), (not_a_time, "valid")] {
        let e = tasks.create_task(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("start_at") && e.message().contains(rule),
            "{:?}",
            e.message()
        );
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(before, after, "nothing stored");
    server.stop().await;
}

/// Calls of each `tasker` function reported so far by the backends of this database, from the
/// statistics collector (`track_functions = all`).
async fn function_calls(pool: &PgPool) -> std::collections::BTreeMap<String, i64> {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_as::<_, (String, i64)>(
        "SELECT funcname::text, calls FROM pg_stat_user_functions WHERE schemaname = 'tasker'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// The function calls once every backend's report is in: with nothing running, a backend
/// reports what it counted within 10 s (PostgreSQL's idle statistics interval).
async fn settled_calls(pool: &PgPool) -> std::collections::BTreeMap<String, i64> {
    // waiting out the reporting interval is the measurement's method, not a synchronisation
    tokio::time::sleep(Duration::from_secs(11)).await;
    function_calls(pool).await
}

/// A pool of its own for a server, closed when it stops.
async fn server_pool(pool: &PgPool) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect_with(
            (*pool.connect_options())
                .clone()
                .application_name("tasker-server"),
        )
        .await
        .unwrap()
}

/// The `tasker` function calls of one server's life: started, idle for `window`, stopped.
async fn calls_while_idle(
    pool: &PgPool,
    window: Duration,
) -> std::collections::BTreeMap<String, i64> {
    let before = settled_calls(pool).await;
    let own = server_pool(pool).await;
    let server = TestServer::start(&own, &test_config(DeploymentMode::Hybrid)).await;
    // the window is the scenario: an idle service, watched for a while
    tokio::time::sleep(window).await;
    server.stop().await;
    own.close().await;
    settled_calls(pool)
        .await
        .into_iter()
        .map(|(f, n)| (f.clone(), n - before.get(&f).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// No new polling: a service idle for the same time issues the same queries with 100 tasks
/// waiting for their start and 10 schedules as with none: the same statements, each as often
/// within 2 (they run about once a second, and where a window's edges fall moves a count by
/// one). The figures are printed (`--nocapture`) for the docs.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn waiting_starts_and_idle_schedules_add_no_queries(pool: PgPool) {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE \"{db}\" SET track_functions = 'all'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let window = Duration::from_secs(6);
    let idle = calls_while_idle(&pool, window).await;

    let setup = server_pool(&pool).await;
    let server = TestServer::start(&setup, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    for i in 0..100 {
        tasks
            .create_task(
                task("waiting")
                    .named(&format!("t{i}"))
                    .step("a")
                    .start_at(Utc::now() + chrono::Duration::hours(1))
                    .build(),
            )
            .await
            .unwrap();
    }
    let mut schedules = v1::schedule_service_client::ScheduleServiceClient::new(ch.clone());
    for i in 0..10 {
        schedules
            .create_schedule(v1::CreateScheduleRequest {
                namespace: "waiting".into(),
                name: format!("yearly-{i}"),
                cron: "0 0 1 1 *".into(),
                task: Some(task("").step("a").build()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    server.stop().await;
    setup.close().await;
    let loaded = calls_while_idle(&pool, window).await;
    println!("idle service, {window:?}: with nothing waiting {idle:?}");
    println!("idle service, {window:?}: 100 starts + 10 schedules waiting {loaded:?}");
    // the statements the idle service runs: each as often with things waiting as without
    for (f, &a) in &idle {
        let b = loaded.get(f).copied().unwrap_or(0);
        assert!(
            (a - b).abs() <= 2,
            "{f}: {a} calls with nothing waiting, {b} with starts and schedules waiting"
        );
    }
    // and nothing more, but the namespace filter evaluated inside tasker.next_deadline on the
    // first waiting start and schedule it meets (LIMIT 1: not one per task or schedule)
    for (f, &b) in &loaded {
        assert!(
            idle.contains_key(f) || (f == "namespace_matches" && b <= 2 * loaded["next_deadline"]),
            "{f}: called {b} times only with starts and schedules waiting"
        );
    }
    assert!(idle.contains_key("next_deadline"), "{idle:?}");
}
