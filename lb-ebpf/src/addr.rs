//! Addresses as the program holds them (16 bytes, IPv4 in the first four): this node's own,
//! and comparing two.

use lb_common::{FAMILY_V4, NODE_F_SRC_V4, NODE_F_SRC_V6, NodeConfig};

/// This node's source address for `family` (IPv4 in the first four bytes), if configured: the
/// outer source of tunnels (DSR) and the translated source (NAT).
#[inline(always)]
pub fn node_addr(node: &NodeConfig, family: u8) -> Option<[u8; 16]> {
    if family == FAMILY_V4 {
        if node.flags & NODE_F_SRC_V4 == 0 {
            return None;
        }
        let a = node.src_v4;
        Some([a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    } else if node.flags & NODE_F_SRC_V6 != 0 {
        Some(node.src_v6)
    } else {
        None
    }
}

#[inline(always)]
pub fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let a: [u64; 2] = unsafe { core::mem::transmute(*a) };
    let b: [u64; 2] = unsafe { core::mem::transmute(*b) };
    a[0] == b[0] && a[1] == b[1]
}
