//! `TableMaintenance`: keeps the churn tables healthy when PostgreSQL's autovacuum is off.
//!
//! Every step attempt inserts and deletes a queue row and updates its step row three times
//! (not HOT: the pending-steps index depends on `state`). Without vacuum the dead versions
//! pile up and every fetch, readiness check and enqueue slows down with them. Measured in a
//! soak at 200 steps/s on a server with `autovacuum = off`: completion -> enqueue p50 went
//! from 2 ms to 20 ms in four minutes (no statistics, dead rows), and back to 1.9 ms, flat
//! for the following five minutes, after one `VACUUM (ANALYZE)`. Vacuuming every 30 s held
//! it at 10-13 ms instead: on a small machine a full-speed vacuum costs more than the dead
//! rows do. So: fresh statistics often ([`ANALYZE_INTERVAL`], cheap), vacuum rarely
//! ([`VACUUM_INTERVAL`]). With autovacuum on, the per-table settings in the schema migration
//! do the job and this loop only checks once. `SKIP_LOCKED` so instances sharing a database
//! never queue behind each other.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the churn tables' statistics are refreshed when autovacuum is off.
pub const ANALYZE_INTERVAL: Duration = Duration::from_secs(60);
/// How often they are vacuumed (which also analyzes).
pub const VACUUM_INTERVAL: Duration = Duration::from_secs(300);

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
                analyze_every_s = ANALYZE_INTERVAL.as_secs(),
                vacuum_every_s = VACUUM_INTERVAL.as_secs(),
                "autovacuum is off on this server: Tasker will analyze and vacuum its queue and step tables itself"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the autovacuum setting; vacuuming the churn tables periodically");
            }
        }
        let mut tick = tokio::time::interval(ANALYZE_INTERVAL);
        tick.tick().await; // the first tick is immediate: nothing to clean yet
        let per_vacuum = (VACUUM_INTERVAL.as_secs() / ANALYZE_INTERVAL.as_secs()).max(1);
        for round in 1u64.. {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let vacuum = round % per_vacuum == 0;
            if let Err(e) = self.store.maintain_churn_tables(vacuum).await {
                tracing::warn!(error = %e, vacuum, "maintenance of the churn tables failed; will retry");
            }
        }
    }
}
