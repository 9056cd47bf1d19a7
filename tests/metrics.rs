//! The core's metrics are emitted: every instrument named in the design, with data.

mod common;

use std::collections::BTreeSet;

use common::*;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::internal::ListenerState;
use tasker::internal::Metrics;
use tasker::internal::Store;
use tasker::internal::TaskSpec;

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn core_emits_every_named_metric(pool: PgPool) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let metrics = Metrics::new(&provider.meter("tasker"));
    let core = start_core_with(&pool, &test_config(DeploymentMode::Hybrid), metrics).await;
    let store = Store::new(pool.clone());
    let t = create(&store, TaskSpec::diamond("metrics")).await;
    work_until_done(&core, &pool, "metrics", &[t.task_uuid], WAIT).await;
    // a malformed notification from outside, and one listener reconnect
    sqlx::query("SELECT pg_notify('tasker_task_ready', 'not json')")
        .execute(&pool)
        .await
        .unwrap();
    let mut status = core.coordinator.listener_status();
    let generation = status.borrow().generation;
    let pid = status.borrow().backend_pid.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&pool)
        .await
        .unwrap();
    status
        .wait_for(|s| s.generation > generation && s.state == ListenerState::Listening)
        .await
        .unwrap();
    let mut poller = core.coordinator.poller_status();
    poller.wait_for(|s| s.rounds >= 1).await.unwrap();

    provider.force_flush().unwrap();
    let names: BTreeSet<String> = exporter
        .get_finished_metrics()
        .unwrap()
        .iter()
        .flat_map(|rm| {
            rm.scope_metrics()
                .flat_map(|sm| sm.metrics().map(|m| m.name().to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    for expected in [
        "task_readiness_events_received",
        "task_readiness_command_sent",
        "task_readiness_latency",
        "task_readiness_malformed_notifications",
        "fallback_polls_executed",
        "fallback_tasks_found",
        "step_completion_to_enqueue_latency",
        "command_queue_depth",
        "commands_in_flight",
        "commands_processed",
        "listener_reconnects",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    core.shutdown().await;
}
