//! Metric instruments, by the names operators query. Built from an injected `Meter`, so the
//! service uses the global (OTLP-exported) provider and tests read an in-memory one.
//!
//! | name | kind | unit | attributes |
//! |---|---|---|---|
//! | `task_readiness_events_received` | counter | `{event}` | `event_type` |
//! | `task_readiness_command_sent` | counter | `{command}` | `triggered_by` |
//! | `task_readiness_latency` | histogram | `ms` | notification received -> command accepted |
//! | `task_readiness_malformed_notifications` | counter | `{notification}` | `channel` |
//! | `fallback_polls_executed` | counter | `{poll}` | `kind` (fallback_polling, catch_up) |
//! | `fallback_tasks_found` | counter | `{task}` | `kind` |
//! | `step_completion_to_enqueue_latency` | histogram | `ms` | `triggered_by`; database clock |
//! | `command_queue_depth` | gauge | `{command}` | |
//! | `commands_in_flight` | gauge | `{command}` | |
//! | `commands_processed` | counter | `{command}` | `outcome` |
//! | `commands_rejected` | counter | `{command}` | `reason` (overloaded, shutting_down) |
//! | `listener_reconnects` | counter | `{reconnect}` | |
//! | `retry_promotions` | counter | `{step}` | `source` (retry, lease_expired, task_start, schedule_to_start) |
//! | `steps_leased` | counter | `{step}` | `namespace`, `queue`; steps a FetchSteps delivered |
//! | `queue_steps_in_flight`, `queue_steps_queued`, `queue_steps_held` | gauge | `{step}` | `namespace`, `queue`; per lane with work or settings, read when collected (`app::lane_gauges`) |
//! | `retention_tasks_purged`, `retention_rows_purged` | counter | `{task}`, `{row}` | finished tasks removed by this replica's purge, and their rows in every table |
//! | `retention_oldest_finished_age` | gauge | `s` | `namespace`, `state` (finished: complete or cancelled; error); read by the purger each round (`app::retention`) |
//! | `retention_schema_size` | gauge | `By` | the `tasker` schema's tables, indexes and TOAST |
//! | `db.pool.connections`, `db.pool.idle` | gauge | `{connection}` | |
//! | `rpc.server.requests`, `rpc.server.duration` | counter, histogram (ms) | | `rpc.method`, `rpc.grpc.status_code` (in `telemetry`) |

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;

/// Milliseconds buckets for the hop latencies: fine below 10 ms, where the target is.
const LATENCY_BUCKETS_MS: &[f64] = &[
    0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 5000.0,
];

#[derive(Clone, Debug)]
pub struct Metrics {
    events_received: Counter<u64>,
    commands_sent: Counter<u64>,
    readiness_latency: Histogram<f64>,
    malformed: Counter<u64>,
    polls: Counter<u64>,
    tasks_found: Counter<u64>,
    completion_to_enqueue: Histogram<f64>,
    processed: Counter<u64>,
    rejected: Counter<u64>,
    reconnects: Counter<u64>,
    promotions: Counter<u64>,
    leased: Counter<u64>,
    tasks_purged: Counter<u64>,
    rows_purged: Counter<u64>,
    meter: Meter,
}

impl Metrics {
    pub fn new(meter: &Meter) -> Self {
        Self {
            events_received: meter
                .u64_counter("task_readiness_events_received")
                .with_description("Readiness notifications received and classified, by event type")
                .with_unit("{event}")
                .build(),
            commands_sent: meter
                .u64_counter("task_readiness_command_sent")
                .with_description("ProcessTaskReadiness commands accepted by the command processor, by source")
                .with_unit("{command}")
                .build(),
            readiness_latency: meter
                .f64_histogram("task_readiness_latency")
                .with_description("From a readiness notification's arrival to its command being accepted")
                .with_unit("ms")
                .with_boundaries(LATENCY_BUCKETS_MS.to_vec())
                .build(),
            malformed: meter
                .u64_counter("task_readiness_malformed_notifications")
                .with_description("Notifications that could not be classified or parsed; ignored")
                .with_unit("{notification}")
                .build(),
            polls: meter
                .u64_counter("fallback_polls_executed")
                .with_description("Fallback poller rounds and catch-up sweeps executed")
                .with_unit("{poll}")
                .build(),
            tasks_found: meter
                .u64_counter("fallback_tasks_found")
                .with_description("Tasks with ready steps found by the poller or a catch-up sweep")
                .with_unit("{task}")
                .build(),
            completion_to_enqueue: meter
                .f64_histogram("step_completion_to_enqueue_latency")
                .with_description("From a step becoming ready (its last parent completing) to it being enqueued, database clock")
                .with_unit("ms")
                .with_boundaries(LATENCY_BUCKETS_MS.to_vec())
                .build(),
            processed: meter
                .u64_counter("commands_processed")
                .with_description("Commands processed, by outcome")
                .with_unit("{command}")
                .build(),
            rejected: meter
                .u64_counter("commands_rejected")
                .with_description("Commands refused because the processor was saturated or stopping")
                .with_unit("{command}")
                .build(),
            reconnects: meter
                .u64_counter("listener_reconnects")
                .with_description("Reconnections of the LISTEN connection")
                .with_unit("{reconnect}")
                .build(),
            promotions: meter
                .u64_counter("retry_promotions")
                .with_description("Steps returned to pending by the deadline scheduler")
                .with_unit("{step}")
                .build(),
            leased: meter
                .u64_counter("steps_leased")
                .with_description("Steps delivered to workers by FetchSteps, by namespace and queue")
                .with_unit("{step}")
                .build(),
            tasks_purged: meter
                .u64_counter("retention_tasks_purged")
                .with_description("Finished tasks removed by retention on this replica")
                .with_unit("{task}")
                .build(),
            rows_purged: meter
                .u64_counter("retention_rows_purged")
                .with_description("Rows removed by retention on this replica, every table (steps and history included)")
                .with_unit("{row}")
                .build(),
            meter: meter.clone(),
        }
    }

    /// Instruments that record nowhere, for code paths built without telemetry.
    pub fn noop() -> Self {
        Self::new(&opentelemetry::metrics::MeterProvider::meter(
            &opentelemetry::metrics::noop::NoopMeterProvider::new(),
            "tasker",
        ))
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    pub fn event_received(&self, event_type: &'static str) {
        self.events_received
            .add(1, &[KeyValue::new("event_type", event_type)]);
    }

    pub fn command_sent(&self, triggered_by: &'static str) {
        self.commands_sent
            .add(1, &[KeyValue::new("triggered_by", triggered_by)]);
    }

    pub fn readiness_latency(&self, ms: f64) {
        self.readiness_latency.record(ms, &[]);
    }

    pub fn malformed_notification(&self, channel: &str) {
        self.malformed
            .add(1, &[KeyValue::new("channel", channel.to_string())]);
    }

    pub fn poll_executed(&self, kind: &'static str, tasks_found: u64) {
        let attrs = [KeyValue::new("kind", kind)];
        self.polls.add(1, &attrs);
        self.tasks_found.add(tasks_found, &attrs);
    }

    pub fn completion_to_enqueue(&self, ms: f64, triggered_by: &'static str) {
        self.completion_to_enqueue
            .record(ms, &[KeyValue::new("triggered_by", triggered_by)]);
    }

    pub fn steps_leased(&self, namespace: &str, queue: &str, n: u64) {
        self.leased.add(
            n,
            &[
                KeyValue::new("namespace", namespace.to_string()),
                KeyValue::new("queue", queue.to_string()),
            ],
        );
    }

    pub fn command_processed(&self, outcome: &'static str) {
        self.processed.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn command_rejected(&self, reason: &'static str) {
        self.rejected.add(1, &[KeyValue::new("reason", reason)]);
    }

    pub fn listener_reconnected(&self) {
        self.reconnects.add(1, &[]);
    }

    pub fn steps_promoted(&self, source: &'static str, n: u64) {
        self.promotions.add(n, &[KeyValue::new("source", source)]);
    }

    pub fn purged(&self, tasks: u64, rows: u64) {
        self.tasks_purged.add(tasks, &[]);
        self.rows_purged.add(rows, &[]);
    }
}
