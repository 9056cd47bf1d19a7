//! Cron schedules (ScheduleService): exactly one task per tick across replicas and a SIGKILL,
//! the overlap policies (SKIP makes nothing while the previous task runs, BUFFER_ONE runs the
//! kept tick when it finishes), the catch-up policies after an outage with no replica, and bad
//! input refused by name with nothing stored.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::process::{connect, ServiceProcess};
use common::*;
use sqlx::PgPool;
use tasker::config::{DeploymentMode, TaskerConfig};
use tasker::proto::v1;
use tonic::transport::Channel;
use tonic::Code;

type Schedules = v1::schedule_service_client::ScheduleServiceClient<Channel>;

fn every_second(namespace: &str, name: &str) -> v1::CreateScheduleRequest {
    v1::CreateScheduleRequest {
        namespace: namespace.into(),
        name: name.into(),
        cron: "* * * * * *".into(),
        time_zone: "Europe/Paris".into(),
        task: Some(task("").named("tick").step("work").build()),
        ..Default::default()
    }
}

/// A schedule's runs, oldest first: (tick, outcome, task, catch_up, missed, recorded_at).
type Run = (
    DateTime<Utc>,
    String,
    Option<uuid::Uuid>,
    bool,
    i32,
    DateTime<Utc>,
);

async fn runs(pool: &PgPool, name: &str) -> Vec<Run> {
    sqlx::query_as(
        "SELECT fire_at, outcome, task_uuid, catch_up, missed, recorded_at
         FROM tasker.schedule_runs WHERE schedule = $1 ORDER BY fire_at",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Wait (observing the database) until `name` has recorded a run for a tick at or after `at`.
async fn wait_for_tick(pool: &PgPool, name: &str, at: DateTime<Utc>) {
    let reached = async {
        let mut every = tokio::time::interval(Duration::from_millis(50));
        loop {
            every.tick().await;
            let latest: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT max(fire_at) FROM tasker.schedule_runs WHERE schedule = $1",
            )
            .bind(name)
            .fetch_one(pool)
            .await
            .unwrap();
            if latest.is_some_and(|l| l >= at) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), reached)
        .await
        .unwrap_or_else(|_| panic!("{name} made no run for {at} within 30 s"));
}

fn grace_config(grace: Duration) -> TaskerConfig {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.orchestration.scheduling.misfire_grace = grace;
    cfg
}

/// Two service processes, a schedule firing every second for 10 s, one process SIGKILLed
/// after 4 s: every tick from the first to the last has exactly one task (counted by tick
/// time, from the tasks' own idempotency keys), none lost to the kill.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn each_tick_makes_exactly_one_task_across_replicas_and_a_kill(pool: PgPool) {
    let url = database_url(&pool);
    let a = ServiceProcess::spawn(&url, "Hybrid").await;
    let b = ServiceProcess::spawn(&url, "Hybrid").await;
    let created = Schedules::new(connect(a.addr).await.unwrap())
        .create_schedule(every_second("cron", "every-second"))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert_eq!(created.next_fire_times.len(), 5);
    let first = tasker::proto::datetime(&created.next_fire_times[0]).unwrap();
    wait_for_tick(&pool, "every-second", first + chrono::Duration::seconds(4)).await;
    a.sigkill().await;
    let last = first + chrono::Duration::seconds(10);
    wait_for_tick(&pool, "every-second", last).await;
    b.sigkill().await;

    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM tasker.tasks WHERE namespace = 'cron' ORDER BY idempotency_key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected: Vec<String> = (0..=10)
        .map(|s| {
            // the documented key: schedule:<name>:<tick, RFC 3339 UTC>
            let tick = first + chrono::Duration::seconds(s);
            format!(
                "schedule:every-second:{}",
                tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )
        })
        .collect();
    let made: Vec<&String> = keys.iter().filter(|k| **k <= expected[10]).collect();
    assert_eq!(
        made,
        expected.iter().collect::<Vec<_>>(),
        "one task per tick from the first to the last"
    );
    let runs = runs(&pool, "every-second").await;
    assert!(
        runs.iter().all(|r| r.1 == "created" && r.2.is_some()),
        "{runs:?}"
    );
}

/// SKIP: while the first task runs (no worker takes it) every later tick makes nothing.
/// BUFFER_ONE: the first later tick is kept, the others skipped, and the kept tick's task is
/// made as soon as the running task completes. GetSchedule shows the next ticks and the runs.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn overlap_policies_skip_and_buffer_one(pool: PgPool) {
    let server = TestServer::start(&pool, &grace_config(Duration::from_secs(10))).await;
    let ch = server.channel().await;
    let mut schedules = Schedules::new(ch.clone());
    let skip = schedules
        .create_schedule(v1::CreateScheduleRequest {
            overlap: v1::OverlapPolicy::Skip as i32,
            ..every_second("overlap", "skip")
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    // every 3 s: a kept tick made by its task's end, not by the next tick, shows in the timing
    let buffer = schedules
        .create_schedule(v1::CreateScheduleRequest {
            overlap: v1::OverlapPolicy::BufferOne as i32,
            cron: "*/3 * * * * *".into(),
            ..every_second("buffered", "buffer")
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    let buffer_first = tasker::proto::datetime(&buffer.next_fire_times[0]).unwrap();
    let first = tasker::proto::datetime(&skip.next_fire_times[0]).unwrap();
    wait_for_tick(&pool, "skip", first + chrono::Duration::seconds(3)).await;
    wait_for_tick(&pool, "buffer", buffer_first + chrono::Duration::seconds(6)).await;

    let skipped = runs(&pool, "skip").await;
    assert_eq!(skipped[0].1, "created", "{skipped:?}");
    assert!(
        skipped.len() >= 4
            && skipped[1..]
                .iter()
                .all(|r| r.1 == "skipped" && r.2.is_none()),
        "{skipped:?}"
    );
    let tasks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.tasks WHERE namespace = 'overlap'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tasks, 1, "a skipped tick makes nothing");

    let buffered = runs(&pool, "buffer").await;
    assert_eq!(
        buffered
            .iter()
            .take(2)
            .map(|r| r.1.as_str())
            .collect::<Vec<_>>(),
        ["created", "buffered"],
        "{buffered:?}"
    );
    assert!(
        buffered[2..].iter().all(|r| r.1 == "skipped"),
        "{buffered:?}"
    );
    let shown = schedules
        .get_schedule(v1::GetScheduleRequest {
            namespace: "buffered".into(),
            name: "buffer".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert_eq!(
        shown.buffered_fire_at.as_ref(),
        Some(&tasker::proto::timestamp(buffered[1].0))
    );
    assert_eq!(shown.next_fire_times.len(), 5);
    assert!(!shown.recent_runs.is_empty() && shown.recent_runs[0].fire_at.is_some());

    // the running task completes: the kept tick's task is made at once (not at a next tick's)
    let workers = Workers::new(ch.clone());
    let step = lease_one(&workers, "buffered").await;
    let mut w = workers.clone();
    w.complete_step(v1::CompleteStepRequest {
        step_uuid: step.step_uuid.clone(),
        attempt: step.attempt,
        lease_token: step.lease_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let completed_at = Utc::now();
    let kept = tokio::time::timeout(Duration::from_secs(5), async {
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            let row: Option<(Option<uuid::Uuid>, DateTime<Utc>)> = sqlx::query_as(
                "SELECT task_uuid, recorded_at FROM tasker.schedule_runs
                 WHERE schedule = 'buffer' AND fire_at = $1 AND outcome = 'created'",
            )
            .bind(buffered[1].0)
            .fetch_optional(&pool)
            .await
            .unwrap();
            if let Some(r) = row {
                return r;
            }
        }
    })
    .await
    .expect("the buffered tick ran after the task completed");
    assert!(kept.0.is_some());
    assert!(
        kept.1 - completed_at < chrono::Duration::milliseconds(500),
        "made {} ms after the completion",
        (kept.1 - completed_at).num_milliseconds()
    );
    server.stop().await;
}

/// An outage of 5 s with no replica: on restart, the SKIP schedule runs none of the ticks it
/// missed (one 'missed' record counts them) and the RUN_LATEST one runs the latest of them,
/// once; ticks within the misfire grace (2 s here: a loaded machine may wake a little late)
/// run as on time.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn missed_ticks_follow_the_catch_up_policy_after_an_outage(pool: PgPool) {
    let grace = Duration::from_secs(2);
    let cfg = grace_config(grace);
    let server = TestServer::start(&pool, &cfg).await;
    let mut schedules = Schedules::new(server.channel().await);
    let mut first = None;
    for (name, catch_up) in [
        ("catch-skip", v1::CatchUpPolicy::Skip),
        ("catch-latest", v1::CatchUpPolicy::RunLatest),
    ] {
        let s = schedules
            .create_schedule(v1::CreateScheduleRequest {
                catch_up: catch_up as i32,
                ..every_second("catch", name)
            })
            .await
            .unwrap()
            .into_inner()
            .schedule
            .unwrap();
        first.get_or_insert(tasker::proto::datetime(&s.next_fire_times[0]).unwrap());
    }
    let first = first.unwrap() + chrono::Duration::seconds(1);
    wait_for_tick(&pool, "catch-skip", first).await;
    wait_for_tick(&pool, "catch-latest", first).await;
    server.stop().await;
    let stopped = Utc::now();
    // the outage itself is the scenario, not a wait for something
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restarted = Utc::now();
    let server = TestServer::start(&pool, &cfg).await;
    let after = restarted + chrono::Duration::seconds(2);
    wait_for_tick(&pool, "catch-skip", after).await;
    wait_for_tick(&pool, "catch-latest", after).await;
    server.stop().await;

    let grace = chrono::Duration::from_std(grace).unwrap();
    let late = |r: &Run| r.5 - r.0 > grace;
    // SKIP: no task for a missed tick; one record of them
    let skip = runs(&pool, "catch-skip").await;
    let missed: Vec<&Run> = skip.iter().filter(|r| r.1 == "missed").collect();
    assert_eq!(missed.len(), 1, "{skip:?}");
    assert!(missed[0].4 >= 2, "the outage's ticks counted: {skip:?}");
    assert!(
        skip.iter().filter(|r| r.1 == "created").all(|r| !late(r)),
        "a missed tick ran: {skip:?}"
    );
    // RUN_LATEST: exactly one missed tick runs, the latest before the grace
    let latest = runs(&pool, "catch-latest").await;
    let caught: Vec<&Run> = latest
        .iter()
        .filter(|r| r.1 == "created" && late(r))
        .collect();
    assert_eq!(caught.len(), 1, "{latest:?}");
    assert!(caught[0].3, "marked as the catch-up: {latest:?}");
    assert!(
        caught[0].4 >= 1,
        "the other missed ticks counted: {latest:?}"
    );
    assert!(caught[0].0 > stopped, "{latest:?}");
    let next_tick = caught[0].0 + chrono::Duration::seconds(1);
    assert!(
        latest
            .iter()
            .any(|r| r.0 == next_tick && r.1 == "created" && !late(r)),
        "the tick after it was within the grace: {latest:?}"
    );
}

/// A malformed expression, an unknown zone, an expression that never fires, a bad template or
/// policy: INVALID_ARGUMENT naming each field, nothing stored; a second schedule of the same
/// name: ALREADY_EXISTS.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn bad_schedules_are_refused_by_name(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut schedules = Schedules::new(server.channel().await);
    let base = every_second("bad", "s");
    let mut keyed = base.clone();
    keyed.task.as_mut().unwrap().idempotency_key = "mine".into();
    let mut elsewhere = base.clone();
    elsewhere.task.as_mut().unwrap().namespace = "other".into();
    let mut stepless = base.clone();
    stepless.task.as_mut().unwrap().steps.clear();
    let cases = [
        (
            v1::CreateScheduleRequest {
                cron: "61 * * * *".into(),
                ..base.clone()
            },
            vec!["cron"],
        ),
        (
            v1::CreateScheduleRequest {
                cron: "* * *".into(),
                ..base.clone()
            },
            vec!["cron"],
        ),
        (
            v1::CreateScheduleRequest {
                time_zone: "Mars/Olympus".into(),
                ..base.clone()
            },
            vec!["time_zone"],
        ),
        (
            v1::CreateScheduleRequest {
                cron: "0 0 30 2 *".into(),
                ..base.clone()
            },
            vec!["cron"],
        ),
        (
            v1::CreateScheduleRequest {
                name: "Bad Name".into(),
                overlap: 9,
                ..base.clone()
            },
            vec!["name", "overlap"],
        ),
        (
            v1::CreateScheduleRequest {
                task: None,
                ..base.clone()
            },
            vec!["task"],
        ),
        (keyed, vec!["task.idempotency_key"]),
        (elsewhere, vec!["task.namespace"]),
        (stepless, vec!["task.steps"]),
    ];
    for (request, fields) in cases {
        let e = schedules.create_schedule(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{fields:?}: {e:?}");
        for f in fields {
            assert!(e.message().contains(f), "{f} named in {:?}", e.message());
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.schedules")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    schedules.create_schedule(base.clone()).await.unwrap();
    let again = schedules.create_schedule(base).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    server.stop().await;
}
