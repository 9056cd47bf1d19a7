//! `TableMaintenance`: keeps the churn tables healthy when PostgreSQL's autovacuum is off.
//!
//! Every step attempt inserts and deletes a queue row and updates its step row three times.
//! Without vacuum the dead versions pile up and every fetch, readiness check and enqueue
//! walks past more of them. With autovacuum off (this machine's server) nothing removes them,
//! so the service does what autovacuum would do with the schema's per-table settings: a
//! `VACUUM (ANALYZE)` of the churn tables every [`MAINTENANCE_INTERVAL`]. Why every minute:
//! in 5-minute soaks at 200 steps/s, a server whose autovacuum vacuumed these tables about
//! once a minute kept the completion -> enqueue p50 flat, while a vacuum only every five
//! minutes let it more than double before each vacuum. With autovacuum on this loop only
//! checks once. `SKIP_LOCKED`, so instances sharing a database never queue behind each other.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the churn tables are vacuumed and analyzed when autovacuum is off: autovacuum's
/// own default cadence (`autovacuum_naptime`).
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

pub struct TableMaintenance {
    store: Store,
}

impl TableMaintenance {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn run(self, cancel: CancellationToken) {
        match self.store.autovacuum_enabled().await {
            Ok(true) => return,
            Ok(false) => tracing::warn!(
                vacuum_every_s = MAINTENANCE_INTERVAL.as_secs(),
                "autovacuum is off on this server: Tasker will analyze and vacuum its queue and step tables itself"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the autovacuum setting; vacuuming the churn tables periodically");
            }
        }
        let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
        tick.tick().await; // the first tick is immediate: nothing to clean yet
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.store.maintain_churn_tables().await {
                tracing::warn!(error = %e, "maintenance of the churn tables failed; will retry");
            }
        }
    }
}
