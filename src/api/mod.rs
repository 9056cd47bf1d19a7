//! The gRPC surface: the `tasker.v1` services, standard health, and server reflection (v1 and
//! v1alpha, since grpcurl 1.8 and Python's grpcio-reflection only speak v1alpha).
//!
//! Layout:
//! - `accept`: accepting connections under limits (cap, keepalive, TLS and preface deadline)
//! - `context`: `ApiContext`, what every handler shares
//! - `readiness_api`, `admin_api`, `task_api`, `worker_api`, `schedule_api`: one file per
//!   service; `work_stream`, WorkerService's calls as messages on one stream
//! - `auth`: bearer tokens and scopes, a tower layer in front of everything
//! - `error`: the one mapping from internal errors to status codes
//! - `convert`: protobuf <-> domain conversions and field-naming request parsing
//! - `connections`: the connection registry (per-peer caps, idle eviction)
//! - `task_list`, `task_watch`: ListTasks paging and the WatchTask feed
//! - `client`: the worker client (connect, lease, complete, fail), the library's public API,
//!   with `task_builder` (a `CreateTaskRequest` written the way a DAG is drawn) and
//!   `client_stream` (its calls over one Work stream)
//!
//! Every request gets a server span (`grpc.request`, with method, peer and status code)
//! whose parent is the caller's W3C trace context when it sent one.

mod accept;
mod admin_api;
pub mod auth;
pub mod client;
mod client_stream;
pub mod connections;
mod context;
pub mod convert;
pub mod error;
mod readiness_api;
mod schedule_api;
mod task_api;
mod task_builder;
mod task_list;
mod task_watch;
mod work_stream;
mod worker_api;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::GrpcConfig;
use crate::proto::{v1, FILE_DESCRIPTOR_SET};
pub use context::{ApiContext, EngineHandles};

/// The name health checks use for the whole server (the empty service name).
pub const OVERALL: &str = "";

/// How long a shutdown waits for open streams (watches, command streams, long-polls) to end
/// before it closes their connections.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A bound listener and the health reporter that flips to SERVING once the core is up.
pub struct GrpcServer {
    listener: TcpListener,
    pub health: HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<HealthService>,
}

impl GrpcServer {
    /// Bind now (so a busy port fails start-up, before anything is spawned).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let health = HealthReporter::new();
        health
            .set_service_status(OVERALL, tonic_health::ServingStatus::NotServing)
            .await;
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            HealthService::from_health_reporter(health.clone()),
        );
        Ok(Self {
            listener,
            health,
            health_service,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve the API until `shutdown` resolves. Health turns SERVING once the systems the
    /// deployment mode needs are up, and NOT_SERVING as soon as shutdown begins.
    pub async fn serve(
        self,
        ctx: ApiContext,
        cfg: &GrpcConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let ready = ctx.mode_controller.ready_signal();
        let health = self.health.clone();
        let serving = tokio::spawn(async move {
            ready.await;
            health
                .set_service_status(OVERALL, tonic_health::ServingStatus::Serving)
                .await;
        });
        let health = self.health.clone();
        let drain_ctx = ctx.clone();
        let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            let _ = began_tx.send(());
            serving.abort();
            drain_ctx.set_draining();
            health
                .set_service_status(OVERALL, tonic_health::ServingStatus::NotServing)
                .await;
        };
        let limit = cfg.max_request_bytes;
        let auth = Arc::new(auth::Authenticator::from_config(&cfg.auth));
        if auth.is_open() {
            tracing::warn!(bind = %cfg.bind, "no gRPC tokens configured: the API is open to anyone who can reach it");
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest and the other error details our statuses carry, so that
            // reflection clients (grpcurl) can print them
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection v1alpha")?;

        // Connections are accepted (and TLS done) in `accept`, under its limits. Nagle's
        // algorithm is off there: with it on, a response spanning two segments waited for the
        // client's delayed ACK (measured: 40-48 ms added to CreateTask and the slowest hops).
        let tls = match (&cfg.tls.cert_path, &cfg.tls.key_path) {
            (Some(cert), Some(key)) => Some(accept::tls_acceptor(cert, key)?),
            _ => None,
        };
        let connections = connections::Connections::new(connections::ConnectionLimits {
            max_connections: cfg.max_connections,
            max_per_peer: cfg.max_connections_per_peer,
            idle_timeout: cfg.idle_timeout,
        });
        let stop_sweep = tokio_util::sync::CancellationToken::new();
        let _stop_sweep_on_exit = stop_sweep.clone().drop_guard();
        tokio::spawn(connections.clone().sweep_idle(stop_sweep));
        let policy = accept::AcceptPolicy {
            connections,
            handshake_timeout: cfg.handshake_timeout,
            tcp_keepalive: cfg.tcp_keepalive,
            tls,
        };
        let out_limit = cfg.max_response_bytes;
        let serve = Server::builder()
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .concurrency_limit_per_connection(cfg.concurrency_per_connection)
            .http2_keepalive_interval(Some(cfg.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(cfg.http2_keepalive_timeout))
            .timeout(cfg.request_timeout)
            .trace_fn(request_span)
            .layer(crate::telemetry::GrpcStatusLayer)
            .layer(connections::CallAccounting::new(cfg.max_health_watches))
            .layer(auth::AuthLayer::new(auth))
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                v1::readiness_service_server::ReadinessServiceServer::new(
                    readiness_api::ReadinessApi::new(ctx.clone()),
                )
                .max_decoding_message_size(limit)
                .max_encoding_message_size(out_limit),
            )
            .add_service(
                v1::admin_service_server::AdminServiceServer::new(admin_api::AdminApi::new(
                    ctx.clone(),
                ))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(out_limit),
            )
            .add_service(
                v1::task_service_server::TaskServiceServer::new(task_api::TaskApi::new(
                    ctx.clone(),
                ))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(out_limit),
            )
            .add_service(
                v1::schedule_service_server::ScheduleServiceServer::new(
                    schedule_api::ScheduleApi::new(ctx.clone()),
                )
                .max_decoding_message_size(limit)
                .max_encoding_message_size(out_limit),
            )
            .add_service(
                v1::worker_service_server::WorkerServiceServer::new(worker_api::WorkerApi::new(
                    ctx,
                ))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(out_limit),
            )
            .serve_with_incoming_shutdown(accept::incoming(self.listener, policy), shutdown);
        // A graceful shutdown waits for every open stream; a client holding a Health/Watch or
        // a command stream open would hold the process forever. After the grace, close them.
        let grace = async move {
            match began_rx.await {
                Ok(()) => tokio::time::sleep(DRAIN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            served = serve => served.context("gRPC server"),
            () = grace => {
                tracing::warn!(grace_s = DRAIN_GRACE.as_secs(), "streams still open after the shutdown grace: closing them");
                Ok(())
            }
        }
    }
}

/// The server span of one gRPC request, continuing the caller's trace when its metadata
/// carries a `traceparent`.
fn request_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let path = req.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let peer = req
        .extensions()
        .get::<connections::ConnectionInfo>()
        .and_then(|i| i.peer())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        net.peer = %peer,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = header("traceparent") {
        if let Some(cx) = crate::telemetry::context_from_traceparent(tp, header("tracestate")) {
            let _ = span.set_parent(cx);
        }
    }
    span
}
