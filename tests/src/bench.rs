//! `cargo xtask bench`: the numbers behind BENCHMARKS.md. Every speed figure is a ratio to a
//! baseline measured in the same run, medians over alternating rounds, on one pinned CPU.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{Counter, IPPROTO_TCP, MODE_DSR, MODE_NAT, VipValue};
use lb_userspace::{
    dataplane::{Dataplane, kernel::KernelDataplane},
    maglev,
    model::{BackendSpec, Desired, HashOn, Mode, NodeSpec, Protocol, VipSpec},
    plan::{State, TableCache, plan_cached},
    program::{self, Sizes},
};
use serde_json::{Value, json};

use crate::{
    harness::{FibNet, Lb, XDP_DROP, XDP_PASS, XDP_TX, map_memory, net::*, vip_key},
    packet::{L4, Pkt, TCP_ACK},
};

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

/// A fast-path VIP: id, address, mode, affinity timeout, ring (None: see [`load_instance`]).
type VipRow<'a> = (u32, &'a str, u32, u32, Option<&'a [u32]>);

/// The fast path's Maglev table size.
const M: u32 = 65_537;

/// Loads a copy of the program with the benchmark's configuration: a DSR VIP on 100 IPv4
/// backends (id 0, 192.0.2.10), one on 100 IPv6 backends (1, 2001:db8::10), one with affinity
/// (2, 192.0.2.11), a NAT VIP (3, 192.0.2.12), one whose only backend's route lookup fails
/// (4, 192.0.2.13), one without backends (5, 192.0.2.14) and one on the IPv6 backends for an
/// IPv4 address (6, 192.0.2.15), one whose new-flow budget is spent (7, 192.0.2.16) and one
/// that takes sources from 10.0.0.0/8 only (8, 192.0.2.17).
/// Everything a case needs before its first packet is set here.
fn load_instance(flow_entries: u32, nat_entries: u32, v6_source: bool) -> Lb {
    let mut lb = Lb::load(Sizes {
        maglev_m: M,
        max_vips: 9,
        // A member per (VIP, backend): seven VIPs of up to 100 backends.
        max_backends: 1024,
        flow_entries,
        affinity_entries: 1 << 16,
        nat_entries,
    });
    lb.set_node(Some(NODE_V4), v6_source.then_some(NODE_V6), 0);
    for i in 0..100u32 {
        lb.set_backend(i, &format!("10.1.0.{}", i + 1), true);
        lb.set_backend(100 + i, &format!("fd01::{:x}", i + 1), true);
    }
    let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("b{i}").into_bytes()).collect();
    let table = |base: u32| {
        let e: Vec<maglev::Entry> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| maglev::Entry {
                key: k,
                weight: 1,
                value: base + i as u32,
            })
            .collect();
        maglev::build(&e, M, lb_common::NO_BACKEND).unwrap()
    };
    let (t4, t6) = (table(0), table(100));
    // NAT ports 1024-65535: 100 x 64k translations.
    lb.set_nat(1024, 65535, 10_000_000_000, 2_000_000_000);
    lb.set_backend(200, UNREACHABLE_V4, true);
    let vips: [VipRow; 9] = [
        (0, "192.0.2.10", MODE_DSR, 0, Some(&t4)),
        (1, "2001:db8::10", MODE_DSR, 0, Some(&t6)),
        (2, "192.0.2.11", MODE_DSR, 3600, Some(&t4)),
        (3, "192.0.2.12", MODE_NAT, 0, Some(&t4)),
        (4, "192.0.2.13", MODE_DSR, 0, None),
        (5, "192.0.2.14", MODE_DSR, 0, None),
        (6, "192.0.2.15", MODE_DSR, 0, Some(&t6)),
        (7, "192.0.2.16", MODE_DSR, 0, Some(&t4)),
        (8, "192.0.2.17", MODE_DSR, 0, Some(&t4)),
    ];
    for (id, addr, mode, affinity, ring) in vips {
        lb.add_vip(
            vip_key(addr, 80, IPPROTO_TCP),
            VipValue {
                id,
                flags: match id {
                    7 => lb_common::VIP_F_NEW_FLOW_BUDGET,
                    8 => lb_common::VIP_F_SOURCE_RANGES,
                    _ => 0,
                },
                affinity_timeout_s: affinity,
                mode,
                table_size: 0,
            },
        );
        match (id, ring) {
            (_, Some(t)) => lb.set_ring(id, |s| t[s as usize]),
            (4, None) => lb.set_ring(id, |_| 200),
            _ => lb.set_ring(id, |_| lb_common::NO_BACKEND),
        }
    }
    // VIP 7's budget: no token left and none to come (a bucket used once, at 1 ns after
    // boot, that earns a token every u64::MAX ns), so every new flow is over budget.
    lb.set_budget(
        7,
        lb_common::NewFlowBudget {
            tokens: 0,
            last_ns: 1,
            ns_per_token: u64::MAX,
            burst: 1,
        },
    );
    // VIP 8 takes 10.0.0.0/8 only: the cases' clients (198.51.100.0/24, 100.64.0.0/10) are
    // refused.
    lb.add_source_ranges(8, &["10.0.0.0/8"]);
    // Every member's next hop, as the agent resolves them (the route lookup is the fallback).
    lb.resolve_nexthops();
    lb
}

/// Flows in the flow tables.
fn flow_count(lb: &mut Lb) -> usize {
    lb.flow_count()
}

/// The flow tables emptied (not timed).
fn clear_flows(lb: &mut Lb) {
    lb.clear_flows()
}

/// Kernel memory of `lb`'s flow table per entry it can hold.
fn flow_table_figures(lb: &Lb) -> Value {
    // IPv4 flows: the bucket table holds `flow_entries` of them.
    let bytes = map_memory(&lb.ebpf).get("LB_FLOWS4").copied().unwrap_or(0);
    let entries = lb.sizes.flow_entries;
    json!({"entries": entries, "kernel_bytes": bytes, "bytes_per_entry": bytes as f64 / entries as f64, "target_bytes_per_entry": TARGET_FLOW_BYTES_PER_ENTRY})
}

/// Client bases of the fast-path flows (each flow `k` is base + k).
const EST_BASE: &str = "100.64.0.0";
const NEW_BASE: &str = "100.96.0.0";
const NAT_NEW_BASE: &str = "100.112.0.0";
const FILL_BASE: &str = "172.16.0.0";
const PROBE_BASE: &str = "11.0.0.0";

/// The program of cost probe `name` (`probe_vip` -> `lb_probe_vip`).
fn probe_program(name: &'static str) -> &'static str {
    match name {
        "probe_parse" => "lb_probe_parse",
        "probe_vip" => "lb_probe_vip",
        "probe_flow" => "lb_probe_flow",
        "probe_lru" => "lb_probe_lru",
        "probe_fib" => "lb_probe_fib",
        "probe_insert" => "lb_probe_insert",
        _ => unreachable!("no probe {name}"),
    }
}
/// Affinity clients make this many connections each.
const PER_CLIENT: usize = 60_000;

fn syn(src: &str, sport: u16, dst: &str) -> Pkt {
    Pkt::tcp(src, sport, dst, 80, LB0_MAC)
}

fn ack(p: Pkt) -> Pkt {
    p.with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
}

/// `t` with its IPv4 source address replaced.
fn with_src(t: &[u8], src: u32) -> Vec<u8> {
    let mut f = t.to_vec();
    f[26..30].copy_from_slice(&src.to_be_bytes());
    f
}

/// Makes the state the cases need before timing (flows, affinity, a NAT translation, a full
/// table); returns the NAT flow's reply frame.
fn prepare(lbs: &mut [Lb; 4], opts: &Options, ingress: u32) -> Vec<u8> {
    let main = &mut lbs[On::Main as usize];
    for k in 0..opts.flows {
        let r = main.run(
            &syn(&flow_src(ip4(EST_BASE), k), 40000, "192.0.2.10").frame(),
            ingress,
        );
        assert_eq!(r.action, XDP_TX, "creating established flow {k}");
    }
    for vip in ["192.0.2.10", "192.0.2.12", "192.0.2.13"] {
        main.run(&syn("198.51.100.1", 1111, vip).frame(), ingress);
    }
    main.run(
        &Pkt::tcp("2001:db8:c::1", 1111, "2001:db8::10", 80, LB0_MAC).frame(),
        ingress,
    );
    // Affinity clients: one connection each makes their entry fresh.
    for c in 0..opts.calls.div_ceil(PER_CLIENT).max(1) {
        main.run(
            &syn(&v4(ip4("198.18.0.1") + c as u32), 1, "192.0.2.11").frame(),
            ingress,
        );
    }
    // The NAT flow's reply: from its backend to the node's NAT port.
    let nat = main
        .nat_flow(&syn("198.51.100.1", 1111, "192.0.2.12").flow_key())
        .expect("the NAT flow was translated");
    let nat_backend = format!("10.1.0.{}", main.backend_of(nat.backend_id) + 1);
    let nat_reply = ack(Pkt::tcp(
        &nat_backend,
        80,
        NODE_V4,
        u16::from_be(nat.nat_port),
        LB0_MAC,
    ))
    .frame();
    // The backend answers and the client acknowledges: the translation is established, not
    // half-open (a half-open one would be over after `nat_half_open_timeout`, mid-bench).
    let answered = main.run(&nat_reply, ingress);
    assert_eq!(answered.action, XDP_TX, "the NAT flow's reply");
    let acked = main.run(
        &ack(syn("198.51.100.1", 1111, "192.0.2.12")).frame(),
        ingress,
    );
    assert_eq!(acked.action, XDP_TX, "the NAT flow's ACK");
    // The full table: more new flows than it holds.
    let full = &mut lbs[On::FullTable as usize];
    let size = full.sizes.flow_entries as usize;
    // Twice its size: with two choices of bucket, a table fills its last ways slowly.
    for k in 0..(2 * size + 1024) {
        full.run(
            &syn(&v4(ip4(FILL_BASE) + k as u32), 40000, "192.0.2.10").frame(),
            ingress,
        );
    }
    // An established flow whose IPv6 backend has no source address to encapsulate from.
    lbs[On::NoV6Source as usize].run(&syn("198.51.100.1", 1111, "192.0.2.15").frame(), ingress);
    nat_reply
}

/// The cases, in the order they run in each round and are printed.
fn cases(nat_reply: Vec<u8>) -> Vec<Case> {
    let b4: Vec<[u8; 4]> = (1..=100).map(|i| [10, 1, 0, i as u8]).collect();
    let same = |f: Vec<u8>| -> Box<dyn FnMut(usize) -> Vec<u8>> { Box::new(move |_| f.clone()) };
    let from = |t: Vec<u8>, base: &str| -> Box<dyn FnMut(usize) -> Vec<u8>> {
        let base = ip4(base);
        Box::new(move |k| with_src(&t, base + k as u32))
    };
    let case = |name, on, frame, action, backends: &[[u8; 4]]| Case {
        name,
        on,
        program: "lb",
        frame,
        action,
        backends: backends.to_vec(),
        v6_outer: false,
        note: "",
    };
    let one4 = ack(syn("198.51.100.1", 1111, "192.0.2.10")).frame();
    // A cost probe: one operation of the fast path alone, after the parser (see `lb_probe_*`).
    let probe = |name: &'static str, frame, note| Case {
        name,
        on: On::Main,
        program: probe_program(name),
        frame,
        action: XDP_TX,
        backends: vec![],
        v6_outer: false,
        note,
    };
    let aff = syn("198.18.0.1", 1000, "192.0.2.11").frame();
    let affinity = Box::new(move |k: usize| {
        let mut f = with_src(&aff, ip4("198.18.0.1") + (k / PER_CLIENT) as u32);
        f[34..36].copy_from_slice(&(2 + (k % PER_CLIENT) as u16).to_be_bytes());
        f
    });
    let one6 = ack(Pkt::tcp("2001:db8:c::1", 1111, "2001:db8::10", 80, LB0_MAC)).frame();
    let at = |vip: &str| ack(syn("198.51.100.1", 1111, vip)).frame();
    vec![
        Case {
            program: "lb_floor",
            ..case("floor", On::Main, same(one4.clone()), XDP_TX, &[])
        },
        case(
            "pass_non_vip",
            On::Main,
            same(at("203.0.113.1")),
            XDP_PASS,
            &[],
        ),
        case(
            "v4_tcp_new_flow",
            On::EmptyTable,
            from(syn(NEW_BASE, 40000, "192.0.2.10").frame(), NEW_BASE),
            XDP_TX,
            &b4,
        ),
        Case {
            note: "(a SYN at a VIP whose new-flow budget is spent: parse, VIP lookup, clock, its bucket; dropped. Compare v4_tcp_new_flow, a SYN that passes)",
            ..case(
                "v4_syn_over_budget",
                On::Main,
                from(syn(NEW_BASE, 40000, "192.0.2.16").frame(), NEW_BASE),
                XDP_DROP,
                &[],
            )
        },
        Case {
            note: "(a SYN from a source outside the VIP's source ranges: parse, VIP lookup, one longest-prefix lookup; dropped. Compare v4_tcp_new_flow)",
            ..case(
                "v4_refused_source",
                On::Main,
                from(syn(NEW_BASE, 40000, "192.0.2.17").frame(), NEW_BASE),
                XDP_DROP,
                &[],
            )
        },
        case(
            "v4_tcp_new_flow_full_table",
            On::FullTable,
            from(syn(NEW_BASE, 40000, "192.0.2.10").frame(), NEW_BASE),
            XDP_TX,
            &b4,
        ),
        case(
            "v4_tcp_established_1flow",
            On::Main,
            same(one4.clone()),
            XDP_TX,
            &b4,
        ),
        case(
            "v4_tcp_established_1m_flows",
            On::Main,
            from(ack(syn(EST_BASE, 40000, "192.0.2.10")).frame(), EST_BASE),
            XDP_TX,
            &b4,
        ),
        case("v4_affinity_hit", On::Main, affinity, XDP_TX, &b4),
        Case {
            v6_outer: true,
            ..case(
                "v6_tcp_established_1flow",
                On::Main,
                same(one6),
                XDP_TX,
                &[],
            )
        },
        case(
            "v4_nat_established_1flow",
            On::Main,
            same(at("192.0.2.12")),
            XDP_TX,
            &b4,
        ),
        case(
            "v4_nat_new_flow",
            On::Main,
            from(syn(NAT_NEW_BASE, 40000, "192.0.2.12").frame(), NAT_NEW_BASE),
            XDP_TX,
            &b4,
        ),
        case(
            "v4_nat_reply",
            On::Main,
            same(nat_reply),
            XDP_TX,
            &[[198, 51, 100, 1]],
        ),
        probe(
            "probe_parse",
            same(one4.clone()),
            "(the program's parser alone)",
        ),
        probe(
            "probe_vip",
            same(one4.clone()),
            "(parser + a VIP-table hit: hash of a 20-byte key)",
        ),
        probe(
            "probe_flow",
            same(one4.clone()),
            "(parser + an IPv4 flow-table hit: one bucket)",
        ),
        probe(
            "probe_lru",
            same(one4.clone()),
            "(parser + an LRU-hash miss, 40-byte key: the IPv6 flow table)",
        ),
        probe(
            "probe_fib",
            same(one4.clone()),
            "(parser + bpf_fib_lookup that resolves)",
        ),
        probe(
            "probe_insert",
            from(syn(PROBE_BASE, 40000, "192.0.2.10").frame(), PROBE_BASE),
            "(parser + an LRU-hash insert that evicts, 8 Ki entries)",
        ),
        Case {
            note: "(parse, VIP lookup, clock, one empty ring slot; dropped)",
            ..case(
                "breakdown_vip_no_backend",
                On::Main,
                same(syn("198.51.100.1", 1111, "192.0.2.14").frame()),
                XDP_DROP,
                &[],
            )
        },
        Case {
            note: "(flow hit, member, VIP and member stats; dropped before encapsulation)",
            ..case(
                "breakdown_established_no_encap",
                On::NoV6Source,
                same(at("192.0.2.15")),
                XDP_DROP,
                &[],
            )
        },
        Case {
            note: "(flow hit + encapsulation; the next hop says unreachable)",
            ..case(
                "breakdown_established_encap_fib_fails",
                On::Main,
                same(at("192.0.2.13")),
                XDP_DROP,
                &[],
            )
        },
    ]
}

/// Calls per round of a case.
fn calls_per_round(case: &Case, opts: &Options) -> usize {
    if case.name == "v4_tcp_established_1m_flows" {
        (opts.flows / opts.rounds).max(1)
    } else {
        (opts.calls / opts.rounds).max(1)
    }
}

/// Runs one round of `case`, checking each call's action and output; returns the round's median.
fn time_round(lb: &mut Lb, case: &mut Case, r: usize, n: usize, ingress: u32) -> u64 {
    let mut ns = Vec::with_capacity(n);
    for i in 0..n {
        let k = r * n + i;
        let frame = (case.frame)(k);
        let run = lb.run_program(case.program, &frame, ingress);
        assert_eq!(
            run.action, case.action,
            "{}: call {k}: wrong action",
            case.name
        );
        if case.v6_outer {
            assert_eq!(
                u16::from_be_bytes([run.output[12], run.output[13]]),
                0x86dd,
                "{}: not IP6IP6",
                case.name
            );
        } else if !case.backends.is_empty() {
            let dst: [u8; 4] = run.output[30..34].try_into().unwrap();
            assert!(
                case.backends.contains(&dst),
                "{}: call {k}: sent to {dst:?}",
                case.name
            );
        } else if case.action == XDP_PASS {
            assert_eq!(
                run.output, frame,
                "{}: changed a packet it should pass",
                case.name
            );
        }
        ns.push(run.duration.as_nanos() as u64);
    }
    median(&mut ns)
}

/// The counters prove each case took the path it is named for (`d`: a counter's change on an
/// instance over the timed rounds).
fn check_paths(d: impl Fn(On, Counter) -> u64, est_calls: u64, one_calls: u64) {
    for on in [On::Main, On::EmptyTable, On::FullTable, On::NoV6Source] {
        assert_eq!(
            d(on, Counter::NexthopFallbacks),
            0,
            "{on:?}: a packet was routed by bpf_fib_lookup, not by its member's next hop"
        );
    }
    assert_eq!(
        d(On::Main, Counter::FlowHits),
        est_calls + 4 * one_calls,
        "established cases did not all hit the flow table"
    );
    assert_eq!(
        d(On::Main, Counter::DropFibFailed),
        one_calls,
        "failed-route breakdown case"
    );
    assert_eq!(
        d(On::Main, Counter::DropNoBackend),
        one_calls,
        "no-backend breakdown case"
    );
    assert_eq!(
        d(On::Main, Counter::DropNewFlowBudget),
        one_calls,
        "SYN over budget case was not refused by the budget"
    );
    assert_eq!(
        d(On::Main, Counter::DropSourceRange),
        one_calls,
        "refused-source case was not refused by the source ranges"
    );
    assert_eq!(
        d(On::Main, Counter::NatForward),
        2 * one_calls,
        "NAT cases did not all translate"
    );
    assert_eq!(
        d(On::Main, Counter::NatNew),
        one_calls,
        "NAT new-flow case did not make new translations"
    );
    assert_eq!(
        d(On::Main, Counter::NatReverse),
        one_calls,
        "NAT reply case did not translate back"
    );
    assert_eq!(
        d(On::Main, Counter::AffinityHits),
        one_calls,
        "affinity case did not hit affinity"
    );
    assert_eq!(
        d(On::Main, Counter::MaglevLookups),
        one_calls,
        "NAT new-flow case did not go through Maglev"
    );
    for on in [On::EmptyTable, On::FullTable] {
        assert_eq!(
            d(on, Counter::MaglevLookups),
            one_calls,
            "{on:?}: new flows did not go through Maglev"
        );
        assert_eq!(
            d(on, Counter::NewFlows),
            one_calls,
            "{on:?}: new flows were not all inserted"
        );
    }
    assert_eq!(
        d(On::NoV6Source, Counter::FlowHits),
        one_calls,
        "no-encapsulation breakdown case missed its flow"
    );
    assert_eq!(
        d(On::NoV6Source, Counter::DropNoSourceAddress),
        one_calls,
        "no-encapsulation breakdown case was not dropped before encapsulation"
    );
}

/// A case's figures: median (min, max) of its round medians, ratio to the floor, target.
fn case_figures(case: &Case, rounds: &[u64], floor: u64) -> Value {
    let mut v = rounds.to_vec();
    let med = median(&mut v);
    let ratio = med as f64 / floor.max(1) as f64;
    let mut c = json!({"ns": med, "min": v[0], "max": v[v.len() - 1], "ratio_to_floor": ratio, "instance": format!("{:?}", case.on)});
    if let Some(t) = target(case.name) {
        c["target_x_floor"] = json!(t);
        c["met"] = json!(ratio <= t);
    }
    if !case.note.is_empty() {
        c["note"] = json!(case.note);
    }
    c
}

pub fn fastpath(opts: &Options) -> Value {
    // A profile needs no million flows: their making would fill the profile.
    let small = Options {
        flows: 1000,
        calls: 1000,
        ..Options::smoke()
    };
    let opts = if std::env::var_os("LB_BENCH_PROFILE").is_some() {
        &small
    } else {
        opts
    };
    let net = FibNet::new("bench");
    let ingress = net.lb0;
    net.ns.run(|| {
        let cpu = pin_cpu();
        // Main holds the established flows and the affinity and NAT cases' new flows: at most
        // a quarter of its IPv4 table, which keeps every one of them (`flowtab`).
        let big = ((4 * (opts.flows + 2 * opts.calls) + 1024) as u32).next_power_of_two();
        let nat = ((2 * opts.flows + opts.calls + 1024) as u32).next_power_of_two();
        let full_size = (opts.flows as u32).next_power_of_two();
        let mut lbs = [
            load_instance(big, nat, true),
            load_instance(big, 1024, true),
            load_instance(full_size, 1024, true),
            load_instance(1024, 1024, false),
        ];
        let nat_reply = prepare(&mut lbs, opts, ingress);
        let full_before = flow_count(&mut lbs[On::FullTable as usize]);
        let mut cases = cases(nat_reply);
        if let Ok(name) = std::env::var("LB_BENCH_PROFILE") {
            return profile(&mut lbs, &mut cases, &name, ingress);
        }

        let mut rounds: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let before: Vec<_> = lbs.iter_mut().map(|lb| lb.counters()).collect();
        let started = Instant::now();
        let mut empty_max = 0;
        for r in 0..opts.rounds {
            empty_max = empty_max.max(flow_count(&mut lbs[On::EmptyTable as usize]));
            clear_flows(&mut lbs[On::EmptyTable as usize]);
            for case in cases.iter_mut() {
                let n = calls_per_round(case, opts);
                let m = time_round(&mut lbs[case.on as usize], case, r, n, ingress);
                rounds.entry(case.name).or_default().push(m);
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let empty_max = empty_max.max(flow_count(&mut lbs[On::EmptyTable as usize]));
        let full_after = flow_count(&mut lbs[On::FullTable as usize]);
        let after: Vec<_> = lbs.iter_mut().map(|lb| lb.counters()).collect();
        let per_round = (opts.calls / opts.rounds).max(1);
        let est_calls = ((opts.flows / opts.rounds).max(1) * opts.rounds) as u64;
        check_paths(|on, c| after[on as usize][&c] - before[on as usize][&c], est_calls, (per_round * opts.rounds) as u64);
        // A round's inserts fill at most this share of the emptied table.
        assert!(empty_max <= per_round + 16, "the emptied table held {empty_max} flows, more than a round's {per_round}");
        // Full: 99.9 % of its ways were taken and it grew by at most 0.1 %, so (nearly) every
        // insert evicted a flow.
        let capacity = 3 * lb_common::flowtab::buckets_for(full_size) as usize;
        assert!(full_before * 1000 >= capacity * 999 && full_after <= full_before + capacity / 1000, "full table: {full_before} flows before, {full_after} after, of {capacity}");

        let floor = median(&mut rounds["floor"].clone());
        let mut out = serde_json::Map::new();
        out.insert("floor_ns".into(), json!(floor));
        for case in &cases {
            out.insert(case.name.to_string(), case_figures(case, &rounds[case.name], floor));
        }
        out.insert("order".into(), json!(cases.iter().map(|c| c.name).collect::<Vec<_>>()));
        out.insert("flow_table".into(), flow_table_figures(&lbs[On::Main as usize]));
        out.insert(
            "method".into(),
            json!({
                "calls_per_case": opts.calls, "rounds": opts.rounds, "established_flows": opts.flows, "cpu": cpu,
                "timing": "BPF_PROG_TEST_RUN, repeat 1, one call per packet; kernel-reported ns per call; per-round median, then median (min, max) of the rounds",
                "config": "one TCP VIP per case, 100 backends, table size 65537",
                "instances": {
                    "Main": format!("flow table {big} entries, {} established flows", opts.flows),
                    "EmptyTable": format!("flow table {big} entries, emptied before each round (at most {empty_max} flows)"),
                    "FullTable": format!("flow table {full_size} entries, {full_before} flows before timing, {full_after} after"),
                    "NoV6Source": "node without an IPv6 source address, VIP 192.0.2.15 on IPv6 backends",
                },
                "seconds": seconds,
            }),
        );
        Value::Object(out)
    })
}

/// `LB_BENCH_PROFILE=<case>`: runs only that case, for `LB_BENCH_PROFILE_SECS` seconds (10 by
/// default), so that `perf record -e cpu-clock -a` can say where its time goes; reports the
/// median time per call.
fn profile(lbs: &mut [Lb; 4], cases: &mut [Case], name: &str, ingress: u32) -> Value {
    let case = cases
        .iter_mut()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("LB_BENCH_PROFILE: no case {name:?}"));
    let secs: u64 = std::env::var("LB_BENCH_PROFILE_SECS").map_or(10, |s| s.parse().unwrap());
    let started = Instant::now();
    let mut medians = Vec::new();
    let mut r = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        medians.push(time_round(
            &mut lbs[case.on as usize],
            case,
            r,
            100_000,
            ingress,
        ));
        r += 1;
    }
    json!({ "profile": name, "median_ns": median(&mut medians), "rounds": r })
}

/// Every `ethtool -S` counter of `dev` in namespace `ns`.
pub(crate) fn ethtool_stats(ns: &str, dev: &str) -> BTreeMap<String, u64> {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-S", dev])
        .output()
        .expect("ethtool -S");
    assert!(
        o.status.success(),
        "ethtool -S {dev}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Sum over the queues of a per-queue veth counter (`rx_queue_0_xdp_tx` + `rx_queue_1_xdp_tx`
/// for `("rx", "xdp_tx")`).
pub(crate) fn queue_sum(stats: &BTreeMap<String, u64>, dir: &str, key: &str) -> u64 {
    stats
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(&format!("{dir}_queue_"))
                .and_then(|r| r.split_once('_'))
                .is_some_and(|(q, rest)| q.parse::<u32>().is_ok() && rest == key)
        })
        .map(|(_, v)| v)
        .sum()
}

/// Per-CPU figures of the host: NET_RX softirqs run, and the CPU time (clock ticks) of each
/// `ksoftirqd/N`, to see where the veths' NAPI ran.
fn softirq_snapshot() -> (Vec<u64>, Vec<u64>) {
    let net_rx = std::fs::read_to_string("/proc/softirqs")
        .unwrap_or_default()
        .lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let cpus = online_cpus();
    let ksoftirqd = (0..cpus)
        .map(|c| {
            let comm = format!("ksoftirqd/{c}");
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .find(|e| {
                    std::fs::read_to_string(e.path().join("comm")).is_ok_and(|s| s.trim() == comm)
                })
                .and_then(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .map(|s| {
                    let f: Vec<&str> = s
                        .rsplit_once(')')
                        .map(|x| x.1)
                        .unwrap_or("")
                        .split_whitespace()
                        .collect();
                    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                })
                .unwrap_or(0)
        })
        .collect();
    (net_rx, ksoftirqd)
}

/// Threads of the kernel's threaded NAPI (`napi/<dev>-<napi id>`), pid and name.
pub(crate) fn napi_threads() -> BTreeMap<u32, String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with("napi/")
                .then(|| (pid, comm.trim().to_string()))
        })
        .collect()
}

/// Pins the NAPI threads of `dev` that appeared since `before` (queue `q`'s to CPU `q %
/// cpus`: ids are given in queue order) and makes them SCHED_FIFO, so that a frame put in a
/// queue's ring is processed on that CPU before the generator there runs again.
fn pin_new_napi_threads(before: &BTreeMap<u32, String>, dev: &str, queues: usize) {
    let prefix = format!("napi/{dev}-");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ours: Vec<(u64, u32)> = loop {
        let v: Vec<(u64, u32)> = napi_threads()
            .into_iter()
            .filter(|(pid, _)| !before.contains_key(pid))
            .filter_map(|(pid, name)| Some((name.strip_prefix(&prefix)?.parse().ok()?, pid)))
            .collect();
        if v.len() >= queues || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        ours.len(),
        queues,
        "{dev}: expected {queues} new NAPI threads, found {ours:?}"
    );
    ours.sort_unstable();
    let cpus = online_cpus();
    for (q, (_, pid)) in ours.iter().enumerate() {
        // SAFETY: a zeroed cpu_set_t with one bit set, and a sched_param, for thread `pid`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(q % cpus, &mut set);
            let r =
                libc::sched_setaffinity(*pid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set);
            assert_eq!(
                r,
                0,
                "pinning {dev}'s NAPI thread {pid}: {}",
                std::io::Error::last_os_error()
            );
            let param = libc::sched_param { sched_priority: 50 };
            let r = libc::sched_setscheduler(*pid as i32, libc::SCHED_FIFO, &param);
            assert_eq!(
                r,
                0,
                "SCHED_FIFO for {dev}'s NAPI thread {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Turns on threaded NAPI for `dev` (in namespace `ns`).
fn set_threaded_napi(ns: &str, dev: &str) {
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{dev}/threaded"),
        ])
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "threaded NAPI on {dev}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// What one live-frames run did, from the veths' own counters (`ethtool -S`, summed over
/// queues) and lb's: every generated frame is either put in lb0's ring or refused there (full),
/// every frame in the ring is run through lb0's program, and each `XDP_TX` is sent or refused.
#[derive(Debug)]
struct LiveRound {
    wall: Duration,
    /// Frames up0 put in lb0's rings (up0's `tx_queue_N_xdp_xmit`).
    enqueued: u64,
    /// Frames lb0's full rings refused, lost before any program on lb0 ran (up0's
    /// `tx_queue_N_xdp_xmit_errors`).
    ring_full: u64,
    /// Frames lb0's program ran on (lb0's `rx_queue_N_xdp_packets`).
    ran: u64,
    /// `XDP_TX` frames lb0 sent, and those up0's full rings refused.
    forwarded: u64,
    refused: u64,
    /// lb's own `packets` and `tx` counters, by CPU (empty for the floor, which counts nothing).
    lb_packets_by_cpu: Vec<u64>,
    lb_tx: u64,
    /// NET_RX softirqs and ksoftirqd CPU ticks by CPU during the run (host-wide).
    net_rx: Vec<u64>,
    ksoftirqd: Vec<u64>,
}

/// Generates `frames` frames with `lb_gen` on up0, split over one thread per CPU in `cpus`,
/// and waits until lb0 has run its program on every frame that reached its rings.
fn live_round(
    lb: &mut Lb,
    ns: &str,
    up0: u32,
    frame: &[u8],
    frames: u32,
    cpus: &[usize],
    counted: bool,
) -> LiveRound {
    let lb0_0 = ethtool_stats(ns, "lb0");
    let up0_0 = ethtool_stats(ns, "up0");
    let (rx0, ks0) = softirq_snapshot();
    let c0 = lb.per_cpu_counters(&[Counter::Packets, Counter::Tx]);
    let generator: &aya::programs::Xdp = lb.xdp("lb_gen");
    let per = frames / cpus.len() as u32;
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let hs: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                s.spawn(move || {
                    crate::netns::enter(ns);
                    crate::harness::pin_to_cpu(cpu);
                    let t = Instant::now();
                    crate::harness::test_run_live(generator, frame, up0, per);
                    (t, Instant::now())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("generator thread"))
            .collect()
    });
    let wall = spans.iter().map(|x| x.1).max().unwrap() - spans.iter().map(|x| x.0).min().unwrap();
    let delta = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, dir: &str, key: &str| {
        queue_sum(b, dir, key) - queue_sum(a, dir, key)
    };
    // The last frames may still be in the rings when the generators return.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (lb0_1, up0_1) = loop {
        let (l, u) = (ethtool_stats(ns, "lb0"), ethtool_stats(ns, "up0"));
        if delta(&lb0_0, &l, "rx", "xdp_packets") >= delta(&up0_0, &u, "tx", "xdp_xmit")
            || Instant::now() > deadline
        {
            break (l, u);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (rx1, ks1) = softirq_snapshot();
    let c1 = lb.per_cpu_counters(&[Counter::Packets, Counter::Tx]);
    let sub = |a: &[u64], b: &[u64]| b.iter().zip(a).map(|(b, a)| b - a).collect::<Vec<u64>>();
    LiveRound {
        wall,
        enqueued: delta(&up0_0, &up0_1, "tx", "xdp_xmit"),
        ring_full: delta(&up0_0, &up0_1, "tx", "xdp_xmit_errors"),
        ran: delta(&lb0_0, &lb0_1, "rx", "xdp_packets"),
        forwarded: delta(&lb0_0, &lb0_1, "rx", "xdp_tx"),
        refused: delta(&lb0_0, &lb0_1, "rx", "xdp_tx_errors"),
        lb_packets_by_cpu: if counted { sub(&c0[0], &c1[0]) } else { vec![] },
        lb_tx: if counted {
            sub(&c0[1], &c1[1]).iter().sum()
        } else {
            0
        },
        net_rx: sub(&rx0, &rx1),
        ksoftirqd: sub(&ks0, &ks1),
    }
}

/// The checks every live round must pass; returns the round's rate.
fn check_live_round(name: &str, r: &LiveRound, frames: u64, cpus: &[usize]) -> u64 {
    let what = format!("{name}: {r:?}");
    assert_eq!(
        r.enqueued + r.ring_full,
        frames,
        "{what}: generated frames unaccounted for at up0"
    );
    assert_eq!(
        r.ran, r.enqueued,
        "{what}: frames put in lb0's rings but never run through its program"
    );
    assert_eq!(
        r.ring_full, 0,
        "{what}: lb0's rings overflowed (frames lost before XDP)"
    );
    assert_eq!(
        r.refused, 0,
        "{what}: up0's rings refused lb0's XDP_TX frames"
    );
    assert_eq!(r.forwarded, frames, "{what}: not every frame was forwarded");
    if !r.lb_packets_by_cpu.is_empty() {
        assert_eq!(
            r.lb_packets_by_cpu.iter().sum::<u64>(),
            r.ran,
            "{what}: lb's packets counter"
        );
        assert_eq!(r.lb_tx, r.forwarded, "{what}: lb's tx counter");
        for (cpu, n) in r.lb_packets_by_cpu.iter().enumerate() {
            let want = if cpus.contains(&cpu) {
                frames / cpus.len() as u64
            } else {
                0
            };
            assert_eq!(
                *n, want,
                "{what}: lb ran on {n} frames on CPU {cpu} (generators on {cpus:?})"
            );
        }
    }
    (r.forwarded as f64 / r.wall.as_secs_f64()) as u64
}

/// The forwarding bench's program: a DSR VIP on one backend reached through lb0, with lb_pass on
/// up0 (a veth only takes XDP frames when its peer runs NAPI) and the NAPI of up0 threaded and
/// pinned. Returns it with the generator's frame (an ACK of an established flow).
fn forwarding_setup(ns: &str, ingress: u32, queues: usize) -> (Lb, Vec<u8>) {
    let mut lb = Lb::load(Sizes {
        maglev_m: 1009,
        max_vips: 2,
        max_backends: 8,
        flow_entries: 1024,
        affinity_entries: 64,
        nat_entries: 64,
    });
    lb.set_node(Some(NODE_V4), None, 0);
    lb.set_backend(0, TX_V4, true);
    lb.add_vip(
        vip_key("192.0.2.10", 80, IPPROTO_TCP),
        VipValue {
            id: 0,
            flags: 0,
            affinity_timeout_s: 0,
            mode: MODE_DSR,
            table_size: 0,
        },
    );
    lb.set_ring(0, |_| 0);
    lb.resolve_nexthops();
    let before = napi_threads();
    lb.xdp("lb_pass")
        .attach("up0", aya::programs::XdpMode::Driver)
        .expect("attaching lb_pass to up0");
    set_threaded_napi(ns, "up0");
    pin_new_napi_threads(&before, "up0", queues);
    let syn =
        Pkt::tcp("198.51.100.1", 1111, "192.0.2.10", 80, LB0_MAC).with(|p| p.payload = vec![7; 10]);
    lb.run(&syn.frame(), ingress);
    let frame = syn.with(|p| p.l4 = L4::Tcp { flags: TCP_ACK }).frame();
    lb.set_gen_frame(&frame);
    (lb, frame)
}

/// Median (min, max) rate of each run, its ratio to the floor, and two cores over one.
fn forwarding_figures(pps: &BTreeMap<&str, Vec<u64>>) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let med = |k: &str| median(&mut pps[k].clone());
    let (floor, one_core) = (med("floor"), med("lb"));
    for (name, v) in pps {
        let mut v = v.clone();
        let m = median(&mut v);
        let key = match *name {
            "lb" => "lb_established_v4",
            "floor" => "floor",
            _ => "lb_established_v4_2cores",
        };
        out.insert(key.into(), json!({"pps": m, "min": v[0], "max": v[v.len() - 1], "ratio_to_floor": m as f64 / floor.max(1) as f64}));
    }
    out.insert(
        "ratio_2cores_to_1core".into(),
        json!(med("lb_2cores") as f64 / one_core.max(1) as f64),
    );
    out
}

/// Packets per second forwarded by one core, and by two: `lb_gen` in live-frames mode sends a
/// pristine frame of an established flow out of up0 for every frame (restoring it from a
/// template, since recycled pages come back encapsulated); the program attached to lb0 (`lb`,
/// or the floor) forwards it with `XDP_TX` back to up0, where `lb_pass` hands it to the stack.
/// lb0 and up0 have a queue per CPU; a veth puts an XDP frame in the peer queue of the sending CPU
/// and their NAPI runs threaded, each queue's thread pinned to its CPU with real-time priority:
/// so a generator's CPU also runs the whole path of its frames, and processes each batch before
/// it generates the next (nothing is lost to a full ring). The rate is the generator's, lb0's
/// and up0's work together; the ratio to the floor is the figure to compare.
pub fn forwarding_rate(opts: &Options) -> Value {
    // A queue per CPU (at least two), so that each CPU's frames have a queue of their own.
    let queues = online_cpus().max(2);
    let net = FibNet::with_uplink_queues("fwd", queues as u32);
    let ns = net.ns.name.clone();
    let ingress = net.lb0;
    // The bench is IPv4 only: without IPv6, neither end sends stray frames (router
    // solicitations, MLD) that would wake a queue's NAPI.
    for dev in ["lb0", "up0"] {
        net.ns
            .sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1");
    }
    net.ns.run(|| {
        let cpu = pin_cpu();
        let cpus = online_cpus();
        let up0 = net.ns.ifindex("up0");
        let (mut lb, frame) = forwarding_setup(&ns, ingress, queues);
        if let Some(refused) = live_frames_refused(&mut lb, &frame, up0) {
            return json!({ "unavailable": refused });
        }
        // Frames per round: a multiple of the batch (64) per generator.
        let frames = (opts.calls as u32).div_ceil(128) * 128;
        let one = [cpu];
        let two: Vec<usize> = (0..cpus.min(2)).collect();
        let runs: [(&str, &str, &[usize]); 3] = [("lb", "lb", &one), ("floor", "lb_floor", &one), ("lb_2cores", "lb", &two)];
        let mut pps: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut rounds = Vec::new();
        for _ in 0..opts.rounds {
            for (name, prog, on) in runs {
                let before = napi_threads();
                let id = lb.xdp(prog).attach("lb0", aya::programs::XdpMode::Driver).expect("attaching to lb0");
                // Attaching makes lb0's NAPI instances anew (detaching removed them).
                set_threaded_napi(&ns, "lb0");
                pin_new_napi_threads(&before, "lb0", queues);
                let r = live_round(&mut lb, &ns, up0, &frame, frames, on, prog == "lb");
                lb.xdp(prog).detach(id).expect("detaching");
                rounds.push(json!({"case": name, "wall_s": r.wall.as_secs_f64(), "ring_full": r.ring_full, "refused": r.refused, "forwarded": r.forwarded, "lb_packets_by_cpu": r.lb_packets_by_cpu, "net_rx_softirqs_by_cpu": r.net_rx, "ksoftirqd_ticks_by_cpu": r.ksoftirqd}));
                pps.entry(name).or_default().push(check_live_round(name, &r, frames as u64, on));
            }
        }
        let mut out = forwarding_figures(&pps);
        out.insert("rounds".into(), Value::Array(rounds));
        out.insert("method".into(), json!({"frames_per_round": frames, "rounds": opts.rounds, "cpu": cpu, "cpus_2cores": two, "napi": "threaded, each queue's thread pinned to its CPU, SCHED_FIFO 50", "generator": "lb_gen, BPF_F_TEST_XDP_LIVE_FRAMES on the veth peer, batch 64, one thread per CPU"}));
        Value::Object(out)
    })
}

/// Why this kernel refuses to generate frames with `BPF_F_TEST_XDP_LIVE_FRAMES`, if it does
/// (one frame, with lb attached to lb0 to take it): the forwarding section then reports that
/// reason instead of figures. Seen on a sandboxed VM where the same call on the same kernel
/// version works elsewhere; every other section runs without live frames.
fn live_frames_refused(lb: &mut Lb, frame: &[u8], up0: u32) -> Option<String> {
    let id = lb
        .xdp("lb")
        .attach("lb0", aya::programs::XdpMode::Driver)
        .expect("attaching to lb0");
    let r = crate::harness::try_test_run_live(lb.xdp("lb_gen"), frame, up0, 1);
    lb.xdp("lb").detach(id).expect("detaching");
    r.err().map(|e| {
        format!(
            "this kernel refuses BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES ({}): no forwarding figures here",
            lb_userspace::error_chain(&e)
        )
    })
}

pub fn maglev_figures() -> Value {
    let m = 65_537;
    let mut out = serde_json::Map::new();
    for n in [10usize, 100, 1000] {
        let keys: Vec<Vec<u8>> = (0..=n)
            .map(|i| format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256).into_bytes())
            .collect();
        let weights: Vec<u32> = (0..=n).map(|i| 50 + (i % 100) as u32).collect();
        let entries = |upto: usize, skip: Option<usize>| -> Vec<maglev::Entry> {
            (0..upto)
                .filter(|i| Some(*i) != skip)
                .map(|i| maglev::Entry {
                    key: &keys[i],
                    weight: weights[i],
                    value: i as u32,
                })
                .collect()
        };
        let mut times = Vec::new();
        let mut table = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            table = maglev::build(&entries(n, None), m, u32::MAX).unwrap();
            times.push(t.elapsed().as_nanos() as u64);
        }
        let shares = maglev::shares(&table);
        let total: u64 = weights[..n].iter().map(|&w| w as u64).sum();
        let worst = (0..n)
            .map(|i| {
                let want = weights[i] as f64 / total as f64 * m as f64;
                (*shares.get(&(i as u32)).unwrap_or(&0) as f64 / want - 1.0).abs()
            })
            .fold(0.0, f64::max);
        let equal: Vec<maglev::Entry> = (0..n)
            .map(|i| maglev::Entry {
                key: &keys[i],
                weight: 1,
                value: i as u32,
            })
            .collect();
        let eq_table = maglev::build(&equal, m, u32::MAX).unwrap();
        let eq_shares = maglev::shares(&eq_table);
        let balance = *eq_shares.values().max().unwrap() as f64 / (m as f64 / n as f64);
        let moved = |a: &[u32], b: &[u32]| {
            a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / m as f64
        };
        let removed = maglev::build(&entries(n, Some(n / 2)), m, u32::MAX).unwrap();
        let added = maglev::build(&entries(n + 1, None), m, u32::MAX).unwrap();
        out.insert(
            format!("n{n}"),
            json!({
                "build_ms": median(&mut times) as f64 / 1e6,
                "weighted_worst_share_error": worst,
                "equal_weights_largest_over_mean": balance,
                "remove_one_moved": moved(&table, &removed), "remove_ideal": 1.0 / n as f64,
                "add_one_moved": moved(&table, &added), "add_ideal": 1.0 / (n + 1) as f64,
            }),
        );
    }
    out.insert("table_size".into(), json!(m));
    Value::Object(out)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn control_plane(opts: &Options) -> Value {
    let rss_before = rss_kib();
    let sizes = Sizes {
        maglev_m: 65_537,
        max_vips: opts.vips as u32,
        max_backends: (opts.vips * opts.backends_per_vip) as u32,
        flow_entries: 1 << 16,
        affinity_entries: 1 << 10,
        nat_entries: 1 << 10,
    };
    let ebpf = program::load(&sizes, None).expect("loading lb for the control-plane benchmark");
    let mut dp = KernelDataplane::new(ebpf, sizes.clone()).expect("kernel dataplane");
    let vip = |i: usize, weight_of: &dyn Fn(usize, usize) -> u32| VipSpec {
        name: format!("v{i}"),
        address: IpAddr::from(std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(192, 0, 0, 0)) + i as u32,
        )),
        port: 80,
        protocol: Protocol::Tcp,
        mode: Mode::Dsr,
        hash: HashOn::FiveTuple,
        affinity_timeout_s: 0,
        table_size: None,
        source_ranges: None,
        new_flow_budget: None,
        backends: (0..opts.backends_per_vip)
            .map(|b| {
                BackendSpec::new(
                    IpAddr::from(std::net::Ipv4Addr::from(
                        u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0))
                            + (i * opts.backends_per_vip + b) as u32,
                    )),
                    0,
                    weight_of(i, b),
                )
            })
            .collect(),
    };
    let desired = |w: &dyn Fn(usize, usize) -> u32| Desired {
        node: NodeSpec {
            source_v4: Some("10.255.0.1".parse().unwrap()),
            source_v6: None,
            udp_idle_timeout: Duration::from_secs(30),
            ..Default::default()
        },
        vips: (0..opts.vips).map(|i| vip(i, w)).collect(),
    };
    let all = desired(&|_, _| 1);
    let one_changed = desired(&|i, b| if i == 0 && b == 0 { 0 } else { 1 });
    let mut cache = TableCache::default();
    let mut step = |cur: &State, d: &Desired, dp: &mut KernelDataplane| {
        let t = Instant::now();
        let (p, next) = plan_cached(cur, d, sizes.limits(), &mut cache).expect("plan");
        let planned = t.elapsed();
        dp.apply(&p).expect("apply");
        (next, p.write_count(), planned, t.elapsed())
    };
    let (s1, full_writes, full_plan, full_total) = step(&State::default(), &all, &mut dp);
    let rss = rss_kib();
    let (s2, one_writes, one_plan, one_total) = step(&s1, &one_changed, &mut dp);
    let (_, same_writes, same_plan, same_total) = step(&s2, &one_changed, &mut dp);
    let kernel = map_memory(&dp.ebpf);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    json!({
        "scale": {"vips": opts.vips, "backends_per_vip": opts.backends_per_vip, "table_size": 65_537},
        "full_sync": {"writes": full_writes, "plan_ms": ms(full_plan), "total_ms": ms(full_total)},
        "one_backend_change": {"writes": one_writes, "plan_ms": ms(one_plan), "total_ms": ms(one_total)},
        "unchanged_resync": {"writes": same_writes, "plan_ms": ms(same_plan), "total_ms": ms(same_total)},
        "agent_rss_kib": {"before_load": rss_before, "after_full_sync": rss},
        "kernel_map_bytes_at_this_scale": kernel,
    })
}

pub fn memory(opts: &Options) -> Value {
    let sizes = Sizes {
        flow_entries: opts.memory_flows,
        ..Sizes::default()
    };
    let ebpf = program::load(&sizes, None).expect("loading lb for the memory figures");
    let maps = map_memory(&ebpf);
    let total: u64 = maps.values().sum();
    // IPv4 flows live in the bucket table (`flow_entries` of them), IPv6 flows in the LRU hash.
    let per_entry = maps.get("LB_FLOWS4").copied().unwrap_or(0) as f64 / opts.memory_flows as f64;
    let v6_entries = sizes.flow_entries_v6();
    let v6_per_entry = maps.get("LB_FLOWS").copied().unwrap_or(0) as f64 / v6_entries as f64;
    json!({"flow_entries": opts.memory_flows, "kernel_map_bytes": maps, "kernel_map_bytes_total": total, "flow_table_bytes_per_entry": per_entry, "v6_flow_entries": v6_entries, "v6_flow_table_bytes_per_entry": v6_per_entry, "sizes": format!("{sizes:?}")})
}

/// A migration that doubles the flow and NAT tables (see `lb_userspace::migrate`) holding
/// `opts.migration_entries` IPv4 flows and as many NAT translations (both directions), with 1 %
/// more written to the old maps between the copy and the swap (late writes to merge). Reports
/// the copy (while the old program would serve) and the finish (grace period, merge and pin
/// renames: the window in which the late entries are missing from the maps the new program uses).
pub fn migration(opts: &Options) -> Value {
    use aya::maps::{HashMap, MapData};
    use lb_common::{FlowKey, NatFlow, NatReverse, flowtab, maps};
    use lb_userspace::migrate;
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/lb-bench-migrate-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("making the pin dir");
    let n = opts.migration_entries;
    let sizes = Sizes {
        flow_entries: n * 3,
        nat_entries: n + n / 4,
        ..Sizes::default()
    };
    let key = |i: u32| {
        let mut k = FlowKey::default();
        k.src[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
        k.src_port = (1024 + (i % 60_000) as u16).to_be();
        k.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        k.dst_port = 80u16.to_be();
        k.proto = IPPROTO_TCP;
        k.family = lb_common::FAMILY_V4;
        k
    };
    let fill = |ebpf_nat: &mut HashMap<&mut MapData, FlowKey, NatFlow>, from: u32, to: u32| {
        for i in from..to {
            ebpf_nat
                .insert(key(i), NatFlow::default(), 0)
                .expect("NAT entry");
        }
    };
    let mut first = migrate::load(&sizes, &dir, "start", None).expect("loading on empty pins");
    {
        let mut nat: HashMap<_, FlowKey, NatFlow> =
            HashMap::try_from(first.ebpf.map_mut(maps::NAT).unwrap()).unwrap();
        fill(&mut nat, 0, n);
        let mut rev: HashMap<_, FlowKey, NatReverse> =
            HashMap::try_from(first.ebpf.map_mut(maps::NAT_REV).unwrap()).unwrap();
        for i in 0..n {
            rev.insert(key(i), NatReverse::default(), 0)
                .expect("reverse entry");
        }
        let mut dp = KernelDataplane::new(first.ebpf, sizes.clone()).expect("dataplane");
        let buckets = flowtab::buckets_for(sizes.flow_entries);
        let map = dp.ebpf.map_mut(maps::FLOWS4).unwrap();
        let aya::maps::Map::Array(data) = map else {
            panic!("LB_FLOWS4 is an array")
        };
        let mem = lb_userspace::mapping::Mapping::new(
            data,
            buckets as usize * size_of::<flowtab::FlowBucket>(),
            true,
        )
        .expect("mapping the flow table");
        // SAFETY: the mapping covers `buckets` buckets, page-aligned.
        let table = unsafe {
            std::slice::from_raw_parts_mut(
                mem.ptr().cast::<flowtab::FlowBucket>(),
                buckets as usize,
            )
        };
        for i in 0..n {
            let k = flowtab::pack_key(&key(i), 0);
            assert!(migrate::convert::place(
                table,
                k,
                flowtab::pack_value(k, 1, 1),
                i
            ));
        }
        first.ebpf = dp.ebpf;
    }
    drop(first);
    let doubled = Sizes {
        flow_entries: sizes.flow_entries * 2,
        nat_entries: sizes.nat_entries * 2,
        ..sizes.clone()
    };
    let t = Instant::now();
    let mut second = migrate::load(&doubled, &dir, "reload", None).expect("migrating");
    let copy = t.elapsed();
    // Late writes of the old program: 1 % more translations in the old maps.
    let late = (n / 100).max(1);
    {
        let data = MapData::from_pin(dir.join(maps::NAT)).expect("the old NAT map");
        let mut old = aya::maps::Map::from_map_data(data).expect("a map");
        let mut nat: HashMap<_, FlowKey, NatFlow> = HashMap::try_from(&mut old).unwrap();
        fill(&mut nat, n, n + late);
    }
    let t = Instant::now();
    let report = second
        .pending
        .take()
        .expect("the tables moved")
        .finish(&mut second.ebpf)
        .expect("finishing");
    let finish = t.elapsed();
    drop(second);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let _ = std::fs::remove_dir(&dir);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let moved: Vec<Value> = report
        .maps
        .iter()
        .filter(|m| m.entries + m.merged > 0)
        .map(|m| json!({"map": m.map, "entries": m.entries, "merged": m.merged, "ms": m.ms}))
        .collect();
    assert_eq!(
        report.merged,
        u64::from(late),
        "the late writes were merged"
    );
    json!({
        "entries": n,
        "late_writes": late,
        "load_and_copy_ms": ms(copy),
        "finish_ms": ms(finish),
        "entries_copied": report.entries,
        "copy_and_merge_ms": report.maps.iter().map(|m| m.ms).sum::<f64>(),
        "maps": moved,
    })
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

/// The table printed by `cargo xtask bench` (the sections the document has).
pub fn table(v: &Value) -> String {
    let mut s = String::new();
    if let Some(f) = v.get("fastpath") {
        s += &match f.get("profile") {
            Some(p) => format!("profile of {p}: median {} ns per call\n", f["median_ns"]),
            None => fastpath_table(f),
        };
    }
    if let Some(fw) = v.get("forwarding_rate") {
        s += &forwarding_table(fw);
    }
    if let Some(p) = v.get("nat_peer") {
        s += &crate::bench_peer::table(p);
    }
    if let Some(p) = v.get("programs") {
        s += &programs_table(p);
    }
    if let Some(m) = v.get("maglev") {
        s += &maglev_table(m);
    }
    if let Some(cp) = v.get("control_plane") {
        s += &control_plane_table(cp);
    }
    if let Some(m) = v.get("migration") {
        s += &format!(
            "migration (flow and NAT tables doubled, {} IPv4 flows and {} translations each way, {} late writes): load and copy {:.0} ms (the old program serving), finish {:.0} ms (grace period, merge, renames); copying and merging the maps {:.0} ms in all\n",
            m["entries"],
            m["entries"],
            m["late_writes"],
            m["load_and_copy_ms"].as_f64().unwrap_or(0.0),
            m["finish_ms"].as_f64().unwrap_or(0.0),
            m["copy_and_merge_ms"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(m) = v.get("memory") {
        s += &format!(
            "memory: kernel maps for a {}-entry flow table: {} bytes ({} of them the IPv4 flow table, {:.1} bytes per entry; target <= {}: {}; IPv6 LRU: {} entries, {:.1} bytes each)\n",
            m["flow_entries"],
            m["kernel_map_bytes_total"],
            m["kernel_map_bytes"]["LB_FLOWS4"],
            m["flow_table_bytes_per_entry"].as_f64().unwrap_or(0.0),
            TARGET_FLOW_BYTES_PER_ENTRY,
            mark(
                m["flow_table_bytes_per_entry"].as_f64().unwrap_or(f64::MAX)
                    <= TARGET_FLOW_BYTES_PER_ENTRY
            ),
            m["v6_flow_entries"],
            m["v6_flow_table_bytes_per_entry"].as_f64().unwrap_or(0.0),
        );
    }
    s
}

fn fastpath_table(f: &Value) -> String {
    let mut s = format!(
        "fast path (BPF_PROG_TEST_RUN, one call per packet), floor {} ns\n",
        f["floor_ns"]
    );
    s += &format!(
        "  {:<38} {:>6} {:>6} {:>6} {:>8}   {}\n",
        "case", "ns", "min", "max", "x floor", "target"
    );
    let order: Vec<&str> = f["order"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for k in order {
        let c = &f[k];
        let Some(ns) = c.get("ns") else { continue };
        let n = |x: &Value| x.as_u64().unwrap_or(0);
        let ratio = c["ratio_to_floor"].as_f64().unwrap_or(0.0);
        let tail = match (
            c.get("target_x_floor").and_then(Value::as_f64),
            c.get("note").and_then(Value::as_str),
        ) {
            (Some(t), _) => format!("<= {t:<5} {}", mark(ratio <= t)),
            (None, Some(note)) => note.to_string(),
            _ => String::new(),
        };
        s += &format!(
            "  {:<38} {:>6} {:>6} {:>6} {:>8.2}   {}\n",
            k,
            n(ns),
            n(&c["min"]),
            n(&c["max"]),
            ratio,
            tail
        );
    }
    let t = &f["flow_table"];
    let per = t["bytes_per_entry"].as_f64().unwrap_or(0.0);
    s += &format!(
        "  flow table of the main instance: {} entries, {} bytes in the kernel, {per:.1} bytes per entry (target <= {TARGET_FLOW_BYTES_PER_ENTRY}: {})\n",
        t["entries"],
        t["kernel_bytes"],
        mark(per <= TARGET_FLOW_BYTES_PER_ENTRY)
    );
    s
}

fn forwarding_table(fw: &Value) -> String {
    if let Some(why) = fw["unavailable"].as_str() {
        return format!("forwarding rate (live frames): not measured: {why}\n");
    }
    let pps = |k: &str| fw[k]["pps"].as_u64().unwrap_or(0);
    let ratio = fw["lb_established_v4"]["ratio_to_floor"]
        .as_f64()
        .unwrap_or(0.0);
    let two = fw["ratio_2cores_to_1core"].as_f64().unwrap_or(0.0);
    format!(
        "forwarding rate (live frames), one core: lb {} pps, floor {} pps, ratio {ratio:.2} (target >= {TARGET_FORWARDING_RATIO}: {})\n\
         forwarding_rate_2cores: lb {} pps, x{two:.2} one core (target >= {TARGET_2CORES_RATIO}: {})\n",
        pps("lb_established_v4"),
        pps("floor"),
        mark(ratio >= TARGET_FORWARDING_RATIO),
        pps("lb_established_v4_2cores"),
        mark(two >= TARGET_2CORES_RATIO),
    )
}

fn programs_table(p: &Value) -> String {
    let mut s = format!(
        "programs (kernel's view after loading)\n  {:<12} {:>12} {:>10} {:>14}\n",
        "program", "translated", "JIT bytes", "verifier insns"
    );
    for (k, c) in p.as_object().into_iter().flatten() {
        let n = |x: &str| c[x].as_u64().unwrap_or(0);
        s += &format!(
            "  {:<12} {:>12} {:>10} {:>14}\n",
            k,
            n("translated_insns"),
            n("jited_bytes"),
            n("verified_insns")
        );
    }
    s
}

fn maglev_table(mg: &Value) -> String {
    let mut s = String::from("maglev, M = 65537\n");
    for n in ["n10", "n100", "n1000"] {
        let m = &mg[n];
        let f = |k: &str| m[k].as_f64().unwrap_or(0.0);
        s += &format!(
            "  N={:<5} build {:>7.3} ms  balance {:.4}  weighted error {:.2} %  remove {:.4} (ideal {:.4})  add {:.4} (ideal {:.4})\n",
            &n[1..],
            f("build_ms"),
            f("equal_weights_largest_over_mean"),
            f("weighted_worst_share_error") * 100.0,
            f("remove_one_moved"),
            f("remove_ideal"),
            f("add_one_moved"),
            f("add_ideal"),
        );
    }
    s
}

fn control_plane_table(cp: &Value) -> String {
    let mut s = format!(
        "control plane, {} VIPs x {} backends\n",
        cp["scale"]["vips"], cp["scale"]["backends_per_vip"]
    );
    for k in ["full_sync", "one_backend_change", "unchanged_resync"] {
        s += &format!(
            "  {:<20} {:>10} writes {:>10.1} ms (plan {:.1} ms)\n",
            k,
            cp[k]["writes"].as_u64().unwrap_or(0),
            cp[k]["total_ms"].as_f64().unwrap_or(0.0),
            cp[k]["plan_ms"].as_f64().unwrap_or(0.0)
        );
    }
    s += &format!(
        "  agent RSS after full sync: {} KiB\n",
        cp["agent_rss_kib"]["after_full_sync"]
    );
    s
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
