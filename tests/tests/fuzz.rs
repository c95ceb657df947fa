//! Robustness: every truncation of valid frames, and well over 100,000 random and mutated frames.
//! The program must never return `XDP_ABORTED` (or anything but DROP, PASS, TX, REDIRECT), and
//! every packet must end in exactly one verdict counter.

use lb_common::{Counter, IPPROTO_TCP, IPPROTO_UDP, MODE_DSR, VIP_F_HASH_SRC_ONLY, VipValue};
use lb_tests::{
    harness::{self, FibNet, Lb, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, net::*, vip_key},
    hex,
    packet::{L4, Pkt, TCP_ACK, ext},
};
use lb_userspace::program::Sizes;
use rand::{Rng, SeedableRng, rngs::StdRng};

const RANDOM_FRAMES: usize = 120_000;

fn load(net: &FibNet) -> Lb {
    let mut lb = Lb::load(Sizes {
        maglev_m: 251,
        max_vips: 8,
        max_backends: 64,
        flow_entries: 1024,
        affinity_entries: 256,
        nat_entries: 256,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), 1_000_000_000);
    for (id, a) in [
        (1, TX_V4),
        (2, TX_V6),
        (3, REDIRECT_V4),
        (4, NO_NEIGH_V6),
        (5, UNREACHABLE_V4),
        (6, SMALL_MTU_V4),
    ] {
        lb.set_backend(id, a, true);
    }
    let vips = [
        ("192.0.2.10", IPPROTO_TCP, 0, 30),
        ("192.0.2.10", IPPROTO_UDP, VIP_F_HASH_SRC_ONLY, 0),
        ("2001:db8::10", IPPROTO_TCP, 0, 0),
        ("2001:db8::10", IPPROTO_UDP, 0, 10),
    ];
    for (id, (addr, proto, flags, affinity)) in vips.into_iter().enumerate() {
        lb.add_vip(
            vip_key(addr, 80, proto),
            VipValue {
                id: id as u32,
                flags,
                affinity_timeout_s: affinity,
                mode: MODE_DSR,
                table_size: 0,
            },
        );
        lb.set_ring(id as u32, |s| 1 + s % 6);
    }
    lb.add_tx_port(net.lb1);
    lb
}

/// Valid frames of every shape the parser knows, all aimed at VIPs.
fn seeds() -> Vec<Vec<u8>> {
    let to = LB0_MAC;
    let s4 = Pkt::tcp("198.51.100.7", 40000, "192.0.2.10", 80, to);
    let s6 = Pkt::tcp("2001:db8:c::7", 40000, "2001:db8::10", 80, to);
    vec![
        s4.frame(),
        s4.clone().with(|p| p.vlan = Some(5)).frame(),
        s4.clone().with(|p| p.v4_options = vec![1; 12]).frame(),
        s4.clone()
            .with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
            .frame(),
        Pkt::udp("198.51.100.7", 5000, "192.0.2.10", 80, to).frame(),
        Pkt::udp("198.51.100.7", 5000, "192.0.2.10", 80, to)
            .with(|p| p.v4_frag = (true, 0))
            .frame(),
        s6.frame(),
        s6.clone()
            .with(|p| p.v6_ext = vec![ext::hop_by_hop(), ext::dest_opts(), ext::ah()])
            .frame(),
        Pkt::udp("2001:db8:c::7", 5000, "2001:db8::10", 80, to)
            .with(|p| p.v6_ext = vec![ext::fragment(0, false)])
            .frame(),
        Pkt::udp("2001:db8:c::7", 5000, "2001:db8::10", 80, to)
            .with(|p| p.vlan = Some(9))
            .frame(),
    ]
}

fn check(lb: &mut Lb, frame: &[u8], ingress: u32, what: &str) {
    let run = lb.run(frame, ingress);
    assert!(
        matches!(run.action, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT),
        "{what}: action {} ({})\nframe:\n{}",
        run.action,
        harness::action_name(run.action),
        hex(frame)
    );
}

fn assert_counters_add_up(lb: &mut Lb, runs: u64) {
    let c = lb.counters();
    assert_eq!(c[&Counter::Packets], runs, "packets counter != frames run");
    assert_eq!(
        harness::verdict_sum(&c),
        runs,
        "verdict counters do not add up to the packets: {c:?}"
    );
}

#[test]
fn every_truncation_of_valid_frames() {
    let net = FibNet::new("trunc");
    net.ns.run(|| {
        let mut lb = load(&net);
        let mut runs = 0u64;
        for (i, seed) in seeds().iter().enumerate() {
            for len in 0..=seed.len() {
                let frame = &seed[..len];
                if len < 14 {
                    // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header (and no
                    // driver delivers one), so the program cannot be run on them: check that
                    // refusal rather than skip silently.
                    let prog: &mut aya::programs::Xdp =
                        lb.ebpf.program_mut("lb").unwrap().try_into().unwrap();
                    let mut opts = aya::programs::TestRunOptions::new();
                    opts.data_in = Some(frame);
                    use aya::programs::TestRun as _;
                    assert!(
                        prog.test_run(opts).is_err(),
                        "kernel accepted a {len}-byte XDP frame"
                    );
                    continue;
                }
                check(
                    &mut lb,
                    frame,
                    net.lb0,
                    &format!("seed {i} cut to {len} bytes"),
                );
                runs += 1;
            }
        }
        assert_counters_add_up(&mut lb, runs);
        eprintln!("{runs} truncated frames run");
    });
}

#[test]
fn random_and_mutated_frames() {
    let net = FibNet::new("fuzz");
    let seed: u64 = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed1b);
    net.ns.run(|| {
        let mut lb = load(&net);
        let mut rng = StdRng::seed_from_u64(seed);
        let seeds = seeds();
        let mut forwarded = 0u64;
        for n in 0..RANDOM_FRAMES {
            let frame: Vec<u8> = match n % 4 {
                // Pure noise, of any length from an Ethernet header up.
                0 => (0..rng.random_range(14..200))
                    .map(|_| rng.random())
                    .collect(),
                // A valid frame with a few bytes changed (mostly in the headers).
                1 | 2 => {
                    let mut f = seeds[rng.random_range(0..seeds.len())].clone();
                    for _ in 0..rng.random_range(1..5) {
                        let limit = if rng.random_bool(0.8) {
                            f.len().min(80)
                        } else {
                            f.len()
                        };
                        let at = rng.random_range(0..limit);
                        f[at] = rng.random();
                    }
                    f
                }
                // A valid frame cut or extended at random.
                _ => {
                    let mut f = seeds[rng.random_range(0..seeds.len())].clone();
                    let len = rng.random_range(14..f.len() + 40);
                    f.resize(len, rng.random());
                    f
                }
            };
            let run = lb.run(&frame, net.lb0);
            assert!(
                matches!(run.action, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT),
                "frame {n} (seed {seed:#x}): action {}\n{}",
                run.action,
                hex(&frame)
            );
            forwarded += matches!(run.action, XDP_TX | XDP_REDIRECT) as u64;
        }
        assert_counters_add_up(&mut lb, RANDOM_FRAMES as u64);
        // The mutations must reach the deep paths too, not just bounce off the parser.
        assert!(
            forwarded > RANDOM_FRAMES as u64 / 20,
            "only {forwarded} frames were forwarded"
        );
        let c = lb.counters();
        for k in [
            Counter::PassMalformed,
            Counter::DropMalformed,
            Counter::DropFragment,
            Counter::PassNotForVip,
            Counter::Tx,
            Counter::Redirect,
            Counter::NewFlows,
            Counter::FlowHits,
        ] {
            assert!(c[&k] > 0, "no frame reached {}", k.name());
        }
        eprintln!(
            "{RANDOM_FRAMES} random frames (seed {seed:#x}), {forwarded} forwarded; counters: {:?}",
            Counter::ALL
                .iter()
                .filter(|k| c[k] > 0)
                .map(|k| (k.name(), c[k]))
                .collect::<Vec<_>>()
        );
    });
}
