//! One trace across the database hop, received by a fake OTLP collector: CompleteStep (with
//! the caller's traceparent) -> NOTIFY -> listener -> command -> enqueue -> the next step's
//! lease; and the metrics exported with data.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    /// metric name -> the largest data point value seen (sums, gauges; histogram counts)
    metrics: Arc<Mutex<BTreeMap<String, f64>>>,
}

fn largest_value(m: &opentelemetry_proto::tonic::metrics::v1::Metric) -> f64 {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
    let number = |v: &Option<Value>| match v {
        Some(Value::AsDouble(d)) => *d,
        Some(Value::AsInt(i)) => *i as f64,
        None => 0.0,
    };
    match &m.data {
        Some(Data::Sum(s)) => s
            .data_points
            .iter()
            .map(|p| number(&p.value))
            .fold(0.0, f64::max),
        Some(Data::Gauge(g)) => g
            .data_points
            .iter()
            .map(|p| number(&p.value))
            .fold(0.0, f64::max),
        Some(Data::Histogram(h)) => h
            .data_points
            .iter()
            .map(|p| p.count as f64)
            .fold(0.0, f64::max),
        _ => 0.0,
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        r: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in r.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        r: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut seen = self.metrics.lock().unwrap();
        for rm in r.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let v = largest_value(&m);
                    let e = seen.entry(m.name).or_insert(0.0);
                    *e = e.max(v);
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            AnyValue::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one trace as an indented tree, for the eye.
fn tree(spans: &[&Span]) -> String {
    let ids: BTreeSet<String> = spans.iter().map(|s| hex(&s.span_id)).collect();
    let mut children: BTreeMap<String, Vec<&Span>> = BTreeMap::new();
    let mut roots = Vec::new();
    for s in spans {
        let parent = hex(&s.parent_span_id);
        if ids.contains(&parent) {
            children.entry(parent).or_default().push(s);
        } else {
            roots.push(*s);
        }
    }
    fn walk(s: &Span, depth: usize, children: &BTreeMap<String, Vec<&Span>>, out: &mut String) {
        let ms = (s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano)) as f64 / 1e6;
        out.push_str(&format!("{}{} ({ms:.2} ms)\n", "  ".repeat(depth), s.name));
        let mut kids = children.get(&hex(&s.span_id)).cloned().unwrap_or_default();
        kids.sort_by_key(|k| k.start_time_unix_nano);
        for k in kids {
            walk(k, depth + 1, children, out);
        }
    }
    roots.sort_by_key(|r| r.start_time_unix_nano);
    let mut out = String::new();
    for r in roots {
        walk(r, 0, &children, &mut out);
    }
    out
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn one_trace_from_complete_step_to_the_next_lease(pool: PgPool) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let c = collector.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .add_service(MetricsServiceServer::new(c))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut cfg = test_config(DeploymentMode::EventDrivenOnly);
    cfg.telemetry.otlp_endpoint = Some(format!("http://127.0.0.1:{port}"));
    cfg.telemetry.log_filter = "info".into();
    let guard = tasker::telemetry::init(&cfg.telemetry, DeploymentMode::EventDrivenOnly);
    assert!(guard.exporting());
    let metrics = tasker::testkit::Metrics::new(&opentelemetry::global::meter("tasker"));
    let server = TestServer::start_with(&pool, &cfg, metrics).await;
    let ch = server.channel().await;
    let mut tasks = Tasks::new(ch.clone());
    let mut workers = Workers::new(ch);

    tasks
        .create_task(two_steps("traced", "chain"))
        .await
        .unwrap();
    let first = lease_one(&workers, "traced").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut complete = Request::new(v1::CompleteStepRequest {
        step_uuid: first.step_uuid.clone(),
        attempt: 1,
        results: None,
        lease_token: first.lease_token.clone(),
        next: None,
    });
    complete.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    workers.complete_step(complete).await.unwrap();
    let second = lease_one(&workers, "traced").await;
    assert_eq!(second.name, "second");

    server.stop().await;
    guard.shutdown().await; // flushes spans and metrics to the collector

    let spans = collector.spans.lock().unwrap().clone();
    let in_trace: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let names: BTreeSet<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
    println!(
        "span tree of one hop, as received by the collector:\n{}",
        tree(&in_trace)
    );
    for expected in [
        "tasker.v1.WorkerService/CompleteStep",
        "listener.receive",
        "listener.classify",
        "command.process_task_readiness",
        "enqueue.claim_and_enqueue",
        "step.lease",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not in trace {trace_id}: {names:?}"
        );
    }
    let command = in_trace
        .iter()
        .find(|s| s.name == "command.process_task_readiness")
        .unwrap();
    assert_eq!(
        attr(command, "triggered_by").as_deref(),
        Some("step_transition")
    );
    assert_eq!(attr(command, "namespace").as_deref(), Some("traced"));
    assert_eq!(attr(command, "outcome").as_deref(), Some("enqueued"));
    assert_eq!(attr(command, "steps_enqueued").as_deref(), Some("1"));
    assert!(attr(command, "task_uuid").is_some());
    let lease = in_trace.iter().find(|s| s.name == "step.lease").unwrap();
    assert_eq!(attr(lease, "step_name").as_deref(), Some("second"));
    assert_eq!(lease.links.len(), 1, "linked to the FetchSteps request");
    let request = in_trace
        .iter()
        .find(|s| s.name == "tasker.v1.WorkerService/CompleteStep")
        .unwrap();
    assert_eq!(attr(request, "rpc.grpc.status_code").as_deref(), Some("0"));

    let exported = collector.metrics.lock().unwrap().clone();
    for m in [
        "task_readiness_events_received",
        "task_readiness_command_sent",
        "task_readiness_latency",
        "step_completion_to_enqueue_latency",
        "commands_processed",
        "fallback_polls_executed",
        "db.pool.connections",
        "rpc.server.requests",
        "rpc.server.duration",
    ] {
        let v = exported.get(m).copied();
        assert!(
            v.is_some_and(|v| v > 0.0),
            "metric {m} not exported with a non-zero value: {exported:?}"
        );
    }
    for m in ["command_queue_depth", "commands_in_flight", "db.pool.idle"] {
        assert!(
            exported.contains_key(m),
            "gauge {m} not exported: {exported:?}"
        );
    }
}
