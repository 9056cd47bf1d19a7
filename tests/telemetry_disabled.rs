//! Telemetry disabled: no exporter is built, no trace context rides into the database, and a
//! workflow runs normally.

mod common;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::internal::Store;
use tasker::internal::TaskSpec;

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn nothing_is_exported_and_nothing_breaks(pool: PgPool) {
    std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
    let cfg = test_config(DeploymentMode::Hybrid);
    assert!(tasker::telemetry::otlp_endpoint(&cfg.telemetry).is_none());
    let guard = tasker::telemetry::init(&cfg.telemetry, DeploymentMode::Hybrid);
    assert!(!guard.exporting());
    let span = tracing::info_span!("some.work");
    assert_eq!(span.in_scope(tasker::telemetry::current_traceparent), None);

    let core = start_core(&pool, &cfg).await;
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::diamond("quiet")).await;
    work_until_done(&core, &pool, "quiet", &[t.task_uuid], WAIT).await;
    let with_trace: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasker.step_queue WHERE traceparent IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(with_trace, 0);
    core.shutdown().await;
    guard.shutdown().await;
}
