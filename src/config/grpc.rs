//! `[grpc]`, `[grpc.auth]`, `[grpc.tls]`: the listening address, the limits every connection and
//! call is held to, bearer tokens and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::{Checks, DAY_S};
use super::units::{empty_is_none, millis, seconds};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub bind: SocketAddr,
    pub max_request_bytes: usize,
    #[serde(rename = "request_timeout_seconds", with = "seconds")]
    pub request_timeout: Duration,
    /// The longest a FetchSteps long-poll may wait; it bounds `wait_ms`.
    #[serde(rename = "max_fetch_wait_ms", with = "millis")]
    pub max_fetch_wait: Duration,
    /// The largest response the server encodes.
    pub max_response_bytes: usize,
    /// Open connections at once. When every one is taken, the one idle longest (no call open)
    /// is closed to admit a newcomer; only when all have a call open is the newcomer refused.
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// A connection with no call open this long is closed (clients reconnect on their next
    /// call).
    #[serde(rename = "idle_timeout_seconds", with = "seconds")]
    pub idle_timeout: Duration,
    /// Health Watch streams open at once (callers need no token for them).
    pub max_health_watches: usize,
    /// WatchTask streams open at once. Streams of one task share its reads; each costs a
    /// snapshot when it opens and its messages.
    pub max_watch_streams: usize,
    /// ... from one caller (a token; without tokens, a peer address).
    pub max_watch_streams_per_caller: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests one connection may have in the service at once.
    pub concurrency_per_connection: usize,
    #[serde(rename = "http2_keepalive_interval_seconds", with = "seconds")]
    pub http2_keepalive_interval: Duration,
    #[serde(rename = "http2_keepalive_timeout_seconds", with = "seconds")]
    pub http2_keepalive_timeout: Duration,
    #[serde(rename = "tcp_keepalive_seconds", with = "seconds")]
    pub tcp_keepalive: Duration,
    /// A new connection must finish its TLS handshake and send the HTTP/2 preface within this.
    #[serde(rename = "handshake_timeout_seconds", with = "seconds")]
    pub handshake_timeout: Duration,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 50051)),
            // Large enough for a task of 1,000 steps with modest inputs; bigger requests are
            // refused by the transport before they are decoded.
            max_request_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_fetch_wait: Duration::from_millis(20_000),
            // gRPC clients refuse bigger responses by default.
            max_response_bytes: 4 * 1024 * 1024,
            max_connections: 1_024,
            // A quarter of the slots, so one host cannot take them all.
            max_connections_per_peer: 256,
            idle_timeout: Duration::from_secs(300),
            max_health_watches: 1_024,
            max_watch_streams: 4_096,
            max_watch_streams_per_caller: 512,
            max_concurrent_streams: 256,
            concurrency_per_connection: 256,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl GrpcConfig {
    pub(super) fn validate(&self, c: &mut Checks, environment: &str) {
        c.range(
            "max_response_bytes",
            self.max_response_bytes,
            64 * 1024,
            1 << 30,
        );
        c.range("max_connections", self.max_connections, 1, 1_000_000);
        c.range(
            "max_connections_per_peer",
            self.max_connections_per_peer,
            1,
            1_000_000,
        );
        c.seconds("idle_timeout_seconds", self.idle_timeout, 1, DAY_S);
        c.range("max_health_watches", self.max_health_watches, 1, 1_000_000);
        c.range("max_watch_streams", self.max_watch_streams, 1, 1_000_000);
        c.range(
            "max_watch_streams_per_caller",
            self.max_watch_streams_per_caller,
            1,
            1_000_000,
        );
        c.range(
            "max_concurrent_streams",
            self.max_concurrent_streams,
            1,
            100_000,
        );
        c.range(
            "concurrency_per_connection",
            self.concurrency_per_connection,
            1,
            100_000,
        );
        c.seconds(
            "http2_keepalive_interval_seconds",
            self.http2_keepalive_interval,
            1,
            DAY_S,
        );
        c.seconds(
            "http2_keepalive_timeout_seconds",
            self.http2_keepalive_timeout,
            1,
            3_600,
        );
        c.seconds("tcp_keepalive_seconds", self.tcp_keepalive, 1, DAY_S);
        c.seconds(
            "handshake_timeout_seconds",
            self.handshake_timeout,
            1,
            3_600,
        );
        c.range("max_request_bytes", self.max_request_bytes, 1024, 1 << 30);
        c.seconds("request_timeout_seconds", self.request_timeout, 1, DAY_S);
        c.millis("max_fetch_wait_ms", self.max_fetch_wait, 0, DAY_S * 1000);
        if self.max_fetch_wait >= self.request_timeout {
            c.problem(
                "max_fetch_wait_ms",
                format!(
                    "must be less than grpc.request_timeout_seconds ({} ms >= {} s), or long-polls are cut off by the request timeout",
                    self.max_fetch_wait.as_millis(),
                    self.request_timeout.as_secs()
                ),
            );
        }
        let reachable = !self.bind.ip().is_loopback();
        if reachable && self.auth.tokens.is_empty() {
            c.problem(
                "auth.tokens",
                format!(
                    "grpc.bind {} is reachable from other hosts: configure tokens, or bind to 127.0.0.1",
                    self.bind
                ),
            );
        }
        let tls_on = self.tls.cert_path.is_some() && self.tls.key_path.is_some();
        if reachable && !self.auth.tokens.is_empty() && !tls_on && !self.tls.allow_plaintext {
            c.problem(
                "tls",
                format!(
                    "grpc.bind {} is reachable from other hosts, and bearer tokens would cross the network in cleartext: set grpc.tls.cert_path and grpc.tls.key_path, or grpc.tls.allow_plaintext = true behind a TLS-terminating proxy",
                    self.bind
                ),
            );
        }
        self.tls.validate(&mut c.section("tls"));
        self.auth.validate(&mut c.section("auth"), environment);
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

/// Scopes a token may carry.
pub const SCOPES: [&str; 3] = ["read", "write", "admin"];

/// The SHA-256 of the empty string: refused as a configured hash, since it admits an empty
/// bearer token.
const EMPTY_TOKEN_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl AuthConfig {
    fn validate(&self, c: &mut Checks, environment: &str) {
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("tokens[{i}]");
            if t.name.is_empty() {
                c.problem(&format!("{key}.name"), "must not be empty");
            }
            if t.sha256.len() != 64 || !t.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                c.problem(
                    &format!("{key}.sha256"),
                    "must be the 64 hex digits of the token's SHA-256 (see `tasker token hash`)",
                );
            } else if t.sha256.eq_ignore_ascii_case(EMPTY_TOKEN_SHA256) {
                c.problem(
                    &format!("{key}.sha256"),
                    "is the SHA-256 of the empty string: it would admit a request with an empty bearer token",
                );
            }
            if t.scopes.is_empty() {
                c.problem(&format!("{key}.scopes"), "must name at least one scope");
            }
            for s in &t.scopes {
                if !SCOPES.contains(&s.as_str()) {
                    c.problem(
                        &format!("{key}.scopes"),
                        format!("unknown scope {s:?}; expected read, write or admin"),
                    );
                }
            }
        }
        if self.required && self.tokens.is_empty() {
            c.problem(
                "tokens",
                format!(
                    "at least one token is required (grpc.auth.required = true in environment {environment:?})"
                ),
            );
        }
    }
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

impl TlsConfig {
    fn validate(&self, c: &mut Checks) {
        if self.cert_path.is_some() != self.key_path.is_some() {
            // the section's own key: the rule is about the pair
            c.problem("", "cert_path and key_path must be set together");
        }
    }
}
