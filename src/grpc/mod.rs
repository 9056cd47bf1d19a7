//! The gRPC surface: the `tasker.v1` services, standard health, and server reflection (v1 and
//! v1alpha, since grpcurl 1.8 and Python's grpcio-reflection only speak v1alpha).
//!
//! Layout:
//! - `context`: `ApiContext`, what every handler shares
//! - `readiness_api`, `admin_api`, `task_api`, `worker_api`: one file per service
//! - `auth`: bearer tokens and scopes, a tower layer in front of everything
//! - `error`: the one mapping from internal errors to status codes
//! - `convert`: protobuf <-> domain conversions and field-naming request parsing
//!
//! Every request gets a server span (`grpc.request`, with method, peer and status code)
//! whose parent is the caller's W3C trace context when it sent one.

mod admin_api;
pub mod auth;
mod context;
pub mod convert;
pub mod error;
mod readiness_api;
mod task_api;
mod worker_api;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::server::{HealthReporter, HealthService};

use crate::config::GrpcConfig;
use crate::proto::{v1, FILE_DESCRIPTOR_SET};
pub use context::ApiContext;

/// Accepted connections, with Nagle's algorithm off. Connections accepted from our own
/// listener do not get tonic's socket settings, and with Nagle on, a response that spans two
/// segments waits for the client's delayed ACK: measured, 40-48 ms added to every CreateTask
/// of a 10-step chain and to the slowest hops.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// The name health checks use for the whole server (the empty service name).
pub const OVERALL: &str = "";

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
        let ready = ctx.coordinator.ready_signal();
        let health = self.health.clone();
        let serving = tokio::spawn(async move {
            ready.await;
            health
                .set_service_status(OVERALL, tonic_health::ServingStatus::Serving)
                .await;
        });
        let health = self.health.clone();
        let drain_ctx = ctx.clone();
        let shutdown = async move {
            shutdown.await;
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
            .build_v1()
            .context("reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection v1alpha")?;

        let mut builder = Server::builder();
        if let (Some(cert_path), Some(key_path)) = (&cfg.tls.cert_path, &cfg.tls.key_path) {
            let cert = std::fs::read(cert_path)
                .with_context(|| format!("reading grpc.tls.cert_path {}", cert_path.display()))?;
            let key = std::fs::read(key_path)
                .with_context(|| format!("reading grpc.tls.key_path {}", key_path.display()))?;
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                .context("grpc.tls")?;
        }
        builder
            .timeout(cfg.request_timeout)
            .trace_fn(crate::telemetry::grpc_request_span)
            .layer(crate::telemetry::GrpcStatusLayer)
            .layer(auth::AuthLayer::new(auth))
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                v1::readiness_service_server::ReadinessServiceServer::new(
                    readiness_api::ReadinessApi::new(ctx.clone()),
                )
                .max_decoding_message_size(limit),
            )
            .add_service(
                v1::admin_service_server::AdminServiceServer::new(admin_api::AdminApi::new(
                    ctx.clone(),
                ))
                .max_decoding_message_size(limit),
            )
            .add_service(
                v1::task_service_server::TaskServiceServer::new(task_api::TaskApi::new(
                    ctx.clone(),
                ))
                .max_decoding_message_size(limit),
            )
            .add_service(
                v1::worker_service_server::WorkerServiceServer::new(worker_api::WorkerApi::new(
                    ctx,
                ))
                .max_decoding_message_size(limit),
            )
            .serve_with_incoming_shutdown(incoming(self.listener), shutdown)
            .await
            .context("gRPC server")
    }
}
