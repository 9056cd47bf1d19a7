//! `[telemetry]`: logs and OpenTelemetry export.

use serde::{Deserialize, Serialize};

use super::checks::Checks;
use super::units::empty_is_none;

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
            // sqlx logs every statement at info
            log_filter: "info,sqlx=warn".to_string(),
            otlp_endpoint: None,
            service_name: "tasker".to_string(),
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    pub(super) fn validate(&self, c: &mut Checks) {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            c.problem(
                "sample_ratio",
                format!("must be between 0.0 and 1.0, is {}", self.sample_ratio),
            );
        }
        if self.service_name.is_empty() {
            c.problem("service_name", "must not be empty");
        }
    }
}
