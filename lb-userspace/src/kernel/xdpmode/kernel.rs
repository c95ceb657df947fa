//! The facts [`super::decide`] needs, asked of the kernel over netlink (blocking requests, a
//! few per interface, at start and reload only):
//!
//! - the link's kind and, for a veth, its peer (`IFLA_LINK`) and the peer's namespace
//!   (`IFLA_LINK_NETNSID`), from `RTM_GETLINK`;
//! - the peer itself, asked in its own namespace by that id (`IFLA_TARGET_NETNSID`): its name
//!   and whether an XDP program is attached to it in native mode (`IFLA_XDP`);
//! - the namespace's name: the entry of /run/netns whose id (`RTM_GETNSID`) is that one;
//! - the device's `xdp-features`, from the netdev generic netlink family (Linux 6.3+).
//!
//! Whatever cannot be asked is left unknown ([`super::Peer::native_program`]'s error, or no
//! features) rather than failing: the decision says what it could not check.

use std::{io, os::fd::AsRawFd as _};

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    nsid::{NsidAttribute, NsidMessage},
};
use rtnetlink::{
    packet_core::{
        NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    },
    sys::{Socket, SocketAddr, protocols},
};

use super::{LinkFacts, Peer};

/// The facts of each interface of `links` (name, index), in this network namespace.
pub fn facts(links: &[(String, u32)]) -> Vec<LinkFacts> {
    let features = Features::open();
    links
        .iter()
        .map(|(name, index)| LinkFacts {
            name: name.clone(),
            features: features.as_ref().ok().and_then(|f| f.of(*index).ok()),
            veth_peer: veth_peer(*index),
        })
        .collect()
}

/// The peer of the veth `index`; None if `index` is not a veth (or cannot be asked).
fn veth_peer(index: u32) -> Option<Peer> {
    let link = get_link(index, None).ok()?;
    let veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(i)
            if i.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    if !veth {
        return None;
    }
    let peer_index = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    });
    let nsid = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    });
    let netns = nsid.map(|id| netns_name(id).unwrap_or_else(|| format!("id {id}")));
    let Some(peer_index) = peer_index.filter(|i| *i != 0) else {
        return Some(Peer {
            name: "(unknown)".to_string(),
            netns,
            native_program: Err("the kernel does not name it".to_string()),
        });
    };
    let peer = get_link(peer_index, nsid);
    let name = peer
        .as_ref()
        .ok()
        .and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
        })
        .unwrap_or_else(|| format!("index {peer_index}"));
    Some(Peer {
        name,
        netns,
        native_program: peer
            .map(|m| native_program(&m))
            .map_err(|e| format!("asking the kernel about it: {e}")),
    })
}

/// Whether a program is attached to the link in native (driver) mode.
fn native_program(link: &LinkMessage) -> bool {
    let xdp = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    });
    xdp.into_iter().flatten().any(|x| match x {
        LinkXdp::Attached(XdpAttached::Driver) => true,
        LinkXdp::DrvProgId(id) => *id != 0,
        _ => false,
    })
}

/// `RTM_GETLINK` of the link `index`, in the namespace of id `nsid` (None: this one).
fn get_link(index: u32, nsid: Option<i32>) -> io::Result<LinkMessage> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(id) = nsid {
        // IFLA_TARGET_NETNSID (the crate's older name for it).
        m.attributes.push(LinkAttribute::IfNetnsId(id));
    }
    match route_request(RouteNetlinkMessage::GetLink(m))? {
        RouteNetlinkMessage::NewLink(l) => Ok(l),
        _ => Err(bad("not a link message")),
    }
}

/// The name under /run/netns of the namespace this one knows by `nsid`.
fn netns_name(nsid: i32) -> Option<String> {
    let dir = std::fs::read_dir(rtnetlink::NETNS_PATH).ok()?;
    dir.flatten().find_map(|e| {
        let file = std::fs::File::open(e.path()).ok()?;
        let mut m = NsidMessage::default();
        m.attributes
            .push(NsidAttribute::Fd(file.as_raw_fd() as u32));
        let RouteNetlinkMessage::NewNsId(reply) =
            route_request(RouteNetlinkMessage::GetNsId(m)).ok()?
        else {
            return None;
        };
        let id = reply.attributes.iter().find_map(|a| match a {
            NsidAttribute::Id(id) => Some(*id),
            _ => None,
        })?;
        (id == nsid).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

/// One rtnetlink request and its one answer.
fn route_request(msg: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
    let reply = request(protocols::NETLINK_ROUTE, msg)?;
    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| bad(&e.to_string()))
        .and_then(|m| match m.payload {
            NetlinkPayload::InnerMessage(m) => Ok(m),
            _ => Err(bad("no answer")),
        })
}

/// Sends `msg` on a fresh socket of `protocol` and returns the first answer's bytes (a
/// netlink error as the OS error it carries).
fn request<M: NetlinkSerializable + std::fmt::Debug>(
    protocol: isize,
    msg: M,
) -> io::Result<Vec<u8>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    send(protocol, &buf)
}

/// Sends one message (its bytes) and returns the answer's, checking for a netlink error.
fn send(protocol: isize, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(bytes, 0)?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    buf.truncate(n);
    const NLMSG_ERROR: u16 = 2;
    if buf.len() >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(-errno));
        }
    }
    Ok(buf)
}

/// The netdev generic netlink family, which reports each device's `xdp-features`.
struct Features {
    family: u16,
}

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

impl Features {
    /// The family's id (absent before Linux 6.3).
    fn open() -> io::Result<Self> {
        let reply = genl(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            &nla(CTRL_ATTR_FAMILY_NAME, b"netdev\0"),
        )?;
        let id = attribute(&reply, CTRL_ATTR_FAMILY_ID).ok_or_else(|| bad("no family id"))?;
        let family = <[u8; 2]>::try_from(id.get(..2).unwrap_or_default())
            .map_err(|_| bad("short family id"))?;
        Ok(Self {
            family: u16::from_ne_bytes(family),
        })
    }

    /// The `xdp-features` of the device `index` (`NETDEV_XDP_ACT_*`).
    fn of(&self, index: u32) -> io::Result<u64> {
        let reply = genl(
            self.family,
            NETDEV_CMD_DEV_GET,
            &nla(NETDEV_A_DEV_IFINDEX, &index.to_ne_bytes()),
        )?;
        let v = attribute(&reply, NETDEV_A_DEV_XDP_FEATURES).ok_or_else(|| bad("no features"))?;
        let v = <[u8; 8]>::try_from(v.get(..8).unwrap_or_default()).map_err(|_| bad("short"))?;
        Ok(u64::from_ne_bytes(v))
    }
}

/// One netlink attribute, padded to 4 bytes.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut v = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
    v.extend(kind.to_ne_bytes());
    v.extend(value);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

/// A generic netlink request (`cmd` with `attrs`) to `family`; the answer's attributes.
fn genl(family: u16, cmd: u8, attrs: &[u8]) -> io::Result<Vec<u8>> {
    const NLMSG_HDR: usize = 16;
    const GENL_HDR: usize = 4;
    let len = NLMSG_HDR + GENL_HDR + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(family.to_ne_bytes());
    m.extend(NLM_F_REQUEST.to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // sequence
    m.extend(0u32.to_ne_bytes()); // port
    m.extend([cmd, 1, 0, 0]); // genlmsghdr: cmd, version, reserved
    m.extend(attrs);
    let reply = send(protocols::NETLINK_GENERIC, &m)?;
    let end = (u32::from_ne_bytes(
        reply
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("short answer"))?,
    ) as usize)
        .min(reply.len());
    reply
        .get(NLMSG_HDR + GENL_HDR..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| bad("short answer"))
}

/// The value of the first attribute of type `kind` in `attrs`.
fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let k = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if k == kind {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}
