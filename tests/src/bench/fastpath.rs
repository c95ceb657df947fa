//! The fast path: each case's time per packet through `BPF_PROG_TEST_RUN`, against the floor.

use super::*;

/// A fast-path VIP: id, address, mode, affinity timeout, ring (None: see [`load_instance`]).
type VipRow<'a> = (u32, &'a str, u32, u32, Option<&'a [u32]>);

/// The fast path's Maglev table size.
const M: u32 = 65_537;

/// Loads a copy of the program with the benchmark's configuration: a DSR VIP on 100 IPv4
/// backends (id 0, 192.0.2.10), one on 100 IPv6 backends (1, 2001:db8::10), one with affinity
/// (2, 192.0.2.11), a NAT VIP (3, 192.0.2.12), one whose only backend's route lookup fails
/// (4, 192.0.2.13), one without backends (5, 192.0.2.14) and one on the IPv6 backends for an
/// IPv4 address (6, 192.0.2.15), one whose new-flow budget is spent (7, 192.0.2.16), one
/// that takes sources from 10.0.0.0/8 only (8, 192.0.2.17), a port-range VIP on the IPv4
/// backends (9, 192.0.2.18:10000-10999, found in `LB_VIP_RANGES` after an exact miss) and one
/// that balances by least connections (10, 192.0.2.19; its members' counts start at 0 and grow
/// with the new flows).
/// Everything a case needs before its first packet is set here.
fn load_instance(flow_table_size: u32, nat_table_size: u32, v6_source: bool) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: M,
        max_vips: 11,
        // A member per (VIP, backend): seven VIPs of up to 100 backends.
        max_backends: 1024,
        flow_table_size,
        affinity_table_size: 1 << 16,
        nat_table_size,
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
    let vips: [VipRow; 10] = [
        (0, "192.0.2.10", MODE_DSR, 0, Some(&t4)),
        (1, "2001:db8::10", MODE_DSR, 0, Some(&t6)),
        (2, "192.0.2.11", MODE_DSR, 3600, Some(&t4)),
        (3, "192.0.2.12", MODE_NAT, 0, Some(&t4)),
        (4, "192.0.2.13", MODE_DSR, 0, None),
        (5, "192.0.2.14", MODE_DSR, 0, None),
        (6, "192.0.2.15", MODE_DSR, 0, Some(&t6)),
        (7, "192.0.2.16", MODE_DSR, 0, Some(&t4)),
        (8, "192.0.2.17", MODE_DSR, 0, Some(&t4)),
        (10, "192.0.2.19", MODE_DSR, 0, Some(&t4)),
    ];
    for (id, addr, mode, affinity, ring) in vips {
        lb.add_vip(
            vip_key(addr, 80, IPPROTO_TCP),
            VipValue {
                id,
                flags: match id {
                    7 => lb_common::VIP_F_NEW_FLOW_BUDGET,
                    8 => lb_common::VIP_F_SOURCE_RANGES,
                    10 => lb_common::VIP_F_LEAST_CONN,
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
    lb.add_vip_range(
        RANGE_VIP,
        IPPROTO_TCP,
        10000,
        10999,
        VipValue {
            id: 9,
            mode: MODE_DSR,
            ..Default::default()
        },
    );
    lb.set_ring(9, |s| t4[s as usize]);
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
    // IPv4 flows: the bucket table holds `flow_table_size` of them.
    let bytes = map_memory(&lb.ebpf).get("LB_FLOWS4").copied().unwrap_or(0);
    let entries = lb.sizes.flow_table_size;
    json!({"entries": entries, "kernel_bytes": bytes, "bytes_per_entry": bytes as f64 / entries as f64, "target_bytes_per_entry": TARGET_FLOW_BYTES_PER_ENTRY})
}

/// The port-range VIP's address, and the port of its range the cases send to.
const RANGE_VIP: &str = "192.0.2.18";
const RANGE_PORT: u16 = 10500;

/// A SYN to the port-range VIP.
fn range_syn(src: &str) -> Pkt {
    Pkt::tcp(src, 1111, RANGE_VIP, RANGE_PORT, LB0_MAC)
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
    for vip in ["192.0.2.10", "192.0.2.12", "192.0.2.13", "192.0.2.19"] {
        main.run(&syn("198.51.100.1", 1111, vip).frame(), ingress);
    }
    let r = main.run(&range_syn("198.51.100.1").frame(), ingress);
    assert_eq!(r.action, XDP_TX, "the port-range VIP's flow");
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
    let nat_backend = format!("10.1.0.{}", main.backend_of(nat.member_id) + 1);
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
    let size = full.sizes.flow_table_size as usize;
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
        Case {
            note: "(a SYN at a least-connections VIP: as v4_tcp_new_flow, handed to the least subprogram, which reads four ring slots and their members' counts)",
            ..case(
                "v4_least_conn_new_flow",
                On::EmptyTable,
                from(syn(NEW_BASE, 40000, "192.0.2.19").frame(), NEW_BASE),
                XDP_TX,
                &b4,
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
        Case {
            note: "(a port-range VIP: the exact lookup misses, one longest-prefix lookup finds the range; compare v4_tcp_established_1flow)",
            ..case(
                "v4_range_established_1flow",
                On::Main,
                same(ack(range_syn("198.51.100.1")).frame()),
                XDP_TX,
                &b4,
            )
        },
        Case {
            note: "(a SYN to a port of a port-range VIP; compare v4_tcp_new_flow)",
            ..case(
                "v4_range_new_flow",
                On::EmptyTable,
                from(range_syn(NEW_BASE).frame(), NEW_BASE),
                XDP_TX,
                &b4,
            )
        },
        Case {
            note: "(an established flow of a least-connections VIP: body hands it to the least subprogram, which looks the VIP up again. Compare v4_tcp_established_1flow)",
            ..case(
                "v4_least_conn_established_1flow",
                On::Main,
                same(at("192.0.2.19")),
                XDP_TX,
                &b4,
            )
        },
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
        est_calls + 6 * one_calls,
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
    // The emptied table takes the new flows of a VIP, of a port-range VIP and of a
    // least-connections VIP.
    for (on, cases) in [(On::EmptyTable, 3), (On::FullTable, 1)] {
        assert_eq!(
            d(on, Counter::MaglevLookups),
            cases * one_calls,
            "{on:?}: new flows did not go through Maglev"
        );
        assert_eq!(
            d(on, Counter::NewFlows),
            cases * one_calls,
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
            for case in cases.iter_mut() {
                // Each new-flow case on the emptied table starts it empty (two share it).
                if case.on == On::EmptyTable {
                    empty_max = empty_max.max(flow_count(&mut lbs[On::EmptyTable as usize]));
                    clear_flows(&mut lbs[On::EmptyTable as usize]);
                }
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
        // A round's inserts (of each case on the emptied table) fill at most this share of it.
        let empty_cases = cases.iter().filter(|c| matches!(c.on, On::EmptyTable)).count();
        let round_inserts = empty_cases * per_round;
        assert!(empty_max <= round_inserts + 16, "the emptied table held {empty_max} flows, more than a round's {round_inserts}");
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
                    "EmptyTable": format!("flow table {big} entries, emptied before each round of each new-flow case (at most {empty_max} flows)"),
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
