//! `cargo xtask bench`: the numbers behind BENCHMARKS.md. Every speed figure is a ratio to a
//! baseline measured in the same run, medians over alternating rounds, on one pinned CPU.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{Counter, IPPROTO_TCP, MODE_DSR, MODE_NAT, VipValue};
use lb_userspace::{
    kernel::dataplane::{Dataplane, kernel::KernelDataplane},
    kernel::program::{self, Sizes},
    model::desired::{BackendSpec, Desired, HashOn, Mode, NodeSpec, Protocol, VipSpec},
    model::maglev,
    model::plan::State,
    model::planner::Planner,
};
use serde_json::{Value, json};

use crate::{
    harness::{FibNet, Lb, XDP_DROP, XDP_PASS, XDP_TX, map_memory, net::*, vip_key},
    packet::{L4, Pkt, TCP_ACK},
};

mod control;
mod fastpath;
mod forwarding;
mod table;

use control::*;
use fastpath::*;
pub(crate) use forwarding::*;
pub use table::table;

pub struct Options {
    /// Calls per fast-path case (split over the rounds).
    pub calls: usize,
    pub rounds: usize,
    /// Established flows visited once each in `v4_tcp_established_1m_flows`.
    pub flows: usize,
    /// VIPs x backends for the control-plane figures.
    pub vips: usize,
    pub backends_per_vip: usize,
    /// Flow-table size whose kernel memory is reported.
    pub memory_flows: u32,
    /// IPv4 flows and NAT translations (each direction) in the tables a migration doubles.
    pub migration_entries: u32,
    /// The timed window of each NAT-peer round (see [`crate::bench_peer`]).
    pub peer_window_ms: u64,
}

impl Options {
    /// What the issue asks for.
    pub fn full() -> Self {
        Self {
            calls: 1_000_000,
            rounds: 5,
            flows: 1_000_000,
            vips: 1000,
            backends_per_vip: 100,
            memory_flows: 1 << 20,
            migration_entries: 200_000,
            peer_window_ms: 1000,
        }
    }

    /// Small enough for the test suite, so the benchmark cannot rot.
    pub fn smoke() -> Self {
        Self {
            calls: 2_000,
            rounds: 5,
            flows: 2_000,
            vips: 20,
            backends_per_vip: 10,
            memory_flows: 1 << 12,
            migration_entries: 2_000,
            peer_window_ms: 100,
        }
    }
}

/// CPUs online (not the calling thread's affinity, which `available_parallelism` reports).
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

/// Pins the calling thread to one CPU (the last one).
fn pin_cpu() -> usize {
    let cpus = online_cpus();
    let cpu = cpus - 1;
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    cpu
}

pub(crate) fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The loaded copies of the program the fast-path cases run on (each has its own maps).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum On {
    /// Every VIP, 1M established flows in a 4M-entry flow table.
    Main,
    /// The same configuration and table size, flow table emptied before each round.
    EmptyTable,
    /// A flow table filled to capacity before timing: every insert evicts.
    FullTable,
    /// No IPv6 source address: packets to IPv6 backends end before encapsulation.
    NoV6Source,
}

/// A frame generator for one case and the check each output must pass.
struct Case {
    name: &'static str,
    on: On,
    program: &'static str,
    frame: Box<dyn FnMut(usize) -> Vec<u8>>,
    action: u32,
    /// Backends the outer destination must be one of (empty: output must equal input).
    backends: Vec<[u8; 4]>,
    v6_outer: bool,
    /// What a breakdown case adds to or leaves out of a real path (printed with it).
    note: &'static str,
}

/// The targets (x `lb_floor`, at most) for the fast-path cases.
pub const TARGETS: &[(&str, f64)] = &[
    ("pass_non_vip", 1.15),
    ("v4_tcp_established_1flow", 1.9),
    ("v4_tcp_established_1m_flows", 3.7),
    ("v4_tcp_new_flow", 5.6),
    ("v4_tcp_new_flow_full_table", 6.5),
    ("v4_affinity_hit", 6.5),
    ("v6_tcp_established_1flow", 2.2),
    // Issue 23 (NAT v2) restated issue 13's NAT targets (2.2, 2.2, 7.5) as these.
    ("v4_nat_established_1flow", 2.5),
    ("v4_nat_reply", 2.5),
    ("v4_nat_new_flow", 8.0),
];
/// Forwarding rate, one core: at least this fraction of the floor's.
pub const TARGET_FORWARDING_RATIO: f64 = 0.90;
/// Two cores: at least this many times one core's rate.
pub const TARGET_2CORES_RATIO: f64 = 1.8;
/// Flow-table kernel memory per entry, at most.
pub const TARGET_FLOW_BYTES_PER_ENTRY: f64 = 64.0;

fn target(name: &str) -> Option<f64> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

fn v4(a: u32) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

/// Client of flow `k` (distinct 5-tuples): 100.64.0.0/10 addresses, fixed port.
fn flow_src(base: u32, k: usize) -> String {
    v4(base + k as u32)
}

fn ip4(a: &str) -> u32 {
    u32::from(a.parse::<std::net::Ipv4Addr>().unwrap())
}

/// The sections `run` can be limited to (`lb-bench --only forwarding,memory`).
pub const SECTIONS: &[&str] = &[
    "fastpath",
    "forwarding",
    "nat_peer",
    "programs",
    "maglev",
    "control_plane",
    "memory",
    "migration",
];

/// Each XDP program of the object as the kernel holds it once loaded: its translated
/// instructions (`xlated_prog_len` / 8), JIT-compiled bytes, and the instructions the verifier
/// processed (its work over every path, not the program's length).
pub fn program_sizes() -> Value {
    let mut ebpf =
        program::load(&Sizes::default(), None).expect("loading lb for its program sizes");
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    let mut out = serde_json::Map::new();
    for name in names {
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(&name)
            .unwrap()
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if prog.fd().is_err() {
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name}: {}", lb_userspace::error_chain(&e)));
        }
        let info = prog
            .info()
            .unwrap_or_else(|e| panic!("{name}: program info: {e}"));
        let xlated = info.size_translated().unwrap_or(0);
        out.insert(
            name,
            json!({"translated_insns": xlated / 8, "translated_bytes": xlated, "jited_bytes": info.size_jitted(), "verified_insns": info.verified_instruction_count()}),
        );
    }
    Value::Object(out)
}

/// Runs everything; returns the JSON document.
pub fn run(opts: &Options) -> Value {
    run_only(opts, SECTIONS)
}

/// Runs the named sections (see [`SECTIONS`]) in the usual order; the document has only their
/// keys (and `machine`, `seconds`).
pub fn run_only(opts: &Options, sections: &[&str]) -> Value {
    for s in sections {
        assert!(
            SECTIONS.contains(s),
            "no bench section {s:?} (sections: {})",
            SECTIONS.join(", ")
        );
    }
    let started = Instant::now();
    let mut out = serde_json::Map::new();
    out.insert("machine".into(), machine());
    let want = |s: &str| sections.contains(&s);
    if want("fastpath") {
        out.insert("fastpath".into(), fastpath(opts));
    }
    if want("forwarding") {
        out.insert("forwarding_rate".into(), forwarding_rate(opts));
    }
    if want("nat_peer") {
        out.insert("nat_peer".into(), crate::bench_peer::nat_peer(opts));
    }
    if want("programs") {
        out.insert("programs".into(), program_sizes());
    }
    if want("maglev") {
        out.insert("maglev".into(), maglev_figures());
    }
    if want("control_plane") {
        out.insert("control_plane".into(), control_plane(opts));
    }
    if want("memory") {
        out.insert("memory".into(), memory(opts));
    }
    if want("migration") {
        out.insert("migration".into(), migration(opts));
    }
    out.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    Value::Object(out)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({"cpu": cpu, "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel})
}

/// "met" or "MISSED".
pub(crate) fn mark(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sum_adds_one_counter_over_the_queues_only() {
        let stats: BTreeMap<String, u64> = [
            ("peer_ifindex", 7),
            ("rx_queue_0_xdp_tx", 10),
            ("rx_queue_1_xdp_tx", 5),
            ("rx_queue_0_xdp_tx_errors", 100),
            ("tx_queue_0_xdp_tx", 1000),
            ("rx_queue_x_xdp_tx", 10000),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(queue_sum(&stats, "rx", "xdp_tx"), 15);
        assert_eq!(queue_sum(&stats, "rx", "xdp_tx_errors"), 100);
        assert_eq!(queue_sum(&stats, "tx", "xdp_xmit"), 0);
    }
}
