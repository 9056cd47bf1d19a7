//! Telemetry disabled: no exporter is built, and no trace context rides into the database,
//! not even when callers send a `traceparent`; a workflow runs normally.

mod common;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::Request;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn traced<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    r
}

/// Queue rows of the task (they exist while their steps are queued or leased), and how many
/// of them carry a trace context.
async fn queue_rows(pool: &PgPool, task: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(traceparent) FROM tasker.step_queue WHERE task_uuid = $1::uuid",
    )
    .bind(task)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn no_trace_context_reaches_the_database(pool: PgPool) {
    std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
    let cfg = test_config(DeploymentMode::Hybrid);
    assert!(tasker::telemetry::otlp_endpoint(&cfg.telemetry).is_none());
    let guard = tasker::telemetry::init(&cfg.telemetry, DeploymentMode::Hybrid);
    assert!(!guard.exporting());
    let span = tracing::info_span!("some.work");
    assert_eq!(span.in_scope(tasker::telemetry::current_traceparent), None);

    let server = TestServer::start(&pool, &cfg).await;
    let ch = server.channel().await;
    let (mut tasks, mut workers) = (Tasks::new(ch.clone()), Workers::new(ch));
    let mut notifications = listener(&pool, &["tasker_task_ready"]).await;
    let task = tasks
        .create_task(traced(diamond("quiet").build()))
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let mut rows_seen = 0;
    let mut done = 0;
    while done < 4 {
        let leased = workers
            .fetch_steps(traced(fetch_request("quiet", 10, 5000, 30)))
            .await
            .unwrap()
            .into_inner()
            .steps;
        assert!(!leased.is_empty(), "the next steps were enqueued");
        // leased, not yet completed: their queue rows are there to look at
        let (rows, with_trace) = queue_rows(&pool, &task).await;
        assert_eq!(with_trace, 0, "a queue row carries a trace context");
        rows_seen += rows;
        for s in leased {
            workers
                .complete_step(traced(v1::CompleteStepRequest {
                    step_uuid: s.step_uuid,
                    attempt: s.attempt,
                    results: None,
                    lease_token: s.lease_token,
                    next: None,
                }))
                .await
                .unwrap();
            done += 1;
        }
    }
    assert_eq!(rows_seen, 4, "every step's queue row was looked at");
    let payloads = drain_until_sentinel(&pool, &mut notifications, &["tasker_task_ready"]).await;
    assert_eq!(payloads.len(), 3, "task start, then b and c, then d");
    for n in payloads {
        assert!(
            !n.payload().contains("traceparent"),
            "a notification carries a trace context: {}",
            n.payload()
        );
    }
    server.stop().await;
    guard.shutdown().await;
}
