//! A Gateway's addresses: its `spec.addresses` of type IPAddress, or else those the cluster
//! allocates to the LoadBalancer Service lb makes for it (ownerReference, lb's class label, a
//! port per listener), whose `status.loadBalancer.ingress` the Gateway takes.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::{GatewayCtx, Output, lb_service_name, listeners};
use crate::sources::k8s::translate::{CLASS_LABEL, Cond, cond};

impl GatewayCtx<'_> {
    /// The Gateway's addresses, and Ok(None), Ok(Some(Programmed=False)) while it has none yet,
    /// or Err(Accepted=False) for addresses lb cannot take.
    #[allow(clippy::type_complexity)]
    pub(super) fn addresses(&self, out: &mut Output) -> (Vec<IpAddr>, Result<Option<Cond>, Cond>) {
        let spec = &self.gw.spec.addresses;
        if !spec.is_empty() {
            let mut addrs = Vec::new();
            for a in spec {
                let t = a.type_.as_deref().unwrap_or("IPAddress");
                match (t, a.value.parse::<IpAddr>()) {
                    ("IPAddress", Ok(ip)) => addrs.push(ip),
                    _ => {
                        return (
                            Vec::new(),
                            Err(cond(
                                "Accepted",
                                false,
                                "UnsupportedAddress",
                                format!(
                                    "address {:?} of type {t}: lb takes IPAddress addresses only",
                                    a.value
                                ),
                            )),
                        );
                    }
                }
            }
            addrs.sort();
            addrs.dedup();
            return (addrs, Ok(None));
        }
        // No addresses asked for: a LoadBalancer Service of lb's asks the cluster for them.
        let (ns, name) = self.key();
        if let Some(svc) = self.lb_service(&ns, &name) {
            out.lb_services.push(svc);
        }
        let mut addrs: Vec<IpAddr> = self
            .by_key
            .get(&(ns.clone(), lb_service_name(&name)))
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            let c = cond(
                "Programmed",
                false,
                "AddressNotAssigned",
                format!(
                    "waiting for an address on Service {ns}/{} (type LoadBalancer: MetalLB, a cloud or kube-vip fills it)",
                    lb_service_name(&name)
                ),
            );
            return (addrs, Ok(Some(c)));
        }
        (addrs, Ok(None))
    }

    /// The LoadBalancer Service (a server-side apply body) that asks for this Gateway's
    /// addresses, with a port per TCP/UDP listener.
    fn lb_service(&self, ns: &str, name: &str) -> Option<Value> {
        let mut ports: Vec<(u16, &str)> = listeners::judge(&self.gw.spec.listeners)
            .iter()
            .filter(|l| l.usable())
            .map(|l| {
                let p = if l.protocol == Some(crate::model::desired::Protocol::Udp) {
                    "UDP"
                } else {
                    "TCP"
                };
                (l.port, p)
            })
            .collect();
        ports.sort();
        ports.dedup();
        if ports.is_empty() {
            return None;
        }
        let ports: Vec<Value> = ports
            .iter()
            .map(|(port, p)| json!({ "name": format!("{}-{port}", p.to_lowercase()), "port": port, "protocol": p }))
            .collect();
        Some(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": lb_service_name(name), "namespace": ns,
                "labels": { CLASS_LABEL: self.settings.class, "lb.dev/gateway": name },
                "ownerReferences": [ {
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": name,
                    "uid": self.gw.metadata.uid.clone().unwrap_or_default(), "controller": true,
                } ],
            },
            "spec": { "type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": ports },
        }))
    }
}
