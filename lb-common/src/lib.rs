//! Types and constants shared by the lb XDP program (`lb-ebpf`) and its agent (`lb-userspace`).
//!
//! Everything stored in a BPF map is defined here once, `#[repr(C)]`, `Copy` and free of implicit
//! padding, with its size asserted at compile time, so that both sides agree on every byte.
//! Fields that hold packet data (addresses, ports) are in network byte order and say so.
#![no_std]

pub mod budget;
pub mod csum;
pub mod flowtab;
pub mod hash;
pub mod maps;
pub mod reset;
pub mod select;
pub mod stats;
pub mod types;

pub use budget::NewFlowBudget;
pub use hash::{
    NAT_PORT_PROBES, candidate_hash, flow_hash, maglev_slot, nat_port_candidate, source_hash,
};
pub use stats::{Counter, TrafficStats};
pub use types::*;
