//! `ctl namespace create | delete | list`.

use serde_json::{json, Value};
use tasker::proto::v1;

use super::output::{print_value, ts};
use super::{Ctl, CtlError};

/// `namespace create`: an admin creates a namespace (needed when the service does not create them on first use).
pub(super) async fn create(ctl: &Ctl, namespace: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::admin_service_client::AdminServiceClient::new(svc)
        .create_namespace(v1::CreateNamespaceRequest { namespace })
        .await?
        .into_inner();
    let mut out = r.namespace.map(namespace_json).unwrap_or(Value::Null);
    out["created"] = Value::Bool(r.created);
    print(out);
    Ok(())
}

/// `namespace delete`: an empty namespace goes.
pub(super) async fn delete(ctl: &Ctl, namespace: String) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    v1::admin_service_client::AdminServiceClient::new(svc)
        .delete_namespace(v1::DeleteNamespaceRequest {
            namespace: namespace.clone(),
        })
        .await?;
    print(json!({ "namespace": namespace, "deleted": true }));
    Ok(())
}

/// `namespace list`: every namespace, oldest first.
pub(super) async fn list(ctl: &Ctl) -> Result<(), CtlError> {
    let svc = ctl.svc.clone();
    let print = |v: Value| print_value(&v, ctl.out);
    let r = v1::admin_service_client::AdminServiceClient::new(svc)
        .list_namespaces(v1::ListNamespacesRequest {})
        .await?
        .into_inner();
    print(Value::Array(
        r.namespaces.into_iter().map(namespace_json).collect(),
    ));
    Ok(())
}

fn namespace_json(n: v1::Namespace) -> Value {
    json!({ "namespace": n.namespace, "created_at": ts(n.created_at) })
}

/// `namespace key-limit <namespace> [N | --none]`: set (or with neither, show) the most tasks
/// with the same concurrency key in progress at once.
pub(super) async fn key_limit(
    ctl: &Ctl,
    namespace: String,
    max_tasks_per_key: Option<i32>,
    none: bool,
) -> Result<(), CtlError> {
    let mut admin = v1::admin_service_client::AdminServiceClient::new(ctl.svc.clone());
    let r = if max_tasks_per_key.is_some() || none {
        admin
            .set_namespace_settings(v1::SetNamespaceSettingsRequest {
                namespace,
                max_tasks_per_key,
            })
            .await?
    } else {
        admin
            .get_namespace_settings(v1::GetNamespaceSettingsRequest { namespace })
            .await?
    }
    .into_inner();
    print_value(
        &json!({
            "namespace": r.namespace,
            "max_tasks_per_key": r.max_tasks_per_key,
            "tasks_waiting_on_keys": r.tasks_waiting_on_keys,
        }),
        ctl.out,
    );
    Ok(())
}
