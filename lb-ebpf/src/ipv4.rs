//! What the program writes into the IPv4 headers it builds (a tunnel's outer header, an ICMP
//! error's): the don't-fragment flag and the header checksum.

use network_types::ip::Ipv4Hdr;

pub const IPV4_DF: u16 = 0x4000;

/// RFC 1071 checksum of a 20-byte IPv4 header (no options), `check` zeroed by the caller.
#[inline(always)]
pub fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    let words = unsafe { &*(ip as *const Ipv4Hdr as *const [[u8; 2]; 10]) };
    let mut sum = 0u32;
    for w in words {
        sum += u16::from_be_bytes(*w) as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
