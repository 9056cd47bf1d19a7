//! The core's metrics are emitted with the values the work implies: every instrument named in
//! the design, counted by its attributes.

mod common;

use std::collections::BTreeMap;

use common::*;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::testkit::{ListenerState, Metrics, Store, TaskSpec};

/// `name{attr=value,...}` -> value (sums and gauges) or count (histograms), from the last
/// export (cumulative).
fn readings(exporter: &InMemoryMetricExporter) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let mut put = |attrs: Vec<String>, v: f64| {
                    out.insert(format!("{}{{{}}}", m.name(), attrs.join(",")), v);
                };
                let attrs = |it: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
                    let mut a: Vec<String> =
                        it.map(|kv| format!("{}={}", kv.key, kv.value)).collect();
                    a.sort();
                    a
                };
                match m.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            put(attrs(&mut p.attributes()), p.value() as f64);
                        }
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        for p in g.data_points() {
                            put(attrs(&mut p.attributes()), p.value() as f64);
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            put(attrs(&mut p.attributes()), p.count() as f64);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

fn reading(r: &BTreeMap<String, f64>, key: &str) -> f64 {
    *r.get(key)
        .unwrap_or_else(|| panic!("no reading {key} among {:#?}", r.keys()))
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn core_emits_every_named_metric_with_the_values_the_work_implies(pool: PgPool) {
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
    // counted before the listener's connection is killed (else the notification may die
    // with it, undelivered)
    tokio::time::timeout(WAIT, async {
        loop {
            provider.force_flush().unwrap();
            if readings(&exporter)
                .contains_key("task_readiness_malformed_notifications{channel=tasker_task_ready}")
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the malformed notification is counted");
    let mut status = core.mode_controller.listener_status();
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
    let mut poller = core.mode_controller.poller_status();
    poller.wait_for(|s| s.rounds >= 1).await.unwrap();

    provider.force_flush().unwrap();
    let r = readings(&exporter);
    // the diamond: a ready at creation, then b and c together, then d
    assert_eq!(
        reading(&r, "task_readiness_events_received{event_type=task_ready}"),
        3.0
    );
    assert_eq!(
        reading(
            &r,
            "task_readiness_events_received{event_type=task_state_change}"
        ),
        2.0,
        "pending -> in_progress -> complete"
    );
    assert_eq!(reading(&r, "task_readiness_latency{}"), 3.0);
    assert_eq!(
        reading(&r, "task_readiness_command_sent{triggered_by=task_start}"),
        1.0
    );
    assert_eq!(
        reading(
            &r,
            "task_readiness_command_sent{triggered_by=step_transition}"
        ),
        2.0
    );
    assert_eq!(
        reading(
            &r,
            "step_completion_to_enqueue_latency{triggered_by=step_transition}"
        ),
        2.0,
        "one enqueue pass for b and c, one for d"
    );
    assert_eq!(
        reading(
            &r,
            "task_readiness_malformed_notifications{channel=tasker_task_ready}"
        ),
        1.0
    );
    assert_eq!(reading(&r, "listener_reconnects{}"), 1.0);
    assert!(reading(&r, "commands_processed{outcome=enqueued}") >= 3.0);
    assert!(
        reading(&r, "fallback_polls_executed{kind=catch_up}") >= 2.0,
        "start-up and reconnect sweeps"
    );
    assert!(reading(&r, "fallback_polls_executed{kind=fallback_polling}") >= 1.0);
    assert_eq!(reading(&r, "command_queue_depth{}"), 0.0);
    assert_eq!(reading(&r, "commands_in_flight{}"), 0.0);
    assert!(reading(&r, "db.pool.connections{}") >= 1.0);
    core.shutdown().await;
}

/// Steps delivered by FetchSteps are counted by namespace and queue.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn leased_steps_are_counted_by_queue(pool: PgPool) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let metrics = Metrics::new(&provider.meter("tasker"));
    let server = TestServer::start_with(&pool, &test_config(DeploymentMode::Hybrid), metrics).await;
    let ch = server.channel().await;
    tasker::proto::v1::task_service_client::TaskServiceClient::new(ch.clone())
        .create_task(
            task("shop")
                .step("charge")
                .queue("payments")
                .step("refund")
                .queue("payments")
                .step("ship")
                .queue("warehouse")
                .build(),
        )
        .await
        .unwrap();
    let mut workers = Workers::new(ch.clone());
    for (queue, n) in [("payments", 2), ("warehouse", 1)] {
        let mut got = 0;
        while got < n {
            got += workers
                .fetch_steps(tasker::proto::v1::FetchStepsRequest {
                    queues: vec![queue.into()],
                    ..fetch_request("shop", 5, 5000, 30)
                })
                .await
                .unwrap()
                .into_inner()
                .steps
                .len();
        }
    }
    provider.force_flush().unwrap();
    let r = readings(&exporter);
    assert_eq!(
        reading(&r, "steps_leased{namespace=shop,queue=payments}"),
        2.0
    );
    assert_eq!(
        reading(&r, "steps_leased{namespace=shop,queue=warehouse}"),
        1.0
    );
    server.stop().await;
}

/// The gauges per queue report each lane's leased, queued and held steps: a queue limited to
/// one lease with three ready steps (one leased, two held by the limit) beside an unlimited
/// queue with one step nobody fetched (queued, not held). Read when the metrics are collected.
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn queue_gauges_report_leased_queued_and_held_steps(pool: PgPool) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let metrics = Metrics::new(&provider.meter("tasker"));
    let server = TestServer::start_with(&pool, &test_config(DeploymentMode::Hybrid), metrics).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    tasks
        .create_task(task("shop").named("warm-up").step("x").build())
        .await
        .unwrap();
    Admin::new(ch.clone())
        .set_queue_settings(tasker::proto::v1::SetQueueSettingsRequest {
            namespace: "shop".into(),
            queue: "payments".into(),
            max_in_flight: Some(1),
        })
        .await
        .unwrap();
    tasks
        .create_task(
            task("shop")
                .step("charge-1")
                .queue("payments")
                .step("charge-2")
                .queue("payments")
                .step("charge-3")
                .queue("payments")
                .step("ship")
                .queue("warehouse")
                .build(),
        )
        .await
        .unwrap();
    let mut workers = Workers::new(ch.clone());
    let leased = workers
        .fetch_steps(tasker::proto::v1::FetchStepsRequest {
            queues: vec!["payments".into()],
            ..fetch_request("shop", 5, 5000, 30)
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(leased.len(), 1, "the limit lets one through");

    // the first collection asks for a read; the next reports it
    let mut refreshed = server.core.lane_gauges.refreshed();
    let before = *refreshed.borrow_and_update();
    provider.force_flush().unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        refreshed.wait_for(|n| *n > before),
    )
    .await
    .expect("the queues' load is read after a collection")
    .unwrap();
    provider.force_flush().unwrap();
    let r = readings(&exporter);
    for (name, payments, warehouse) in [
        ("queue_steps_in_flight", 1.0, 0.0),
        ("queue_steps_queued", 2.0, 1.0),
        ("queue_steps_held", 2.0, 0.0),
    ] {
        assert_eq!(
            reading(&r, &format!("{name}{{namespace=shop,queue=payments}}")),
            payments,
            "{name} of payments"
        );
        assert_eq!(
            reading(&r, &format!("{name}{{namespace=shop,queue=warehouse}}")),
            warehouse,
            "{name} of warehouse"
        );
    }
    server.stop().await;
}

/// Retention's instruments: tasks and rows purged, the schema's size, and the age of the
/// oldest finished task kept per namespace and state (a task in error, kept for its hour).
#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn retention_reports_what_it_purged_and_what_is_kept(pool: PgPool) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let metrics = Metrics::new(&provider.meter("tasker"));
    let mut config = test_config(DeploymentMode::Hybrid);
    config.orchestration.retention.retention = std::time::Duration::from_secs(1);
    config.orchestration.retention.error_retention = std::time::Duration::from_secs(3600);
    config.orchestration.retention.purge_interval = std::time::Duration::from_millis(100);
    let server = TestServer::start_with(&pool, &config, metrics).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch.clone());
    let done = tasks
        .create_task(task("shop").step("only").build())
        .await
        .unwrap()
        .into_inner()
        .task_uuid;
    let s = lease_one(&workers, "shop").await;
    assert_eq!(s.task_uuid, done);
    complete_leased(&mut workers, &s).await;
    tasks
        .create_task(task("shop").step("broken").build())
        .await
        .unwrap();
    let s = lease_one(&workers, "shop").await;
    fail_for_good(&mut workers, &s, "broken").await;
    let r = tokio::time::timeout(WAIT * 3, async {
        loop {
            provider.force_flush().unwrap();
            let r = readings(&exporter);
            let purged = r.get("retention_tasks_purged{}").copied().unwrap_or(0.0);
            if purged >= 1.0
                && r.contains_key("retention_oldest_finished_age{namespace=shop,state=error}")
            {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the purge removes the finished task and reports it");
    assert_eq!(reading(&r, "retention_tasks_purged{}"), 1.0);
    // the task, its step, their history
    assert!(reading(&r, "retention_rows_purged{}") >= 4.0, "{r:#?}");
    assert!(reading(&r, "retention_schema_size{}") > 0.0);
    server.stop().await;
}
