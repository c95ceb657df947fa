//! Everything the agent writes to the cluster goes through [`Writer`]: status subresources
//! (UpstreamPolicies, GatewayClasses, Gateways, routes) and the LoadBalancer Services it owns for
//! Gateways. One place, so that a single agent can be made the only writer (every node computes
//! the same state; only one needs to say it).

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tracing::warn;

/// Writes to the cluster in the background; failures are logged (the next change retries).
pub trait Writer: Send + Sync {
    /// Merge-patches `status` into the status subresource of `ns/name` (`ns` None: cluster
    /// scoped).
    fn patch_status(&self, ar: &ApiResource, ns: Option<&str>, name: &str, status: Value);
    /// Server-side applies `obj` (field manager `lb`).
    fn apply(&self, ar: &ApiResource, ns: &str, name: &str, obj: Value);
}

/// The writer that talks to the API server.
pub struct KubeWriter {
    pub client: Client,
    /// Status patches name this writer (`fieldManager`).
    pub field_manager: String,
}

impl KubeWriter {
    fn api(&self, ar: &ApiResource, ns: Option<&str>) -> Api<DynamicObject> {
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }
}

impl Writer for KubeWriter {
    fn patch_status(&self, ar: &ApiResource, ns: Option<&str>, name: &str, status: Value) {
        let api = self.api(ar, ns);
        let what = format!(
            "{} {}{name}",
            ar.kind,
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        );
        let name = name.to_string();
        let params = PatchParams {
            field_manager: Some(self.field_manager.clone()),
            ..Default::default()
        };
        tokio::spawn(async move {
            let patch = json!({ "status": status });
            if let Err(e) = api
                .patch_status(&name, &params, &Patch::Merge(&patch))
                .await
            {
                warn!("updating the status of {what}: {}", crate::error_chain(&e));
            }
        });
    }

    fn apply(&self, ar: &ApiResource, ns: &str, name: &str, obj: Value) {
        let api = self.api(ar, Some(ns));
        let what = format!("{} {ns}/{name}", ar.kind);
        let name = name.to_string();
        tokio::spawn(async move {
            // One field manager for every node: whichever agent writes owns the same fields.
            let params = PatchParams::apply("lb").force();
            if let Err(e) = api.patch(&name, &params, &Patch::Apply(&obj)).await {
                warn!("applying {what}: {}", crate::error_chain(&e));
            }
        });
    }
}
