//! The TCP reset that answers a packet for a rejecting member (`MEMBER_F_REJECT`): its sequence
//! numbers by RFC 793 ("Reset Generation") and its headers, checksums included.
//!
//! Pure, so the program builds the same bytes host tests check; the fixtures compare them with
//! frames etherparse builds.

use crate::csum::{add, fold};

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;
/// TTL / hop limit of a reset (Linux's default).
pub const RESET_TTL: u8 = 64;

/// The sequence number, acknowledgement number and flags of the reset answering a segment with
/// `seq`, `ack`, `flags` and `payload` bytes of data, or `None` for a reset (never answered).
///
/// RFC 793: "If the incoming segment has an ACK field, the reset takes its sequence number from
/// the ACK field of the segment, otherwise the reset has sequence number zero and the ACK field
/// is set to the sum of the sequence number and segment length of the incoming segment" (SYN
/// and FIN count one each).
#[inline(always)]
pub const fn reset_numbers(seq: u32, ack: u32, flags: u8, payload: u32) -> Option<(u32, u32, u8)> {
    if flags & TCP_FLAG_RST != 0 {
        return None;
    }
    if flags & TCP_FLAG_ACK != 0 {
        return Some((ack, 0, TCP_FLAG_RST));
    }
    let len = payload + (flags & TCP_FLAG_SYN != 0) as u32 + (flags & TCP_FLAG_FIN != 0) as u32;
    Some((0, seq.wrapping_add(len), TCP_FLAG_RST | TCP_FLAG_ACK))
}

/// One's-complement sum of `bytes` as 16-bit words in load order (see [`crate::csum`]).
#[inline(always)]
fn sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s = add(s, u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32);
        i += 2;
    }
    s
}

/// A 20-byte TCP header (no options, window 0) from `sport` to `dport` (network byte order)
/// with its checksum over the pseudo-header of `src` and `dst` (the first 4 bytes for IPv4).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn tcp_header(
    src: &[u8; 16],
    dst: &[u8; 16],
    v4: bool,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_ne_bytes());
    h[2..4].copy_from_slice(&dport.to_ne_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    // Pseudo-header: addresses, protocol 6, TCP length 20 (the last two as one word each).
    let addrs = if v4 {
        let mut a = [0u8; 8];
        a[..4].copy_from_slice(&src[..4]);
        a[4..].copy_from_slice(&dst[..4]);
        sum(&a)
    } else {
        add(sum(src), sum(dst))
    };
    let pseudo = add(
        addrs,
        add(
            u16::from_ne_bytes(6u16.to_be_bytes()) as u32,
            u16::from_ne_bytes(20u16.to_be_bytes()) as u32,
        ),
    );
    let check = !fold(add(pseudo, sum(&h)));
    h[16..18].copy_from_slice(&check.to_ne_bytes());
    h
}

/// The IPv4 header of a reset from `src` to `dst`: 40 bytes long, DF, TTL [`RESET_TTL`].
#[inline(always)]
pub fn ipv4_header(src: &[u8; 16], dst: &[u8; 16]) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&40u16.to_be_bytes());
    h[6] = 0x40;
    h[8] = RESET_TTL;
    h[9] = 6;
    h[12..16].copy_from_slice(&src[..4]);
    h[16..20].copy_from_slice(&dst[..4]);
    let check = !fold(sum(&h));
    h[10..12].copy_from_slice(&check.to_ne_bytes());
    h
}

/// The IPv6 header of a reset from `src` to `dst`: 20 bytes of payload, hop limit
/// [`RESET_TTL`].
#[inline(always)]
pub fn ipv6_header(src: &[u8; 16], dst: &[u8; 16]) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&20u16.to_be_bytes());
    h[6] = 6;
    h[7] = RESET_TTL;
    h[8..24].copy_from_slice(src);
    h[24..40].copy_from_slice(dst);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_is_answered_with_rst_ack_acknowledging_the_syn() {
        assert_eq!(
            reset_numbers(1000, 0, TCP_FLAG_SYN, 0),
            Some((0, 1001, TCP_FLAG_RST | TCP_FLAG_ACK))
        );
        assert_eq!(
            reset_numbers(u32::MAX, 0, TCP_FLAG_SYN | TCP_FLAG_FIN, 3),
            Some((0, 4, TCP_FLAG_RST | TCP_FLAG_ACK)),
            "SYN, FIN and data all count, modulo 2^32"
        );
    }

    #[test]
    fn a_segment_with_ack_is_answered_from_its_ack_field() {
        assert_eq!(
            reset_numbers(5, 777, TCP_FLAG_ACK, 10),
            Some((777, 0, TCP_FLAG_RST))
        );
    }

    #[test]
    fn a_reset_is_never_answered() {
        assert_eq!(reset_numbers(5, 0, TCP_FLAG_RST | TCP_FLAG_ACK, 0), None);
    }
}
