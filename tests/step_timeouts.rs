//! Declared step timeouts (StepDefinition.timeout): an attempt's execution limit that
//! ExtendLease cannot carry it past; an attempt still running then is a failed attempt
//! (TIMED_OUT) that the retry policy follows, and a worker's late report on it is refused
//! naming the timeout.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::Code;

fn epoch_ms(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 * 1000.0 + f64::from(t.nanos) / 1e6
}

/// A step with a 1 s timeout, leased for 30 s and extended every 100 ms by 30 s more: every
/// lease ends at the attempt's start + 1 s, the attempt is failed at 1 s (TIMED_OUT in its
/// last error and history) and retried, and the worker's extension and completion after it
/// are refused with FAILED_PRECONDITION naming the timeout.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_attempt_is_failed_at_its_timeout_and_retried(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let created = Tasks::new(ch.clone())
        .create_task(
            task("timeouts")
                .step("slow")
                .max_attempts(2)
                .timeout(Duration::from_secs(1))
                .build(),
        )
        .await
        .unwrap()
        .into_inner();
    let workers = Workers::new(ch.clone());
    let first = lease_one(&workers, "timeouts").await;
    let started_ms: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM s.started_at)::float8 * 1000 FROM tasker.workflow_steps s
         WHERE s.step_uuid = $1::uuid",
    )
    .bind(&first.step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    let deadline_ms = started_ms + 1000.0;
    let first_lease = epoch_ms(first.lease_expires_at.as_ref().unwrap());
    assert!(
        (first_lease - deadline_ms).abs() < 1.0,
        "the first lease ends at the timeout: {first_lease} vs {deadline_ms}"
    );

    // a worker that keeps extending: each extension stops at the timeout, until refused
    let mut w = workers.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let refusal = loop {
        tick.tick().await;
        match w
            .extend_lease(v1::ExtendLeaseRequest {
                step_uuid: first.step_uuid.clone(),
                attempt: first.attempt,
                lease_token: first.lease_token.clone(),
                lease_seconds: 30,
            })
            .await
        {
            Ok(r) => {
                let until = epoch_ms(r.into_inner().lease_expires_at.as_ref().unwrap());
                assert!(
                    until <= deadline_ms + 1.0,
                    "an extension carried the attempt past its timeout: {until} > {deadline_ms}"
                );
            }
            Err(e) => break e,
        }
        assert!(
            (chrono::Utc::now().timestamp_millis() as f64) < deadline_ms + 10_000.0,
            "never refused"
        );
    };
    assert_eq!(refusal.code(), Code::FailedPrecondition, "{refusal:?}");
    assert!(refusal.message().contains("timeout"), "{refusal:?}");

    // retried: the second attempt is leased
    let second = lease_one(&workers, "timeouts").await;
    assert_eq!(
        (second.step_uuid.as_str(), second.attempt),
        (first.step_uuid.as_str(), 2)
    );
    // and the late completion of the first is refused, naming the timeout
    let late = w
        .complete_step(v1::CompleteStepRequest {
            step_uuid: first.step_uuid.clone(),
            attempt: first.attempt,
            lease_token: first.lease_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(
        late.message().contains("timeout") && late.message().contains("TIMED_OUT"),
        "{late:?}"
    );

    // the attempt ended at its timeout, as TIMED_OUT, in the history and the last error
    let (failed_ms, reason): (f64, Option<String>) = sqlx::query_as(
        "SELECT extract(epoch FROM t.created_at)::float8 * 1000, t.metadata->>'reason'
         FROM tasker.step_transitions t
         WHERE t.step_uuid = $1::uuid AND t.from_state = 'in_progress'
         ORDER BY t.id LIMIT 1",
    )
    .bind(&first.step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(reason.as_deref(), Some("timed_out"));
    assert!(
        (0.0..150.0).contains(&(failed_ms - deadline_ms)),
        "failed {:.1} ms after its timeout",
        failed_ms - deadline_ms
    );
    let step = Tasks::new(ch.clone())
        .get_task(v1::GetTaskRequest {
            task_uuid: created.task_uuid.clone(),
            include_step_data: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .steps
        .remove(0);
    assert_eq!(step.timeout, Some(tasker::proto::duration_from_ms(1000)));
    let error = tasker::proto::struct_to_json(step.last_error);
    assert_eq!(error["outcome"], "TIMED_OUT", "{error}");
    server.stop().await;
}

/// A step handed to a fetch that was parked before its task existed (claim-and-enqueue's
/// hand-off) is leased to exactly its start + its timeout, as a fetch that reads the queue is:
/// the lease's end and the start are one reading of the clock.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_handed_step_is_leased_to_exactly_its_start_plus_its_timeout(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let workers = Workers::new(ch.clone());
    let mut parked = server.core.workers.parked_fetches();
    let fetch = tokio::spawn({
        let workers = workers.clone();
        async move { lease_one(&workers, "handed").await }
    });
    tokio::time::timeout(Duration::from_secs(10), parked.wait_for(|p| *p >= 1))
        .await
        .expect("the fetch parks")
        .unwrap();
    Tasks::new(ch.clone())
        .create_task(
            task("handed")
                .step("slow")
                .timeout(Duration::from_secs(1))
                .build(),
        )
        .await
        .unwrap();
    let leased = fetch.await.unwrap();
    let (exact, started_ms): (bool, f64) = sqlx::query_as(
        "SELECT q.visible_at = s.started_at + interval '1 second',
                extract(epoch FROM s.started_at)::float8 * 1000
         FROM tasker.step_queue q JOIN tasker.workflow_steps s ON s.step_uuid = q.step_uuid
         WHERE q.step_uuid = $1::uuid",
    )
    .bind(&leased.step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    let lease_ms = epoch_ms(leased.lease_expires_at.as_ref().unwrap());
    assert!(
        exact && (lease_ms - (started_ms + 1000.0)).abs() < 0.01,
        "the lease ends at the start + the timeout: {lease_ms} vs {}",
        started_ms + 1000.0
    );
    server.stop().await;
}

/// A timeout out of range is refused with INVALID_ARGUMENT naming the step's field.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_bad_timeout_is_refused_by_name(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    for bad in [Duration::ZERO, Duration::from_secs(8 * 86_400)] {
        let e = tasks
            .create_task(task("bad").step("a").timeout(bad).build())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("steps[0].timeout"), "{e:?}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    server.stop().await;
}

/// A step queued where no worker fetches fails for good at its schedule_to_start (500 ms from
/// being queued; SCHEDULE_TO_START_TIMED_OUT, no retry, its task in error), on time; a step a
/// worker leases within its schedule_to_start is not touched.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_step_no_worker_starts_fails_at_its_schedule_to_start(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let unserved = tasks
        .create_task(
            task("unserved")
                .step("waits")
                .max_attempts(3)
                .schedule_to_start(Duration::from_millis(500))
                .build(),
        )
        .await
        .unwrap()
        .into_inner();
    tasks
        .create_task(
            task("served")
                .step("taken")
                .schedule_to_start(Duration::from_millis(500))
                .build(),
        )
        .await
        .unwrap();
    let leased = lease_one(&Workers::new(ch.clone()), "served").await;

    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            let t = tasks
                .get_task(v1::GetTaskRequest {
                    task_uuid: unserved.task_uuid.clone(),
                    include_step_data: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .task
                .unwrap();
            if t.state() == v1::TaskState::Error {
                return t;
            }
        }
    })
    .await
    .expect("the unserved task failed");
    let step = &failed.steps[0];
    assert_eq!(step.state(), v1::StepState::Error);
    assert_eq!(step.attempts, 1, "no retry");
    let error = tasker::proto::struct_to_json(step.last_error.clone());
    assert_eq!(error["outcome"], "SCHEDULE_TO_START_TIMED_OUT", "{error}");
    let late_ms: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM (t.created_at - s.enqueued_at))::float8 * 1000 - 500
         FROM tasker.step_transitions t JOIN tasker.workflow_steps s ON s.step_uuid = t.step_uuid
         WHERE t.step_uuid = $1::uuid AND t.to_state = 'error'",
    )
    .bind(&step.step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        (0.0..150.0).contains(&late_ms),
        "failed {late_ms:.1} ms after its schedule_to_start"
    );
    // the leased one is in progress still
    let mut w = Workers::new(ch.clone());
    w.complete_step(v1::CompleteStepRequest {
        step_uuid: leased.step_uuid.clone(),
        attempt: leased.attempt,
        lease_token: leased.lease_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    server.stop().await;
}
