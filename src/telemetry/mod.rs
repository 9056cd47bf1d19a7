//! Logs, traces and metrics.
//!
//! - A `tracing` subscriber with an env-filter (`RUST_LOG` overrides `[telemetry] log_filter`)
//!   and human-readable or JSON output (`log_format`).
//! - OpenTelemetry export over OTLP/gRPC when `[telemetry] otlp_endpoint` is set or the
//!   standard `OTEL_EXPORTER_OTLP_ENDPOINT` is: spans through a batch exporter (the
//!   `tracing-opentelemetry` layer), metrics through a periodic reader installed as the global
//!   meter provider. `OTEL_SERVICE_NAME` and `OTEL_TRACES_SAMPLER` are honoured. Resource
//!   attributes: service name and version, an instance id, the deployment mode at start.
//!   [`TelemetryGuard::shutdown`] flushes both on exit.
//! - W3C trace context in and out: [`context_from_traceparent`] continues a caller's `traceparent`
//!   (the gRPC server's request span uses it);
//!   [`current_traceparent`] renders the current span's context for the database (it rides in
//!   the NOTIFY payload); [`context_from_traceparent`] turns it back into a parent.
//!
//! With export disabled, no OpenTelemetry layer is installed: spans are plain `tracing` spans
//! and nothing is sent anywhere.
//!
//! # One trace per hop: children, not links
//!
//! A request that changes a step (CompleteStep, FailStep, CreateTask, CancelTask) sets
//! `tasker.traceparent` in its transaction; the readiness trigger copies it into the NOTIFY
//! payload. The listener's `listener.receive` span takes it as its *parent*, the
//! `command.process_task_readiness` span is a child of that, `enqueue.claim_and_enqueue` a
//! child of the command, and the enqueue stores its own context on the queue row, so the
//! `step.lease` span emitted when a worker's FetchSteps takes the step is its child too (with
//! a *link* to the FetchSteps request, which belongs to the worker's own trace).
//!
//! Children rather than links because the relation is causal and one-to-one: this
//! completion made exactly these steps ready, and Jaeger then shows the hop as one tree with
//! its latency in plain sight. The one place a link is right is the lease, where a worker's
//! request (its own trace) picks up work caused by another trace. A notification folded into
//! a pass already running for its task joins that pass's trace instead. Poller rounds, retry
//! wake-ups and commands injected over the API start their own traces.

pub mod metrics;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{DeploymentMode, TelemetryConfig};

/// Owns the exporters; flush them with [`TelemetryGuard::shutdown`].
#[derive(Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl TelemetryGuard {
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }

    /// Export what is buffered and stop the exporters. The exporters block on their OTLP
    /// client, whose I/O runs on this runtime: the flush runs on a blocking-pool thread so the
    /// runtime stays free to drive it.
    pub async fn shutdown(self) {
        let flush = move || {
            if let Some(t) = self.tracer {
                if let Err(e) = t.shutdown() {
                    eprintln!("telemetry: flushing traces failed: {e}");
                }
            }
            if let Some(m) = self.meter {
                if let Err(e) = m.shutdown() {
                    eprintln!("telemetry: flushing metrics failed: {e}");
                }
            }
        };
        if let Err(e) = tokio::task::spawn_blocking(flush).await {
            eprintln!("telemetry: flush task failed: {e}");
        }
    }
}

/// The OTLP endpoint to export to, if any: configuration first, then the standard variable.
pub fn otlp_endpoint(cfg: &TelemetryConfig) -> Option<String> {
    if let Some(endpoint) = &cfg.otlp_endpoint {
        return Some(endpoint.clone());
    }
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Install the global subscriber (and exporters when configured). Later calls only return an
/// empty guard, so tests and subcommands can all call it.
pub fn init(cfg: &TelemetryConfig, mode: DeploymentMode) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if cfg.log_format == crate::config::LogFormat::Json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut guard = TelemetryGuard::default();
    let otel_layer = match otlp_endpoint(cfg) {
        Some(endpoint) => match build_exporters(cfg, &endpoint, mode) {
            Ok((tracer, meter)) => {
                let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer("tasker"));
                opentelemetry::global::set_meter_provider(meter.clone());
                guard.tracer = Some(tracer);
                guard.meter = Some(meter);
                Some(layer)
            }
            Err(e) => {
                eprintln!("telemetry: OTLP export disabled: {e}");
                None
            }
        },
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt.with_filter(filter))
        .try_init();
    guard
}

fn resource(cfg: &TelemetryConfig, mode: DeploymentMode) -> Resource {
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| cfg.service_name.clone());
    Resource::builder()
        .with_service_name(name)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", uuid::Uuid::now_v7().to_string()),
            KeyValue::new("tasker.deployment_mode", mode.as_str()),
        ])
        .build()
}

/// Build the span and metric exporters for `endpoint` (OTLP over gRPC).
pub fn build_exporters(
    cfg: &TelemetryConfig,
    endpoint: &str,
    mode: DeploymentMode,
) -> Result<
    (
        SdkTracerProvider,
        opentelemetry_sdk::metrics::SdkMeterProvider,
    ),
    String,
> {
    let resource = resource(cfg, mode);
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone());
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        tracer = tracer.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))));
    }
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let meter = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(metrics)
        .with_resource(resource)
        .build();
    Ok((tracer.build(), meter))
}

/// `00-<trace id>-<span id>-<flags>` for the current span, when it has a valid context.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// An OpenTelemetry context whose remote parent is `traceparent` (and `tracestate`).
pub fn context_from_traceparent(
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<opentelemetry::Context> {
    let mut carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    if let Some(ts) = tracestate {
        carrier.insert("tracestate".to_string(), ts.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

struct GrpcInstruments {
    requests: opentelemetry::metrics::Counter<u64>,
    duration: opentelemetry::metrics::Histogram<f64>,
}

fn grpc_instruments() -> &'static GrpcInstruments {
    static I: OnceLock<GrpcInstruments> = OnceLock::new();
    I.get_or_init(|| {
        let meter = opentelemetry::global::meter("tasker");
        GrpcInstruments {
            requests: meter
                .u64_counter("rpc.server.requests")
                .with_description("gRPC requests handled, by method and status code")
                .with_unit("{request}")
                .build(),
            duration: meter
                .f64_histogram("rpc.server.duration")
                .with_description("Time to the response headers of a gRPC request (the whole call, for unary methods)")
                .with_unit("ms")
                .build(),
        }
    })
}

/// Records each request's gRPC status code on its span and in the request metrics.
#[derive(Clone, Copy, Default)]
pub struct GrpcStatusLayer;

impl<S> tower::Layer<S> for GrpcStatusLayer {
    type Service = GrpcStatusService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcStatusService { inner }
    }
}

#[derive(Clone)]
pub struct GrpcStatusService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcStatusService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = req.uri().path().trim_start_matches('/').to_string();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            // errors travel as trailers-only responses (status in the headers); success has
            // its status in the trailers, and is OK
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Internal as i32,
            };
            record_grpc_call(method, code, started);
            res
        })
    }
}

/// Records a call's gRPC status code on the current span and in the request metrics under
/// `method` (`tasker.v1.Service/Method`): every unary call, and each call a Work stream
/// carries, as the method it stands for.
pub fn record_grpc_call(method: String, code: i32, started: Instant) {
    tracing::Span::current().record("rpc.grpc.status_code", code);
    let attrs = [
        KeyValue::new("rpc.method", method),
        KeyValue::new("rpc.grpc.status_code", i64::from(code)),
    ];
    let i = grpc_instruments();
    i.requests.add(1, &attrs);
    i.duration
        .record(started.elapsed().as_secs_f64() * 1000.0, &attrs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_and_rejects() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_from_traceparent(tp, None).expect("valid");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context_from_traceparent("garbage", None).is_none());
        assert!(context_from_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            None
        )
        .is_none());
    }
}
