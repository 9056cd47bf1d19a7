//! `TaskerConfig`: the layered configuration and its validation.
//!
//! Layers, later wins:
//! 1. compiled defaults (each section's `Default`; `config/tasker/base/*.toml` restates them,
//!    and `tests/config.rs` fails when the two disagree),
//! 2. `config/tasker/base/*.toml`,
//! 3. `config/tasker/environments/<TASKER_ENV>/*.toml` (`TASKER_ENV` defaults to `development`),
//! 4. `DATABASE_URL` (as `database.url`),
//! 5. environment variables `TASKER_<SECTION>__<KEY>`, `__` between levels
//!    (`TASKER_ORCHESTRATION__DEPLOYMENT__MODE=PollingOnly`). The process's own variables
//!    ([`PROCESS_VARIABLES`]: `TASKER_ENV`, `TASKER_TOKEN`, ...) are not settings; any other
//!    `TASKER_` variable without `__` is reported as a problem, with the setting it probably
//!    meant (`TASKER_DATABASE_URL` -> `TASKER_DATABASE__URL`), rather than silently ignored,
//! 6. command-line flags.
//!
//! [`load`] checks everything before it returns: unknown keys, values of the wrong type,
//! out-of-range values and cross-field rules are all collected and reported at once
//! ([`ConfigError`]), each naming the key, the rule and the layer the value came from. The
//! deployment mode alone decides which readiness systems run: there are no `enabled` flags.
//!
//! Layout: one file per section (`orchestration`, `database`, `grpc`, `telemetry`), each type
//! with its defaults (and the reason for each) and the rules that check it; `load` (layers,
//! leaf checks, rendering), `checks` (where rules report), `units` (how durations and absent
//! values are written). The rules that span sections are in [`TaskerConfig::validate`].

mod checks;
mod database;
mod grpc;
mod load;
mod orchestration;
mod telemetry;
mod units;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::model::mode::DeploymentMode;
pub use crate::model::namespaces::{namespace_name_problem, MAX_NAMESPACE_BYTES};
pub use database::{DatabaseConfig, LOCAL_DATABASE_URL};
pub use grpc::{AuthConfig, GrpcConfig, TlsConfig, TokenConfig, SCOPES};
pub use load::{
    load, redact_url, ConfigError, ConfigProblem, ConfigSources, LoadedConfig, CONFIG_DIRS,
    PROCESS_VARIABLES,
};
pub use orchestration::{
    CommandProcessorConfig, CompletionsConfig, DeploymentConfig, OrchestrationConfig,
    ReplicasConfig, RetentionConfig, TaskReadinessConfig, WorkersConfig, MAX_RETENTION,
};
pub use telemetry::{LogFormat, TelemetryConfig};

use checks::Checks;

/// The exit code for a configuration the process refuses to run with (EX_USAGE in sysexits).
pub const EXIT_CONFIG: i32 = 64;

/// The longest a ready task waits for the fallback poller after its notification was lost,
/// with the default settings: the age threshold, then at most one polling period with its
/// +10 % jitter (2 s + 27.5 s). In general the bound is
/// `age_threshold + 1.1 x fallback_polling_interval`.
pub const MISSED_EVENT_BOUND: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TaskerConfig {
    pub orchestration: OrchestrationConfig,
    pub database: DatabaseConfig,
    pub grpc: GrpcConfig,
    pub telemetry: TelemetryConfig,
}

impl TaskerConfig {
    /// Range and cross-field rules: (dotted key, message) for every violation. Types (whole
    /// numbers, addresses, enums) were already checked while reading. Each section checks
    /// itself; the rules here are the ones that span sections.
    pub fn validate(&self, environment: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut c = Checks::new(&mut out);
        self.orchestration.validate(&mut c.section("orchestration"));
        self.database
            .validate(&mut c.section("database"), environment);
        self.grpc.validate(&mut c.section("grpc"), environment);
        self.telemetry.validate(&mut c.section("telemetry"));

        let (cp, db) = (&self.orchestration.command_processor, &self.database);
        // Every command holds a connection; the listener, the poller and gRPC reads need some too.
        if cp.max_concurrent_commands as u64 >= u64::from(db.max_connections) {
            c.problem(
                "orchestration.command_processor.max_concurrent_commands",
                format!(
                    "must be less than database.max_connections ({} >= {}), or commands starve every other database user",
                    cp.max_concurrent_commands, db.max_connections
                ),
            );
        }
        // one step (its inputs, its parents' results, names and ids) must always fit in a
        // FetchSteps response, or it could never be delivered
        let (wk, g) = (&self.orchestration.workers, &self.grpc);
        let inputs = crate::model::limits::MAX_DOCUMENT_BYTES;
        let one_step = wk.max_parent_results_bytes + inputs + 64 * 1024;
        if one_step > g.max_response_bytes {
            c.problem(
                "orchestration.workers.max_parent_results_bytes",
                format!(
                    "plus a step's inputs ({inputs} bytes) and 64 KiB must fit in grpc.max_response_bytes ({} + {inputs} + {} > {}), or a step could be too large to deliver",
                    wk.max_parent_results_bytes,
                    64 * 1024,
                    g.max_response_bytes
                ),
            );
        }
        out
    }
}
