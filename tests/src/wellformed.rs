//! Is a frame the program sent on well formed? Ethernet (any 802.1Q tags) carrying IPv4 or IPv6
//! whose lengths agree with the frame, IPv4 header checksums that verify, and TCP, UDP, ICMP and
//! ICMPv6 checksums that verify (an IPv4 UDP checksum of 0 means "none"), for every packet in
//! it: the outer and the inner packet of a tunnel (IPIP, IPv6 in IPv4, IP6IP6, IPv4 in IPv6),
//! and the IP header an ICMP error quotes (the quote may be cut short; its header checksum must
//! still verify). Checksums are computed by etherparse, independently of the program.
//!
//! The program does not check what it forwards (a load balancer carries a client's bad
//! checksum to the backend as it came), so [`check_forwarded`] holds the output to what the
//! input was: a problem the input's packet already had is excused in the output's matching
//! packet; anything else is the program's.

use etherparse::{
    Ethernet2HeaderSlice, Icmpv4Slice, Icmpv6Slice, Ipv4HeaderSlice, Ipv6Extensions,
    Ipv6HeaderSlice, TcpHeaderSlice, UdpHeaderSlice, checksum::Sum16BitWords,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const IPIP: u8 = 4;
const IPV6: u8 = 41;

/// What is wrong with one packet of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A header too short to read, or invalid (version, header length).
    Unreadable(&'static str),
    /// A length field that disagrees with the frame or with another length.
    Length(&'static str),
    /// An IP protocol lb never forwards (not TCP, UDP, ICMP, ICMPv6, IPIP or IPv6).
    Protocol(u8),
    Ipv4HeaderChecksum,
    /// The TCP, UDP, ICMP or ICMPv6 checksum does not verify.
    Checksum(&'static str),
}

/// How a packet sits in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The frame's own packet.
    Packet,
    /// Inside a tunnel: it must fill its outer packet's payload exactly.
    Tunnelled,
    /// Quoted by an ICMP error: may be cut short; only its IP header is checked.
    Quoted,
}

/// One IP packet of a frame and what is wrong with it.
#[derive(Clone, Debug)]
pub struct Layer {
    pub role: Role,
    /// Offset of its IP header in the frame.
    pub offset: usize,
    pub v6: bool,
    /// The upper-layer protocol (after any IPv6 extension headers); 0 if unread.
    pub proto: u8,
    pub problems: Vec<Problem>,
}

/// The packets of `frame`, outermost first, each with its problems; `Err` if the frame is not
/// Ethernet carrying IPv4 or IPv6 at all.
pub fn layers(frame: &[u8]) -> Result<Vec<Layer>, String> {
    let (off, ether_type) = l2(frame)?;
    let v6 = match ether_type {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        t => return Err(format!("EtherType {t:#06x} is not IPv4 or IPv6")),
    };
    let mut out = Vec::new();
    walk_ip(frame, off, frame.len(), Role::Packet, v6, &mut out);
    Ok(out)
}

/// Offset of the IP header and the EtherType, past any 802.1Q / 802.1ad tags.
fn l2(frame: &[u8]) -> Result<(usize, u16), String> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|e| format!("Ethernet: {e}"))?;
    let (mut off, mut ether_type) = (eth.slice().len(), eth.ether_type().0);
    while ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let tag = frame
            .get(off..off + 4)
            .ok_or_else(|| "802.1Q tag cut short".to_string())?;
        ether_type = u16::from_be_bytes([tag[2], tag[3]]);
        off += 4;
    }
    Ok((off, ether_type))
}

/// Source and destination of a packet, for the pseudo-header of its L4 checksum.
#[derive(Clone, Copy)]
enum Addrs {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

/// Walks the IP packet at `frame[off..end]` (and what it carries), pushing it onto `out`.
fn walk_ip(frame: &[u8], off: usize, end: usize, role: Role, v6: bool, out: &mut Vec<Layer>) {
    let mut layer = Layer {
        role,
        offset: off,
        v6,
        proto: 0,
        problems: Vec::new(),
    };
    let bytes = &frame[off.min(end)..end];
    let next = if v6 {
        ipv6(bytes, &mut layer)
    } else {
        ipv4(bytes, &mut layer)
    };
    let index = out.len();
    out.push(layer);
    if let Some((l4_off, l4_end, addrs)) = next {
        let (l4_off, l4_end) = (off + l4_off, off + l4_end);
        let mut problems = Vec::new();
        let nested = l4(
            frame,
            l4_off,
            l4_end,
            out[index].proto,
            addrs,
            &mut problems,
        );
        out[index].problems.extend(problems);
        if let Some((at, role, v6)) = nested {
            walk_ip(frame, at, l4_end, role, v6, out);
        }
    }
}

/// Checks an IPv4 header; returns where its payload lies (relative to `bytes`) if there is an
/// L4 header to check.
fn ipv4(bytes: &[u8], layer: &mut Layer) -> Option<(usize, usize, Addrs)> {
    let h = match Ipv4HeaderSlice::from_slice(bytes) {
        Ok(h) => h,
        Err(_) => {
            layer.problems.push(Problem::Unreadable("IPv4 header"));
            return None;
        }
    };
    layer.proto = h.protocol().0;
    if !same_sum(h.to_header().calc_header_checksum(), h.header_checksum()) {
        layer.problems.push(Problem::Ipv4HeaderChecksum);
    }
    if layer.role == Role::Quoted {
        return None;
    }
    let (hlen, total) = (h.slice().len(), h.total_len() as usize);
    if total < hlen || total > bytes.len() {
        layer.problems.push(Problem::Length("IPv4 total length"));
        return None;
    }
    if layer.role == Role::Tunnelled && total != bytes.len() {
        layer
            .problems
            .push(Problem::Length("IPv4 total length, tunnel payload"));
    }
    if h.is_fragmenting_payload() {
        return None;
    }
    Some((hlen, total, Addrs::V4(h.source(), h.destination())))
}

/// Checks an IPv6 header and its extension headers, like [`ipv4`].
fn ipv6(bytes: &[u8], layer: &mut Layer) -> Option<(usize, usize, Addrs)> {
    let h = match Ipv6HeaderSlice::from_slice(bytes) {
        Ok(h) => h,
        Err(_) => {
            layer.problems.push(Problem::Unreadable("IPv6 header"));
            return None;
        }
    };
    layer.proto = h.next_header().0;
    if layer.role == Role::Quoted {
        return None;
    }
    let total = h.slice().len() + h.payload_length() as usize;
    if total > bytes.len() {
        layer.problems.push(Problem::Length("IPv6 payload length"));
        return None;
    }
    if layer.role == Role::Tunnelled && total != bytes.len() {
        layer
            .problems
            .push(Problem::Length("IPv6 payload length, tunnel payload"));
    }
    let payload = &bytes[h.slice().len()..total];
    let Ok((ext, next, rest)) = Ipv6Extensions::from_slice(h.next_header(), payload) else {
        layer
            .problems
            .push(Problem::Unreadable("IPv6 extension headers"));
        return None;
    };
    layer.proto = next.0;
    if ext.is_fragmenting_payload() {
        return None;
    }
    Some((
        total - rest.len(),
        total,
        Addrs::V6(h.source(), h.destination()),
    ))
}

/// Checks the L4 header at `frame[off..end]`; returns a packet it carries (tunnel) or quotes
/// (ICMP error): its offset, role and family.
fn l4(
    frame: &[u8],
    off: usize,
    end: usize,
    proto: u8,
    addrs: Addrs,
    problems: &mut Vec<Problem>,
) -> Option<(usize, Role, bool)> {
    let seg = &frame[off..end];
    match (proto, addrs) {
        (TCP, _) => tcp(seg, addrs, problems),
        (UDP, _) => udp(seg, addrs, problems),
        (ICMP, Addrs::V4(..)) => {
            let Ok(icmp) = Icmpv4Slice::from_slice(seg) else {
                problems.push(Problem::Length("ICMP header"));
                return None;
            };
            if Sum16BitWords::new().add_slice(seg).ones_complement() != 0 {
                problems.push(Problem::Checksum("ICMP"));
            }
            // Destination unreachable, source quench, redirect, time exceeded, parameter problem.
            if matches!(icmp.type_u8(), 3 | 4 | 5 | 11 | 12) {
                return Some((off + 8, Role::Quoted, false));
            }
        }
        (ICMPV6, Addrs::V6(s, d)) => {
            let Ok(icmp) = Icmpv6Slice::from_slice(seg) else {
                problems.push(Problem::Length("ICMPv6 header"));
                return None;
            };
            if !icmp.is_checksum_valid(s, d) {
                problems.push(Problem::Checksum("ICMPv6"));
            }
            // Destination unreachable, packet too big, time exceeded, parameter problem.
            if matches!(icmp.type_u8(), 1..=4) {
                return Some((off + 8, Role::Quoted, true));
            }
        }
        (IPIP, _) => return Some((off, Role::Tunnelled, false)),
        (IPV6, _) => return Some((off, Role::Tunnelled, true)),
        (p, _) => problems.push(Problem::Protocol(p)),
    }
    None
}

fn tcp(seg: &[u8], addrs: Addrs, problems: &mut Vec<Problem>) {
    let Ok(h) = TcpHeaderSlice::from_slice(seg) else {
        problems.push(Problem::Length("TCP data offset"));
        return;
    };
    let payload = &seg[h.slice().len()..];
    let want = match addrs {
        Addrs::V4(s, d) => h.calc_checksum_ipv4_raw(s, d, payload),
        Addrs::V6(s, d) => h.calc_checksum_ipv6_raw(s, d, payload),
    };
    if !want.is_ok_and(|w| same_sum(w, h.checksum())) {
        problems.push(Problem::Checksum("TCP"));
    }
}

fn udp(seg: &[u8], addrs: Addrs, problems: &mut Vec<Problem>) {
    let Ok(h) = UdpHeaderSlice::from_slice(seg) else {
        problems.push(Problem::Length("UDP header"));
        return;
    };
    let len = h.length() as usize;
    if len != seg.len() {
        problems.push(Problem::Length("UDP length"));
    }
    if len < 8 || len > seg.len() {
        return;
    }
    let (hdr, payload) = (h.to_header(), &seg[8..len]);
    let want = match addrs {
        Addrs::V4(..) if h.checksum() == 0 => return,
        Addrs::V4(s, d) => hdr.calc_checksum_ipv4_raw(s, d, payload),
        Addrs::V6(s, d) => hdr.calc_checksum_ipv6_raw(s, d, payload),
    };
    if want.ok() != Some(h.checksum()) {
        problems.push(Problem::Checksum("UDP"));
    }
}

/// Whether checksum field `got` verifies where etherparse computes `want`: equal, or the other
/// one's-complement zero (0x0000 and 0xffff both verify at a receiver, and an incremental
/// update may give either, RFC 1624 section 3). Not for UDP, where 0 means "no checksum".
fn same_sum(want: u16, got: u16) -> bool {
    want == got || matches!((want, got), (0, 0xffff) | (0xffff, 0))
}

/// A short description of a frame's packets, outermost first: `IPv4/IPIP > IPv4/TCP`.
pub fn shape(layers: &[Layer]) -> String {
    layers
        .iter()
        .map(|l| {
            let family = if l.v6 { "IPv6" } else { "IPv4" };
            let proto = match l.proto {
                _ if l.role == Role::Quoted => "quoted".to_string(),
                TCP => "TCP".into(),
                UDP => "UDP".into(),
                ICMP => "ICMP".into(),
                ICMPV6 => "ICMPv6".into(),
                IPIP => "IPIP".into(),
                IPV6 => "IPv6".into(),
                p => format!("proto {p}"),
            };
            format!("{family}/{proto}")
        })
        .collect::<Vec<_>>()
        .join(" > ")
}

/// Checks `output`, the frame the program sent on for `input`: every packet in it must be
/// well formed, except for problems the input's matching packet already had. Packets are
/// matched from the innermost out (a tunnel or an ICMP error wraps the input's packet; a
/// translation keeps it where it was); outer packets with no match were made by the program
/// and must have no problem at all. Returns the output's packets, or what is wrong.
pub fn check_forwarded(input: &[u8], output: &[u8]) -> Result<Vec<Layer>, String> {
    let out = layers(output)?;
    let inp = layers(input).unwrap_or_default();
    // Output packet `i` matches input packet `i + shift`, if there is one.
    let shift = inp.len() as isize - out.len() as isize;
    let mut wrong = Vec::new();
    for (i, l) in out.iter().enumerate() {
        let had: &[Problem] = match usize::try_from(i as isize + shift) {
            Ok(j) => &inp[j].problems,
            Err(_) => &[],
        };
        for p in l.problems.iter().filter(|p| !had.contains(p)) {
            wrong.push(format!(
                "packet {i} ({:?}, at byte {}): {p:?}",
                l.role, l.offset
            ));
        }
    }
    if wrong.is_empty() {
        Ok(out)
    } else {
        Err(format!("{} ({})", wrong.join("; "), shape(&out)))
    }
}

/// Rewrites the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6 checksum of `frame`'s
/// packet (not of any packet inside it) to the values etherparse computes, where the headers
/// can be read: a mutated frame that is valid again, so that the program's output for it must
/// be valid too.
pub fn repair(frame: &mut [u8]) {
    let Ok((off, ether_type)) = l2(frame) else {
        return;
    };
    let v6 = match ether_type {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return,
    };
    let mut layer = Layer {
        role: Role::Packet,
        offset: off,
        v6,
        proto: 0,
        problems: Vec::new(),
    };
    if !v6 && let Ok(h) = Ipv4HeaderSlice::from_slice(&frame[off..]) {
        let c = h.to_header().calc_header_checksum();
        frame[off + 10..off + 12].copy_from_slice(&c.to_be_bytes());
    }
    let bytes = &frame[off..];
    let Some((l4_off, l4_end, addrs)) = (if v6 {
        ipv6(bytes, &mut layer)
    } else {
        ipv4(bytes, &mut layer)
    }) else {
        return;
    };
    let seg = &mut frame[off + l4_off..off + l4_end];
    let at = match layer.proto {
        TCP if seg.len() >= 20 => 16,
        UDP if seg.len() >= 8 && u16::from_be_bytes([seg[6], seg[7]]) != 0 => 6,
        ICMP | ICMPV6 if seg.len() >= 8 => 2,
        _ => return,
    };
    seg[at..at + 2].copy_from_slice(&[0, 0]);
    let len = if layer.proto == UDP {
        (u16::from_be_bytes([seg[4], seg[5]]) as usize).min(seg.len())
    } else {
        seg.len()
    };
    let mut sum = Sum16BitWords::new();
    if layer.proto != ICMP {
        sum = match addrs {
            Addrs::V4(s, d) => sum.add_4bytes(s).add_4bytes(d),
            Addrs::V6(s, d) => sum.add_16bytes(s).add_16bytes(d),
        }
        .add_2bytes([0, layer.proto])
        .add_4bytes((len as u32).to_be_bytes());
    }
    let mut c = sum.add_slice(&seg[..len]).ones_complement().to_be();
    if c == 0 && layer.proto == UDP {
        c = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
}
