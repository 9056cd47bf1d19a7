//! Tasker: a gRPC control plane that orchestrates workflow tasks (DAGs of steps) stored in
//! PostgreSQL, with event-driven readiness.
//!
//! When a step completes, a database trigger announces which task has newly ready steps
//! (`pg_notify`); the service turns the notification into an
//! `OrchestrationCommand::ProcessTaskReadiness`, and the command processor claims the task and
//! enqueues the ready steps in one transaction. A fallback poller sends the same command for
//! anything a notification missed.
//!
//! # Layout
//!
//! - [`config`]: `TaskerConfig`, layered TOML + environment, validation, `DeploymentMode`
//! - [`dag`]: validating requested step DAGs; chain / diamond / fan builders
//! - [`store`]: the pool, migrations and every SQL statement, behind typed functions
//! - [`commands`]: `OrchestrationCommand` and the `CommandProcessor` actor
//! - [`enqueue`]: `TaskClaimStepEnqueuer` and the workers' wake-ups
//! - [`readiness`]: listener, event classifier, fallback poller, deadline scheduler
//! - [`events`]: `TaskReadinessEventSystem` and the `UnifiedEventCoordinator`
//! - [`core`]: `OrchestrationCore`, all of the above assembled
//! - [`worker`]: the workers' side: lease, complete, fail, extend
//! - [`completions`]: `CompletionBatcher`, concurrent completions in one transaction
//! - [`maintenance`]: vacuuming the churn tables when autovacuum is off
//! - [`metrics`]: OpenTelemetry instruments by name
//! - [`bench`]: the latency/throughput benchmark behind `tasker bench`
//! - [`ctl`]: the gRPC client behind `tasker ctl`
//! - [`local_db`]: finding or starting a PostgreSQL to run against
//! - [`proto`]: generated gRPC code and the descriptor set for reflection
//! - [`grpc`]: tonic services, health, reflection, the error-to-status mapping
//! - [`telemetry`]: tracing subscriber
//! - [`app`]: the composition root: build (can fail), then run (cannot), graceful shutdown
//!
//! The binary (`src/main.rs`) only parses the command line and calls into this library.

pub mod app;
pub mod bench;
pub mod commands;
pub mod completions;
pub mod config;
pub mod core;
pub mod ctl;
pub mod dag;
pub mod enqueue;
pub mod events;
pub mod grpc;
pub mod local_db;
pub mod maintenance;
pub mod metrics;
pub mod proto;
pub mod readiness;
pub mod store;
pub mod telemetry;
pub mod worker;
