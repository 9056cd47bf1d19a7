//! `ctl status`: the replica's mode, listener, poller, command queue, parked fetches, watch
//! streams, the replicas it knows, the queues with settings and what retention keeps.

use serde_json::{json, Value};
use tasker::proto::v1;

use super::output::{duration_text, mode_name, print_value, ts};
use super::{Ctl, CtlError};

/// `status`: everything GetStatus answers.
pub(super) async fn show(ctl: &Ctl) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::admin_service_client::AdminServiceClient::new(svc)
        .get_status(v1::GetStatusRequest {})
        .await?
        .into_inner();
    print(json!({
        "mode": mode_name(r.mode),
        "listener_connected": r.listener_connected,
        "listener_channels": r.listener_channels,
        "listener_reconnects": r.listener_reconnects,
        "poller_last_run": ts(r.poller_last_run),
        "poller_last_tasks_found": r.poller_last_tasks_found,
        "command_queue_depth": r.command_queue_depth,
        "commands_in_flight": r.commands_in_flight,
        "commands_processed": r.commands_processed,
        "uptime_seconds": r.uptime.map(|d| d.seconds),
        "version": r.version,
        "draining": r.draining,
        "poller_periodic": r.poller_periodic,
        "parked_fetches": r.parked_fetches,
        "claims_lost": r.claims_lost,
        "events_left_to_peers": r.events_left_to_peers,
        "watch_streams": r.watch_streams,
        "watched_tasks": r.watched_tasks,
        "replica_id": r.replica_id,
        "replicas": r.replicas.into_iter().map(|p| json!({
            "replica_id": p.replica_id,
            "address": p.address,
            "version": p.version,
            "mode": mode_name(p.mode),
            "listening": p.listening,
            "serves_every_namespace": p.serves_every_namespace,
            "started_at": ts(p.started_at),
            "heartbeat_at": ts(p.heartbeat_at),
        })).collect::<Vec<_>>(),
        "queues": r.queues.into_iter().map(super::queue::queue_json).collect::<Vec<_>>(),
        "retention": r.retention.map(|t| json!({
            "purging": t.purging,
            "tasks_purged": t.tasks_purged,
            "steps_purged": t.steps_purged,
            "rows_purged": t.rows_purged,
            "schema_bytes": t.schema_bytes,
            "oldest_finished_age": duration_text(t.oldest_finished_age),
            "behind": t.behind,
            "namespaces": t.namespaces.into_iter().map(|n| json!({
                "namespace": n.namespace,
                "retention": duration_text(n.retention),
                "error_retention": duration_text(n.error_retention),
                "oldest_finished_age": duration_text(n.oldest_finished_age),
                "oldest_error_age": duration_text(n.oldest_error_age),
                "behind": n.behind,
            })).collect::<Vec<_>>(),
        })),
    }));
    Ok(())
}
