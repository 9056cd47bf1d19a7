//! Declared retry policies (StepDefinition.retry, CreateTaskRequest.retry): the backoff of a
//! failed attempt when the worker's FailStep names none; a worker's explicit backoff wins; the
//! task's policy serves the steps that declare none; a bad policy is refused by name.

mod common;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::Code;

fn ms(n: i64) -> Option<prost_types::Duration> {
    Some(tasker::proto::duration_from_ms(n))
}

fn policy(initial: i64, multiplier: f64, max: i64, jitter: f64) -> v1::RetryPolicy {
    v1::RetryPolicy {
        initial_backoff: ms(initial),
        multiplier,
        max_backoff: ms(max),
        jitter,
    }
}

/// Fail a leased step, retryable, with the worker's backoff (`None`: none named); the
/// backoff the database chose, in ms: next_retry_at less the time the failure was recorded.
async fn fail_and_read_backoff(
    workers: &mut Workers,
    pool: &PgPool,
    step: &v1::LeasedStep,
    backoff_ms: Option<i64>,
) -> f64 {
    let r = workers
        .fail_step(v1::FailStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            lease_token: step.lease_token.clone(),
            error_message: "flaky".into(),
            retryable: true,
            backoff_ms,
            error_details: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), v1::FailStepOutcome::RetryScheduled);
    let at = r.next_retry_at.expect("a retry time");
    // the history row is immutable (the step itself may be enqueued again already)
    let failed_at: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM t.created_at)::float8 FROM tasker.step_transitions t
         WHERE t.step_uuid = $1::uuid AND t.to_state = 'waiting_for_retry'
         ORDER BY t.created_at DESC LIMIT 1",
    )
    .bind(&step.step_uuid)
    .fetch_one(pool)
    .await
    .unwrap();
    (at.seconds as f64 + f64::from(at.nanos) / 1e9 - failed_at) * 1000.0
}

fn near(got: f64, want: f64) -> bool {
    // the failure's history row and next_retry_at are stamped a few statements apart
    (want - 25.0..=want + 25.0).contains(&got)
}

/// A step declaring {200 ms, x3, at most 1 s, no jitter}: its attempts wait 200, 600 and then
/// 1000 ms (capped) when the worker names no backoff; a worker's explicit 0 still retries at
/// once; a step declaring nothing takes the task's {50 ms}; a task with no policy retries at
/// once, as before.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn the_declared_policy_sets_the_backoff_when_the_worker_names_none(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let created = tasks
        .create_task(
            task("retries")
                .named("declared")
                .default_retry(policy(50, 1.0, 50, 0.0))
                .step("flaky")
                .max_attempts(6)
                .retry(policy(200, 3.0, 1000, 0.0))
                .build(),
        )
        .await
        .unwrap()
        .into_inner();
    // GetTask shows the policy each step follows
    let shown = get_task(&mut tasks, &created.task_uuid).await.steps;
    assert_eq!(shown[0].retry, Some(policy(200, 3.0, 1000, 0.0)));

    let mut seen = Vec::new();
    for _ in 0..3 {
        let step = lease_one(&workers, "retries").await;
        seen.push(fail_and_read_backoff(&mut workers, &pool, &step, None).await);
    }
    assert!(
        near(seen[0], 200.0) && near(seen[1], 600.0) && near(seen[2], 1000.0),
        "200, 600, then capped at 1000 ms; got {seen:?}"
    );
    // the worker's own backoff wins, 0 too
    let step = lease_one(&workers, "retries").await;
    let explicit = fail_and_read_backoff(&mut workers, &pool, &step, Some(0)).await;
    assert!(
        near(explicit, 0.0),
        "an explicit 0 retries at once, got {explicit}"
    );

    // a step without a policy of its own: the task's
    tasks
        .create_task(
            task("retries-default")
                .default_retry(policy(50, 1.0, 50, 0.0))
                .step("plain")
                .build(),
        )
        .await
        .unwrap();
    let step = lease_one(&workers, "retries-default").await;
    let by_task = fail_and_read_backoff(&mut workers, &pool, &step, None).await;
    assert!(near(by_task, 50.0), "the task's 50 ms, got {by_task}");

    // no policy anywhere: at once, as before
    tasks
        .create_task(task("retries-none").step("plain").build())
        .await
        .unwrap();
    let step = lease_one(&workers, "retries-none").await;
    let none = fail_and_read_backoff(&mut workers, &pool, &step, None).await;
    assert!(near(none, 0.0), "at once, got {none}");
    server.stop().await;
}

/// Jitter takes a random part of up to its fraction off each backoff: attempt 3 of {1 s, x2,
/// at most 10 s, jitter 0.5} waits between 2 and 4 s, and not always the same.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn jitter_takes_up_to_its_fraction_off(pool: PgPool) {
    let samples: Vec<i64> = sqlx::query_scalar(
        "SELECT tasker.policy_backoff_ms(
             '{\"initial_ms\": 1000, \"multiplier\": 2, \"max_ms\": 10000, \"jitter\": 0.5}', 3)
         FROM generate_series(1, 200)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        samples.iter().all(|b| (2000..=4000).contains(b)),
        "{samples:?}"
    );
    let distinct: std::collections::HashSet<_> = samples.iter().collect();
    assert!(
        distinct.len() > 50,
        "random, not fixed: {} values",
        distinct.len()
    );
}

/// A bad policy is refused with INVALID_ARGUMENT naming the field and the rule, and nothing
/// is stored.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_bad_policy_is_refused_by_name(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let cases = [
        (
            task("bad").step("a").retry(policy(500, 2.0, 100, 0.0)),
            "steps[0].retry.max_backoff",
        ),
        (
            task("bad").step("a").retry(policy(-5, 2.0, 100, 0.0)),
            "steps[0].retry.initial_backoff",
        ),
        (
            task("bad").step("a").retry(v1::RetryPolicy {
                initial_backoff: None,
                ..policy(0, 2.0, 100, 0.0)
            }),
            "steps[0].retry.initial_backoff",
        ),
        (
            task("bad").step("a").retry(policy(100, 0.5, 1000, 0.0)),
            "steps[0].retry.multiplier",
        ),
        (
            task("bad").step("a").retry(policy(100, 2.0, 1000, 1.5)),
            "steps[0].retry.jitter",
        ),
        (
            task("bad")
                .default_retry(policy(100, 2.0, 172_800_000, 0.0))
                .step("a"),
            "retry.max_backoff",
        ),
    ];
    for (request, field) in cases {
        let e = tasks.create_task(request.build()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(field),
            "{field} named in {:?}",
            e.message()
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    server.stop().await;
}

/// A retry's due time reaches every replica: replica A records the failure (800 ms backoff)
/// and stops; replica B, whose poller and deadline cap are an hour away, leases the step
/// within 150 ms of its due time, woken by the announcement alone.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_retry_is_met_on_time_by_another_replica(pool: PgPool) {
    let mut cfg = events_only_config();
    cfg.orchestration.task_readiness.fallback_polling_interval =
        std::time::Duration::from_secs(3600);
    let a = TestServer::start(&pool, &cfg).await;
    let b = TestServer::start(&pool, &cfg).await;
    let (cha, chb) = (a.channel().await, b.channel().await);
    Tasks::new(cha.clone())
        .create_task(task("far").step("x").max_attempts(3).build())
        .await
        .unwrap();
    let mut wa = Workers::new(cha.clone());
    let step = lease_one(&wa, "far").await;
    let due = wa
        .fail_step(v1::FailStepRequest {
            step_uuid: step.step_uuid.clone(),
            attempt: step.attempt,
            lease_token: step.lease_token.clone(),
            error_message: "later".into(),
            retryable: true,
            backoff_ms: Some(800),
            error_details: None,
        })
        .await
        .unwrap()
        .into_inner()
        .next_retry_at
        .expect("a retry time");
    a.stop().await;
    let again = lease_one(&Workers::new(chb.clone()), "far").await;
    assert_eq!(again.attempt, 2);
    let started_ms: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM s.started_at)::float8 * 1000 FROM tasker.workflow_steps s
         WHERE s.step_uuid = $1::uuid",
    )
    .bind(&step.step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    let late_ms = started_ms - (due.seconds as f64 * 1000.0 + f64::from(due.nanos) / 1e6);
    assert!(
        (0.0..150.0).contains(&late_ms),
        "leased {late_ms:.1} ms after its due time"
    );
    b.stop().await;
}
