//! Tasker: a gRPC control plane that orchestrates workflow tasks (DAGs of steps) stored in
//! PostgreSQL, with event-driven readiness.
//!
//! When a step completes, the database announces which task has newly ready steps
//! (`pg_notify`); the service turns the notification into an
//! `OrchestrationCommand::ProcessTaskReadiness`, and the command processor claims the task and
//! enqueues the ready steps in one transaction. A fallback poller sends the same command for
//! anything a notification missed.
//!
//! # The library's API
//!
//! - [`client`]: a worker client (connect, lease, complete, fail) over the generated gRPC code;
//! - [`proto`]: the `tasker.v1` gRPC types, and JSON / time conversions for them;
//! - [`config`]: `TaskerConfig`, layered TOML + environment, validation;
//! - [`App`]: the service itself, to embed (build, then run until a shutdown future);
//! - [`telemetry`]: logs, OTLP traces and metrics for a process that embeds the service;
//! - [`MIGRATOR`]: the database migrations.
//!
//! # Layout (internal modules)
//!
//! - `vocabulary`: the words every layer speaks (`TriggeredBy`, `EnqueueOutcome`)
//! - `namespaces`: the namespace name rule, `NamespaceSelector`
//! - `quota`: places for long-lived requests, capped in all and per key
//! - `wakeups`: the in-process wake-ups (parked fetches, the deadline scheduler, sweeps)
//! - `store`: the pool, migrations and every SQL statement, behind typed functions
//! - `fleet`: the replica registry as this replica sees it; the claim split
//! - `announce`: `StepAnnouncer`, telling other replicas of steps queued here, after a grace
//! - `dag`: validating requested step DAGs; chain / diamond / fan builders
//! - `enqueue`: `TaskClaimStepEnqueuer`, one claim-and-enqueue transaction
//! - `commands`: `OrchestrationCommand` and the `CommandProcessor` actor
//! - `events`: LISTEN connection, notification classifier, `TaskReadinessEventSystem`
//! - `poller`: `ReadinessFallbackPoller` (periodic rounds, catch-up sweeps)
//! - `deadlines`: `DeadlineScheduler` (retry backoffs, lease expiry)
//! - `coordinator`: `UnifiedEventCoordinator`, the deployment mode and the systems it runs
//! - `worker`, `completions`: the workers' side (lease, complete in batches, fail, extend)
//! - `maintenance`: vacuuming the churn tables when autovacuum is off
//! - `core`: `OrchestrationCore`, all of the above assembled
//! - `grpc`: tonic services, auth, health, reflection, the error-to-status mapping
//! - `metrics`: OpenTelemetry instruments by name
//! - `local_db`: finding or starting a PostgreSQL to run against
//! - `app`: the composition root: build (can fail), then run (cannot), graceful shutdown
//!
//! Dependencies point one way, from the top of this list to the bottom (`tests/module_graph.rs`
//! checks that no two modules import each other). The `tasker` binary (`src/bin/tasker`:
//! command line, `ctl` client, benchmark) uses the library from outside.

mod announce;
mod app;
pub mod client;
mod commands;
mod completions;
pub mod config;
mod coordinator;
mod core;
mod dag;
mod deadlines;
mod enqueue;
mod events;
mod fleet;
mod grpc;
pub mod limits;
mod local_db;
mod maintenance;
mod metrics;
mod namespaces;
mod poller;
pub mod proto;
mod quota;
mod store;
pub mod telemetry;
mod vocabulary;
mod wakeups;
mod worker;

pub use app::{shutdown_signal, App};

/// The crate's migrations, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The service's internals, exported only so that this crate's integration tests (`tests/`)
/// and the `tasker` binary's benchmark and database commands can drive them directly. Not an
/// API: nothing here is stable, and it is hidden from the documentation.
#[doc(hidden)]
pub mod internal {
    pub use crate::commands::{
        CommandEvent, CommandFailure, CommandOutcome, CommandPhase, CommandProcessor,
        CommandProcessorHandle, CommandResult, OrchestrationCommand, SubmitError,
    };
    pub use crate::coordinator::{CoordinatorStatus, UnifiedEventCoordinator};
    pub use crate::core::OrchestrationCore;
    pub use crate::dag::{StepSpec, TaskSpec, Violation};
    pub use crate::events::{
        payload_traceparent, ClassifyError, EventKind, ListenerState, ListenerStatus,
        ReadinessEventClassifier, TaskReadinessEvent, TaskReadyEvent,
    };
    pub use crate::grpc::convert::{mode_from_proto, uuid as parse_uuid_field};
    pub use crate::grpc::{ApiContext, GrpcServer};
    pub use crate::limits;
    pub use crate::local_db::{
        find_bin_dir, listener_owner, local_server_is_trusted, resolve as resolve_database,
        with_database, EmbeddedCluster, LocalDbError, ResolvedDatabase,
    };
    pub use crate::metrics::Metrics;
    pub use crate::poller::PollerStatus;
    pub use crate::store::*;
    pub use crate::vocabulary::{EnqueueOutcome, TriggeredBy};
    pub use crate::worker::WorkerQueue;
}
