//! Pure: what the kernel's routes, neighbours and links say -> the [`NextHop`] that
//! `bpf_fib_lookup` would give for an outer packet to a backend (no socket in here).
//!
//! The rules follow `bpf_ipv4_fib_lookup` / `bpf_ipv6_fib_lookup` (net/core/filter.c) as XDP
//! calls them (MTU checked, no flags):
//! - the route lookup fails: blackhole (`EINVAL`), unreachable (`EHOSTUNREACH`) and prohibit
//!   (`EACCES`) routes end in a drop (`NH_UNREACHABLE`); no route at all (`ENETUNREACH`) is
//!   `BPF_FIB_LKUP_RET_NOT_FWDED` in the kernel, which lb passes to the stack as
//!   `pass_local_backend`, so it is `NH_LOCAL` here too;
//! - a route of another type than unicast: IPv4 never forwards it (`NOT_FWDED`: `NH_LOCAL`);
//!   IPv6 drops blackhole / unreachable / prohibit and passes the rest;
//! - a unicast route: the MTU is the route's locked `mtu` metric, else a path MTU exception
//!   (IPv4: an unlocked route `mtu` counts only with `net.ipv4.ip_forward_use_pmtu`), else the
//!   device's (IPv6: its `mtu6`, at least 1280); then the neighbour of the gateway (or of the
//!   destination itself on a connected route) on the egress device, which must be in a valid
//!   state (`NUD_VALID`) for `NH_FORWARD`, else `NH_NO_NEIGH`.

use std::{collections::HashMap, net::IpAddr};

use lb_common::{NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNREACHABLE, NextHop};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteType, RouteVia,
    },
};

const ENETUNREACH: i32 = libc::ENETUNREACH;
const RTAX_MTU: u32 = 2;
const IP_MAX_MTU: u32 = 0xffff;
const IPV6_MIN_MTU: u32 = 1280;
const IP6_MAX_MTU: u32 = 0xffff + 40;

/// What `RTM_GETROUTE` answered for a destination: the route, or the (positive) errno.
#[derive(Clone, Debug)]
pub enum RouteReply {
    Route(RouteMessage),
    Error(i32),
}

/// A device as the route lookup sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv6's MTU of the device (`net.ipv6.conf.<dev>.mtu`), if it has IPv6.
    pub mtu6: Option<u32>,
}

/// A neighbour entry: its `NUD_*` state and link-layer address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Neighbour {
    pub state: NeighbourState,
    pub lladdr: Vec<u8>,
}

/// The devices and neighbours of the namespace at one moment, shared by every member's
/// resolution in one refresh.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub links: HashMap<u32, Link>,
    pub neighbours: HashMap<(u32, IpAddr), Neighbour>,
    /// `net.ipv4.ip_forward_use_pmtu`: IPv4 forwarding uses an unlocked route `mtu` too.
    pub v4_fwd_use_pmtu: bool,
}

/// Why a next hop could not be worked out (the program then asks `bpf_fib_lookup` itself).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unresolvable {
    #[error("the route lookup failed: {0}")]
    Lookup(String),
    #[error("the route has no egress interface")]
    NoOif,
    #[error("egress interface {0} is not in the link list")]
    UnknownLink(u32),
    #[error("the route has a lightweight tunnel encapsulation, which the route helper refuses")]
    Encap,
    #[error("the gateway is not an IP address")]
    OddGateway,
    #[error("egress interface {0} reports no MTU")]
    NoMtu(u32),
}

/// Where a unicast route sends a packet: egress device, the address whose neighbour entry
/// gives the MAC, and what the route says about the MTU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    pub oif: u32,
    pub neighbour: IpAddr,
    pub mtu_metric: Option<u32>,
    pub mtu_locked: bool,
    /// The MTU metric comes from a path MTU exception (cached route), not the route.
    pub exception: bool,
    /// The hop is not an Ethernet neighbour the route helper looks up (lwtunnel).
    pub encap: bool,
}

/// The next hop to `dst` (the outer destination) from a route reply, or why there is none.
/// `generation` is left 0 (the caller sets the member's).
pub fn next_hop(dst: IpAddr, reply: &RouteReply, snap: &Snapshot) -> Result<NextHop, Unresolvable> {
    let route = match reply {
        RouteReply::Error(e) => return error_action(*e).map(action_only),
        RouteReply::Route(r) => r,
    };
    if let Some(a) = non_unicast_action(route.header.kind) {
        return Ok(action_only(a));
    }
    let eg = egress(dst, route)?;
    if eg.encap {
        return Err(Unresolvable::Encap);
    }
    let link = snap
        .links
        .get(&eg.oif)
        .ok_or(Unresolvable::UnknownLink(eg.oif))?;
    let mtu = route_mtu(dst.is_ipv4(), &eg, link, snap.v4_fwd_use_pmtu);
    if mtu == 0 {
        // Every packet would be too big: leave it to the route lookup.
        return Err(Unresolvable::NoMtu(eg.oif));
    }
    let mut nh = NextHop {
        ifindex: eg.oif,
        mtu,
        action: NH_NO_NEIGH,
        smac: link.mac,
        ..Default::default()
    };
    if let Some(n) = snap.neighbours.get(&(eg.oif, eg.neighbour))
        && nud_valid(n.state)
    {
        nh.action = NH_FORWARD;
        let len = n.lladdr.len().min(6);
        nh.dmac[..len].copy_from_slice(&n.lladdr[..len]);
    }
    Ok(nh)
}

fn action_only(action: u8) -> NextHop {
    NextHop {
        action,
        ..Default::default()
    }
}

/// The action for a failed route lookup (`errno` positive), as the kernel maps `fib_lookup`'s
/// errors.
pub fn error_action(errno: i32) -> Result<u8, Unresolvable> {
    match errno {
        libc::EINVAL | libc::EHOSTUNREACH | libc::EACCES => Ok(NH_UNREACHABLE),
        ENETUNREACH => Ok(NH_LOCAL),
        e => Err(Unresolvable::Lookup(
            std::io::Error::from_raw_os_error(e).to_string(),
        )),
    }
}

/// The action for a route that is not unicast, None for unicast. (IPv4 reports the reject
/// types as lookup errors, above; IPv6 as route types.)
fn non_unicast_action(kind: RouteType) -> Option<u8> {
    match kind {
        RouteType::Unicast => None,
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit => Some(NH_UNREACHABLE),
        _ => Some(NH_LOCAL),
    }
}

/// `NUD_VALID`: the states in which the kernel uses a neighbour's address.
pub fn nud_valid(s: NeighbourState) -> bool {
    matches!(
        s,
        NeighbourState::Permanent
            | NeighbourState::Noarp
            | NeighbourState::Reachable
            | NeighbourState::Probe
            | NeighbourState::Stale
            | NeighbourState::Delay
    )
}

/// Reads a unicast route's egress from its attributes.
pub fn egress(dst: IpAddr, route: &RouteMessage) -> Result<Egress, Unresolvable> {
    let mut eg = Egress {
        oif: 0,
        neighbour: dst,
        mtu_metric: None,
        mtu_locked: false,
        exception: route.header.flags.contains(RouteFlags::Cloned) && dst.is_ipv6(),
        encap: false,
    };
    let mut oif = None;
    for a in &route.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => eg.neighbour = route_addr(g)?,
            RouteAttribute::Via(RouteVia::Inet(a)) => eg.neighbour = IpAddr::V4(*a),
            RouteAttribute::Via(RouteVia::Inet6(a)) => eg.neighbour = IpAddr::V6(*a),
            RouteAttribute::Via(_) => return Err(Unresolvable::OddGateway),
            RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) => eg.encap = true,
            RouteAttribute::CacheInfo(c) if dst.is_ipv4() => eg.exception |= c.expires != 0,
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    match m {
                        RouteMetric::Mtu(v) if *v != 0 => eg.mtu_metric = Some(*v),
                        RouteMetric::Lock(bits) => eg.mtu_locked = bits & (1 << RTAX_MTU) != 0,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    eg.oif = oif.ok_or(Unresolvable::NoOif)?;
    Ok(eg)
}

fn route_addr(a: &RouteAddress) -> Result<IpAddr, Unresolvable> {
    match a {
        RouteAddress::Inet(a) => Ok(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Ok(IpAddr::V6(*a)),
        _ => Err(Unresolvable::OddGateway),
    }
}

/// The MTU the route helper checks the outer packet against (`ip_mtu_from_fib_result`,
/// `ip6_mtu_from_fib6`).
pub fn route_mtu(v4: bool, eg: &Egress, link: &Link, v4_fwd_use_pmtu: bool) -> u32 {
    if let Some(m) = eg.mtu_metric
        && (eg.mtu_locked || eg.exception || (v4 && v4_fwd_use_pmtu))
    {
        return m;
    }
    if v4 {
        link.mtu.min(IP_MAX_MTU)
    } else {
        link.mtu6
            .unwrap_or(link.mtu)
            .clamp(IPV6_MIN_MTU, IP6_MAX_MTU)
    }
}

/// A link message -> (ifindex, device).
pub fn link_of(m: &LinkMessage) -> (u32, Link) {
    let mut l = Link::default();
    for a in &m.attributes {
        match a {
            LinkAttribute::Address(mac) if mac.len() >= 6 => l.mac.copy_from_slice(&mac[..6]),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            _ => {}
        }
    }
    (m.header.index, l)
}

/// A neighbour message -> ((ifindex, address), entry); None if it has no IP destination.
pub fn neighbour_of(m: &NeighbourMessage) -> Option<((u32, IpAddr), Neighbour)> {
    let mut dst = None;
    let mut lladdr = Vec::new();
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                dst = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                dst = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => lladdr = l.clone(),
            _ => {}
        }
    }
    let n = Neighbour {
        state: m.header.state,
        lladdr,
    };
    Some(((m.header.ifindex, dst?), n))
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::route::RouteCacheInfo;

    use super::*;

    const MAC_LB: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_GW: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn snap() -> Snapshot {
        let mut s = Snapshot::default();
        s.links.insert(
            7,
            Link {
                mac: MAC_LB,
                mtu: 1500,
                mtu6: Some(1500),
            },
        );
        for (a, state) in [
            ("10.0.0.254", NeighbourState::Reachable),
            ("10.0.0.253", NeighbourState::Failed),
            ("10.0.0.252", NeighbourState::Stale),
            ("10.0.0.251", NeighbourState::Incomplete),
            ("fd00::fe", NeighbourState::Permanent),
        ] {
            s.neighbours.insert(
                (7, ip(a)),
                Neighbour {
                    state,
                    lladdr: MAC_GW.to_vec(),
                },
            );
        }
        s
    }

    fn unicast(attrs: Vec<RouteAttribute>) -> RouteReply {
        let mut m = RouteMessage::default();
        m.header.kind = RouteType::Unicast;
        m.attributes = attrs;
        RouteReply::Route(m)
    }

    fn via(gw: &str) -> Vec<RouteAttribute> {
        vec![
            RouteAttribute::Oif(7),
            RouteAttribute::Gateway(ip(gw).into()),
        ]
    }

    fn forward(ifindex: u32, mtu: u32) -> NextHop {
        NextHop {
            dmac: MAC_GW,
            smac: MAC_LB,
            ifindex,
            mtu,
            action: NH_FORWARD,
            ..Default::default()
        }
    }

    #[test]
    fn a_gateway_with_a_reachable_or_stale_neighbour_forwards_with_its_mac_and_the_device_mtu() {
        for gw in ["10.0.0.254", "10.0.0.252"] {
            let nh = next_hop(ip("10.1.0.1"), &unicast(via(gw)), &snap()).unwrap();
            assert_eq!(nh, forward(7, 1500), "via {gw}");
        }
    }

    #[test]
    fn an_interface_without_an_mtu_is_left_to_the_route_lookup() {
        let mut s = snap();
        s.links.get_mut(&7).unwrap().mtu = 0;
        let got = next_hop(ip("10.1.0.1"), &unicast(via("10.0.0.254")), &s);
        assert!(matches!(got, Err(Unresolvable::NoMtu(7))), "{got:?}");
    }

    #[test]
    fn a_connected_route_looks_up_the_destinations_own_neighbour() {
        let r = unicast(vec![RouteAttribute::Oif(7)]);
        assert_eq!(next_hop(ip("fd00::fe"), &r, &snap()), Ok(forward(7, 1500)));
        assert_eq!(
            next_hop(ip("10.0.0.9"), &r, &snap()).unwrap().action,
            NH_NO_NEIGH
        );
    }

    #[test]
    fn a_failed_incomplete_or_missing_neighbour_is_no_neighbour_with_the_route_still_known() {
        for gw in ["10.0.0.253", "10.0.0.251", "10.0.0.250"] {
            let nh = next_hop(ip("10.1.0.1"), &unicast(via(gw)), &snap()).unwrap();
            assert_eq!(
                nh,
                NextHop {
                    smac: MAC_LB,
                    ifindex: 7,
                    mtu: 1500,
                    action: NH_NO_NEIGH,
                    ..Default::default()
                },
                "via {gw}"
            );
        }
    }

    #[test]
    fn route_lookup_errors_map_as_the_kernel_maps_them() {
        for (errno, action) in [
            (libc::EINVAL, NH_UNREACHABLE),
            (libc::EHOSTUNREACH, NH_UNREACHABLE),
            (libc::EACCES, NH_UNREACHABLE),
            (libc::ENETUNREACH, NH_LOCAL),
        ] {
            let nh = next_hop(ip("10.1.0.1"), &RouteReply::Error(errno), &snap()).unwrap();
            assert_eq!(nh, action_only(action), "errno {errno}");
        }
        assert!(matches!(
            next_hop(ip("10.1.0.1"), &RouteReply::Error(libc::ENOBUFS), &snap()),
            Err(Unresolvable::Lookup(_))
        ));
    }

    #[test]
    fn local_and_reject_route_types_give_local_and_unreachable() {
        for (kind, action) in [
            (RouteType::Local, NH_LOCAL),
            (RouteType::Broadcast, NH_LOCAL),
            (RouteType::BlackHole, NH_UNREACHABLE),
            (RouteType::Unreachable, NH_UNREACHABLE),
            (RouteType::Prohibit, NH_UNREACHABLE),
        ] {
            let mut m = RouteMessage::default();
            m.header.kind = kind;
            m.attributes = vec![RouteAttribute::Oif(1)];
            for dst in ["10.1.0.1", "fd01::1"] {
                let nh = next_hop(ip(dst), &RouteReply::Route(m.clone()), &snap()).unwrap();
                assert_eq!(nh.action, action, "{kind:?} to {dst}");
            }
        }
    }

    fn with_metrics(gw: &str, ms: Vec<RouteMetric>) -> Vec<RouteAttribute> {
        let mut a = via(gw);
        a.push(RouteAttribute::Metrics(ms));
        a
    }

    #[test]
    fn a_locked_route_mtu_counts_an_unlocked_one_does_not() {
        let locked = with_metrics(
            "10.0.0.254",
            vec![RouteMetric::Lock(1 << RTAX_MTU), RouteMetric::Mtu(1400)],
        );
        let nh = next_hop(ip("10.1.0.1"), &unicast(locked.clone()), &snap()).unwrap();
        assert_eq!(nh.mtu, 1400);
        let unlocked = with_metrics("10.0.0.254", vec![RouteMetric::Mtu(1400)]);
        let nh = next_hop(ip("10.1.0.1"), &unicast(unlocked.clone()), &snap()).unwrap();
        assert_eq!(
            nh.mtu, 1500,
            "IPv4 forwarding ignores an unlocked route mtu"
        );
        let mut s = snap();
        s.v4_fwd_use_pmtu = true;
        let nh = next_hop(ip("10.1.0.1"), &unicast(unlocked), &s).unwrap();
        assert_eq!(nh.mtu, 1400, "unless ip_forward_use_pmtu");
        let v6 = with_metrics("fd00::fe", vec![RouteMetric::Mtu(1400)]);
        let nh = next_hop(ip("fd01::1"), &unicast(v6), &snap()).unwrap();
        assert_eq!(
            nh.mtu, 1500,
            "IPv6 forwarding ignores an unlocked route mtu"
        );
    }

    #[test]
    fn a_path_mtu_exception_counts() {
        let mut a = with_metrics("10.0.0.254", vec![RouteMetric::Mtu(1300)]);
        // struct rta_cacheinfo: clntref, lastuse, expires (the third u32), ...
        let mut raw = [0u8; 32];
        raw[8..12].copy_from_slice(&600_000u32.to_ne_bytes());
        a.push(RouteAttribute::CacheInfo(
            RouteCacheInfo::parse(&raw).unwrap(),
        ));
        let nh = next_hop(ip("10.1.0.1"), &unicast(a), &snap()).unwrap();
        assert_eq!(nh.mtu, 1300);
        let RouteReply::Route(mut m) =
            unicast(with_metrics("fd00::fe", vec![RouteMetric::Mtu(1300)]))
        else {
            unreachable!()
        };
        m.header.flags = RouteFlags::Cloned;
        let nh = next_hop(ip("fd01::1"), &RouteReply::Route(m), &snap()).unwrap();
        assert_eq!(nh.mtu, 1300);
    }

    #[test]
    fn the_ipv6_mtu_is_the_devices_mtu6_at_least_1280() {
        let mut s = snap();
        s.links.get_mut(&7).unwrap().mtu6 = Some(1400);
        let nh = next_hop(ip("fd01::1"), &unicast(via("fd00::fe")), &s).unwrap();
        assert_eq!(nh.mtu, 1400);
        s.links.get_mut(&7).unwrap().mtu6 = Some(1000);
        let nh = next_hop(ip("fd01::1"), &unicast(via("fd00::fe")), &s).unwrap();
        assert_eq!(nh.mtu, 1280);
    }

    #[test]
    fn routes_the_program_cannot_take_are_unresolvable() {
        let mut a = via("10.0.0.254");
        a.push(RouteAttribute::EncapType(Default::default()));
        assert_eq!(
            next_hop(ip("10.1.0.1"), &unicast(a), &snap()),
            Err(Unresolvable::Encap)
        );
        assert_eq!(
            next_hop(ip("10.1.0.1"), &unicast(vec![]), &snap()),
            Err(Unresolvable::NoOif)
        );
        assert_eq!(
            next_hop(
                ip("10.1.0.1"),
                &unicast(vec![RouteAttribute::Oif(9)]),
                &snap()
            ),
            Err(Unresolvable::UnknownLink(9))
        );
    }

    #[test]
    fn neighbour_and_link_messages_translate() {
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 3;
        n.header.state = NeighbourState::Delay;
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet6("fd00::2".parse().unwrap())),
            NeighbourAttribute::LinkLayerAddress(MAC_GW.to_vec()),
        ];
        let ((i, a), e) = neighbour_of(&n).unwrap();
        assert_eq!((i, a), (3, ip("fd00::2")));
        assert_eq!(e.lladdr, MAC_GW);
        assert!(nud_valid(e.state));
        let mut l = LinkMessage::default();
        l.header.index = 4;
        l.attributes = vec![
            LinkAttribute::Address(MAC_LB.to_vec()),
            LinkAttribute::Mtu(9000),
        ];
        assert_eq!(
            link_of(&l),
            (
                4,
                Link {
                    mac: MAC_LB,
                    mtu: 9000,
                    mtu6: None
                }
            )
        );
    }
}
