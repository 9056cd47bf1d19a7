//! Eager start (`CreateTaskRequest.next`): a task's creation leases the steps it makes ready
//! to the creating worker in its own transaction, as a completion's `next` does for its
//! successors. What it must keep: exactly once (a worker that dies holding an eagerly started
//! step loses nothing), the steps it does not take flowing to everyone else, nothing leased
//! for a task that starts later or that its idempotency key returned, and bad input creating
//! nothing.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tasker::proto::v1;
use tonic::Code;

const WORKER: &str = "creator-1";

/// `request` created by WORKER, asking for `next`.
fn started(
    mut request: v1::CreateTaskRequest,
    next: Option<v1::NextSteps>,
) -> v1::CreateTaskRequest {
    request.next = next;
    request.worker_id = WORKER.into();
    request
}

async fn create(tasks: &mut Tasks, request: v1::CreateTaskRequest) -> v1::CreateTaskResponse {
    tasks.create_task(request).await.unwrap().into_inner()
}

async fn tasks_stored(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A chain created asking for one step: its root arrives in the creation's answer, leased to
/// the creating worker and enqueued by the creation's transaction (its history says so), with
/// no readiness notification sent and the command stream showing the pass; the chain then
/// runs to completion exactly once.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_task_created_asking_for_next_arrives_leased_in_the_creations_answer(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let mut readiness = Readiness::new(ch.clone());
    let mut events = readiness
        .stream_command_events(v1::StreamCommandEventsRequest {
            triggered_by: vec![v1::TriggeredBy::EagerDispatch.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ready = listener(&pool, &["tasker_task_ready"]).await;
    let r = create(
        &mut tasks,
        started(chain("shop", 3).build(), ask_next(1, &[], 30)),
    )
    .await;
    assert!(r.created);
    assert_eq!(r.steps.len(), 3);
    assert_eq!(r.next_steps.len(), 1, "{:?}", r.next_steps);
    let root = r.next_steps[0].clone();
    assert_eq!(root.name, "s0");
    assert_eq!(root.task_uuid, r.task_uuid);
    assert_eq!(root.step_uuid, r.steps[0].step_uuid);
    assert_eq!(root.attempt, 1);
    assert_eq!(root.queue, "default");
    assert!(!root.lease_token.is_empty());
    let holder: Option<String> = sqlx::query_scalar(
        "SELECT leased_by FROM tasker.step_queue WHERE step_uuid = $1::uuid AND attempt = 1",
    )
    .bind(&root.step_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(holder.as_deref(), Some(WORKER));
    // no readiness notification: the creation enqueued its root itself
    let sent = drain_until_sentinel(&pool, &mut ready, &["tasker_task_ready"]).await;
    assert!(
        sent.is_empty(),
        "{:?}",
        sent.iter().map(|n| n.payload()).collect::<Vec<_>>()
    );
    let history: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT coalesce(from_state, '') || '>' || to_state, metadata->>'triggered_by'
         FROM tasker.step_transitions WHERE step_uuid = $1::uuid ORDER BY id",
    )
    .bind(&root.step_uuid)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        [
            (">pending".to_string(), None),
            (
                "pending>enqueued".to_string(),
                Some("eager_dispatch".to_string())
            ),
            (
                "enqueued>in_progress".to_string(),
                Some("eager_dispatch".to_string())
            ),
        ]
    );
    let e = next_pass(&mut events).await;
    assert_eq!(e.task_uuid, r.task_uuid);
    assert_eq!(e.steps_enqueued, 1);
    assert_eq!(e.outcome(), v1::CommandOutcome::Enqueued);
    // the root is an ordinary lease: the chain runs on to its end
    let mut step = root;
    loop {
        let r = workers
            .complete_step(v1::CompleteStepRequest {
                step_uuid: step.step_uuid.clone(),
                attempt: step.attempt,
                results: None,
                lease_token: step.lease_token.clone(),
                next: ask_next(1, &[], 30),
            })
            .await
            .unwrap()
            .into_inner();
        match r.next_steps.into_iter().next() {
            Some(s) => step = s,
            None => break,
        }
    }
    assert_eq!(
        get_task(&mut tasks, &r.task_uuid).await.state(),
        v1::TaskState::Complete
    );
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// Three roots and one of another queue, the creator asking for one: one arrives in the
/// answer, the other two reach a fetch already parked (woken by the enqueue, no poller), and
/// the root of a queue the creator did not name is left for that queue's workers.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn roots_the_creating_worker_does_not_take_flow_to_everyone_else(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let workers = Workers::new(ch.clone());
    // the namespace exists before the fetches park on it
    create(&mut tasks, task("shop").step("warm-up").build()).await;
    let warm = lease_one(&workers, "shop").await;
    complete_leased(&mut workers.clone(), &warm).await;
    let (parked, ship) = park_default_and_warehouse(&ch, "shop").await;
    let request = task("shop")
        .step("a")
        .step("b")
        .step("c")
        .step("ship")
        .queue("warehouse")
        .build();
    let r = create(&mut tasks, started(request, ask_next(1, &[], 30))).await;
    assert_eq!(r.next_steps.len(), 1);
    assert_split(&r.next_steps[0].name, parked, ship, &["a", "b", "c"]).await;
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// A worker killed holding an eagerly started step: the step is leased again (attempt 2) when
/// the lease runs out, and the dead worker's late report is refused.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_eagerly_started_step_of_a_killed_worker_is_leased_again_after_its_lease(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let r = create(
        &mut tasks,
        started(chain("shop", 2).build(), ask_next(1, &[], 1)),
    )
    .await;
    let held = r.next_steps[0].clone();
    // the worker dies here: another fetches and receives the step once its lease runs out
    let again = lease_within(&workers, "shop", Duration::from_secs(30)).await;
    assert_eq!(again.step_uuid, held.step_uuid);
    assert_eq!(again.attempt, 2);
    let late = workers
        .complete_step(v1::CompleteStepRequest {
            step_uuid: held.step_uuid.clone(),
            attempt: held.attempt,
            results: None,
            lease_token: held.lease_token.clone(),
            next: None,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    complete_leased(&mut workers, &again).await;
    let last = lease_one(&workers, "shop").await;
    complete_leased(&mut workers, &last).await;
    assert_eq!(
        get_task(&mut tasks, &r.task_uuid).await.state(),
        v1::TaskState::Complete
    );
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// Nothing is leased for a task that starts later, nor for the task an idempotency key
/// returns (its steps were leased when it was created); neither leases anything twice.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn nothing_is_leased_for_a_later_start_or_a_repeated_key(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut later = chain("shop", 2).build();
    later.start_at = Some(tasker::proto::timestamp(
        chrono::Utc::now() + chrono::Duration::hours(1),
    ));
    let r = create(&mut tasks, started(later, ask_next(1, &[], 30))).await;
    assert!(r.created);
    assert!(r.next_steps.is_empty(), "{:?}", r.next_steps);
    assert_eq!(
        get_task(&mut tasks, &r.task_uuid).await.state(),
        v1::TaskState::Pending
    );
    let mut keyed = chain("shop", 2).build();
    keyed.idempotency_key = "order-7".into();
    let first = create(&mut tasks, started(keyed.clone(), ask_next(1, &[], 30))).await;
    assert!(first.created);
    assert_eq!(first.next_steps.len(), 1);
    let again = create(&mut tasks, started(keyed, ask_next(1, &[], 30))).await;
    assert!(!again.created);
    assert_eq!(again.task_uuid, first.task_uuid);
    assert!(again.next_steps.is_empty(), "{:?}", again.next_steps);
    let leases: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker.step_queue WHERE task_uuid = $1::uuid AND leased_by IS NOT NULL",
    )
    .bind(&first.task_uuid)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leases, 1);
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// A task that must wait for a slot of its concurrency key leases nothing at its creation: it
/// starts, for any worker, when the task holding the slot finishes.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_task_waiting_on_its_key_leases_nothing_and_starts_when_the_slot_frees(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let mut admin = Admin::new(ch.clone());
    admin
        .create_namespace(v1::CreateNamespaceRequest {
            namespace: "shop".into(),
        })
        .await
        .unwrap();
    admin
        .set_namespace_settings(v1::SetNamespaceSettingsRequest {
            namespace: "shop".into(),
            max_tasks_per_key: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let keyed = |name: &str| {
        let mut r = task("shop").named(name).step("only").build();
        r.concurrency_key = "customer-1".into();
        r
    };
    let first = create(&mut tasks, started(keyed("first"), ask_next(1, &[], 30))).await;
    assert_eq!(first.next_steps.len(), 1);
    let second = create(&mut tasks, started(keyed("second"), ask_next(1, &[], 30))).await;
    assert!(second.next_steps.is_empty(), "{:?}", second.next_steps);
    assert_eq!(
        get_task(&mut tasks, &second.task_uuid).await.state(),
        v1::TaskState::Pending
    );
    complete_leased(&mut workers, &first.next_steps[0]).await;
    let step = lease_one(&workers, "shop").await;
    assert_eq!(step.task_uuid, second.task_uuid);
    complete_leased(&mut workers, &step).await;
    assert_exactly_once_in_order(&pool).await;
    server.stop().await;
}

/// A bad `next` or `worker_id` is refused naming the field, with the task's own problems in
/// the same answer, and nothing is created.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn bad_eager_start_input_is_refused_by_field_and_creates_nothing(pool: PgPool) {
    let server = TestServer::start(&pool, &events_only_config()).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let without_worker = {
        let mut r = started(chain("shop", 2).build(), ask_next(1, &[], 30));
        r.worker_id.clear();
        r
    };
    let without_next = started(chain("shop", 2).build(), None);
    let mut bad_task = started(
        chain("shop", 2).build(),
        ask_next(101, &["bad/queue"], 3601),
    );
    bad_task.name.clear();
    for (request, fields) in [
        (without_worker, vec!["worker_id"]),
        (without_next, vec!["worker_id"]),
        (
            bad_task,
            vec![
                "next.max_steps",
                "next.lease_seconds",
                "next.queues[0]",
                "name",
            ],
        ),
    ] {
        let e = tasks.create_task(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let mut named = field_violations(&e);
        named.sort();
        let mut fields: Vec<String> = fields.into_iter().map(String::from).collect();
        fields.sort();
        assert_eq!(named, fields, "{e:?}");
    }
    assert_eq!(tasks_stored(&pool).await, 0);
    server.stop().await;
}
