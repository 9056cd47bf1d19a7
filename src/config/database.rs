//! `[database]`: where the database is (or how to find or start one), the pool, and what the
//! database may hold.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::{Checks, DAY_S};
use super::units::{empty_is_none, millis, seconds};

/// Tried when no database URL is configured, before an embedded cluster is started.
pub const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tasker";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `None` (`""` in files): use [`LOCAL_DATABASE_URL`] if it answers, else an embedded
    /// cluster.
    #[serde(with = "empty_is_none")]
    pub url: Option<String>,
    /// The pool's size; the hop's statements keep up to 8 of its connections (at most half)
    /// between uses.
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
            max_connections: 20,
            min_connections: 2,
            // Bounds both waiting for a pooled connection and opening a new one.
            acquire_timeout: Duration::from_secs(5),
            // No request can hold a backend for minutes.
            statement_timeout: Duration::from_secs(30),
            require_url: false,
            embedded_data_dir: PathBuf::from(".tasker/pg"),
            max_namespaces: 1_000,
            // Development's convenience; production's overlay turns it off.
            create_namespaces_on_first_use: true,
        }
    }
}

impl DatabaseConfig {
    pub(super) fn validate(&self, c: &mut Checks, environment: &str) {
        c.range("max_connections", self.max_connections, 2, 10_000);
        c.range("min_connections", self.min_connections, 0, 10_000);
        c.seconds("acquire_timeout_seconds", self.acquire_timeout, 1, 3_600);
        c.millis(
            "statement_timeout_ms",
            self.statement_timeout,
            100,
            DAY_S * 1000,
        );
        c.range("max_namespaces", self.max_namespaces, 1, 1_000_000);
        if self.min_connections > self.max_connections {
            c.problem(
                "min_connections",
                format!(
                    "must not exceed database.max_connections ({} > {})",
                    self.min_connections, self.max_connections
                ),
            );
        }
        if let Some(url) = &self.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                c.problem("url", "must start with postgres:// or postgresql://");
            }
        }
        if self.require_url && self.url.is_none() {
            c.problem(
                "url",
                format!(
                    "must be set: database.require_url = true (environment {environment:?}) does not fall back to a local server or an embedded cluster"
                ),
            );
        }
    }
}
