//! The gRPC API in-process: every method, every error code, auth per scope, the event stream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use tasker::client::diamond;
use tasker::config::{DeploymentMode, TokenConfig};
use tasker::proto::{v1, Vocabulary};
use tokio_stream::StreamExt;
use tonic::{Code, Request};

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn workflow_through_the_api_with_every_method(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers, mut readiness, mut admin) = (
        Tasks::new(ch.clone()),
        Workers::new(ch.clone()),
        Readiness::new(ch.clone()),
        Admin::new(ch),
    );

    let mut events = readiness
        .stream_command_events(v1::StreamCommandEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let mut req = diamond("api").build();
    req.idempotency_key = "order-1".into();
    req.context = Some(tasker::proto::json_to_struct(
        &serde_json::json!({"customer": 7}),
    ));
    let created = tasks.create_task(req.clone()).await.unwrap().into_inner();
    assert!(created.created);
    assert_eq!(created.steps.len(), 4);
    let again = tasks.create_task(req).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!(again.task_uuid, created.task_uuid);

    let mut order = Vec::new();
    while order.len() < 4 {
        let fetched = workers
            .fetch_steps(fetch_request("api", 10, 5000, 30))
            .await
            .unwrap()
            .into_inner();
        assert!(!fetched.steps.is_empty(), "fetch waited for an enqueue");
        for s in fetched.steps {
            if s.name == "d" {
                let parents = tasker::proto::struct_to_json(s.parent_results.clone());
                assert_eq!(parents["b"]["done"], serde_json::json!("b"));
            }
            let ext = workers
                .extend_lease(v1::ExtendLeaseRequest {
                    step_uuid: s.step_uuid.clone(),
                    attempt: s.attempt,
                    lease_seconds: 60,
                    lease_token: s.lease_token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(ext.lease_expires_at.is_some());
            workers
                .complete_step(v1::CompleteStepRequest {
                    step_uuid: s.step_uuid.clone(),
                    attempt: s.attempt,
                    results: Some(tasker::proto::json_to_struct(
                        &serde_json::json!({"done": s.name}),
                    )),
                    lease_token: s.lease_token.clone(),
                    next: None,
                })
                .await
                .unwrap();
            order.push(s.name);
        }
    }
    assert_eq!(order[0], "a");
    assert_eq!(order[3], "d");

    let task = get_task(&mut tasks, &created.task_uuid).await;
    assert_eq!(task.state(), v1::TaskState::Complete);
    assert_eq!(task.steps.len(), 4);
    let r = readiness
        .get_task_readiness(v1::GetTaskReadinessRequest {
            task_uuid: created.task_uuid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.execution_status(), v1::ExecutionStatus::AllComplete);
    assert_eq!(r.counts.unwrap().complete, 4);

    // the task's command events arrive in order: received before started before completed
    let mut phases = Vec::new();
    let deadline = tokio::time::sleep(WAIT);
    tokio::pin!(deadline);
    while phases
        .iter()
        .filter(|p: &&String| p.as_str() == "completed")
        .count()
        < 3
    {
        tokio::select! {
            e = events.next() => {
                let e = e.unwrap().unwrap();
                if e.task_uuid == created.task_uuid && e.phase() != v1::CommandPhase::Coalesced {
                    phases.push(e.phase().word());
                }
            }
            _ = &mut deadline => panic!("events missing: {phases:?}"),
        }
    }
    let first = |p: &str| phases.iter().position(|x| x == p).unwrap();
    assert!(
        first("received") < first("started") && first("started") < first("completed"),
        "{phases:?}"
    );

    // FailStep: a retryable failure with backoff, then a final one
    let mut failing = diamond("api-fail").build();
    failing.steps[0].max_attempts = 2;
    tasks.create_task(failing).await.unwrap();
    let first = lease_one(&workers, "api-fail").await;
    let fail = |leased: &v1::LeasedStep, retryable: bool| v1::FailStepRequest {
        step_uuid: leased.step_uuid.clone(),
        attempt: leased.attempt,
        lease_token: leased.lease_token.clone(),
        error_message: "boom".into(),
        retryable,
        backoff_ms: Some(50),
        error_details: Some(tasker::proto::json_to_struct(
            &serde_json::json!({"code": 7}),
        )),
    };
    let r = workers
        .fail_step(fail(&first, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), v1::FailStepOutcome::RetryScheduled);
    assert!(r.next_retry_at.is_some());
    let again = lease_one(&workers, "api-fail").await; // the deadline scheduler re-enqueues after 50 ms
    assert_eq!(
        (again.step_uuid.as_str(), again.attempt),
        (first.step_uuid.as_str(), 2)
    );
    let r = workers
        .fail_step(fail(&again, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.outcome(),
        v1::FailStepOutcome::Failed,
        "max_attempts = 2 is honoured"
    );
    let e = workers.fail_step(fail(&again, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // inject, ready tasks, cancel
    let t2 = tasks
        .create_task(diamond("api").build())
        .await
        .unwrap()
        .into_inner();
    let injected = readiness
        .process_task_readiness(v1::ProcessTaskReadinessRequest {
            task_uuid: t2.task_uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!injected.command_id.is_empty());
    assert!(
        [
            v1::CommandOutcome::Enqueued,
            v1::CommandOutcome::NothingReady
        ]
        .contains(&injected.outcome()),
        "{:?}",
        injected.outcome()
    );
    let cancelled = tasks
        .cancel_task(v1::CancelTaskRequest {
            task_uuid: t2.task_uuid.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.state(), v1::TaskState::Cancelled);

    // mode change is visible in status
    let set = admin
        .set_deployment_mode(v1::SetDeploymentModeRequest {
            mode: v1::DeploymentMode::PollingOnly as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.previous, v1::DeploymentMode::Hybrid as i32);
    let status = admin
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.mode, v1::DeploymentMode::PollingOnly as i32);
    assert!(!status.version.is_empty());
    let mode = admin
        .get_deployment_mode(v1::GetDeploymentModeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mode.mode, v1::DeploymentMode::PollingOnly as i32);
    drop(events);
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn every_error_code(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers, mut readiness, mut admin) = (
        Tasks::new(ch.clone()),
        Workers::new(ch.clone()),
        Readiness::new(ch.clone()),
        Admin::new(ch),
    );

    // INVALID_ARGUMENT with field violations
    let e = tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: "not-a-uuid".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_violations(&e)),
        (Code::InvalidArgument, vec!["task_uuid".to_string()])
    );
    let mut cyclic = diamond("api").build();
    cyclic.steps[0].depends_on = vec!["d".into()];
    cyclic.steps.push(step_def("", &["nope"]));
    let e = tasks.create_task(cyclic).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let fields = field_violations(&e);
    for f in ["steps[4].name", "steps[4].depends_on", "steps"] {
        assert!(fields.contains(&f.to_string()), "{f} not in {fields:?}");
    }
    let e = admin
        .set_deployment_mode(v1::SetDeploymentModeRequest {
            mode: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_violations(&e)),
        (Code::InvalidArgument, vec!["mode".to_string()])
    );
    let e = readiness
        .list_ready_tasks(v1::ListReadyTasksRequest {
            page_token: "bogus".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&e), vec!["page_token".to_string()]);
    let e = workers
        .fetch_steps(v1::FetchStepsRequest {
            namespace: "api".into(),
            worker_id: "w".into(),
            wait_ms: 10_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&e), vec!["wait_ms".to_string()]);
    let mut huge = diamond("api").build();
    huge.steps[0].inputs = Some(tasker::proto::json_to_struct(
        &serde_json::json!({"x": "y".repeat(300_000)}),
    ));
    let e = tasks.create_task(huge).await.unwrap_err();
    assert_eq!(field_violations(&e), vec!["steps[0].inputs".to_string()]);
    let mut oversized = diamond("api").build();
    oversized.context = Some(tasker::proto::json_to_struct(
        &serde_json::json!({"x": "y".repeat(5_000_000)}),
    ));
    let e = tasks.create_task(oversized).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::OutOfRange,
        "refused by the transport's size limit: {e:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "rejected requests wrote nothing");

    // NOT_FOUND
    let missing = uuid::Uuid::now_v7().to_string();
    let e = tasks
        .get_task(v1::GetTaskRequest {
            task_uuid: missing.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = readiness
        .process_task_readiness(v1::ProcessTaskReadinessRequest {
            task_uuid: missing.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // FAILED_PRECONDITION: stale attempt, expired lease, illegal transition
    let created = tasks
        .create_task(diamond("api").build())
        .await
        .unwrap()
        .into_inner();
    let leased = workers
        .fetch_steps(v1::FetchStepsRequest {
            namespace: "api".into(),
            worker_id: "w".into(),
            wait_ms: 5000,
            lease_seconds: 1,
            max_steps: 1,
            queues: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .steps
        .remove(0);
    let report = |attempt: i32, lease_token: &str| v1::CompleteStepRequest {
        step_uuid: leased.step_uuid.clone(),
        attempt,
        results: None,
        lease_token: lease_token.into(),
        next: None,
    };
    // the lease token is required, and must be one
    let e = workers.complete_step(report(1, "")).await.unwrap_err();
    assert_eq!(
        (e.code(), field_violations(&e)),
        (Code::InvalidArgument, vec!["lease_token".to_string()])
    );
    let e = workers.complete_step(report(1, "x")).await.unwrap_err();
    assert_eq!(field_violations(&e), vec!["lease_token".to_string()]);
    // each refusal says why, for the worker to act on
    let e = workers
        .complete_step(report(9, &leased.lease_token))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), refusal_reason(&e).as_deref()),
        (Code::FailedPrecondition, Some("STALE_ATTEMPT"))
    );
    let someone_else = uuid::Uuid::new_v4().simple().to_string();
    for e in [
        workers
            .complete_step(report(1, &someone_else))
            .await
            .unwrap_err(),
        workers
            .fail_step(v1::FailStepRequest {
                step_uuid: leased.step_uuid.clone(),
                attempt: 1,
                lease_token: someone_else.clone(),
                error_message: "not mine".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        workers
            .extend_lease(v1::ExtendLeaseRequest {
                step_uuid: leased.step_uuid.clone(),
                attempt: 1,
                lease_token: someone_else.clone(),
                lease_seconds: 3600,
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(
            (e.code(), refusal_reason(&e).as_deref()),
            (Code::FailedPrecondition, Some("LEASE_NOT_HELD")),
            "{e:?}"
        );
    }
    sqlx::query(
        "UPDATE tasker.step_queue SET visible_at = clock_timestamp() - interval '1 second'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let e = workers
        .complete_step(report(1, &leased.lease_token))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), refusal_reason(&e).as_deref()),
        (Code::FailedPrecondition, Some("LEASE_EXPIRED"))
    );
    assert!(e.message().contains("expired"), "{}", e.message());
    tasks
        .cancel_task(v1::CancelTaskRequest {
            task_uuid: created.task_uuid.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    // a retried cancel (its first answer lost) is answered as done
    let again = tasks
        .cancel_task(v1::CancelTaskRequest {
            task_uuid: created.task_uuid.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancelling a cancelled task answers OK")
        .into_inner();
    assert!(again.already_cancelled);
    assert_eq!(again.task.unwrap().state(), v1::TaskState::Cancelled);

    // ALREADY_EXISTS is not reachable through the API (uuids are server-made); UNAVAILABLE:
    pool.close().await;
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn saturated_processor_answers_resource_exhausted(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.command_processor.channel_capacity = 1;
    cfg.orchestration.command_processor.max_concurrent_commands = 1;
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            tasks
                .create_task(diamond("busy").build())
                .await
                .unwrap()
                .into_inner()
                .task_uuid,
        );
    }
    let calls = ids.iter().map(|id| {
        let ch = ch.clone();
        let id = id.clone();
        async move {
            let mut r = Readiness::new(ch);
            r.process_task_readiness(v1::ProcessTaskReadinessRequest {
                task_uuid: id,
                ..Default::default()
            })
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Code::ResourceExhausted))
        .count();
    assert!(
        exhausted > 0,
        "no RESOURCE_EXHAUSTED among {} concurrent injections",
        results.len()
    );
    assert!(results
        .iter()
        .all(|r| r.is_ok() || r.as_ref().unwrap_err().code() == Code::ResourceExhausted));
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn database_down_answers_unavailable(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let mut tasks = Tasks::new(server.channel().await);
    server.core.store.pool().close().await;
    let e = tasks
        .create_task(diamond("down").build())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains("sqlx") && !e.message().contains("SELECT"));
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn auth_scopes(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::Hybrid);
    let token = |name: &str, secret: &str, scopes: &[&str]| TokenConfig {
        name: name.into(),
        sha256: tasker::hash_token(secret),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    cfg.grpc.auth.tokens = vec![
        token("reader", "r", &["read"]),
        token("writer", "w", &["read", "write"]),
        token("admin", "a", &["read", "admin"]),
    ];
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    fn with<T>(msg: T, secret: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(s) = secret {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {s}").parse().unwrap());
        }
        r
    }
    let mut admin = Admin::new(ch.clone());
    let mut tasks = Tasks::new(ch.clone());
    assert_eq!(
        admin
            .get_status(with(v1::GetStatusRequest {}, None))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        admin
            .get_status(with(v1::GetStatusRequest {}, Some("nope")))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert!(admin
        .get_status(with(v1::GetStatusRequest {}, Some("r")))
        .await
        .is_ok());
    let set = |m| v1::SetDeploymentModeRequest {
        mode: m as i32,
        ..Default::default()
    };
    assert_eq!(
        admin
            .set_deployment_mode(with(set(v1::DeploymentMode::Hybrid), Some("r")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        admin
            .set_deployment_mode(with(set(v1::DeploymentMode::Hybrid), Some("w")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(admin
        .set_deployment_mode(with(set(v1::DeploymentMode::Hybrid), Some("a")))
        .await
        .is_ok());
    assert_eq!(
        tasks
            .create_task(with(diamond("auth").build(), Some("r")))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(tasks
        .create_task(with(diamond("auth").build(), Some("w")))
        .await
        .is_ok());
    // health and reflection stay open
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn slow_observer_gets_a_gap_event_and_the_stream_goes_on(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::EventDrivenOnly);
    cfg.orchestration.command_processor.event_buffer = 8;
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    // a deliberately slow observer: a tiny HTTP/2 receive window, so once it stops reading
    // the server cannot send it anything and its events pile up
    let slow_ch = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut readiness = Readiness::new(ch.clone());
    let mut slow = Readiness::new(slow_ch)
        .stream_command_events(v1::StreamCommandEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut tasks = Tasks::new(ch);
    let t = tasks
        .create_task(diamond("gap").build())
        .await
        .unwrap()
        .into_inner();
    // far more events than the observer's buffer, while it reads nothing
    for _ in 0..200 {
        readiness
            .process_task_readiness(v1::ProcessTaskReadinessRequest {
                task_uuid: t.task_uuid.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut gap = None;
    let mut after_gap = 0;
    let read = async {
        while let Some(e) = slow.next().await {
            let e = e.unwrap();
            if e.phase() == v1::CommandPhase::Gap {
                gap = Some(e.missed);
            } else if gap.is_some() {
                after_gap += 1;
                if after_gap >= 3 {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("stream went on after the gap");
    assert!(gap.unwrap() > 0);
    // shutdown is not held open by a stream whose observer never hangs up
    server.stop().await;
    let drained = async { while let Some(Ok(_)) = slow.next().await {} };
    tokio::time::timeout(WAIT, drained)
        .await
        .expect("the stream ends at shutdown");
}

/// A parked fetch is woken by the enqueue itself: the periodic re-read is set to an hour, so
/// only the wake-up can return it within the bound.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_parked_fetch_is_woken_by_the_enqueue(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::EventDrivenOnly);
    cfg.orchestration.workers.fetch_recheck_interval = Duration::from_secs(3600);
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let mut workers = Workers::new(ch.clone());
    let mut tasks = Tasks::new(ch);
    let mut parked = server.core.workers.parked_fetches();
    let waiting = tokio::spawn(async move {
        let r = workers
            .fetch_steps(fetch_request("quick", 1, 15_000, 30))
            .await
            .unwrap()
            .into_inner();
        (r, Instant::now())
    });
    // the fetch has read an empty queue and parked
    tokio::time::timeout(WAIT, parked.wait_for(|n| *n == 1))
        .await
        .expect("the fetch parked")
        .unwrap();
    let created_at = Instant::now();
    tasks.create_task(diamond("quick").build()).await.unwrap();
    let (r, returned_at) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the parked fetch returned before its 15 s wait ran out")
        .unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.steps[0].name, "a");
    let took = returned_at.duration_since(created_at);
    assert!(
        took < Duration::from_secs(5),
        "returned {took:?} after the create"
    );
    server.stop().await;
}

/// Ready tasks are listed best first and paged; nothing enqueues them here (PollingOnly with
/// a ten-minute interval, after the start-up sweep), so the list is exact.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn list_ready_tasks_pages_best_first(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    let server = TestServer::start(&pool, &cfg).await;
    let mut poller = server.core.mode_controller.poller_status();
    tokio::time::timeout(WAIT, poller.wait_for(|s| s.catch_up_sweeps >= 1))
        .await
        .unwrap()
        .unwrap();
    let ch = server.channel().await;
    let (mut tasks, readiness) = (Tasks::new(ch.clone()), Readiness::new(ch));
    let mut by_priority = Vec::new();
    for priority in [0, 5, -5] {
        let mut req = diamond("listed").build();
        req.priority = priority;
        let id = tasks.create_task(req).await.unwrap().into_inner().task_uuid;
        by_priority.push((priority, id));
    }
    // a task elsewhere is not listed for this namespace
    tasks.create_task(diamond("other").build()).await.unwrap();
    by_priority.sort_by_key(|(p, _)| -p);
    let page = |token: String| {
        let mut r = readiness.clone();
        async move {
            r.list_ready_tasks(v1::ListReadyTasksRequest {
                namespace: "listed".into(),
                limit: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let first = page(String::new()).await;
    let ids: Vec<&str> = first.tasks.iter().map(|t| t.task_uuid.as_str()).collect();
    assert_eq!(ids, [by_priority[0].1.as_str(), by_priority[1].1.as_str()]);
    assert!(first.tasks.iter().all(|t| t.ready_steps == 1));
    assert!(!first.next_page_token.is_empty());
    let second = page(first.next_page_token).await;
    let ids: Vec<&str> = second.tasks.iter().map(|t| t.task_uuid.as_str()).collect();
    assert_eq!(ids, [by_priority[2].1.as_str()]);
    assert!(second.next_page_token.is_empty(), "no third page");
    server.stop().await;
}

/// A pass that fails tells observers why in words safe for any reader: the database's own
/// message (here one naming a secret table) stays in the service's log.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_failed_command_streams_a_safe_error(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let (mut tasks, mut readiness) = (Tasks::new(ch.clone()), Readiness::new(ch));
    let task = tasks
        .create_task(diamond("broken").build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    // every enqueue now fails inside the database, with a message no client should see
    sqlx::raw_sql(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'relation payroll_secrets is locked by %', current_user; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON tasker.workflow_steps
             FOR EACH ROW WHEN (NEW.state = 'enqueued') EXECUTE FUNCTION public.refuse()",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut events = readiness
        .stream_command_events(v1::StreamCommandEventsRequest {
            task_uuids: vec![task.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let injected = readiness
        .process_task_readiness(v1::ProcessTaskReadinessRequest {
            task_uuid: task.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(injected.outcome(), v1::CommandOutcome::Failed);
    let failed = next_phase(&mut events, v1::CommandPhase::Failed).await;
    assert!(!failed.error.is_empty());
    assert!(
        !failed.error.contains("payroll") && !failed.error.contains("postgres"),
        "{}",
        failed.error
    );
    server.stop().await;
}

/// A ProcessTaskReadiness that comes while a pass for its task runs joins the rerun and says
/// so. The test holds the task's claim from its own connection, so the first pass keeps
/// finding it held (and stays in flight) until the second command has been coalesced.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_command_joining_a_running_pass_answers_coalesced(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    cfg.orchestration.command_processor.claim_retry_delay = Duration::from_millis(2);
    cfg.orchestration.command_processor.claim_retry_attempts = 100_000;
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let (mut tasks, mut readiness) = (Tasks::new(ch.clone()), Readiness::new(ch));
    let task = tasks
        .create_task(diamond("joined").build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let mut events = readiness
        .stream_command_events(v1::StreamCommandEventsRequest {
            task_uuids: vec![task.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut claim = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tasker.claim:' || $1, 0))")
        .bind(&task)
        .execute(&mut *claim)
        .await
        .unwrap();
    let call = |r: &v1::readiness_service_client::ReadinessServiceClient<_>| {
        let (mut r, task) = (r.clone(), task.clone());
        tokio::spawn(async move {
            r.process_task_readiness(v1::ProcessTaskReadinessRequest {
                task_uuid: task,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        })
    };
    let first = call(&readiness);
    let started = next_phase(&mut events, v1::CommandPhase::Started)
        .await
        .command_id;
    let second = call(&readiness);
    let joined = next_phase(&mut events, v1::CommandPhase::Coalesced)
        .await
        .command_id;
    assert_ne!(started, joined);
    claim.commit().await.unwrap();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(!first.coalesced);
    assert_eq!(first.outcome(), v1::CommandOutcome::Enqueued);
    assert!(second.coalesced, "{second:?}");
    assert_eq!(second.command_id, joined);
    assert_eq!(
        second.outcome(),
        v1::CommandOutcome::NothingReady,
        "the rerun found the steps enqueued"
    );
    server.stop().await;
}

/// The next command event in `phase`.
async fn next_phase(
    events: &mut tonic::Streaming<v1::CommandEvent>,
    phase: v1::CommandPhase,
) -> v1::CommandEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = events.next().await.unwrap().unwrap();
            if e.phase() == phase {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {phase:?} event"))
}

/// A CompleteStep retried after a lost answer, with the same attempt and results, answers OK
/// and says it was recorded before; different results for the completed attempt are refused,
/// and nothing changes.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_retried_complete_step_is_answered_as_recorded(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(ch.clone()), Workers::new(ch));
    tasks.create_task(diamond("retried").build()).await.unwrap();
    let leased = lease_one(&workers, "retried").await;
    let complete = |results: serde_json::Value| v1::CompleteStepRequest {
        step_uuid: leased.step_uuid.clone(),
        attempt: leased.attempt,
        results: Some(tasker::proto::json_to_struct(&results)),
        lease_token: leased.lease_token.clone(),
        next: None,
    };
    let first = workers
        .complete_step(complete(serde_json::json!({"n": "1", "s": "a"})))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.already_recorded);
    // the same results, keys in another order: the same JSON document
    let again = workers
        .complete_step(complete(serde_json::json!({"s": "a", "n": "1"})))
        .await
        .expect("a retried completion answers OK")
        .into_inner();
    assert!(again.already_recorded);
    let e = workers
        .complete_step(complete(serde_json::json!({"n": "2"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT results FROM tasker.workflow_steps WHERE step_uuid = $1::uuid")
            .bind(&leased.step_uuid)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, serde_json::json!({"n": "1", "s": "a"}));
    server.stop().await;
}

/// An idempotency key names one request: repeated, the same request (steps listed in another
/// order) gets the task back; a different one is refused, naming the key, and creates
/// nothing.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn an_idempotency_key_repeated_with_another_request_is_refused(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::PollingOnly)).await;
    let mut tasks = Tasks::new(server.channel().await);
    let mut req = diamond("keyed").build();
    req.idempotency_key = "order-9".into();
    let created = tasks.create_task(req.clone()).await.unwrap().into_inner();
    let mut reordered = req.clone();
    reordered.steps.reverse();
    let again = tasks.create_task(reordered).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!(again.task_uuid, created.task_uuid);
    let mut other = req.clone();
    other.steps[0].max_attempts = 7;
    let e = tasks.create_task(other).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("order-9"), "{}", e.message());
    assert!(e.message().contains(&created.task_uuid), "{}", e.message());
    let tasks_stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tasks_stored, 1);
    server.stop().await;
}

/// How an operator gets a task in error going again.
#[derive(Clone, Copy, Debug)]
enum Recovery {
    /// ResolveStep: the failed step counts as done, with the operator's results.
    Resolve,
    /// RetryTask: the failed step gets another attempt.
    Retry,
}

impl Recovery {
    /// The recovery of the task whose step `failed` failed; `step` and `task` stand in for
    /// the failed step's and the task's uuids (bad ones, for the refusals), `extra_attempts`
    /// and `reason` for what the operator wrote.
    async fn apply(
        self,
        tasks: &mut Tasks,
        task: &str,
        step: &str,
        extra_attempts: i32,
        reason: &str,
    ) -> Result<v1::Task, tonic::Status> {
        let response = match self {
            Self::Resolve => {
                tasks
                    .resolve_step(v1::ResolveStepRequest {
                        step_uuid: step.into(),
                        reason: reason.into(),
                        results: Some(tasker::proto::json_to_struct(
                            &serde_json::json!({"fixed": "by hand"}),
                        )),
                    })
                    .await?
                    .into_inner()
                    .task
            }
            Self::Retry => {
                tasks
                    .retry_task(v1::RetryTaskRequest {
                        task_uuid: task.into(),
                        extra_attempts,
                        reason: reason.into(),
                    })
                    .await?
                    .into_inner()
                    .task
            }
        };
        Ok(response.expect("the task"))
    }
}

/// A task in error goes on after an operator's recovery, one scenario per way: a step failed
/// for good is resolved by hand (its child gets the operator's results as its parent's) or
/// its task is retried (the step gets attempt 2); either way the task completes. Bad requests
/// name their field, an unknown uuid is NOT_FOUND, and a task that is not in error (before
/// the failure, after completion) cannot be recovered.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_task_in_error_goes_on_after_an_operators_recovery(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(ch.clone()), Workers::new(ch));
    let unknown = uuid::Uuid::now_v7().to_string();
    // (how, its bad requests as (extra_attempts, reason, bad uuid?) -> the field named,
    //  the first step leased after the recovery as (name, attempt))
    type Bad = (i32, &'static str, bool, &'static str);
    let cases: [(Recovery, &[Bad], (&str, i32)); 2] = [
        (
            Recovery::Resolve,
            &[(0, " ", false, "reason"), (0, "fixed", true, "step_uuid")],
            ("second", 1),
        ),
        (
            Recovery::Retry,
            &[
                (101, "over", false, "extra_attempts"),
                (0, "over", true, "task_uuid"),
            ],
            ("first", 2),
        ),
    ];
    for (how, bad, next) in cases {
        let ns = format!("{how:?}").to_lowercase();
        let task = tasks
            .create_task(two_steps(&ns, "fragile"))
            .await
            .unwrap()
            .into_inner()
            .task_uuid;
        let first = lease_one(&workers, &ns).await;
        let e = how
            .apply(&mut tasks, &task, &first.step_uuid, 0, "too early")
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::FailedPrecondition,
            "{how:?}: not in error yet"
        );
        fail_for_good(&mut workers, &first, "upstream down").await;
        for &(extra, reason, bad_uuid, field) in bad {
            let (t, s) = if bad_uuid {
                ("nope", "nope")
            } else {
                (task.as_str(), first.step_uuid.as_str())
            };
            let e = how
                .apply(&mut tasks, t, s, extra, reason)
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{how:?}");
            assert!(e.message().contains(field), "{how:?}: {}", e.message());
        }
        let e = how
            .apply(&mut tasks, &unknown, &unknown, 0, "fixed")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{how:?}");

        let recovered = how
            .apply(&mut tasks, &task, &first.step_uuid, 0, "fixed the file")
            .await
            .unwrap();
        assert_eq!(recovered.task_uuid, task);
        assert_eq!(recovered.state(), v1::TaskState::InProgress, "{how:?}");
        let leased = lease_one(&workers, &ns).await;
        assert_eq!((leased.name.as_str(), leased.attempt), next, "{how:?}");
        if let Recovery::Resolve = how {
            let parents = tasker::proto::struct_to_json(leased.parent_results.clone());
            assert_eq!(parents["first"]["fixed"], "by hand");
        }
        complete_leased(&mut workers, &leased).await;
        if leased.name == "first" {
            let second = lease_one(&workers, &ns).await;
            complete_leased(&mut workers, &second).await;
        }
        let done = get_task(&mut tasks, &task).await;
        assert_eq!(done.state(), v1::TaskState::Complete, "{how:?}");
        let e = how
            .apply(&mut tasks, &task, &first.step_uuid, 0, "again")
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::FailedPrecondition,
            "{how:?}: a complete task"
        );
    }
    server.stop().await;
}

/// An operator can finish by hand a task no worker has touched: resolving a step of a pending
/// task starts it, and resolving its last step completes it (it used to stay pending, with
/// nothing left to run).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_task_resolved_by_hand_before_it_started_completes(pool: PgPool) {
    // nothing enqueues on its own: no events, no poll within the test
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    let server = TestServer::start(&pool, &cfg).await;
    let mut tasks = Tasks::new(server.channel().await);
    let created = tasks
        .create_task(two_steps("by-hand", "untouched"))
        .await
        .unwrap()
        .into_inner();
    let resolve = |name: &str| v1::ResolveStepRequest {
        step_uuid: created
            .steps
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .step_uuid
            .clone(),
        reason: "done outside tasker".into(),
        results: None,
    };
    let after_first = tasks
        .resolve_step(resolve("first"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(after_first.state(), v1::TaskState::InProgress);
    let after_second = tasks
        .resolve_step(resolve("second"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(after_second.state(), v1::TaskState::Complete);
    assert!(after_second.completed_at.is_some());
    assert!(after_second
        .steps
        .iter()
        .all(|s| s.state() == v1::StepState::ResolvedManually));
    server.stop().await;
}

/// Steps that became ready while their task was in error (here: the child of a sibling that
/// completed after the failure) are announced when an operator's resolution lets the task go
/// on, even when the resolved step has no child of its own. EventDrivenOnly: nothing else
/// would enqueue them.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn resolving_a_leaf_announces_the_steps_ready_since_the_error(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::EventDrivenOnly)).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(ch.clone()), Workers::new(ch));
    tasks
        .create_task(v1::CreateTaskRequest {
            namespace: "leaf".into(),
            name: "two-branches".into(),
            steps: vec![
                step_def("check", &[]),
                step_def("build", &[]),
                step_def("ship", &["build"]),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut roots = Vec::new();
    while roots.len() < 2 {
        roots.extend(
            workers
                .fetch_steps(fetch_request("leaf", 2, 5000, 30))
                .await
                .unwrap()
                .into_inner()
                .steps,
        );
    }
    let step = |name: &str| roots.iter().find(|s| s.name == name).unwrap().clone();
    fail_for_good(&mut workers, &step("check"), "flaky check").await;
    // the task is in error: ship becomes ready, and nothing enqueues or announces it
    complete_leased(&mut workers, &step("build")).await;
    tasks
        .resolve_step(v1::ResolveStepRequest {
            step_uuid: step("check").step_uuid,
            reason: "checked by hand".into(),
            results: None,
        })
        .await
        .unwrap();
    let ship = lease_one(&workers, "leaf").await;
    assert_eq!(ship.name, "ship");
    server.stop().await;
}

/// ListReadyTasks pages stay one listing while the ranking ages. Twenty tasks of priority 0
/// have waited 58.5 s and twenty of priority 1 have just become ready: the latter rank first,
/// until the former's aging boost adds a point and, tied, the older come first. A listing
/// begun before that moment and finished after it still shows each task once.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn ready_task_pages_survive_the_ranking_aging_between_them(pool: PgPool) {
    let mut cfg = test_config(DeploymentMode::PollingOnly);
    cfg.orchestration.task_readiness.fallback_polling_interval = Duration::from_secs(600);
    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let (mut tasks, readiness) = (Tasks::new(ch.clone()), Readiness::new(ch));
    let mut waited = Vec::new();
    for priority in [0, 1] {
        for _ in 0..20 {
            let mut req = diamond("aging").build();
            req.priority = priority;
            let id = tasks.create_task(req).await.unwrap().into_inner().task_uuid;
            if priority == 0 {
                waited.push(id);
            }
        }
    }
    let boundary: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "WITH moved AS (
             UPDATE tasker.ready_steps SET ready_at = clock_timestamp() - interval '58.5 seconds'
             WHERE task_uuid = ANY($1::uuid[]) RETURNING ready_at)
         SELECT max(ready_at) + interval '60 seconds' FROM moved",
    )
    .bind(&waited)
    .fetch_one(&pool)
    .await
    .unwrap();
    let page = |token: String| {
        let mut r = readiness.clone();
        async move {
            r.list_ready_tasks(v1::ListReadyTasksRequest {
                namespace: "aging".into(),
                limit: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let first = page(String::new()).await;
    assert!(
        first.tasks.iter().all(|t| t.priority == 1),
        "priority 1 first, before the boost"
    );
    // the database's clock passes the moment the waiting tasks gain a point
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let passed: bool = sqlx::query_scalar("SELECT clock_timestamp() > $1")
                .bind(boundary)
                .fetch_one(&pool)
                .await
                .unwrap();
            if passed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the boundary passes within 10 s");
    let mut seen: Vec<String> = first.tasks.into_iter().map(|t| t.task_uuid).collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let p = page(token).await;
        seen.extend(p.tasks.into_iter().map(|t| t.task_uuid));
        token = p.next_page_token;
    }
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 40, "{} listed", seen.len());
    assert_eq!(unique.len(), 40, "each task once");
    server.stop().await;
}

/// A worker holding a step of a task that was cancelled learns it from the reason, and can
/// stop at once: CompleteStep, FailStep and ExtendLease answer FAILED_PRECONDITION with a
/// google.rpc.ErrorInfo reason TASK_CANCELLED (it was a bare "step ... is not in progress").
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn a_step_of_a_cancelled_task_is_refused_with_its_reason(pool: PgPool) {
    let server = TestServer::start(&pool, &test_config(DeploymentMode::Hybrid)).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(ch.clone()), Workers::new(ch));
    let task = tasks
        .create_task(two_steps("cancelled-under-me", "t"))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let held = lease_one(&workers, "cancelled-under-me").await;
    cancel(&mut tasks, &task).await;
    let complete = workers
        .complete_step(v1::CompleteStepRequest {
            step_uuid: held.step_uuid.clone(),
            attempt: held.attempt,
            lease_token: held.lease_token.clone(),
            results: None,
            next: None,
        })
        .await
        .unwrap_err();
    let extend = workers
        .extend_lease(v1::ExtendLeaseRequest {
            step_uuid: held.step_uuid.clone(),
            attempt: held.attempt,
            lease_token: held.lease_token.clone(),
            lease_seconds: 30,
        })
        .await
        .unwrap_err();
    let fail = workers
        .fail_step(v1::FailStepRequest {
            step_uuid: held.step_uuid.clone(),
            attempt: held.attempt,
            lease_token: held.lease_token.clone(),
            error_message: "stopped".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    for e in [complete, extend, fail] {
        assert_eq!(
            (e.code(), refusal_reason(&e).as_deref()),
            (Code::FailedPrecondition, Some("TASK_CANCELLED")),
            "{e:?}"
        );
    }
    server.stop().await;
}
