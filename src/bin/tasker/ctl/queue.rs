//! `ctl queue show | limit | pause | resume`: a queue's in-flight limit and pause, and what is
//! leased and waiting on it.

use serde_json::{json, Value};
use tasker::proto::v1;

use super::output::print_value;
use super::{Ctl, CtlError};

type Admin = v1::admin_service_client::AdminServiceClient<tasker::client::AuthorizedChannel>;

/// `queue show <namespace> [queue]`: its limit, pause, steps in flight and queued.
pub(super) async fn show(ctl: &Ctl, namespace: String, queue: String) -> Result<(), CtlError> {
    let r = Admin::new(ctl.svc.clone())
        .get_queue_settings(v1::GetQueueSettingsRequest { namespace, queue })
        .await?
        .into_inner();
    print_value(&queue_json(r), ctl.out);
    Ok(())
}

/// `queue limit <namespace> <queue> <n> | --none`: at most n of its steps leased at once,
/// across the fleet (admin scope).
pub(super) async fn limit(
    ctl: &Ctl,
    namespace: String,
    queue: String,
    max_in_flight: Option<i32>,
) -> Result<(), CtlError> {
    let r = Admin::new(ctl.svc.clone())
        .set_queue_settings(v1::SetQueueSettingsRequest {
            namespace,
            queue,
            max_in_flight,
        })
        .await?
        .into_inner();
    print_value(&queue_json(r), ctl.out);
    Ok(())
}

/// `queue pause|resume <namespace> [queue]`: no queue named: the whole namespace (admin scope).
pub(super) async fn pause(
    ctl: &Ctl,
    namespace: String,
    queue: String,
    paused: bool,
) -> Result<(), CtlError> {
    let mut admin = Admin::new(ctl.svc.clone());
    let r = if paused {
        admin
            .pause_queue(v1::PauseQueueRequest { namespace, queue })
            .await?
    } else {
        admin
            .resume_queue(v1::ResumeQueueRequest { namespace, queue })
            .await?
    };
    print_value(&queue_json(r.into_inner()), ctl.out);
    Ok(())
}

pub(super) fn queue_json(q: v1::QueueSettings) -> Value {
    json!({
        "namespace": q.namespace, "queue": q.queue, "max_in_flight": q.max_in_flight,
        "paused": q.paused, "namespace_paused": q.namespace_paused,
        "in_flight": q.in_flight, "queued": q.queued, "held": q.held,
    })
}
