//! `TaskerConfig`: the layered configuration and its validation.
//!
//! Layers, later wins:
//! 1. compiled defaults (the constants below; `config/tasker/base/*.toml` restates them),
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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    use std::time::Duration;

    /// Events do the work, the poller is a safety net; with the jitter and the age threshold
    /// it finds a missed event within [`MISSED_EVENT_BOUND`](super::MISSED_EVENT_BOUND).
    pub const FALLBACK_POLLING_INTERVAL: Duration = Duration::from_secs(25);
    /// A task ready for less than this is probably being handled by its notification right now.
    pub const AGE_THRESHOLD: Duration = Duration::from_secs(2);
    /// Tasks per poller query; the poller loops while a round comes back full.
    pub const BATCH_SIZE: u32 = 50;
    /// Upper bound of the listener's reconnect backoff (jittered, doubling from 100 ms).
    pub const LISTENER_MAX_BACKOFF: Duration = Duration::from_millis(5_000);
    /// A LISTEN connection that is silently dead (no RST) is noticed within this interval.
    pub const LISTENER_PING_INTERVAL: Duration = Duration::from_secs(15);
    /// Bounded command queue: beyond this, senders are told "overloaded" instead of queueing
    /// without limit; the poller picks up whatever was refused.
    pub const COMMAND_CHANNEL_CAPACITY: usize = 1_024;
    /// Commands processed at once. Each holds a pooled connection for one short transaction.
    pub const MAX_CONCURRENT_COMMANDS: usize = 8;
    /// Completions committed in one transaction: the NOTIFY commit lock is taken once per
    /// batch instead of once per completion. A lone completion is never held back.
    pub const COMPLETION_MAX_BATCH: usize = 64;
    /// Two batches at once: one commits while the next does its row work.
    pub const COMPLETION_EXECUTORS: usize = 2;
    /// Steps enqueued by this replica wake its parked fetches at once; until wake-ups cross
    /// replicas, this is how soon a fetch parked here finds a step another replica enqueued.
    pub const FETCH_RECHECK_INTERVAL: Duration = Duration::from_millis(250);
    /// Enough for a few seconds of a busy processor; observers further behind get a gap event.
    pub const EVENT_BUFFER: usize = 4_096;
    /// A task claimed by another instance is tried again after this delay: the holder may
    /// have read its ready set before a completion that made more steps ready.
    pub const CLAIM_RETRY_DELAY: Duration = Duration::from_millis(25);
    pub const CLAIM_RETRY_ATTEMPTS: u32 = 8;
    /// In-flight commands get this long to finish on shutdown before they are abandoned (their
    /// tasks stay ready and are picked up by the next instance's startup sweep).
    pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(10);
    pub const DATABASE_MAX_CONNECTIONS: u32 = 20;
    pub const DATABASE_MIN_CONNECTIONS: u32 = 2;
    /// Bounds both waiting for a pooled connection and opening a new one.
    pub const DATABASE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Every statement of the service's pool is cancelled by PostgreSQL after this long: no
    /// request can hold a backend for minutes.
    pub const DATABASE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DATABASE_MAX_NAMESPACES: u32 = 1_000;
    /// Tried when no database URL is configured, before an embedded cluster is started.
    pub const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tasker";
    pub const EMBEDDED_DATA_DIR: &str = ".tasker/pg";
    pub const GRPC_BIND: &str = "127.0.0.1:50051";
    /// Large enough for a task of 1,000 steps with modest inputs; oversized requests are
    /// refused by the transport before they are decoded.
    pub const GRPC_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
    pub const GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Long-poll FetchSteps calls may wait up to this long; it bounds `wait_ms`.
    pub const GRPC_MAX_FETCH_WAIT: Duration = Duration::from_millis(20_000);
    /// The largest response the server encodes: gRPC clients refuse bigger ones by default.
    pub const GRPC_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
    /// Open connections at once. When every one is taken, the one idle longest (no call open)
    /// is closed to admit a newcomer; only when all have a call open is the newcomer refused.
    pub const GRPC_MAX_CONNECTIONS: usize = 1_024;
    /// Connections one peer address may hold: a quarter of the slots, so one host cannot take
    /// them all.
    pub const GRPC_MAX_CONNECTIONS_PER_PEER: usize = 256;
    /// A connection with no call open this long is closed (clients reconnect on their next
    /// call).
    pub const GRPC_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Health Watch streams open at once (callers need no token for them).
    pub const GRPC_MAX_HEALTH_WATCHES: usize = 1_024;
    /// WatchTask streams open at once. Streams of one task share its reads; each costs a
    /// snapshot when it opens and its messages.
    pub const GRPC_MAX_WATCH_STREAMS: usize = 4_096;
    /// ... from one caller (a token; without tokens, a peer address).
    pub const GRPC_MAX_WATCH_STREAMS_PER_CALLER: usize = 512;
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub const GRPC_MAX_CONCURRENT_STREAMS: u32 = 256;
    /// Requests one connection may have in the service at once.
    pub const GRPC_CONCURRENCY_PER_CONNECTION: usize = 256;
    pub const GRPC_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const GRPC_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const GRPC_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
    /// A new connection must finish its TLS handshake and send the HTTP/2 preface within this.
    pub const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// FetchSteps calls waiting at once, over all namespaces; beyond it, RESOURCE_EXHAUSTED.
    pub const MAX_PARKED_FETCHES: usize = 1_024;
    /// ... in one namespace: a namespace can take a quarter of them, not all.
    pub const MAX_PARKED_FETCHES_PER_NAMESPACE: usize = 256;
    /// ... from one caller (token, or peer address without tokens).
    pub const MAX_PARKED_FETCHES_PER_CALLER: usize = 256;
    /// The results of a step's parents, together, that the step can be given when it is
    /// leased; a completion that would take a child past it is refused.
    pub const MAX_PARENT_RESULTS_BYTES: usize = 1024 * 1024;
    pub const REPLICA_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    pub const REPLICA_GONE_AFTER: Duration = Duration::from_secs(5);
    pub const REPLICA_ANNOUNCE_GRACE: Duration = Duration::from_millis(5);
}

/// The longest a ready task waits for the fallback poller after its notification was lost,
/// with the default settings: the age threshold, then at most one polling period with its
/// +10 % jitter (2 s + 27.5 s). In general the bound is
/// `age_threshold + 1.1 x fallback_polling_interval`.
pub const MISSED_EVENT_BOUND: Duration = Duration::from_secs(30);

/// Durations in configuration files are whole numbers in the unit their key names
/// (`*_seconds`, `*_ms`).
mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// An optional value, written as `""` when absent (TOML has no null).
mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::str::FromStr;

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => "".serialize(s),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(serde::de::Error::custom)
    }
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
    pub workers: WorkersConfig,
    pub replicas: ReplicasConfig,
}

/// The replica registry: each service process heart-beats into the database, so replicas know
/// whether others are alive (and then announce enqueued steps to their parked fetches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasConfig {
    #[serde(rename = "heartbeat_interval_ms", with = "millis")]
    pub heartbeat_interval: Duration,
    /// A replica whose heartbeat is older than this is gone.
    #[serde(rename = "gone_after_ms", with = "millis")]
    pub gone_after: Duration,
    /// Steps queued here that no local fetch took are announced to the other replicas only
    /// if no local fetch takes them within this grace (0: at once).
    #[serde(rename = "announce_grace_ms", with = "millis")]
    pub announce_grace: Duration,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: defaults::REPLICA_HEARTBEAT_INTERVAL,
            gone_after: defaults::REPLICA_GONE_AFTER,
            announce_grace: defaults::REPLICA_ANNOUNCE_GRACE,
        }
    }
}

/// The workers' side: parked `FetchSteps` long-polls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// A parked fetch re-reads the queue this often even without a wake-up: a safety net
    /// for a wake-up that was missed (a step enqueued by another replica).
    #[serde(rename = "fetch_recheck_interval_ms", with = "millis")]
    pub fetch_recheck_interval: Duration,
    /// FetchSteps calls waiting at once (all namespaces); beyond it, RESOURCE_EXHAUSTED.
    pub max_parked_fetches: usize,
    /// ... in one namespace.
    pub max_parked_fetches_per_namespace: usize,
    /// ... from one caller: a token, or a peer address when no tokens are configured.
    pub max_parked_fetches_per_caller: usize,
    /// Bytes of parent results one step can be given (the sum over its parents).
    pub max_parent_results_bytes: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            fetch_recheck_interval: defaults::FETCH_RECHECK_INTERVAL,
            max_parked_fetches: defaults::MAX_PARKED_FETCHES,
            max_parked_fetches_per_namespace: defaults::MAX_PARKED_FETCHES_PER_NAMESPACE,
            max_parked_fetches_per_caller: defaults::MAX_PARKED_FETCHES_PER_CALLER,
            max_parent_results_bytes: defaults::MAX_PARENT_RESULTS_BYTES,
        }
    }
}

/// How workers' completions reach the database (see `completions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompletionsConfig {
    /// Completions committed together at most; 1 commits each on its own.
    pub max_batch: usize,
    /// Batches in flight at once.
    pub executors: usize,
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
    #[serde(rename = "fallback_polling_interval_seconds", with = "seconds")]
    pub fallback_polling_interval: Duration,
    #[serde(rename = "age_threshold_seconds", with = "seconds")]
    pub age_threshold: Duration,
    pub batch_size: u32,
    /// Namespaces this instance serves: exact names or prefix patterns ending in `*`
    /// (`billing-*`). Empty means all (the global channels).
    pub namespaces: Vec<String>,
    #[serde(rename = "listener_max_backoff_ms", with = "millis")]
    pub listener_max_backoff: Duration,
    #[serde(rename = "listener_ping_interval_seconds", with = "seconds")]
    pub listener_ping_interval: Duration,
}

impl Default for TaskReadinessConfig {
    fn default() -> Self {
        Self {
            fallback_polling_interval: defaults::FALLBACK_POLLING_INTERVAL,
            age_threshold: defaults::AGE_THRESHOLD,
            batch_size: defaults::BATCH_SIZE,
            namespaces: Vec::new(),
            listener_max_backoff: defaults::LISTENER_MAX_BACKOFF,
            listener_ping_interval: defaults::LISTENER_PING_INTERVAL,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandProcessorConfig {
    pub channel_capacity: usize,
    /// Lifecycle events kept for stream observers; one that falls further behind gets a gap
    /// event saying how many it missed.
    pub event_buffer: usize,
    pub max_concurrent_commands: usize,
    #[serde(rename = "claim_retry_delay_ms", with = "millis")]
    pub claim_retry_delay: Duration,
    pub claim_retry_attempts: u32,
    #[serde(rename = "shutdown_grace_period_seconds", with = "seconds")]
    pub shutdown_grace_period: Duration,
}

impl Default for CommandProcessorConfig {
    fn default() -> Self {
        Self {
            channel_capacity: defaults::COMMAND_CHANNEL_CAPACITY,
            event_buffer: defaults::EVENT_BUFFER,
            max_concurrent_commands: defaults::MAX_CONCURRENT_COMMANDS,
            claim_retry_delay: defaults::CLAIM_RETRY_DELAY,
            claim_retry_attempts: defaults::CLAIM_RETRY_ATTEMPTS,
            shutdown_grace_period: defaults::SHUTDOWN_GRACE_PERIOD,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `None` (`""` in files): use [`defaults::LOCAL_DATABASE_URL`] if it answers, else an
    /// embedded cluster.
    #[serde(with = "empty_is_none")]
    pub url: Option<String>,
    pub max_connections: u32,
    pub min_connections: u32,
    /// Waiting for a pooled connection, including opening a new one.
    #[serde(rename = "acquire_timeout_seconds", with = "seconds")]
    pub acquire_timeout: Duration,
    /// PostgreSQL cancels any statement of the service's pool that runs longer.
    #[serde(rename = "statement_timeout_ms", with = "millis")]
    pub statement_timeout: Duration,
    /// true: `url` must be set; no fallback to a local server or an embedded cluster.
    pub require_url: bool,
    pub embedded_data_dir: PathBuf,
    /// Namespaces the database may hold. Beyond it, RESOURCE_EXHAUSTED.
    pub max_namespaces: u32,
    /// true: the first CreateTask in a namespace creates it. false: only an admin does
    /// (AdminService.CreateNamespace).
    pub create_namespaces_on_first_use: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: defaults::DATABASE_MAX_CONNECTIONS,
            min_connections: defaults::DATABASE_MIN_CONNECTIONS,
            acquire_timeout: defaults::DATABASE_ACQUIRE_TIMEOUT,
            statement_timeout: defaults::DATABASE_STATEMENT_TIMEOUT,
            require_url: false,
            embedded_data_dir: PathBuf::from(defaults::EMBEDDED_DATA_DIR),
            max_namespaces: defaults::DATABASE_MAX_NAMESPACES,
            create_namespaces_on_first_use: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub bind: SocketAddr,
    pub max_request_bytes: usize,
    #[serde(rename = "request_timeout_seconds", with = "seconds")]
    pub request_timeout: Duration,
    #[serde(rename = "max_fetch_wait_ms", with = "millis")]
    pub max_fetch_wait: Duration,
    pub max_response_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    #[serde(rename = "idle_timeout_seconds", with = "seconds")]
    pub idle_timeout: Duration,
    pub max_health_watches: usize,
    pub max_watch_streams: usize,
    pub max_watch_streams_per_caller: usize,
    pub max_concurrent_streams: u32,
    pub concurrency_per_connection: usize,
    #[serde(rename = "http2_keepalive_interval_seconds", with = "seconds")]
    pub http2_keepalive_interval: Duration,
    #[serde(rename = "http2_keepalive_timeout_seconds", with = "seconds")]
    pub http2_keepalive_timeout: Duration,
    #[serde(rename = "tcp_keepalive_seconds", with = "seconds")]
    pub tcp_keepalive: Duration,
    #[serde(rename = "handshake_timeout_seconds", with = "seconds")]
    pub handshake_timeout: Duration,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            bind: defaults::GRPC_BIND
                .parse()
                .expect("a valid default address"),
            max_request_bytes: defaults::GRPC_MAX_REQUEST_BYTES,
            request_timeout: defaults::GRPC_REQUEST_TIMEOUT,
            max_fetch_wait: defaults::GRPC_MAX_FETCH_WAIT,
            max_response_bytes: defaults::GRPC_MAX_RESPONSE_BYTES,
            max_connections: defaults::GRPC_MAX_CONNECTIONS,
            max_connections_per_peer: defaults::GRPC_MAX_CONNECTIONS_PER_PEER,
            idle_timeout: defaults::GRPC_IDLE_TIMEOUT,
            max_health_watches: defaults::GRPC_MAX_HEALTH_WATCHES,
            max_watch_streams: defaults::GRPC_MAX_WATCH_STREAMS,
            max_watch_streams_per_caller: defaults::GRPC_MAX_WATCH_STREAMS_PER_CALLER,
            max_concurrent_streams: defaults::GRPC_MAX_CONCURRENT_STREAMS,
            concurrency_per_connection: defaults::GRPC_CONCURRENCY_PER_CONNECTION,
            http2_keepalive_interval: defaults::GRPC_HTTP2_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: defaults::GRPC_HTTP2_KEEPALIVE_TIMEOUT,
            tcp_keepalive: defaults::GRPC_TCP_KEEPALIVE,
            handshake_timeout: defaults::GRPC_HANDSHAKE_TIMEOUT,
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
    /// PEM certificate chain; set together with `key_path`.
    #[serde(with = "empty_is_none")]
    pub cert_path: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub key_path: Option<PathBuf>,
    /// true: allow tokens over plaintext on a non-loopback address (for a TLS-terminating
    /// proxy in front of the service). Off by default: tokens must not cross a network in
    /// the clear.
    pub allow_plaintext: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An env-filter directive; `RUST_LOG` overrides it.
    pub log_filter: String,
    /// OTLP/gRPC endpoint; `None` disables export unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(with = "empty_is_none")]
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Fraction of root traces sampled, 0.0 ..= 1.0.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info,sqlx=warn".to_string(),
            otlp_endpoint: None,
            service_name: "tasker".to_string(),
            sample_ratio: 1.0,
        }
    }
}

/// `hash_token("")`: refused as a configured hash, since it admits an empty bearer token.
const EMPTY_TOKEN_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The hex SHA-256 of a token, as stored in `grpc.auth.tokens[].sha256`.
pub fn hash_token(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub use crate::model::namespaces::{namespace_name_problem, MAX_NAMESPACE_BYTES};

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
    /// Must exist, with `environments/<environment>`: a service started where its
    /// configuration is not must not run on the defaults unnoticed.
    pub config_dir: PathBuf,
    pub environment: String,
    /// Read from the process environment when `None`.
    pub env_vars: Option<Vec<(String, String)>>,
    pub overrides: Vec<(String, Value)>,
    /// Asked for explicitly (`--builtin-defaults`): the compiled defaults, the environment
    /// variables and the overrides, with no configuration directory (environment
    /// `development` only: the other environments are overlays in a directory).
    pub builtin_defaults: bool,
}

/// Where the configuration is looked for when neither `--config-dir` nor `TASKER_CONFIG_DIR`
/// says: the working directory's `config/tasker` (a checkout), then the installed one.
pub const CONFIG_DIRS: [&str; 2] = ["config/tasker", "/etc/tasker"];

impl ConfigSources {
    /// `TASKER_CONFIG_DIR`, else the first of [`CONFIG_DIRS`] that exists (else the first, to
    /// be reported missing); `TASKER_ENV` (default `development`).
    pub fn from_process_env() -> Self {
        let config_dir = std::env::var_os("TASKER_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let found = CONFIG_DIRS.iter().map(PathBuf::from).find(|d| d.is_dir());
                found.unwrap_or_else(|| PathBuf::from(CONFIG_DIRS[0]))
            });
        Self {
            config_dir,
            environment: std::env::var("TASKER_ENV").unwrap_or_else(|_| "development".into()),
            env_vars: None,
            overrides: Vec::new(),
            builtin_defaults: false,
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
    if sources.builtin_defaults {
        if sources.environment != "development" {
            problems.push(ConfigProblem {
                key: "TASKER_ENV".into(),
                message: format!(
                    "environment {:?} is an overlay in a configuration directory, and --builtin-defaults uses none: give the directory (--config-dir, TASKER_CONFIG_DIR), or run environment development",
                    sources.environment
                ),
                source: Some("environment variable TASKER_ENV or --env".into()),
            });
        }
    } else if !sources.config_dir.is_dir() {
        problems.push(ConfigProblem {
            key: "TASKER_CONFIG_DIR".into(),
            message: format!(
                "configuration directory {} does not exist (without --config-dir or TASKER_CONFIG_DIR, Tasker looks for {}); give the directory, or pass --builtin-defaults to run on the compiled defaults",
                sources.config_dir.display(),
                CONFIG_DIRS.join(", then ")
            ),
            source: Some("--config-dir, TASKER_CONFIG_DIR or the working directory".into()),
        });
    } else {
        let base = sources.config_dir.join("base");
        for file in toml_files(&base) {
            figment = figment.merge(Toml::file_exact(file));
        }
        let env_dir = sources
            .config_dir
            .join("environments")
            .join(&sources.environment);
        if !env_dir.is_dir() {
            problems.push(ConfigProblem {
                key: "TASKER_ENV".into(),
                message: format!(
                    "unknown environment {:?}: no directory {}",
                    sources.environment,
                    env_dir.display()
                ),
                source: Some("environment variable TASKER_ENV or --env".into()),
            });
        }
        for file in toml_files(&env_dir) {
            figment = figment.merge(Toml::file_exact(file));
        }
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
        let Some(rest) = k.strip_prefix("TASKER_") else {
            continue;
        };
        if rest.contains("__") {
            let key = rest.to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(Layer::new(
                &format!("environment variable {k}"),
                &key,
                parse_env_value(v),
            ));
        } else if !PROCESS_VARIABLES.contains(&k.as_str()) {
            problems.push(ConfigProblem {
                key: k.clone(),
                message: format!(
                    "not a setting: settings are TASKER_<SECTION>__<KEY> with `__` between levels{}; the process's own variables are {}",
                    meant_setting(rest)
                        .map(|s| format!(" (did you mean {s}?)"))
                        .unwrap_or_default(),
                    PROCESS_VARIABLES.join(", ")
                ),
                source: Some(format!("environment variable {k}")),
            });
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

/// `TASKER_` variables that belong to the process (the binary's flags read them), not to the
/// configuration.
pub const PROCESS_VARIABLES: [&str; 5] = [
    "TASKER_ENV",
    "TASKER_CONFIG_DIR",
    "TASKER_ENDPOINT",
    "TASKER_TOKEN",
    "TASKER_CA_CERT",
];

/// For a variable written with single underscores (`DATABASE_URL`), the `__` spelling of a
/// setting it matches (`TASKER_DATABASE__URL`), if any.
fn meant_setting(rest: &str) -> Option<String> {
    let defaults = serde_json::to_value(TaskerConfig::default()).ok()?;
    let lower = rest.to_ascii_lowercase();
    let mut found = None;
    walk_leaves(&defaults, &mut Vec::new(), &mut |path| {
        if path.join("_") == lower {
            found = Some(format!("TASKER_{}", path.join("__").to_ascii_uppercase()));
        }
    });
    found
}

fn walk_leaves(value: &Value, path: &mut Vec<String>, f: &mut impl FnMut(&[String])) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(k.clone());
                walk_leaves(v, path, f);
                path.pop();
            }
        }
        _ => f(path),
    }
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
/// a TOML array/table when the text parses as one, otherwise a string. A JSON array or object
/// is taken as JSON (`TASKER_GRPC__AUTH__TOKENS='[{"name": "ci", ...}]'`), since that is what
/// people write in environment variables; TOML inline tables work too.
fn parse_env_value(raw: &str) -> Value {
    let trimmed = raw.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<Value>(raw) {
            return v;
        }
    }
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
    Some(match &meta.source {
        Some(figment::Source::File(p)) => p.display().to_string(),
        // the compiled defaults (`Serialized::defaults`) are not a source worth naming
        Some(figment::Source::Code(_)) => return None,
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
    /// Range and cross-field rules: (dotted key, message) for every violation. Types (whole
    /// numbers, addresses, enums) were already checked while reading.
    pub fn validate(&self, environment: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut range = |key: &str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                out.push((
                    key.to_string(),
                    format!("must be between {min} and {max}, is {value}"),
                ));
            }
        };
        let tr = &self.orchestration.task_readiness;
        let cp = &self.orchestration.command_processor;
        let co = &self.orchestration.completions;
        let db = &self.database;
        let g = &self.grpc;
        const DAY_S: u64 = 86_400;
        range(
            "orchestration.task_readiness.fallback_polling_interval_seconds",
            tr.fallback_polling_interval.as_secs(),
            1,
            DAY_S,
        );
        range(
            "orchestration.task_readiness.age_threshold_seconds",
            tr.age_threshold.as_secs(),
            0,
            DAY_S,
        );
        range(
            "orchestration.task_readiness.batch_size",
            tr.batch_size.into(),
            1,
            10_000,
        );
        range(
            "orchestration.task_readiness.listener_max_backoff_ms",
            tr.listener_max_backoff.as_millis() as u64,
            100,
            600_000,
        );
        range(
            "orchestration.task_readiness.listener_ping_interval_seconds",
            tr.listener_ping_interval.as_secs(),
            1,
            3_600,
        );
        range(
            "orchestration.command_processor.channel_capacity",
            cp.channel_capacity as u64,
            1,
            1_000_000,
        );
        range(
            "orchestration.command_processor.event_buffer",
            cp.event_buffer as u64,
            1,
            1_000_000,
        );
        range(
            "orchestration.command_processor.max_concurrent_commands",
            cp.max_concurrent_commands as u64,
            1,
            1_000,
        );
        range(
            "orchestration.command_processor.claim_retry_delay_ms",
            cp.claim_retry_delay.as_millis() as u64,
            1,
            60_000,
        );
        range(
            "orchestration.command_processor.claim_retry_attempts",
            cp.claim_retry_attempts.into(),
            0,
            100,
        );
        range(
            "orchestration.command_processor.shutdown_grace_period_seconds",
            cp.shutdown_grace_period.as_secs(),
            0,
            3_600,
        );
        range(
            "orchestration.completions.max_batch",
            co.max_batch as u64,
            1,
            10_000,
        );
        range(
            "orchestration.workers.fetch_recheck_interval_ms",
            self.orchestration
                .workers
                .fetch_recheck_interval
                .as_millis() as u64,
            10,
            DAY_S * 1000,
        );
        range(
            "orchestration.completions.executors",
            co.executors as u64,
            1,
            64,
        );
        range(
            "database.max_connections",
            db.max_connections.into(),
            2,
            10_000,
        );
        range(
            "database.min_connections",
            db.min_connections.into(),
            0,
            10_000,
        );
        range(
            "database.acquire_timeout_seconds",
            db.acquire_timeout.as_secs(),
            1,
            3_600,
        );
        range(
            "database.statement_timeout_ms",
            db.statement_timeout.as_millis() as u64,
            100,
            DAY_S * 1000,
        );
        range(
            "database.max_namespaces",
            u64::from(db.max_namespaces),
            1,
            1_000_000,
        );
        let rp = &self.orchestration.replicas;
        range(
            "orchestration.replicas.heartbeat_interval_ms",
            rp.heartbeat_interval.as_millis() as u64,
            100,
            60_000,
        );
        range(
            "orchestration.replicas.announce_grace_ms",
            rp.announce_grace.as_millis() as u64,
            0,
            1_000,
        );
        let wk = &self.orchestration.workers;
        range(
            "orchestration.workers.max_parked_fetches",
            wk.max_parked_fetches as u64,
            1,
            1_000_000,
        );
        range(
            "orchestration.workers.max_parked_fetches_per_namespace",
            wk.max_parked_fetches_per_namespace as u64,
            1,
            1_000_000,
        );
        range(
            "orchestration.workers.max_parked_fetches_per_caller",
            wk.max_parked_fetches_per_caller as u64,
            1,
            1_000_000,
        );
        range(
            "orchestration.workers.max_parent_results_bytes",
            wk.max_parent_results_bytes as u64,
            1024,
            1 << 30,
        );
        range(
            "grpc.max_response_bytes",
            g.max_response_bytes as u64,
            64 * 1024,
            1 << 30,
        );
        range(
            "grpc.max_connections",
            g.max_connections as u64,
            1,
            1_000_000,
        );
        range(
            "grpc.max_connections_per_peer",
            g.max_connections_per_peer as u64,
            1,
            1_000_000,
        );
        range(
            "grpc.idle_timeout_seconds",
            g.idle_timeout.as_secs(),
            1,
            DAY_S,
        );
        range(
            "grpc.max_health_watches",
            g.max_health_watches as u64,
            1,
            1_000_000,
        );
        range(
            "grpc.max_watch_streams",
            g.max_watch_streams as u64,
            1,
            1_000_000,
        );
        range(
            "grpc.max_watch_streams_per_caller",
            g.max_watch_streams_per_caller as u64,
            1,
            1_000_000,
        );
        range(
            "grpc.max_concurrent_streams",
            g.max_concurrent_streams.into(),
            1,
            100_000,
        );
        range(
            "grpc.concurrency_per_connection",
            g.concurrency_per_connection as u64,
            1,
            100_000,
        );
        range(
            "grpc.http2_keepalive_interval_seconds",
            g.http2_keepalive_interval.as_secs(),
            1,
            DAY_S,
        );
        range(
            "grpc.http2_keepalive_timeout_seconds",
            g.http2_keepalive_timeout.as_secs(),
            1,
            3_600,
        );
        range(
            "grpc.tcp_keepalive_seconds",
            g.tcp_keepalive.as_secs(),
            1,
            DAY_S,
        );
        range(
            "grpc.handshake_timeout_seconds",
            g.handshake_timeout.as_secs(),
            1,
            3_600,
        );
        range(
            "grpc.max_request_bytes",
            g.max_request_bytes as u64,
            1024,
            1 << 30,
        );
        range(
            "grpc.request_timeout_seconds",
            g.request_timeout.as_secs(),
            1,
            DAY_S,
        );
        range(
            "grpc.max_fetch_wait_ms",
            g.max_fetch_wait.as_millis() as u64,
            0,
            DAY_S * 1000,
        );

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
        if cp.max_concurrent_commands as u64 >= u64::from(db.max_connections) {
            out.push((
                "orchestration.command_processor.max_concurrent_commands".into(),
                format!(
                    "must be less than database.max_connections ({} >= {}), or commands starve every other database user",
                    cp.max_concurrent_commands, db.max_connections
                ),
            ));
        }
        if let Some(url) = &db.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                out.push((
                    "database.url".into(),
                    "must start with postgres:// or postgresql://".into(),
                ));
            }
        }
        if g.max_fetch_wait >= g.request_timeout {
            out.push((
                "grpc.max_fetch_wait_ms".into(),
                format!(
                    "must be less than grpc.request_timeout_seconds ({} ms >= {} s), or long-polls are cut off by the request timeout",
                    g.max_fetch_wait.as_millis(),
                    g.request_timeout.as_secs()
                ),
            ));
        }
        if !g.bind.ip().is_loopback() && g.auth.tokens.is_empty() {
            out.push((
                "grpc.auth.tokens".into(),
                format!(
                    "grpc.bind {} is reachable from other hosts: configure tokens, or bind to 127.0.0.1",
                    g.bind
                ),
            ));
        }
        // one step (its inputs, its parents' results, names and ids) must always fit in a
        // FetchSteps response, or it could never be delivered
        let one_step =
            wk.max_parent_results_bytes + crate::model::limits::MAX_DOCUMENT_BYTES + 64 * 1024;
        if one_step > g.max_response_bytes {
            out.push((
                "orchestration.workers.max_parent_results_bytes".into(),
                format!(
                    "plus a step's inputs ({} bytes) and 64 KiB must fit in grpc.max_response_bytes ({} + {} + {} > {}), or a step could be too large to deliver",
                    crate::model::limits::MAX_DOCUMENT_BYTES,
                    wk.max_parent_results_bytes,
                    crate::model::limits::MAX_DOCUMENT_BYTES,
                    64 * 1024,
                    g.max_response_bytes
                ),
            ));
        }
        if db.require_url && db.url.is_none() {
            out.push((
                "database.url".into(),
                format!(
                    "must be set: database.require_url = true (environment {environment:?}) does not fall back to a local server or an embedded cluster"
                ),
            ));
        }
        let tls_on = g.tls.cert_path.is_some() && g.tls.key_path.is_some();
        if !g.bind.ip().is_loopback()
            && !g.auth.tokens.is_empty()
            && !tls_on
            && !g.tls.allow_plaintext
        {
            out.push((
                "grpc.tls".into(),
                format!(
                    "grpc.bind {} is reachable from other hosts, and bearer tokens would cross the network in cleartext: set grpc.tls.cert_path and grpc.tls.key_path, or grpc.tls.allow_plaintext = true behind a TLS-terminating proxy",
                    g.bind
                ),
            ));
        }
        if rp.gone_after < rp.heartbeat_interval * 2 {
            out.push((
                "orchestration.replicas.gone_after_ms".into(),
                format!(
                    "must be at least twice heartbeat_interval_ms ({} ms), is {} ms",
                    rp.heartbeat_interval.as_millis(),
                    rp.gone_after.as_millis()
                ),
            ));
        }
        if g.tls.cert_path.is_some() != g.tls.key_path.is_some() {
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
            } else if t.sha256.eq_ignore_ascii_case(EMPTY_TOKEN_SHA256) {
                out.push((
                    format!("{key}.sha256"),
                    "is the SHA-256 of the empty string: it would admit a request with an empty bearer token"
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

/// A URL with its secrets replaced: the password in the userinfo
/// (`postgres://user:secret@host/db` -> `postgres://user:<redacted>@host/db`) and any
/// `password`, `sslpassword` or `passfile`-like query parameter.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=<redacted>")
                    }
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:<redacted>@h:5432/db"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=secret&sslmode=require"),
            "postgres://u@h/db?password=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db?sslpassword=x"),
            "postgres://u:<redacted>@h/db?sslpassword=<redacted>"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
