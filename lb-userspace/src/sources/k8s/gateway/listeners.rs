//! A Gateway's listeners: which are served (TCP, UDP), which route kinds each takes, and which
//! conflict with one another.
//!
//! Conflicts: two listeners conflict when they share a port and a transport (UDP for `UDP`, TCP
//! for every other protocol): at L4 nothing tells their traffic apart. The first in the Gateway's
//! list keeps the port; each later one is `Conflicted=True` (`ProtocolConflict` when its
//! protocol differs from the first's, `HostnameConflict` when it is the same) and
//! `Accepted=False` (`PortUnavailable`). A TCP and a UDP listener on one port do not conflict.

use std::collections::BTreeMap;

use super::types::{GROUP, Listener, RouteGroupKind, RouteKind};
use crate::{
    model::desired::Protocol,
    sources::k8s::translate::{Cond, cond},
};

/// A listener as judged from the Gateway's spec alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    pub name: String,
    pub port: u16,
    /// The protocol lb serves it with; None: not served.
    pub protocol: Option<Protocol>,
    /// Whether its protocol is one the Gateway API defines, served by lb or not (see
    /// [`defined_protocol`]).
    pub defined: bool,
    /// Route kinds it takes (its `supportedKinds`).
    pub kinds: Vec<RouteGroupKind>,
    pub accepted: Cond,
    pub conflicted: Cond,
    pub resolved_refs: Cond,
}

impl Judged {
    /// Whether routes may attach here and traffic may flow.
    pub fn usable(&self) -> bool {
        self.protocol.is_some() && self.accepted.ok && !self.conflicted.ok
    }

    /// Whether it takes routes of `kind`.
    pub fn takes(&self, kind: RouteKind) -> bool {
        self.kinds.iter().any(|k| k.kind == kind.name())
    }
}

/// Whether `protocol` is one the Gateway API defines: a core name (`HTTP`, `HTTPS`, `TLS`, `TCP`,
/// `UDP`) or an implementation's domain-prefixed one (`example.com/proto`). The spec reserves
/// every other unprefixed name for core protocols, so a name like `INVALID` is no protocol.
pub fn defined_protocol(protocol: &str) -> bool {
    matches!(protocol, "HTTP" | "HTTPS" | "TLS" | "TCP" | "UDP")
        || protocol
            .split_once('/')
            .is_some_and(|(domain, name)| !domain.is_empty() && !name.is_empty())
}

fn transport(protocol: &str) -> &'static str {
    if protocol == "UDP" { "UDP" } else { "TCP" }
}

fn route_kind_of(p: Protocol) -> RouteKind {
    match p {
        Protocol::Tcp => RouteKind::Tcp,
        Protocol::Udp => RouteKind::Udp,
    }
}

fn kind(k: RouteKind) -> RouteGroupKind {
    RouteGroupKind {
        group: Some(GROUP.into()),
        kind: k.name().into(),
    }
}

/// Judges every listener of one Gateway, in its order.
pub fn judge(listeners: &[Listener]) -> Vec<Judged> {
    // (port, transport) -> the first listener on it.
    let mut first: BTreeMap<(i32, &str), &Listener> = BTreeMap::new();
    listeners
        .iter()
        .map(|l| {
            let keeper = *first.entry((l.port, transport(&l.protocol))).or_insert(l);
            judge_one(l, (!std::ptr::eq(keeper, l)).then_some(keeper))
        })
        .collect()
}

fn judge_one(l: &Listener, taken_by: Option<&Listener>) -> Judged {
    let protocol = match l.protocol.as_str() {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    };
    let port = u16::try_from(l.port).unwrap_or(0);
    let conflicted = match taken_by {
        Some(k) => cond(
            "Conflicted",
            true,
            if k.protocol == l.protocol {
                "HostnameConflict"
            } else {
                "ProtocolConflict"
            },
            format!(
                "listener {} ({}) already takes {} port {}",
                k.name,
                k.protocol,
                transport(&l.protocol),
                l.port
            ),
        ),
        None => cond("Conflicted", false, "NoConflicts", "no conflicts"),
    };
    let accepted = match (protocol, taken_by) {
        (None, _) => cond(
            "Accepted",
            false,
            "UnsupportedProtocol",
            format!(
                "protocol {} is not served by lb, an L4 load balancer: use TCP (TCPRoute) or UDP (UDPRoute)",
                l.protocol
            ),
        ),
        (Some(_), Some(_)) => cond(
            "Accepted",
            false,
            "PortUnavailable",
            conflicted.message.clone(),
        ),
        (Some(_), None) if port == 0 => cond(
            "Accepted",
            false,
            "PortUnavailable",
            format!("port {} is not a port", l.port),
        ),
        (Some(_), None) => cond("Accepted", true, "Accepted", "served by lb"),
    };
    let (kinds, resolved_refs) = kinds_of(l, protocol);
    Judged {
        name: l.name.clone(),
        port,
        protocol,
        defined: defined_protocol(&l.protocol),
        kinds,
        accepted,
        conflicted,
        resolved_refs,
    }
}

/// The route kinds a listener takes and its `ResolvedRefs`: its protocol's kind by default;
/// `allowedRoutes.kinds` may only name that one.
fn kinds_of(l: &Listener, protocol: Option<Protocol>) -> (Vec<RouteGroupKind>, Cond) {
    let ok = cond(
        "ResolvedRefs",
        true,
        "ResolvedRefs",
        "all references resolved",
    );
    let Some(p) = protocol else {
        return (Vec::new(), ok);
    };
    let own = route_kind_of(p);
    let Some(asked) = l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) else {
        return (vec![kind(own)], ok);
    };
    let mut kinds = Vec::new();
    let mut invalid = Vec::new();
    for k in asked {
        let group_ok = k.group.as_deref().is_none_or(|g| g == GROUP);
        if group_ok && k.kind == own.name() {
            if !kinds.contains(&kind(own)) {
                kinds.push(kind(own));
            }
        } else {
            invalid.push(format!(
                "{}/{}",
                k.group.as_deref().unwrap_or(GROUP),
                k.kind
            ));
        }
    }
    if invalid.is_empty() {
        (kinds, ok)
    } else {
        let message = format!(
            "a {} listener takes {} only, not {}",
            l.protocol,
            own.name(),
            invalid.join(", ")
        );
        (
            kinds,
            cond("ResolvedRefs", false, "InvalidRouteKinds", message),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str, port: i32, protocol: &str) -> Listener {
        Listener {
            name: name.into(),
            port,
            protocol: protocol.into(),
            allowed_routes: None,
        }
    }

    #[test]
    fn tcp_and_udp_listeners_are_served_and_take_their_route_kind() {
        let j = judge(&[l("tcp", 80, "TCP"), l("dns", 53, "UDP")]);
        assert!(j.iter().all(Judged::usable));
        assert!(j[0].takes(RouteKind::Tcp) && !j[0].takes(RouteKind::Udp));
        assert!(j[1].takes(RouteKind::Udp) && !j[1].takes(RouteKind::Tcp));
        assert_eq!(j[0].accepted.reason, "Accepted");
        assert_eq!(j[0].conflicted.reason, "NoConflicts");
    }

    #[test]
    fn http_is_not_served() {
        let j = judge(&[l("web", 8080, "HTTP")]);
        assert!(!j[0].usable());
        assert_eq!(
            (j[0].accepted.ok, j[0].accepted.reason.as_str()),
            (false, "UnsupportedProtocol")
        );
        assert!(j[0].kinds.is_empty());
    }

    #[test]
    fn core_and_domain_prefixed_protocols_are_defined_and_other_names_are_not() {
        for p in [
            "HTTP",
            "HTTPS",
            "TLS",
            "TCP",
            "UDP",
            "example.com/quic",
            "acme/q",
        ] {
            assert!(defined_protocol(p), "{p}");
        }
        for p in ["INVALID", "http", "/quic", "example.com/", ""] {
            assert!(!defined_protocol(p), "{p}");
        }
        let j = judge(&[l("web", 80, "HTTP"), l("odd", 81, "INVALID")]);
        assert_eq!((j[0].defined, j[1].defined), (true, false));
        assert!(j.iter().all(|j| j.accepted.reason == "UnsupportedProtocol"));
    }

    #[test]
    fn the_first_listener_on_a_port_and_transport_keeps_it() {
        let j = judge(&[
            l("a", 80, "TCP"),
            l("b", 80, "UDP"),
            l("c", 80, "HTTP"),
            l("d", 80, "TCP"),
            l("e", 53, "UDP"),
            l("f", 53, "UDP"),
        ]);
        let verdicts: Vec<(bool, &str, &str)> = j
            .iter()
            .map(|j| {
                (
                    j.usable(),
                    j.conflicted.reason.as_str(),
                    j.accepted.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            verdicts,
            [
                (true, "NoConflicts", "Accepted"),
                (true, "NoConflicts", "Accepted"),
                (false, "ProtocolConflict", "UnsupportedProtocol"),
                (false, "HostnameConflict", "PortUnavailable"),
                (true, "NoConflicts", "Accepted"),
                (false, "HostnameConflict", "PortUnavailable"),
            ]
        );
        assert!(j[3].conflicted.ok && j[3].conflicted.message.contains("listener a (TCP)"));
    }

    #[test]
    fn allowed_kinds_may_name_only_the_protocols_route_kind() {
        let mut x = l("tcp", 80, "TCP");
        x.allowed_routes = Some(super::super::types::AllowedRoutes {
            namespaces: None,
            kinds: Some(vec![
                RouteGroupKind {
                    group: None,
                    kind: "TCPRoute".into(),
                },
                RouteGroupKind {
                    group: Some(GROUP.into()),
                    kind: "HTTPRoute".into(),
                },
            ]),
        });
        let j = &judge(&[x])[0];
        assert_eq!(j.kinds, [kind(RouteKind::Tcp)]);
        assert_eq!(
            (j.resolved_refs.ok, j.resolved_refs.reason.as_str()),
            (false, "InvalidRouteKinds")
        );
        assert!(j.usable(), "it still takes TCPRoutes");
    }
}
