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
