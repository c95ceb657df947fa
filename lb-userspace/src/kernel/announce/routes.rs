//! The announcement table over rtnetlink: one blackhole route per VIP address, of lb's own
//! protocol number so that lb only ever touches its own routes (and a daemon's `learn` sees
//! them as routes made by someone else, to export).

use std::{collections::BTreeSet, net::IpAddr};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// The route protocol number of lb's routes (`ip route show table 100 proto 250`): not one
/// iproute2 names, so nothing else is likely to use it.
pub const RTPROT_LB: u8 = 250;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{what} in routing table {table} over netlink")]
    Netlink {
        what: String,
        table: u32,
        #[source]
        source: rtnetlink::Error,
    },
}

/// An rtnetlink connection for the announcement table.
pub struct Routes {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Routes {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// The route for `a` (a host prefix) in `table`.
fn message(table: u32, a: IpAddr) -> RouteMessage {
    let len = if a.is_ipv4() { 32 } else { 128 };
    let mut m = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(a, len)
        .expect("a host prefix of the address's own family is valid")
        .kind(RouteType::BlackHole)
        .protocol(RouteProtocol::Other(RTPROT_LB))
        .build();
    // Always as an attribute: the header's byte cannot say tables above 255.
    m.header.table = 0;
    m.attributes.push(RouteAttribute::Table(table));
    m
}

/// The table of a dumped route (the attribute if present, else the header's byte).
fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

/// The host address a route is for, if it is a /32 or /128.
fn host_of(m: &RouteMessage) -> Option<IpAddr> {
    let a = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let full = if a.is_ipv4() { 32 } else { 128 };
    (m.header.destination_prefix_length == full).then_some(a)
}

impl Routes {
    pub fn new() -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Socket)?;
        Ok(Self {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// The addresses lb's routes in `table` are for (both families).
    pub async fn list(&self, table: u32) -> Result<BTreeSet<IpAddr>, RouteError> {
        let mut out = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            // No destination: a dump of the family, filtered here.
            let mut q = RouteMessage::default();
            q.header.address_family = family;
            let mut dump = self.handle.route().get(q).execute();
            while let Some(m) = dump
                .try_next()
                .await
                .map_err(|source| RouteError::Netlink {
                    what: "listing routes".into(),
                    table,
                    source,
                })?
            {
                if table_of(&m) == table
                    && m.header.protocol == RouteProtocol::Other(RTPROT_LB)
                    && let Some(a) = host_of(&m)
                {
                    out.insert(a);
                }
            }
        }
        Ok(out)
    }

    /// Adds the route for `a` (already there: fine).
    pub async fn add(&self, table: u32, a: IpAddr) -> Result<(), RouteError> {
        match self.handle.route().add(message(table, a)).execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(|source| RouteError::Netlink {
                what: format!("adding the route for {a}"),
                table,
                source,
            }),
        }
    }

    /// Removes the route for `a` (already gone: fine).
    pub async fn del(&self, table: u32, a: IpAddr) -> Result<(), RouteError> {
        match self.handle.route().del(message(table, a)).execute().await {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            r => r.map_err(|source| RouteError::Netlink {
                what: format!("removing the route for {a}"),
                table,
                source,
            }),
        }
    }
}

/// The positive errno of a netlink error reply, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}
