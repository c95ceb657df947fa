//! The one shape a VIP and a backend take wherever lb shows them: in the JSON of every inspecting
//! command, in the status file, and (as their `label`s) in the `vip` and `backend` labels of
//! `/metrics`, so that outputs can be joined on them.
//!
//! A backend is always named `address:port`, the port packets reach it on: its own port (NAT
//! with `port:`), or else the VIP's.

use std::net::{IpAddr, SocketAddr};

use lb_common::{Member, VipKey};
use serde::{Deserialize, Serialize};

use crate::model::desired::{Protocol, ip_of, vip_label};

/// A VIP: `label` is `192.0.2.10:80/tcp` or `[2001:db8::10]:80/tcp`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipRef {
    pub label: String,
    /// The config's or the Service's name, where the reader knows it (the maps do not).
    pub name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
}

impl VipRef {
    pub fn of(k: &VipKey) -> Self {
        Self {
            label: vip_label(k),
            name: None,
            address: ip_of(&k.addr, k.family),
            port: u16::from_be(k.port),
            protocol: Protocol::from_number(k.proto)
                .map_or_else(|| k.proto.to_string(), |p| p.to_string()),
        }
    }

    /// VIP `k`, a port-range VIP (port 0) of `range` if given: its label says the range
    /// (`192.0.2.20:10000-10999/tcp`).
    pub fn of_range(k: &VipKey, range: Option<crate::model::desired::PortRange>) -> Self {
        let r = Self::of(k);
        match range {
            Some(range) => Self {
                label: crate::model::desired::range_label(k, range),
                ..r
            },
            None => r,
        }
    }

    pub fn named(mut self, name: Option<String>) -> Self {
        self.name = name;
        self
    }
}

/// A backend of a VIP: `label` is `10.1.0.1:80` or `[2001:db8::1]:80`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendRef {
    pub label: String,
    pub address: IpAddr,
    pub port: u16,
}

impl BackendRef {
    /// Member `m` of the VIP `vip`.
    pub fn of(m: &Member, vip: &VipKey) -> Self {
        Self::at(backend_endpoint(m, vip))
    }

    pub fn at(endpoint: SocketAddr) -> Self {
        Self {
            label: endpoint.to_string(),
            address: endpoint.ip(),
            port: endpoint.port(),
        }
    }
}

/// Where member `m` of `vip` receives packets: its own port, or the VIP's.
pub fn backend_endpoint(m: &Member, vip: &VipKey) -> SocketAddr {
    endpoint(
        ip_of(&m.addr, m.family),
        u16::from_be(m.port),
        u16::from_be(vip.port),
    )
}

/// Where a backend at `address` receives packets: its own port (`own_port`, 0 if it has none),
/// or else the VIP's.
pub fn endpoint(address: IpAddr, own_port: u16, vip_port: u16) -> SocketAddr {
    SocketAddr::new(address, if own_port == 0 { vip_port } else { own_port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired::addr16;

    fn member(addr: IpAddr, port: u16) -> Member {
        let (addr, family) = addr16(addr);
        Member {
            addr,
            port: port.to_be(),
            family,
            ..Default::default()
        }
    }

    fn vip(addr: IpAddr, port: u16) -> VipKey {
        let (addr, family) = addr16(addr);
        VipKey {
            addr,
            port: port.to_be(),
            proto: 6,
            family,
        }
    }

    #[test]
    fn a_backend_without_a_port_of_its_own_is_named_with_the_vips_port() {
        let v = vip("192.0.2.10".parse().unwrap(), 80);
        let b = BackendRef::of(&member("10.1.0.1".parse().unwrap(), 0), &v);
        assert_eq!(b.label, "10.1.0.1:80");
        let b = BackendRef::of(&member("2001:db8::1".parse().unwrap(), 9000), &v);
        assert_eq!(b.label, "[2001:db8::1]:9000");
        assert_eq!((b.port, b.address), (9000, "2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn a_vip_label_spells_the_address_port_and_protocol() {
        let r = VipRef::of(&vip("2001:db8::10".parse().unwrap(), 443));
        assert_eq!(r.label, "[2001:db8::10]:443/tcp");
        assert_eq!((r.port, r.protocol.as_str()), (443, "tcp"));
    }
}
