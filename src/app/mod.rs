//! The composition root. [`App::build`] does everything that can fail (configuration is
//! already valid; database resolution, migrations, binding the port), then [`App::run`]
//! serves until a shutdown signal and tears down in order.

mod engine;
mod lane_gauges;
mod retention;
pub mod testkit;

pub use engine::Engine;

use std::net::SocketAddr;

use anyhow::Context;

use crate::api::{ApiContext, GrpcServer};
use crate::config::TaskerConfig;
use crate::store::local::{self, EmbeddedCluster};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;
use uuid::Uuid;

/// A built, not yet running service.
pub struct App {
    pub config: TaskerConfig,
    pub store: Store,
    pub core: Engine,
    server: GrpcServer,
    /// Kept so the embedded cluster (if any) lives as long as the service, and stops after it.
    embedded: Option<EmbeddedCluster>,
}

impl App {
    pub async fn build(config: TaskerConfig) -> anyhow::Result<Self> {
        let resolved = local::resolve(&config.database, "tasker").await?;
        tracing::info!(
            url = %crate::config::redact_url(&resolved.url),
            origin = resolved.origin,
            data_dir = resolved.embedded.as_ref().map(|c| c.data_dir().display().to_string()),
            "database"
        );
        let store = Store::connect_as(&resolved.url, &config.database, Some(Uuid::now_v7()))
            .await
            .context("connecting to the database")?;
        let applied = store.migrate().await.context("applying migrations")?;
        tracing::info!(applied, "migrations up to date");
        let addr = config.grpc.bind;
        let server = GrpcServer::bind(addr)
            .await
            .with_context(|| format!("binding gRPC on {addr}"))?;
        let metrics = Metrics::new(&opentelemetry::global::meter("tasker"));
        let core = Engine::start(store.clone(), &config, metrics);
        Ok(Self {
            config,
            store,
            core,
            server,
            embedded: resolved.embedded,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// Serve until `shutdown` resolves, then stop in order: NOT_SERVING, stop accepting, stop
    /// the core (intake first, then drain), close the pool, stop the embedded cluster.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            store,
            core,
            server,
            mut embedded,
        } = self;
        let ctx = ApiContext::new(core.handles(), &config);
        tracing::info!(addr = %server.local_addr()?, mode = %core.mode_controller.mode(), "serving gRPC");
        server.serve(ctx, &config.grpc, shutdown).await?;
        core.shutdown().await;
        store.pool().close().await;
        if let Some(cluster) = embedded.as_mut() {
            cluster.stop()?;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
