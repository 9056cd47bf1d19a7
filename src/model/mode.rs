//! The deployment mode: which of the readiness systems run (the listener, the fallback poller).
//! It belongs to the readiness domain, and lives with the domain's other words below every
//! subsystem because the configuration (which reads it), the store (which records a replica's
//! and the fleet's mode) and telemetry name it too; readiness's `DeploymentModeController`
//! applies it.

use serde::{Deserialize, Serialize};

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

impl std::fmt::Display for DeploymentMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
