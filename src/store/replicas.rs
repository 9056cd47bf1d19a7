//! The replica registry's rows: heartbeats, goodbyes, and the fleet as the database sees it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::config::DeploymentMode;

/// What a heartbeat learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub other_replicas: i32,
    /// Set through SetDeploymentMode with the fleet scope; `None` when never set or cleared.
    pub fleet_mode: Option<DeploymentMode>,
    /// The replicas alive and listening (this one included if it listens), sorted.
    pub claimers: Vec<Uuid>,
}

/// A replica as registered.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ReplicaRecord {
    pub replica_id: Uuid,
    pub address: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Its deployment mode as of its last heartbeat.
    pub deployment_mode: Option<String>,
    /// Whether its LISTEN connection was up at its last heartbeat.
    pub listening: bool,
    /// Whether it serves every namespace (no `orchestration.task_readiness.namespaces`);
    /// a claimer must.
    pub serves_every_namespace: bool,
}

impl Store {
    /// Create or refresh this replica's row (with its mode, whether it listens and whether it
    /// serves every namespace); how many other replicas are alive (heart-beat within
    /// `gone_after`), the fleet's deployment mode, and the claimers (alive, listening, serving
    /// every namespace).
    pub async fn replica_heartbeat(
        &self,
        replica_id: Uuid,
        address: &str,
        gone_after: Duration,
        mode: DeploymentMode,
        listening: bool,
        serves_every_namespace: bool,
    ) -> Result<Heartbeat, StoreError> {
        let (other_replicas, fleet_mode, claimers): (i32, Option<String>, Vec<Uuid>) =
            sqlx::query_as(
                "SELECT other_replicas, fleet_mode, claimers
                 FROM tasker.replica_heartbeat($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(replica_id)
            .bind(address)
            .bind(env!("CARGO_PKG_VERSION"))
            .bind(gone_after.as_millis() as i64)
            .bind(mode.to_string())
            .bind(listening)
            .bind(serves_every_namespace)
            .fetch_one(&self.pool)
            .await?;
        let fleet_mode = fleet_mode
            .map(|m| {
                m.parse::<DeploymentMode>()
                    .map_err(|_| StoreError::unexpected("tasker.replica_heartbeat", &m))
            })
            .transpose()?;
        Ok(Heartbeat {
            other_replicas,
            fleet_mode,
            claimers,
        })
    }

    /// Set (`None`: clear) the fleet's deployment mode, announced to every replica.
    pub async fn set_fleet_mode(&self, mode: Option<DeploymentMode>) -> Result<(), StoreError> {
        sqlx::query("SELECT tasker.set_fleet_mode($1)")
            .bind(mode.map(|m| m.to_string()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Tell the other replicas' parked fetches of steps queued by `replica` (namespace, steps)
    /// on `tasker_steps_enqueued`, in one statement. Asynchronous commit: the transaction
    /// writes nothing but the notifications, which are sent at commit either way.
    pub async fn announce_steps(
        &self,
        queued: &[((String, String), u32)],
        replica: Uuid,
    ) -> Result<(), StoreError> {
        let payloads: Vec<String> = queued
            .iter()
            .map(|((namespace, queue), steps)| {
                serde_json::json!({"namespace": namespace, "queue": queue, "steps": steps, "replica": replica})
                    .to_string()
            })
            .collect();
        sqlx::query(
            "SELECT pg_notify('tasker_steps_enqueued', p)
             FROM (SELECT set_config('synchronous_commit', 'off', true)) s, unnest($1::text[]) p",
        )
        .bind(payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn remove_replica(&self, replica_id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM tasker.replicas WHERE replica_id = $1")
            .bind(replica_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Replicas alive (heart-beat within `gone_after`), oldest first.
    pub async fn live_replicas(
        &self,
        gone_after: Duration,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        Ok(sqlx::query_as::<_, ReplicaRecord>(
            "SELECT replica_id, address, version, started_at, heartbeat_at, deployment_mode,
                    listening, serves_every_namespace
             FROM tasker.replicas
             WHERE heartbeat_at >= clock_timestamp() - make_interval(secs => $1 / 1000.0)
             ORDER BY started_at, replica_id",
        )
        .bind(gone_after.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?)
    }
}
