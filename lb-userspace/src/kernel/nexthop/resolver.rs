//! Asks the kernel over rtnetlink what `bpf_fib_lookup` would answer: one dump of the links
//! and neighbours per refresh ([`Resolver::snapshot`]), one `RTM_GETROUTE` per backend address,
//! and [`super::translate`] to turn the answers into a [`NextHop`].
//!
//! The socket is opened in the network namespace of the calling thread, on the current tokio
//! runtime.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use lb_common::{NH_FORWARD, NH_NO_NEIGH, NextHop};
use netlink_packet_route::{
    AddressFamily,
    link::LinkAttribute,
    neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourState},
    route::{RouteAttribute, RouteMessage},
};
use rtnetlink::Handle;

use super::translate::{self, RouteReply, Snapshot, Unresolvable};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what} over netlink")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the kernel sent no answer to a route request")]
    NoAnswer,
    #[error(transparent)]
    Unresolvable(#[from] Unresolvable),
}

/// An rtnetlink connection for route, neighbour and link requests.
pub struct Resolver {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> ResolveError {
    move |source| ResolveError::Netlink { what, source }
}

/// The positive errno of a netlink error reply, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Resolver {
    /// Opens the socket (in the calling thread's namespace) and spawns its connection task.
    pub fn new() -> Result<Self, ResolveError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(ResolveError::Socket)?;
        Ok(Self {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// The links and neighbours now, and the sysctls the MTU depends on.
    pub async fn snapshot(&self) -> Result<Snapshot, ResolveError> {
        let mut snap = Snapshot {
            v4_fwd_use_pmtu: read_sysctl("net/ipv4/ip_forward_use_pmtu") == Some(1),
            ..Default::default()
        };
        let mut links = self.handle.link().get().execute();
        while let Some(m) = links.try_next().await.map_err(nl("listing links"))? {
            let (index, mut link) = translate::link_of(&m);
            link.mtu6 = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => read_sysctl(&format!("net/ipv6/conf/{n}/mtu")),
                _ => None,
            });
            snap.links.insert(index, link);
        }
        let mut neighs = self.handle.neighbours().get().execute();
        while let Some(m) = neighs.try_next().await.map_err(nl("listing neighbours"))? {
            if let Some((k, n)) = translate::neighbour_of(&m) {
                snap.neighbours.insert(k, n);
            }
        }
        Ok(snap)
    }

    /// `ip route get <dst> from <src>`: the route, or the errno the lookup failed with.
    pub async fn route(
        &self,
        dst: IpAddr,
        src: Option<IpAddr>,
    ) -> Result<RouteReply, ResolveError> {
        let mut m = RouteMessage::default();
        let full = if dst.is_ipv4() { 32 } else { 128 };
        m.header.address_family = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.header.destination_prefix_length = full;
        m.attributes.push(RouteAttribute::Destination(dst.into()));
        if let Some(src) = src {
            m.header.source_prefix_length = full;
            m.attributes.push(RouteAttribute::Source(src.into()));
        }
        let mut answers = self.handle.route().get(m).execute();
        match answers.try_next().await {
            Ok(Some(r)) => Ok(RouteReply::Route(r)),
            Ok(None) => Err(ResolveError::NoAnswer),
            Err(e) => match errno(&e) {
                Some(code) => Ok(RouteReply::Error(code)),
                None => Err(nl("asking for a route")(e)),
            },
        }
    }

    /// The next hop to `dst` for outer packets from `src` (generation 0), and the neighbour it
    /// goes through when the snapshot has no entry for it at all.
    ///
    /// An IPv4 route request from an address this node does not own fails with `ENETUNREACH`
    /// before any route is looked at (the route helper does not check the source): it is asked
    /// again without the source.
    pub async fn resolve(
        &self,
        dst: IpAddr,
        src: Option<IpAddr>,
        snap: &Snapshot,
    ) -> Result<(NextHop, Option<(u32, IpAddr)>), ResolveError> {
        let mut reply = self.route(dst, src).await?;
        if dst.is_ipv4() && src.is_some() && matches!(reply, RouteReply::Error(libc::ENETUNREACH)) {
            reply = self.route(dst, None).await?;
        }
        let nh = translate::next_hop(dst, &reply, snap)?;
        let missing = match &reply {
            RouteReply::Route(r) if matches!(nh.action, NH_FORWARD | NH_NO_NEIGH) => {
                let eg = translate::egress(dst, r)?;
                let k = (eg.oif, eg.neighbour);
                (!snap.neighbours.contains_key(&k)).then_some(k)
            }
            _ => None,
        };
        Ok((nh, missing))
    }

    /// Asks the kernel to keep the neighbour `addr` on `ifindex` resolved (a managed entry,
    /// `NTF_EXT_MANAGED`: the kernel probes it by itself, with no traffic needed). An entry that
    /// exists already is left as it is. Returns whether one was added.
    pub async fn keep_resolved(&self, ifindex: u32, addr: IpAddr) -> Result<bool, ResolveError> {
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, addr)
            .state(NeighbourState::None);
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(nl("adding a managed neighbour")(e)),
        }
    }
}

/// An integer sysctl of the calling thread's namespace (`/proc/sys/<path>`).
fn read_sysctl(path: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
