//! The test kit: what this crate's integration tests (`tests/`) and `tasker bench` drive below
//! the gRPC surface, and [`ServedApi`], the gRPC API served from an engine a test started
//! itself. Not an API for others: nothing here is stable, and it is hidden from the
//! documentation. Task requests are built with the public `tasker::client::task` builder.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{ApiContext, GrpcServer};
use crate::config::TaskerConfig;

// The engine, its store and its parts, for tests that work below the API.
pub use crate::app::Engine;
pub use crate::dispatch::WorkerQueue;
pub use crate::store::retention::{PurgedBatch, RetentionDefaults};
pub use crate::store::{
    ActivityCounters, CancelOutcome, Completion, CreatedTask, FailOutcome, HeldLease, LeasedStep,
    Refusal, StepFailure, Store, StoreError, Taker, TaskListQuery,
};
pub use crate::telemetry::metrics::Metrics;

// The domain's words and requested DAGs.
pub use crate::model::command::TriggeredBy;
pub use crate::model::dag::{StepSpec, TaskSpec};
pub use crate::model::namespaces::DEFAULT_QUEUE;
pub use crate::model::states::{ExecutionStatus, StepState, TaskState};

// Readiness: commands, the listener's state, the classifier.
pub use crate::readiness::{
    payload_traceparent, CommandPhase, ListenerState, OrchestrationCommand, PollerStatus,
    ReadinessEventClassifier, SubmitError,
};

// Finding or starting a database (the embedded cluster).
pub use crate::store::local::{
    find_bin_dir, listener_owner, local_server_is_trusted, resolve as resolve_database,
    with_database, EmbeddedCluster, LocalDbError,
};

// Request parsing, for the property tests of bad input.
pub use crate::api::convert::{mode_from_proto, uuid as parse_uuid_field};

/// The gRPC API served from `engine` on `addr` (port 0: any free one) until [`ServedApi::stop`].
pub struct ServedApi {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ServedApi {
    pub async fn start(
        engine: &Arc<Engine>,
        config: &TaskerConfig,
        addr: SocketAddr,
    ) -> std::io::Result<Self> {
        let server = GrpcServer::bind(addr).await?;
        let addr = server.local_addr()?;
        let ctx = ApiContext::new(engine.handles(), config);
        let (stop, stopped) = oneshot::channel::<()>();
        let grpc = config.grpc.clone();
        let join = tokio::spawn(async move {
            server
                .serve(ctx, &grpc, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            join: Some(join),
        })
    }

    /// Shut the server down gracefully and wait for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.await?,
            None => Ok(()),
        }
    }
}
