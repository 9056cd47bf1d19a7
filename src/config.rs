//! `TaskerConfig`: the layered configuration and its validation.
//!
//! Layers, later wins:
//! 1. compiled defaults (the constants below; `config/tasker/base/*.toml` restates them),
//! 2. `config/tasker/base/*.toml`,
//! 3. `config/tasker/environments/<TASKER_ENV>/*.toml` (`TASKER_ENV` defaults to `development`),
//! 4. `DATABASE_URL` (as `database.url`),
//! 5. environment variables `TASKER_<SECTION>__<KEY>`, `__` between levels
//!    (`TASKER_ORCHESTRATION__DEPLOYMENT__MODE=PollingOnly`). Only names containing `__` are
//!    read: every setting lives in a section, and plain `TASKER_ENV`, `TASKER_TOKEN`, ... are
//!    the process's own variables, not settings,
//! 6. command-line flags.
//!
//! [`load`] checks everything before it returns: unknown keys, values of the wrong type,
//! out-of-range values and cross-field rules are all collected and reported at once
//! ([`ConfigError`]), each naming the key, the rule and the layer the value came from. The
//! deployment mode alone decides which readiness systems run: there are no `enabled` flags.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The exit code for a configuration the process refuses to run with (EX_USAGE in sysexits).
pub const EXIT_CONFIG: i32 = 64;

/// Which readiness systems run. Set in `[orchestration.deployment] mode`, changeable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum DeploymentMode {
    /// LISTEN/NOTIFY only. Nothing recovers a lost notification but the catch-up sweep on
    /// (re)connect.
    EventDrivenOnly,
    /// LISTEN/NOTIFY plus the fallback poller. The default: events do the work, the poller
    /// proves it by finding nothing.
    #[default]
    Hybrid,
    /// The fallback poller only: for PgBouncer in transaction mode, which cannot LISTEN.
    PollingOnly,
}

impl DeploymentMode {
    pub const ALL: [DeploymentMode; 3] = [Self::EventDrivenOnly, Self::Hybrid, Self::PollingOnly];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::EventDrivenOnly => "EventDrivenOnly",
            Self::Hybrid => "Hybrid",
            Self::PollingOnly => "PollingOnly",
        }
    }

    pub fn listens(self) -> bool {
        matches!(self, Self::EventDrivenOnly | Self::Hybrid)
    }

    pub fn polls(self) -> bool {
        matches!(self, Self::Hybrid | Self::PollingOnly)
    }
}

impl fmt::Display for DeploymentMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeploymentMode {
    type Err = String;

    /// Accepts the canonical names and their snake_case forms (`event_driven_only`), which is
    /// what the gRPC enum and shell users tend to type.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let folded: String = s
            .chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|m| m.as_str().to_ascii_lowercase() == folded)
            .ok_or_else(|| {
                format!("unknown deployment mode {s:?}; expected one of EventDrivenOnly, Hybrid, PollingOnly")
            })
    }
}

/// Defaults, each with the reason it has this value.
pub mod defaults {
    /// The design note's figure: events do the work, the poller is a safety net.
    pub const FALLBACK_POLLING_INTERVAL_SECONDS: i64 = 30;
    /// A task ready for less than this is probably being handled by its notification right now.
    pub const AGE_THRESHOLD_SECONDS: i64 = 5;
    /// Tasks per poller query; the poller loops while a round comes back full.
    pub const BATCH_SIZE: i64 = 50;
    /// Upper bound of the listener's reconnect backoff (jittered, doubling from 100 ms).
    pub const LISTENER_MAX_BACKOFF_MS: i64 = 5_000;
    /// A LISTEN connection that is silently dead (no RST) is noticed within this interval.
    pub const LISTENER_PING_INTERVAL_SECONDS: i64 = 15;
    /// Bounded command queue: beyond this, senders are told "overloaded" instead of queueing
    /// without limit; the poller picks up whatever was refused.
    pub const COMMAND_CHANNEL_CAPACITY: i64 = 1_024;
    /// Commands processed at once. Each holds a pooled connection for one short transaction.
    pub const MAX_CONCURRENT_COMMANDS: i64 = 8;
    /// Completions committed in one transaction: the NOTIFY commit lock is taken once per
    /// batch instead of once per completion. A lone completion is never held back.
    pub const COMPLETION_MAX_BATCH: i64 = 64;
    /// Two batches at once: one commits while the next does its row work.
    pub const COMPLETION_EXECUTORS: i64 = 2;
    /// Enough for a few seconds of a busy processor; observers further behind get a gap event.
    pub const EVENT_BUFFER: i64 = 4_096;
    /// A task claimed by another instance is tried again after this delay: the holder may
    /// have read its ready set before a completion that made more steps ready.
    pub const CLAIM_RETRY_DELAY_MS: i64 = 25;
    pub const CLAIM_RETRY_ATTEMPTS: i64 = 8;
    /// In-flight commands get this long to finish on shutdown before they are abandoned (their
    /// tasks stay ready and are picked up by the next instance's startup sweep).
    pub const SHUTDOWN_GRACE_PERIOD_SECONDS: i64 = 10;
    pub const DATABASE_MAX_CONNECTIONS: i64 = 20;
    pub const DATABASE_MIN_CONNECTIONS: i64 = 2;
    pub const DATABASE_ACQUIRE_TIMEOUT_SECONDS: i64 = 5;
    pub const DATABASE_CONNECT_TIMEOUT_SECONDS: i64 = 5;
    /// Tried when no database URL is configured, before an embedded cluster is started.
    pub const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tasker";
    pub const EMBEDDED_DATA_DIR: &str = ".tasker/pg";
    pub const GRPC_BIND: &str = "127.0.0.1:50051";
    /// Large enough for a task of 1,000 steps with modest inputs; oversized requests are
    /// refused by the transport before they are decoded.
    pub const GRPC_MAX_REQUEST_BYTES: i64 = 4 * 1024 * 1024;
    pub const GRPC_REQUEST_TIMEOUT_SECONDS: i64 = 30;
    /// Long-poll FetchSteps calls may wait up to this long; it bounds `wait_ms`.
    pub const GRPC_MAX_FETCH_WAIT_MS: i64 = 20_000;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TaskerConfig {
    pub orchestration: OrchestrationConfig,
    pub database: DatabaseConfig,
    pub grpc: GrpcConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestrationConfig {
    pub deployment: DeploymentConfig,
    pub task_readiness: TaskReadinessConfig,
    pub command_processor: CommandProcessorConfig,
    pub completions: CompletionsConfig,
}

/// How workers' completions reach the database (see `completions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompletionsConfig {
    /// Completions committed together at most; 1 commits each on its own.
    pub max_batch: i64,
    /// Batches in flight at once.
    pub executors: i64,
}

impl Default for CompletionsConfig {
    fn default() -> Self {
        Self {
            max_batch: defaults::COMPLETION_MAX_BATCH,
            executors: defaults::COMPLETION_EXECUTORS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentConfig {
    pub mode: DeploymentMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskReadinessConfig {
    pub fallback_polling_interval_seconds: i64,
    pub age_threshold_seconds: i64,
    pub batch_size: i64,
    /// Namespaces this instance serves: exact names or prefix patterns ending in `*`
    /// (`billing-*`). Empty means all (the global channels).
    pub namespaces: Vec<String>,
    pub listener_max_backoff_ms: i64,
    pub listener_ping_interval_seconds: i64,
}

impl Default for TaskReadinessConfig {
    fn default() -> Self {
        Self {
            fallback_polling_interval_seconds: defaults::FALLBACK_POLLING_INTERVAL_SECONDS,
            age_threshold_seconds: defaults::AGE_THRESHOLD_SECONDS,
            batch_size: defaults::BATCH_SIZE,
            namespaces: Vec::new(),
            listener_max_backoff_ms: defaults::LISTENER_MAX_BACKOFF_MS,
            listener_ping_interval_seconds: defaults::LISTENER_PING_INTERVAL_SECONDS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandProcessorConfig {
    pub channel_capacity: i64,
    /// Lifecycle events kept for stream observers; one that falls further behind gets a gap
    /// event saying how many it missed.
    pub event_buffer: i64,
    pub max_concurrent_commands: i64,
    pub claim_retry_delay_ms: i64,
    pub claim_retry_attempts: i64,
    pub shutdown_grace_period_seconds: i64,
}

impl Default for CommandProcessorConfig {
    fn default() -> Self {
        Self {
            channel_capacity: defaults::COMMAND_CHANNEL_CAPACITY,
            event_buffer: defaults::EVENT_BUFFER,
            max_concurrent_commands: defaults::MAX_CONCURRENT_COMMANDS,
            claim_retry_delay_ms: defaults::CLAIM_RETRY_DELAY_MS,
            claim_retry_attempts: defaults::CLAIM_RETRY_ATTEMPTS,
            shutdown_grace_period_seconds: defaults::SHUTDOWN_GRACE_PERIOD_SECONDS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Empty: use [`defaults::LOCAL_DATABASE_URL`] if it answers, else an embedded cluster.
    pub url: String,
    pub max_connections: i64,
    pub min_connections: i64,
    pub acquire_timeout_seconds: i64,
    pub connect_timeout_seconds: i64,
    pub embedded_data_dir: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: defaults::DATABASE_MAX_CONNECTIONS,
            min_connections: defaults::DATABASE_MIN_CONNECTIONS,
            acquire_timeout_seconds: defaults::DATABASE_ACQUIRE_TIMEOUT_SECONDS,
            connect_timeout_seconds: defaults::DATABASE_CONNECT_TIMEOUT_SECONDS,
            embedded_data_dir: defaults::EMBEDDED_DATA_DIR.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub bind: String,
    pub max_request_bytes: i64,
    pub request_timeout_seconds: i64,
    pub max_fetch_wait_ms: i64,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            bind: defaults::GRPC_BIND.to_string(),
            max_request_bytes: defaults::GRPC_MAX_REQUEST_BYTES,
            request_timeout_seconds: defaults::GRPC_REQUEST_TIMEOUT_SECONDS,
            max_fetch_wait_ms: defaults::GRPC_MAX_FETCH_WAIT_MS,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When true the service refuses to start without at least one token.
    pub required: bool,
    pub tokens: Vec<TokenConfig>,
}

/// A bearer token, stored as the hex SHA-256 of the token so config files hold no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    pub name: String,
    pub sha256: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert_path: String,
    pub key_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` (human-readable) or `json`.
    pub log_format: String,
    /// An env-filter directive; `RUST_LOG` overrides it.
    pub log_filter: String,
    /// OTLP/gRPC endpoint; empty disables export unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: String,
    pub service_name: String,
    /// Fraction of root traces sampled, 0.0 ..= 1.0.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".to_string(),
            log_filter: "info,sqlx=warn".to_string(),
            otlp_endpoint: String::new(),
            service_name: "tasker".to_string(),
            sample_ratio: 1.0,
        }
    }
}

pub use crate::namespaces::{namespace_name_problem, MAX_NAMESPACE_BYTES};

/// The hex SHA-256 of a token, as stored in `grpc.auth.tokens[].sha256`.
pub fn hash_token(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Scopes a token may carry.
pub const SCOPES: [&str; 3] = ["read", "write", "admin"];

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `orchestration.deployment.mode`.
    pub key: String,
    pub message: String,
    /// Where the value came from (file path, environment variable, flag), when known.
    pub source: Option<String>,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        Ok(())
    }
}

/// Every problem found, listed at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Where configuration comes from: the config directory, the environment name, the process
/// environment (injectable for tests) and command-line overrides (dotted key -> value).
#[derive(Debug, Clone)]
pub struct ConfigSources {
    pub config_dir: PathBuf,
    pub environment: String,
    /// Read from the process environment when `None`.
    pub env_vars: Option<Vec<(String, String)>>,
    pub overrides: Vec<(String, Value)>,
}

impl ConfigSources {
    /// `config/tasker` (or `TASKER_CONFIG_DIR`) and `TASKER_ENV` (default `development`).
    pub fn from_process_env() -> Self {
        Self {
            config_dir: std::env::var_os("TASKER_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config/tasker")),
            environment: std::env::var("TASKER_ENV").unwrap_or_else(|_| "development".into()),
            env_vars: None,
            overrides: Vec::new(),
        }
    }

    pub fn with_override(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.overrides.push((key.to_string(), value.into()));
        self
    }
}

/// A validated configuration plus, for `config show`, where each value came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: TaskerConfig,
    pub environment: String,
    /// dotted key -> source description, for every key set by some layer above the defaults.
    pub sources: BTreeMap<String, String>,
}

/// Build, check and return the configuration, or every problem with it.
pub fn load(sources: &ConfigSources) -> Result<LoadedConfig, ConfigError> {
    let mut problems = Vec::new();
    let figment = build_figment(sources, &mut problems);

    let merged: Value = figment.extract().unwrap_or_else(|e| {
        problems.push(ConfigProblem {
            key: e.path.join("."),
            message: e.kind.to_string(),
            source: e.metadata.as_ref().map(|m| m.name.to_string()),
        });
        Value::Object(Default::default())
    });
    let defaults = serde_json::to_value(TaskerConfig::default()).expect("defaults serialize");

    // Walk the merged tree against the defaults' shape: drop unknown keys, and test every leaf
    // on its own so that one bad value never hides the next.
    let mut sanitized = defaults.clone();
    let mut sourced = BTreeMap::new();
    check_tree(
        &figment,
        &defaults,
        &merged,
        &mut Vec::new(),
        &mut sanitized,
        &mut sourced,
        &mut problems,
    );

    let config: TaskerConfig = match serde_json::from_value(sanitized) {
        Ok(c) => c,
        Err(e) => {
            problems.push(ConfigProblem {
                key: "(configuration)".into(),
                message: e.to_string(),
                source: None,
            });
            TaskerConfig::default()
        }
    };
    for (key, message) in config.validate(&sources.environment) {
        let source = sourced.get(&key).cloned();
        problems.push(ConfigProblem {
            key,
            message,
            source,
        });
    }
    if problems.is_empty() {
        Ok(LoadedConfig {
            config,
            environment: sources.environment.clone(),
            sources: sourced,
        })
    } else {
        Err(ConfigError { problems })
    }
}

fn build_figment(sources: &ConfigSources, problems: &mut Vec<ConfigProblem>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(TaskerConfig::default()));
    let base = sources.config_dir.join("base");
    for file in toml_files(&base) {
        figment = figment.merge(Toml::file_exact(file));
    }
    let env_dir = sources
        .config_dir
        .join("environments")
        .join(&sources.environment);
    if sources.config_dir.is_dir() && !env_dir.is_dir() {
        problems.push(ConfigProblem {
            key: "TASKER_ENV".into(),
            message: format!(
                "unknown environment {:?}: no directory {}",
                sources.environment,
                env_dir.display()
            ),
            source: Some("environment variable TASKER_ENV".into()),
        });
    }
    for file in toml_files(&env_dir) {
        figment = figment.merge(Toml::file_exact(file));
    }
    let vars: Vec<(String, String)> = sources
        .env_vars
        .clone()
        .unwrap_or_else(|| std::env::vars().collect());
    if let Some((_, v)) = vars.iter().find(|(k, _)| k == "DATABASE_URL") {
        figment = figment.merge(Layer::new(
            "environment variable DATABASE_URL",
            "database.url",
            Value::String(v.clone()),
        ));
    }
    for (k, v) in &vars {
        if let Some(rest) = k.strip_prefix("TASKER_").filter(|r| r.contains("__")) {
            let key = rest.to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(Layer::new(
                &format!("environment variable {k}"),
                &key,
                parse_env_value(v),
            ));
        }
    }
    for (key, value) in &sources.overrides {
        figment = figment.merge(Layer::new(
            &format!("command-line override of {key}"),
            key,
            value.clone(),
        ));
    }
    figment
}

/// One value at a dotted key, named after where it came from so `config show` and error
/// messages can say "from environment variable TASKER_...".
struct Layer {
    name: String,
    inner: Serialized<Value>,
}

impl Layer {
    fn new(name: &str, key: &str, value: Value) -> Self {
        Self {
            name: name.to_string(),
            inner: Serialized::default(key, value),
        }
    }
}

impl figment::Provider for Layer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name.clone())
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.inner.data()
    }
}

/// Environment values are typed the way figment's `Env` types them: a number, a boolean or
/// a TOML array/table when the text parses as one, otherwise a string.
fn parse_env_value(raw: &str) -> Value {
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(table) => table
            .get("v")
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn source_of(figment: &Figment, path: &[String]) -> Option<String> {
    let key = path.join(".");
    let meta = figment.find_metadata(&key)?;
    let name = meta.name.to_string();
    if name.contains("Serialized") {
        // compiled defaults are not a source worth naming
        return None;
    }
    Some(match &meta.source {
        Some(figment::Source::File(p)) => p.display().to_string(),
        Some(other) => format!("{name} {other}"),
        None => name,
    })
}

fn check_tree(
    figment: &Figment,
    default: &Value,
    merged: &Value,
    path: &mut Vec<String>,
    sanitized: &mut Value,
    sourced: &mut BTreeMap<String, String>,
    problems: &mut Vec<ConfigProblem>,
) {
    match (default, merged) {
        (Value::Object(dmap), Value::Object(mmap)) => {
            for (k, mv) in mmap {
                path.push(k.clone());
                match dmap.get(k) {
                    None => problems.push(ConfigProblem {
                        key: path.join("."),
                        message: format!(
                            "unknown key; known keys here: {}",
                            dmap.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                        source: source_of(figment, path),
                    }),
                    Some(dv) => {
                        let slot = sanitized
                            .as_object_mut()
                            .and_then(|o| o.get_mut(k))
                            .expect("sanitized mirrors defaults");
                        check_tree(figment, dv, mv, path, slot, sourced, problems);
                    }
                }
                path.pop();
            }
        }
        (Value::Object(_), other) => problems.push(ConfigProblem {
            key: path.join("."),
            message: format!("expected a table, found {}", kind(other)),
            source: source_of(figment, path),
        }),
        (_, mv) => {
            // A leaf: accept it only if the whole config deserializes with this value in place.
            let mut probe =
                serde_json::to_value(TaskerConfig::default()).expect("defaults serialize");
            set_path(&mut probe, path, mv.clone());
            match serde_json::from_value::<TaskerConfig>(probe) {
                Ok(_) => {
                    *sanitized = mv.clone();
                    if let Some(src) = source_of(figment, path) {
                        sourced.insert(path.join("."), src);
                    }
                }
                Err(e) => problems.push(ConfigProblem {
                    key: path.join("."),
                    message: leaf_message(mv, &e.to_string()),
                    source: source_of(figment, path),
                }),
            }
        }
    }
}

fn leaf_message(value: &Value, serde_message: &str) -> String {
    // serde's "unknown variant `Hibrid`, expected one of ..." is already clear; strip the
    // position suffix that refers to the probe document, not the user's file.
    let trimmed = serde_message
        .split(" at line ")
        .next()
        .unwrap_or(serde_message);
    format!("invalid value {value}: {trimmed}")
}

fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut cur = root;
    for (i, k) in path.iter().enumerate() {
        let obj = cur.as_object_mut().expect("path follows defaults");
        if i == path.len() - 1 {
            obj.insert(k.clone(), value);
            return;
        }
        cur = obj.get_mut(k).expect("path follows defaults");
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

impl TaskerConfig {
    /// Range and cross-field rules: (dotted key, message) for every violation.
    pub fn validate(&self, environment: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut at_least = |key: &str, value: i64, min: i64| {
            if value < min {
                out.push((key.to_string(), format!("must be >= {min}, is {value}")));
            }
        };
        let tr = &self.orchestration.task_readiness;
        at_least(
            "orchestration.task_readiness.fallback_polling_interval_seconds",
            tr.fallback_polling_interval_seconds,
            1,
        );
        at_least(
            "orchestration.task_readiness.age_threshold_seconds",
            tr.age_threshold_seconds,
            0,
        );
        at_least("orchestration.task_readiness.batch_size", tr.batch_size, 1);
        at_least(
            "orchestration.task_readiness.listener_max_backoff_ms",
            tr.listener_max_backoff_ms,
            100,
        );
        at_least(
            "orchestration.task_readiness.listener_ping_interval_seconds",
            tr.listener_ping_interval_seconds,
            1,
        );
        let cp = &self.orchestration.command_processor;
        at_least(
            "orchestration.command_processor.channel_capacity",
            cp.channel_capacity,
            1,
        );
        at_least(
            "orchestration.command_processor.event_buffer",
            cp.event_buffer,
            1,
        );
        at_least(
            "orchestration.command_processor.max_concurrent_commands",
            cp.max_concurrent_commands,
            1,
        );
        at_least(
            "orchestration.command_processor.claim_retry_delay_ms",
            cp.claim_retry_delay_ms,
            1,
        );
        at_least(
            "orchestration.command_processor.claim_retry_attempts",
            cp.claim_retry_attempts,
            0,
        );
        at_least(
            "orchestration.command_processor.shutdown_grace_period_seconds",
            cp.shutdown_grace_period_seconds,
            0,
        );
        at_least(
            "orchestration.completions.max_batch",
            self.orchestration.completions.max_batch,
            1,
        );
        at_least(
            "orchestration.completions.executors",
            self.orchestration.completions.executors,
            1,
        );
        let db = &self.database;
        at_least("database.max_connections", db.max_connections, 2);
        at_least("database.min_connections", db.min_connections, 0);
        at_least(
            "database.acquire_timeout_seconds",
            db.acquire_timeout_seconds,
            1,
        );
        at_least(
            "database.connect_timeout_seconds",
            db.connect_timeout_seconds,
            1,
        );
        let g = &self.grpc;
        at_least("grpc.max_request_bytes", g.max_request_bytes, 1024);
        at_least("grpc.request_timeout_seconds", g.request_timeout_seconds, 1);
        at_least("grpc.max_fetch_wait_ms", g.max_fetch_wait_ms, 0);

        if tr.batch_size > 10_000 {
            out.push((
                "orchestration.task_readiness.batch_size".into(),
                format!("must be <= 10000, is {}", tr.batch_size),
            ));
        }
        for (i, ns) in tr.namespaces.iter().enumerate() {
            // an entry is a namespace, or a prefix pattern ending in '*'
            let problem = match ns.strip_suffix('*') {
                Some(prefix) => namespace_name_problem(prefix)
                    .map(|p| format!("pattern {ns:?}: the part before '*' {p}")),
                None => namespace_name_problem(ns).map(|p| format!("namespace {ns:?} {p}")),
            };
            if let Some(problem) = problem {
                out.push((
                    format!("orchestration.task_readiness.namespaces[{i}]"),
                    problem,
                ));
            }
        }
        if db.min_connections > db.max_connections {
            out.push((
                "database.min_connections".into(),
                format!(
                    "must not exceed database.max_connections ({} > {})",
                    db.min_connections, db.max_connections
                ),
            ));
        }
        // Every command holds a connection; the listener, the poller and gRPC reads need some too.
        if cp.max_concurrent_commands >= db.max_connections {
            out.push((
                "orchestration.command_processor.max_concurrent_commands".into(),
                format!(
                    "must be less than database.max_connections ({} >= {}), or commands starve every other database user",
                    cp.max_concurrent_commands, db.max_connections
                ),
            ));
        }
        if !(db.url.is_empty()
            || db.url.starts_with("postgres://")
            || db.url.starts_with("postgresql://"))
        {
            out.push((
                "database.url".into(),
                "must start with postgres:// or postgresql://".into(),
            ));
        }
        if g.bind.parse::<std::net::SocketAddr>().is_err() {
            out.push((
                "grpc.bind".into(),
                format!(
                    "must be an address:port such as 127.0.0.1:50051, is {:?}",
                    g.bind
                ),
            ));
        }
        if g.max_fetch_wait_ms >= g.request_timeout_seconds * 1000 {
            out.push((
                "grpc.max_fetch_wait_ms".into(),
                format!(
                    "must be less than grpc.request_timeout_seconds ({} ms >= {} s), or long-polls are cut off by the request timeout",
                    g.max_fetch_wait_ms, g.request_timeout_seconds
                ),
            ));
        }
        if let Ok(addr) = g.bind.parse::<std::net::SocketAddr>() {
            if !addr.ip().is_loopback() && g.auth.tokens.is_empty() {
                out.push((
                    "grpc.auth.tokens".into(),
                    format!("grpc.bind {} is reachable from other hosts: configure tokens, or bind to 127.0.0.1", g.bind),
                ));
            }
        }
        if g.tls.cert_path.is_empty() != g.tls.key_path.is_empty() {
            out.push((
                "grpc.tls".into(),
                "cert_path and key_path must be set together".into(),
            ));
        }
        for (i, t) in g.auth.tokens.iter().enumerate() {
            let key = format!("grpc.auth.tokens[{i}]");
            if t.name.is_empty() {
                out.push((format!("{key}.name"), "must not be empty".into()));
            }
            if t.sha256.len() != 64 || !t.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                out.push((
                    format!("{key}.sha256"),
                    "must be the 64 hex digits of the token's SHA-256 (see `tasker token hash`)"
                        .into(),
                ));
            }
            if t.scopes.is_empty() {
                out.push((
                    format!("{key}.scopes"),
                    "must name at least one scope".into(),
                ));
            }
            for s in &t.scopes {
                if !SCOPES.contains(&s.as_str()) {
                    out.push((
                        format!("{key}.scopes"),
                        format!("unknown scope {s:?}; expected read, write or admin"),
                    ));
                }
            }
        }
        if g.auth.required && g.auth.tokens.is_empty() {
            out.push((
                "grpc.auth.tokens".into(),
                format!(
                    "at least one token is required (grpc.auth.required = true in environment {environment:?})"
                ),
            ));
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            out.push((
                "telemetry.log_format".into(),
                format!(
                    "must be \"text\" or \"json\", is {:?}",
                    self.telemetry.log_format
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            out.push((
                "telemetry.sample_ratio".into(),
                format!(
                    "must be between 0.0 and 1.0, is {}",
                    self.telemetry.sample_ratio
                ),
            ));
        }
        if self.telemetry.service_name.is_empty() {
            out.push(("telemetry.service_name".into(), "must not be empty".into()));
        }
        out
    }

    /// The merged configuration as TOML-like text with secrets redacted; each value set by a
    /// layer above the compiled defaults is annotated with that layer.
    pub fn render(&self, sources: &BTreeMap<String, String>) -> String {
        let mut value = serde_json::to_value(self).expect("config serializes");
        redact(&mut value);
        let mut out = String::new();
        render_table(&value, &mut Vec::new(), sources, &mut out);
        out
    }
}

fn redact(value: &mut Value) {
    if let Some(url) = value
        .pointer_mut("/database/url")
        .and_then(|v| v.as_str().map(str::to_string))
    {
        *value.pointer_mut("/database/url").expect("present") = Value::String(redact_url(&url));
    }
    if let Some(tokens) = value
        .pointer_mut("/grpc/auth/tokens")
        .and_then(Value::as_array_mut)
    {
        for t in tokens {
            if let Some(h) = t.get_mut("sha256") {
                *h = Value::String("<redacted>".into());
            }
        }
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:<redacted>@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

fn render_table(
    value: &Value,
    path: &mut Vec<String>,
    sources: &BTreeMap<String, String>,
    out: &mut String,
) {
    let Value::Object(map) = value else { return };
    let (tables, leaves): (Vec<_>, Vec<_>) = map.iter().partition(|(_, v)| v.is_object());
    if !leaves.is_empty() && !path.is_empty() {
        out.push_str(&format!("\n[{}]\n", path.join(".")));
    }
    for (k, v) in leaves {
        path.push(k.clone());
        let key = path.join(".");
        let rendered = toml::Value::try_from(v)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| v.to_string());
        match sources.get(&key) {
            Some(src) => out.push_str(&format!("{k} = {rendered}  # {src}\n")),
            None => out.push_str(&format!("{k} = {rendered}\n")),
        }
        path.pop();
    }
    for (k, v) in tables {
        path.push(k.clone());
        render_table(v, path, sources, out);
        path.pop();
    }
}
