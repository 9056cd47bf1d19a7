//! The gRPC surface: `tasker.v1` services, standard health, and server reflection (v1 and
//! v1alpha, since grpcurl 1.8 and Python's grpcio-reflection only speak v1alpha).

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::server::{HealthReporter, HealthService};

use crate::proto::FILE_DESCRIPTOR_SET;

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

    /// Serve until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("descriptor sets are valid: built from our own protos");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("descriptor sets are valid: built from our own protos");
        Server::builder()
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await
    }
}
