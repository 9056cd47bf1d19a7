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
//! # Layout
//!
//! Each folder of `src/` is one subsystem; dependencies point one way, from the bottom of this
//! list to the top, never back (`tests/module_graph.rs` checks it):
//!
//! - `proto`: the generated `tasker.v1` types and their conversions
//! - `model`: the domain's words and rules (requested DAGs, size limits, namespace names, the
//!   readiness command's vocabulary)
//! - `config`: `TaskerConfig`: its sections and defaults, loading, validation
//! - `telemetry`: logs, traces, metrics by name
//! - `store`: the pool, migrations and every SQL statement, behind typed functions; finding or
//!   starting a local PostgreSQL; vacuuming the churn tables
//! - `cluster`: the replica registry as this replica sees it; the claim split
//! - `dispatch`: getting ready steps to workers: claim-and-enqueue, parked fetches,
//!   announcements to other replicas, lease / complete / fail / extend
//! - `readiness`: finding tasks with ready steps: the listener and classifier, the event
//!   system, the fallback poller, the deadline scheduler, the command processor, the
//!   deployment-mode controller
//! - `api`: the tonic services, auth, connection caps, the error-to-status mapping, the worker
//!   client
//! - `app`: the composition root: the `Engine` (everything above assembled), build (can fail),
//!   run (cannot), graceful shutdown
//!
//! The `tasker` binary (`src/bin/tasker`: command line, `ctl` client, benchmark) uses the
//! library from outside.

mod api;
mod app;
mod cluster;
pub mod config;
mod dispatch;
mod model;
pub mod proto;
mod readiness;
mod store;
pub mod telemetry;

pub use api::auth::hash_token;
pub use api::client;
pub use model::limits;

pub use app::{shutdown_signal, App};

/// The crate's migrations, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What this crate's tests and `tasker bench` drive below the gRPC surface (see the module).
#[doc(hidden)]
pub use app::testkit;
