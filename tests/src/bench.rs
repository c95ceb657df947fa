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
    harness::{FibNet, Lb, XDP_DROP, XDP_PASS, XDP_TX, net::*, vip_key},
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
        }
    }
}

/// Pins the calling thread to one CPU (the last one).
fn pin_cpu() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu = cpus - 1;
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    cpu
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// A frame generator for one case and the check each output must pass.
struct Case {
    name: &'static str,
    program: &'static str,
    frame: Box<dyn FnMut(usize) -> Vec<u8>>,
    action: u32,
    /// Backends the outer destination must be one of (empty: output must equal input).
    backends: Vec<[u8; 4]>,
    v6_outer: bool,
}

fn v4(a: u32) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

/// Client of flow `k` (distinct 5-tuples): 100.64.0.0/10 addresses, fixed port.
fn flow_src(base: u32, k: usize) -> String {
    v4(base + k as u32)
}

pub fn fastpath(opts: &Options) -> Value {
    let net = FibNet::new("bench");
    let ingress = net.lb0;
    net.ns.run(|| {
        let cpu = pin_cpu();
        let m = 65_537;
        let mut lb = Lb::load(Sizes {
            maglev_m: m,
            max_vips: 8,
            // A member per (VIP, backend): five VIPs of up to 100 backends.
            max_backends: 1024,
            // Established flows, then the new-flow, affinity and NAT cases each add `calls` more: at
            // most a third of the IPv4 table, which keeps every one of them (see `flowtab`).
            flow_entries: ((3 * (opts.flows + 3 * opts.calls) + 1024) as u32).next_power_of_two(),
            affinity_entries: 1 << 16,
            nat_entries: ((2 * opts.flows + opts.calls + 1024) as u32).next_power_of_two(),
        });
        lb.set_node(Some(NODE_V4), Some(NODE_V6), 0);
        let v4_backends: Vec<String> = (1..=100).map(|i| format!("10.1.0.{i}")).collect();
        let v6_backends: Vec<String> = (1..=100).map(|i| format!("fd01::{i:x}")).collect();
        for (i, a) in v4_backends.iter().enumerate() {
            lb.set_backend(i as u32, a, true);
        }
        for (i, a) in v6_backends.iter().enumerate() {
            lb.set_backend(100 + i as u32, a, true);
        }
        let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("b{i}").into_bytes()).collect();
        let table = |base: u32| {
            let e: Vec<maglev::Entry> = keys.iter().enumerate().map(|(i, k)| maglev::Entry { key: k, weight: 1, value: base + i as u32 }).collect();
            maglev::build(&e, m, lb_common::NO_BACKEND).unwrap()
        };
        let (t4, t6) = (table(0), table(100));
        for (id, addr, t, affinity) in [(0, "192.0.2.10", &t4, 0), (1, "2001:db8::10", &t6, 0), (2, "192.0.2.11", &t4, 3600)] {
            lb.add_vip(vip_key(addr, 80, IPPROTO_TCP), VipValue { id, flags: 0, affinity_timeout_s: affinity, mode: MODE_DSR, table_size: 0 });
            lb.set_ring(id, |s| t[s as usize]);
        }
        // A NAT VIP on the same 100 backends (NAT ports 1024-65535: 100 x 64k translations), and
        // a breakdown VIP whose backend's route lookup fails (encapsulation and a route lookup,
        // no neighbour, no transmit).
        lb.set_nat(1024, 65535, 10_000_000_000, 2_000_000_000);
        lb.set_backend(200, UNREACHABLE_V4, true);
        lb.add_vip(vip_key("192.0.2.12", 80, IPPROTO_TCP), VipValue { id: 3, flags: 0, affinity_timeout_s: 0, mode: MODE_NAT, table_size: 0 });
        lb.set_ring(3, |s| t4[s as usize]);
        lb.add_vip(vip_key("192.0.2.13", 80, IPPROTO_TCP), VipValue { id: 4, flags: 0, affinity_timeout_s: 0, mode: MODE_DSR, table_size: 0 });
        lb.set_ring(4, |_| 200);
        let octets = |v: &[String]| -> Vec<[u8; 4]> { v.iter().map(|a| a.parse::<std::net::Ipv4Addr>().unwrap().octets()).collect() };
        let b4 = octets(&v4_backends);

        // Established flows, created before timing (not timed).
        let est_base = u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0));
        let new_base = u32::from(std::net::Ipv4Addr::new(100, 96, 0, 0));
        let syn = |src: &str, sport: u16, dst: &str| Pkt::tcp(src, sport, dst, 80, LB0_MAC);
        let ack = |p: Pkt| p.with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        for k in 0..opts.flows {
            let r = lb.run(&syn(&flow_src(est_base, k), 40000, "192.0.2.10").frame(), ingress);
            assert_eq!(r.action, XDP_TX, "creating established flow {k}");
        }
        let one4 = ack(syn("198.51.100.1", 1111, "192.0.2.10")).frame();
        let nat4 = ack(syn("198.51.100.1", 1111, "192.0.2.12")).frame();
        let fib4 = ack(syn("198.51.100.1", 1111, "192.0.2.13")).frame();
        lb.run(&syn("198.51.100.1", 1111, "192.0.2.12").frame(), ingress);
        lb.run(&syn("198.51.100.1", 1111, "192.0.2.13").frame(), ingress);
        let one6 = ack(Pkt::tcp("2001:db8:c::1", 1111, "2001:db8::10", 80, LB0_MAC)).frame();
        lb.run(&syn("198.51.100.1", 1111, "192.0.2.10").frame(), ingress);
        lb.run(&Pkt::tcp("2001:db8:c::1", 1111, "2001:db8::10", 80, LB0_MAC).frame(), ingress);
        // Affinity clients: one connection each makes their entry fresh.
        let clients = opts.calls.div_ceil(60_000).max(1);
        for c in 0..clients {
            lb.run(&syn(&v4(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)) + c as u32), 1, "192.0.2.11").frame(), ingress);
        }

        // The NAT flow's reply: from its backend to the node's NAT port.
        let nat_key = syn("198.51.100.1", 1111, "192.0.2.12").flow_key();
        let nat = lb.nat_flow(&nat_key).expect("the NAT flow was translated");
        let nat_backend = b4[lb.backend_of(nat.backend_id) as usize];
        let nat_reply = Pkt::tcp(&std::net::Ipv4Addr::from(nat_backend).to_string(), 80, NODE_V4, u16::from_be(nat.nat_port), LB0_MAC)
            .with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
            .frame();
        let nat_new_base = u32::from(std::net::Ipv4Addr::new(100, 112, 0, 0));
        let template_nat_new = syn("100.112.0.0", 40000, "192.0.2.12").frame();
        let template_new = syn("100.96.0.0", 40000, "192.0.2.10").frame();
        let template_est = ack(syn("100.64.0.0", 40000, "192.0.2.10")).frame();
        let template_aff = syn("198.18.0.1", 1000, "192.0.2.11").frame();
        let with_src = |t: &Vec<u8>, src: u32| {
            let mut f = t.clone();
            f[26..30].copy_from_slice(&src.to_be_bytes());
            f
        };
        let per_round = (opts.calls / opts.rounds).max(1);
        let est_per_round = (opts.flows / opts.rounds).max(1);
        let (tn, te, ta) = (template_new.clone(), template_est.clone(), template_aff.clone());
        let mut cases = [
            Case { name: "floor", program: "lb_floor", frame: Box::new({ let f = one4.clone(); move |_| f.clone() }), action: XDP_TX, backends: vec![], v6_outer: false },
            Case { name: "pass_non_vip", program: "lb", frame: Box::new({ let f = ack(syn("198.51.100.1", 1111, "203.0.113.1")).frame(); move |_| f.clone() }), action: XDP_PASS, backends: vec![], v6_outer: false },
            Case { name: "v4_tcp_new_flow", program: "lb", frame: Box::new(move |k| with_src(&tn, new_base + k as u32)), action: XDP_TX, backends: b4.clone(), v6_outer: false },
            Case { name: "v4_tcp_established_1flow", program: "lb", frame: Box::new({ let f = one4.clone(); move |_| f.clone() }), action: XDP_TX, backends: b4.clone(), v6_outer: false },
            Case { name: "v4_tcp_established_1m_flows", program: "lb", frame: Box::new(move |k| with_src(&te, est_base + k as u32)), action: XDP_TX, backends: b4.clone(), v6_outer: false },
            Case {
                name: "v4_affinity_hit",
                program: "lb",
                frame: Box::new(move |k| {
                    let mut f = with_src(&ta, u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)) + (k / 60_000) as u32);
                    f[34..36].copy_from_slice(&(2 + (k % 60_000) as u16).to_be_bytes());
                    f
                }),
                action: XDP_TX,
                backends: b4.clone(),
                v6_outer: false,
            },
            Case { name: "v6_tcp_established_1flow", program: "lb", frame: Box::new({ let f = one6.clone(); move |_| f.clone() }), action: XDP_TX, backends: vec![], v6_outer: true },
            Case { name: "v4_nat_established_1flow", program: "lb", frame: Box::new(move |_| nat4.clone()), action: XDP_TX, backends: b4.clone(), v6_outer: false },
            Case { name: "v4_nat_new_flow", program: "lb", frame: Box::new(move |k| with_src(&template_nat_new, nat_new_base + k as u32)), action: XDP_TX, backends: b4.clone(), v6_outer: false },
            Case { name: "v4_nat_reply", program: "lb", frame: Box::new(move |_| nat_reply.clone()), action: XDP_TX, backends: vec![[198, 51, 100, 1]], v6_outer: false },
            Case { name: "breakdown_established_encap_fib_fails", program: "lb", frame: Box::new(move |_| fib4.clone()), action: XDP_DROP, backends: vec![], v6_outer: false },
        ];

        let mut rounds: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let before = lb.counters();
        let started = Instant::now();
        for r in 0..opts.rounds {
            for case in cases.iter_mut() {
                let n = if case.name == "v4_tcp_established_1m_flows" { est_per_round } else { per_round };
                let mut ns = Vec::with_capacity(n);
                for i in 0..n {
                    let k = r * n + i;
                    let frame = (case.frame)(k);
                    let run = lb.run_program(case.program, &frame, ingress);
                    assert_eq!(run.action, case.action, "{}: call {k}: wrong action", case.name);
                    if case.v6_outer {
                        assert_eq!(u16::from_be_bytes([run.output[12], run.output[13]]), 0x86dd, "{}: not IP6IP6", case.name);
                    } else if !case.backends.is_empty() {
                        let dst: [u8; 4] = run.output[30..34].try_into().unwrap();
                        assert!(case.backends.contains(&dst), "{}: call {k}: sent to {dst:?}", case.name);
                    } else if case.action == XDP_PASS {
                        assert_eq!(run.output, frame, "{}: changed a packet it should pass", case.name);
                    }
                    ns.push(run.duration.as_nanos() as u64);
                }
                rounds.entry(case.name).or_default().push(median(&mut ns));
            }
        }
        let after = lb.counters();
        let d = |c: Counter| after[&c] - before[&c];
        // The cases must have taken the paths they are named for.
        let est_calls = (est_per_round * opts.rounds) as u64;
        let one_calls = (per_round * opts.rounds) as u64;
        assert_eq!(d(Counter::FlowHits), est_calls + 4 * one_calls, "established cases did not all hit the flow table");
        assert_eq!(d(Counter::DropFibFailed), one_calls, "failed-route breakdown case");
        assert_eq!(d(Counter::NatForward), 2 * one_calls, "NAT cases did not all translate");
        assert_eq!(d(Counter::NatNew), one_calls, "NAT new-flow case did not make new translations");
        assert_eq!(d(Counter::NatReverse), one_calls, "NAT reply case did not translate back");
        assert_eq!(d(Counter::AffinityHits), one_calls, "affinity case did not hit affinity");
        assert_eq!(d(Counter::MaglevLookups), 2 * one_calls, "new-flow cases (DSR, NAT) did not go through Maglev");

        let floor = {
            let mut v = rounds["floor"].clone();
            median(&mut v)
        };
        let mut out = serde_json::Map::new();
        out.insert("floor_ns".into(), json!(floor));
        for (name, v) in &rounds {
            let mut v = v.clone();
            let med = median(&mut v);
            out.insert(
                name.to_string(),
                json!({"ns": med, "min": v[0], "max": v[v.len() - 1], "ratio_to_floor": med as f64 / floor.max(1) as f64}),
            );
        }
        out.insert(
            "method".into(),
            json!({
                "calls_per_case": opts.calls, "rounds": opts.rounds, "established_flows": opts.flows, "cpu": cpu,
                "timing": "BPF_PROG_TEST_RUN, repeat 1, one call per packet; kernel-reported ns per call; per-round median, then median (min, max) of the rounds",
                "config": "one TCP VIP per case, 100 backends, table size 65537",
                "seconds": started.elapsed().as_secs_f64(),
            }),
        );
        Value::Object(out)
    })
}

fn ethtool_stat(ns: &str, dev: &str, key: &str) -> u64 {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-S", dev])
        .output()
        .expect("ethtool -S");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.trim().split(':').next() == Some(key))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Packets per second one core forwards: `lb_gen` in live-frames mode sends a pristine frame of an
/// established flow out of up0 for every frame (restoring it from a template, since recycled pages
/// come back encapsulated); the program attached to lb0 (`lb`, or the floor) forwards it with
/// `XDP_TX`. Generation and forwarding run on the same pinned CPU, so the rate is the pair's;
/// the ratio to the floor is the figure to compare.
pub fn forwarding_rate(opts: &Options) -> Value {
    let net = FibNet::new("fwd");
    let ingress = net.lb0;
    net.ns.run(|| {
        let cpu = pin_cpu();
        let mut lb = Lb::load(Sizes { maglev_m: 1009, max_vips: 2, max_backends: 8, flow_entries: 1024, affinity_entries: 64, nat_entries: 64 });
        lb.set_node(Some(NODE_V4), None, 0);
        lb.set_backend(0, TX_V4, true);
        lb.add_vip(vip_key("192.0.2.10", 80, IPPROTO_TCP), VipValue { id: 0, flags: 0, affinity_timeout_s: 0, mode: MODE_DSR, table_size: 0 });
        lb.set_ring(0, |_| 0);
        let up0 = net.ns.ifindex("up0");
        lb.xdp("lb_pass").attach("up0", aya::programs::XdpMode::Driver).expect("attaching lb_pass to up0");
        let syn = Pkt::tcp("198.51.100.1", 1111, "192.0.2.10", 80, LB0_MAC).with(|p| p.payload = vec![7; 10]);
        lb.run(&syn.frame(), ingress);
        let frame = syn.with(|p| p.l4 = L4::Tcp { flags: TCP_ACK }).frame();
        lb.set_gen_frame(&frame);
        let frames = opts.calls as u32;
        let mut pps: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for _ in 0..opts.rounds {
            for prog in ["lb", "lb_floor"] {
                let id = lb.xdp(prog).attach("lb0", aya::programs::XdpMode::Driver).expect("attaching to lb0");
                let tx0 = ethtool_stat(&net.ns.name, "lb0", "rx_queue_0_xdp_tx");
                let err0 = ethtool_stat(&net.ns.name, "lb0", "rx_queue_0_xdp_tx_errors");
                let c0 = lb.counters();
                let t = Instant::now();
                lb.run_live("lb_gen", &frame, up0, frames);
                let wall = t.elapsed();
                let forwarded = ethtool_stat(&net.ns.name, "lb0", "rx_queue_0_xdp_tx") - tx0;
                // A veth can refuse an XDP_TX frame (its peer's ring full): the program's
                // verdict was still XDP_TX, and the veth counts the refusal.
                let refused = ethtool_stat(&net.ns.name, "lb0", "rx_queue_0_xdp_tx_errors") - err0;
                // Frames the program ran on (the floor keeps no counters).
                let mut seen = String::new();
                if prog == "lb" {
                    let c = lb.counters();
                    let tx = c[&Counter::Tx] - c0[&Counter::Tx];
                    assert_eq!(tx, forwarded + refused, "lb counted {tx} XDP_TX; the veth sent {forwarded} and refused {refused}");
                    seen = format!("; lb ran on {} of them", c[&Counter::Packets] - c0[&Counter::Packets]);
                }
                assert!(forwarded as f64 >= frames as f64 * 0.99, "{prog}: only {forwarded} of {frames} frames forwarded ({refused} refused by the veth{seen})");
                pps.entry(prog).or_default().push((forwarded as f64 / wall.as_secs_f64()) as u64);
                lb.xdp(prog).detach(id).expect("detaching");
            }
        }
        let mut out = serde_json::Map::new();
        let floor = median(&mut pps["lb_floor"].clone());
        for (prog, v) in &pps {
            let mut v = v.clone();
            let m = median(&mut v);
            out.insert(
                if *prog == "lb" { "lb_established_v4".into() } else { "floor".into() },
                json!({"pps": m, "min": v[0], "max": v[v.len() - 1], "ratio_to_floor": m as f64 / floor.max(1) as f64}),
            );
        }
        out.insert("method".into(), json!({"frames_per_round": frames, "rounds": opts.rounds, "cpu": cpu, "generator": "lb_gen, BPF_F_TEST_XDP_LIVE_FRAMES on the veth peer, batch 64"}));
        Value::Object(out)
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

/// Kernel memory of each map (the kernel's own accounting: `memlock` in fdinfo).
fn map_memory(ebpf: &aya::Ebpf) -> BTreeMap<String, u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut out = BTreeMap::new();
    for (name, map) in ebpf.maps() {
        let fd = match map {
            aya::maps::Map::Array(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::DevMapHash(d) => d.fd().as_fd().as_raw_fd(),
            _ => continue,
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        if let Some(b) = info
            .lines()
            .find(|l| l.starts_with("memlock:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        {
            out.insert(name.to_string(), b);
        }
    }
    out
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
        backends: (0..opts.backends_per_vip)
            .map(|b| BackendSpec {
                address: IpAddr::from(std::net::Ipv4Addr::from(
                    u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0))
                        + (i * opts.backends_per_vip + b) as u32,
                )),
                port: 0,
                weight: weight_of(i, b),
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
    json!({"flow_entries": opts.memory_flows, "kernel_map_bytes": maps, "kernel_map_bytes_total": total, "sizes": format!("{sizes:?}")})
}

/// Runs everything; returns the JSON document.
pub fn run(opts: &Options) -> Value {
    let started = Instant::now();
    let fast = fastpath(opts);
    let fwd = forwarding_rate(opts);
    let mag = maglev_figures();
    let cp = control_plane(opts);
    let mem = memory(opts);
    json!({
        "machine": machine(),
        "fastpath": fast,
        "forwarding_rate": fwd,
        "maglev": mag,
        "control_plane": cp,
        "memory": mem,
        "seconds": started.elapsed().as_secs_f64(),
    })
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

/// The table printed by `cargo xtask bench`.
pub fn table(v: &Value) -> String {
    let mut s = String::new();
    let f = &v["fastpath"];
    s.push_str(&format!(
        "fast path (BPF_PROG_TEST_RUN, one call per packet), floor {} ns\n",
        f["floor_ns"]
    ));
    s.push_str(&format!(
        "  {:<30} {:>8} {:>8} {:>8} {:>8}\n",
        "case", "ns", "min", "max", "x floor"
    ));
    for (k, c) in f.as_object().into_iter().flatten() {
        if let Some(ns) = c.get("ns") {
            let n = |x: &Value| x.as_u64().unwrap_or(0);
            s.push_str(&format!(
                "  {:<30} {:>8} {:>8} {:>8} {:>8.2}\n",
                k,
                n(ns),
                n(&c["min"]),
                n(&c["max"]),
                c["ratio_to_floor"].as_f64().unwrap_or(0.0)
            ));
        } else if let Some(why) = c.get("not_applicable") {
            s.push_str(&format!(
                "  {:<30} n/a: {}\n",
                k,
                why.as_str().unwrap_or("")
            ));
        }
    }
    let fw = &v["forwarding_rate"];
    s.push_str(&format!(
        "forwarding rate, one core (live frames): lb {} pps, floor {} pps, ratio {:.2}\n",
        fw["lb_established_v4"]["pps"].as_u64().unwrap_or(0),
        fw["floor"]["pps"].as_u64().unwrap_or(0),
        fw["lb_established_v4"]["ratio_to_floor"]
            .as_f64()
            .unwrap_or(0.0)
    ));
    s.push_str("maglev, M = 65537\n");
    for n in ["n10", "n100", "n1000"] {
        let m = &v["maglev"][n];
        s.push_str(&format!(
            "  N={:<5} build {:>7.3} ms  balance {:.4}  weighted error {:.2} %  remove {:.4} (ideal {:.4})  add {:.4} (ideal {:.4})\n",
            &n[1..],
            m["build_ms"].as_f64().unwrap_or(0.0),
            m["equal_weights_largest_over_mean"].as_f64().unwrap_or(0.0),
            m["weighted_worst_share_error"].as_f64().unwrap_or(0.0) * 100.0,
            m["remove_one_moved"].as_f64().unwrap_or(0.0),
            m["remove_ideal"].as_f64().unwrap_or(0.0),
            m["add_one_moved"].as_f64().unwrap_or(0.0),
            m["add_ideal"].as_f64().unwrap_or(0.0),
        ));
    }
    let cp = &v["control_plane"];
    s.push_str(&format!(
        "control plane, {} VIPs x {} backends\n",
        cp["scale"]["vips"], cp["scale"]["backends_per_vip"]
    ));
    for k in ["full_sync", "one_backend_change", "unchanged_resync"] {
        s.push_str(&format!(
            "  {:<20} {:>10} writes {:>10.1} ms (plan {:.1} ms)\n",
            k,
            cp[k]["writes"].as_u64().unwrap_or(0),
            cp[k]["total_ms"].as_f64().unwrap_or(0.0),
            cp[k]["plan_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    s.push_str(&format!(
        "  agent RSS after full sync: {} KiB\n",
        cp["agent_rss_kib"]["after_full_sync"]
    ));
    s.push_str(&format!(
        "memory: kernel maps for a {}-entry flow table: {} bytes ({} of them the flow table)\n",
        v["memory"]["flow_entries"],
        v["memory"]["kernel_map_bytes_total"],
        v["memory"]["kernel_map_bytes"]["LB_FLOWS"]
    ));
    s
}
