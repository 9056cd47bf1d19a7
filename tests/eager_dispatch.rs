//! Eager dispatch (`CompleteStepRequest.next`): a completion leases the steps it makes ready
//! to its own worker in its own transaction. What it must keep: exactly once (a worker that
//! dies holding eagerly leased steps loses nothing), the queues a worker names, the rest of
//! the steps flowing to everyone else, a claim held elsewhere, and bad input changing nothing.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::proto::v1;
use tonic::Code;

fn report(step: &v1::LeasedStep, next: Option<v1::NextSteps>) -> v1::CompleteStepRequest {
    v1::CompleteStepRequest {
        step_uuid: step.step_uuid.clone(),
        attempt: step.attempt,
        results: None,
        lease_token: step.lease_token.clone(),
        next,
    }
}

async fn complete_next(
    workers: &mut Workers,
    step: &v1::LeasedStep,
    next: Option<v1::NextSteps>,
) -> v1::CompleteStepResponse {
    workers
        .complete_step(report(step, next))
        .await
        .unwrap()
        .into_inner()
}

/// A chain of `n` steps in namespace "shop"; its task's uuid.
async fn chain_task(tasks: &mut Tasks, n: usize) -> String {
    tasks
        .create_task(chain("shop", n).build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid
}

async fn task_state(tasks: &mut Tasks, task: &str) -> v1::TaskState {
    get_task(tasks, task).await.state()
}

/// a -> b -> c, each completion asking for one more: every successor arrives in the
/// completion's answer, enqueued by the completion's transaction (its history says so), with
/// no readiness notification sent for it and the command stream showing each pass.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_completion_asking_for_next_receives_its_successor_in_the_same_call(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let mut readiness = Readiness::new(ch.clone());
    let task_uuid = chain_task(&mut tasks, 3).await;
    let mut events = readiness
        .stream_command_events(v1::StreamCommandEventsRequest {
            triggered_by: vec![v1::TriggeredBy::EagerDispatch.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ready = listener(&pool, &["tasker_task_ready"]).await;
    let mut step = lease_one(&workers, "shop").await;
    let mut names = vec![step.name.clone()];
    loop {
        let r = complete_next(&mut workers, &step, ask_next(1, &[], 30)).await;
        assert!(!r.already_recorded);
        match r.next_steps.len() {
            0 => break,
            1 => {}
            n => panic!("asked for one step, got {n}"),
        }
        step = r.next_steps.into_iter().next().unwrap();
        assert_eq!(step.task_uuid, task_uuid);
        assert_eq!(step.attempt, 1);
        assert_eq!(step.queue, "default");
        assert!(!step.lease_token.is_empty());
        names.push(step.name.clone());
    }
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(
        task_state(&mut tasks, &task_uuid).await,
        v1::TaskState::Complete
    );
    // no readiness notification for the successors: the completions enqueued them
    let sent = drain_until_sentinel(&pool, &mut ready, &["tasker_task_ready"]).await;
    assert!(
        sent.is_empty(),
        "{:?}",
        sent.iter().map(|n| n.payload()).collect::<Vec<_>>()
    );
    let eager: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.step_transitions
         WHERE to_state = 'enqueued' AND metadata->>'triggered_by' = 'eager_dispatch'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(eager, 2, "the two successors were enqueued eagerly");
    // enqueued and leased in one move, each successor's history still shows both transitions
    let histories: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT s.name, array_agg(coalesce(t.from_state, '') || '>' || t.to_state ORDER BY t.id)
         FROM tasker.workflow_steps s JOIN tasker.step_transitions t ON t.step_uuid = s.step_uuid
         WHERE s.task_uuid = $1::uuid GROUP BY s.name ORDER BY s.name",
    )
    .bind(&task_uuid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(histories.len(), 3);
    for (name, history) in histories {
        assert_eq!(
            history,
            [
                ">pending",
                "pending>enqueued",
                "enqueued>in_progress",
                "in_progress>complete"
            ],
            "{name}"
        );
    }
    for _ in 0..2 {
        let e = next_pass(&mut events).await;
        assert_eq!(e.task_uuid, task_uuid);
        assert_eq!(e.steps_enqueued, 1);
        assert_eq!(e.outcome(), v1::CommandOutcome::Enqueued);
    }
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// A fan-out of three asking for one: one arrives in the answer, the other two reach a fetch
/// already parked (woken by the enqueue, no poller); a successor of a queue the worker did not
/// name is left for that queue's workers.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn steps_the_completing_worker_does_not_take_flow_to_everyone_else(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    tasks
        .create_task(
            task("shop")
                .step("a")
                .step("b")
                .after("a")
                .step("c")
                .after("a")
                .step("d")
                .after("a")
                .step("ship")
                .after("a")
                .queue("warehouse")
                .build(),
        )
        .await
        .unwrap();
    let a = lease_one(&workers, "shop").await;
    // fetches parked before the completion
    let (parked, ship) = park_default_and_warehouse(&ch, "shop").await;
    let r = complete_next(&mut workers, &a, ask_next(1, &[], 30)).await;
    assert_eq!(r.next_steps.len(), 1);
    let mine = r.next_steps[0].name.clone();
    assert!(["b", "c", "d"].contains(&mine.as_str()), "{mine}");
    assert_split(&mine, parked, ship, &["b", "c", "d"]).await;
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// A worker killed holding an eagerly leased step: the step is leased again (attempt 2) when
/// the lease runs out, the dead worker's late report is refused, and the task completes with
/// every step run to completion once.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn eagerly_leased_steps_of_a_killed_worker_are_leased_again_after_their_lease(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let task_uuid = chain_task(&mut tasks, 3).await;
    let first = lease_one(&workers, "shop").await;
    let r = complete_next(&mut workers, &first, ask_next(1, &[], 1)).await;
    let held = r.next_steps[0].clone();
    // the worker dies here: another fetches and receives the step once its lease runs out
    let again = lease_within(&workers, "shop", Duration::from_secs(30)).await;
    assert_eq!(again.step_uuid, held.step_uuid);
    assert_eq!(again.attempt, 2);
    let late = workers
        .complete_step(report(&held, ask_next(1, &[], 30)))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let mut step = again;
    loop {
        let r = complete_next(&mut workers, &step, ask_next(1, &[], 30)).await;
        match r.next_steps.into_iter().next() {
            Some(s) => step = s,
            // the successor went the plain way: another pass held the task's claim (the
            // listener's, say, still at work on the task after the lease's expiry), and a
            // completion that finds the claim held announces its steps instead of leasing
            // them; a fetch receives it
            None if task_state(&mut tasks, &task_uuid).await != v1::TaskState::Complete => {
                step = lease_one(&workers, "shop").await;
            }
            None => break,
        }
    }
    assert_eq!(
        task_state(&mut tasks, &task_uuid).await,
        v1::TaskState::Complete
    );
    let completions: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.step_transitions t
         JOIN tasker.workflow_steps s USING (step_uuid)
         WHERE t.to_state = 'complete' GROUP BY s.step_uuid",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(completions, [1, 1, 1]);
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// While another holds the task's claim, the completion cannot enqueue: it answers no steps
/// and announces readiness as a plain completion does, so the processor enqueues the successor
/// once the claim is free (no poller runs).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_claim_held_elsewhere_leaves_the_successor_to_the_readiness_event(pool: PgPool) {
    let mut cfg = events_only_config();
    // the processor's retry comes after the test has let the claim go
    cfg.orchestration.command_processor.claim_retry_delay = Duration::from_secs(1);
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let task_uuid = chain_task(&mut tasks, 2).await;
    let first = lease_one(&workers, "shop").await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tasker.claim:' || $1, 0))")
        .bind(&task_uuid)
        .execute(&mut *holder)
        .await
        .unwrap();
    let r = complete_next(&mut workers, &first, ask_next(1, &[], 30)).await;
    assert!(r.next_steps.is_empty(), "the claim is held elsewhere");
    holder.rollback().await.unwrap();
    let second = lease_one(&workers, "shop").await;
    assert_eq!(second.task_uuid, task_uuid);
    assert_eq!(second.attempt, 1);
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// A bad `next` is refused naming the field, and the completion is not recorded; a retried
/// completion answers already_recorded with no steps.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_bad_next_changes_nothing_and_a_retry_leases_nothing_twice(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    chain_task(&mut tasks, 2).await;
    let first = lease_one(&workers, "shop").await;
    for (bad, field) in [
        (ask_next(101, &[], 30), "next.max_steps"),
        (ask_next(-1, &[], 30), "next.max_steps"),
        (ask_next(1, &["bad/queue"], 30), "next.queues[0]"),
        (ask_next(1, &[], 3601), "next.lease_seconds"),
    ] {
        let e = workers
            .complete_step(report(&first, bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(field_violations(&e), [field], "{e:?}");
    }
    let state: String =
        sqlx::query_scalar("SELECT state FROM tasker.workflow_steps WHERE step_uuid = $1::uuid")
            .bind(&first.step_uuid)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "in_progress", "a refused report records nothing");
    let r = complete_next(&mut workers, &first, ask_next(1, &[], 30)).await;
    assert_eq!(r.next_steps.len(), 1);
    let again = complete_next(&mut workers, &first, ask_next(1, &[], 30)).await;
    assert!(again.already_recorded);
    assert!(again.next_steps.is_empty());
    server.stop().await;
}
