//! Backend selection across packets: hashing, the flow table, session affinity and UDP idle
//! expiry. Each test sends a sequence of frames and checks where each one went.

use std::net::IpAddr;

use lb_common::{
    AffinityValue, Counter, FlowValue, IPPROTO_TCP, IPPROTO_UDP, MODE_DSR, VIP_F_HASH_SRC_ONLY,
    VipValue, flow_hash, source_hash,
};
use lb_tests::{
    harness::{FibNet, Lb, XDP_TX, action_name, affinity_key, net::*, vip_key},
    hex,
    packet::{self, L4, Pkt, TCP_ACK},
};
use lb_userspace::kernel::program::Sizes;

const M: u32 = 1009;
const VIP: &str = "192.0.2.10";
/// Backend ids 1..=4, all reached with XDP_TX.
const BACKENDS: [(u32, &str); 4] = [(1, TX_V4), (2, TX_V4_B), (3, TX_V6), (4, TX_V6_B)];

fn backend_addr(id: u32) -> &'static str {
    BACKENDS
        .iter()
        .find(|b| b.0 == id)
        .unwrap_or_else(|| panic!("no backend {id}"))
        .1
}

fn load(affinity_timeout_s: u32, flags: u32, proto: u8, udp_idle_timeout_ns: u64) -> Lb {
    let mut lb = Lb::load(Sizes {
        table_size: M,
        max_vips: 4,
        max_backends: 16,
        flow_table_size: 4096,
        affinity_table_size: 1024,
        nat_table_size: 1024,
    });
    lb.set_node(Some(NODE_V4), Some(NODE_V6), udp_idle_timeout_ns);
    for (id, addr) in BACKENDS {
        lb.set_backend(id, addr, true);
    }
    lb.add_vip(
        vip_key(VIP, 80, proto),
        VipValue {
            id: 0,
            flags,
            affinity_timeout_s,
            mode: MODE_DSR,
            table_size: 0,
        },
    );
    // Slots cycle through the four backends, so neighbouring hashes land on different ones.
    lb.set_ring(0, |s| 1 + s % 4);
    lb
}

/// Runs `pkt` and returns the backend id its encapsulated output is addressed to.
fn send(lb: &mut Lb, pkt: &Pkt, ingress: u32) -> u32 {
    let run = lb.run(&pkt.frame(), ingress);
    assert_eq!(
        action_name(run.action),
        action_name(XDP_TX),
        "input:\n{}",
        hex(&pkt.frame())
    );
    let out = &run.output;
    let dst: IpAddr = match u16::from_be_bytes([out[12], out[13]]) {
        0x0800 => IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap()),
        0x86dd => IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap()),
        t => panic!("output ethertype {t:#06x}"),
    };
    let id = BACKENDS
        .iter()
        .find(|b| b.1.parse::<IpAddr>().unwrap() == dst)
        .unwrap_or_else(|| panic!("output to unknown backend {dst}"))
        .0;
    // The whole frame must be the proper encapsulation to that backend.
    let src = if dst.is_ipv4() { NODE_V4 } else { NODE_V6 };
    let want = packet::encapsulated(pkt, GW0_MAC, LB0_MAC, src.parse().unwrap(), dst);
    assert!(
        out == &want,
        "expected:\n{}\ngot:\n{}",
        hex(&want),
        hex(out)
    );
    id
}

fn client(i: u32) -> String {
    format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250)
}

/// What Maglev says for a packet: the ring slot its hash selects.
fn maglev_choice(lb: &mut Lb, pkt: &Pkt, src_only: bool) -> u32 {
    let key = pkt.flow_key();
    let h = if src_only {
        source_hash(&key.src, key.family)
    } else {
        flow_hash(&key)
    };
    let member = lb.ring_backend(0, h);
    lb.backend_of(member)
}

#[test]
fn five_tuple_hash_is_the_shared_one_and_spreads() {
    let net = FibNet::new("hash5");
    net.ns.run(|| {
        let mut lb = load(0, 0, IPPROTO_TCP, 0);
        let mut seen = [0u32; 5];
        for i in 0..400 {
            let pkt = Pkt::tcp(&client(i % 20), 10000 + i as u16, VIP, 80, LB0_MAC);
            let want = maglev_choice(&mut lb, &pkt, false);
            let got = send(&mut lb, &pkt, net.lb0);
            assert_eq!(
                got, want,
                "packet {i} went to {got}, the shared hash says {want}"
            );
            seen[got as usize] += 1;
        }
        assert!(
            seen[1..].iter().all(|&n| n > 50),
            "uneven spread over four backends: {:?}",
            &seen[1..]
        );
    });
}

#[test]
fn source_address_hashing_keeps_a_client_on_one_backend() {
    let net = FibNet::new("hashsrc");
    net.ns.run(|| {
        let mut lb = load(0, VIP_F_HASH_SRC_ONLY, IPPROTO_TCP, 0);
        let mut used = std::collections::BTreeSet::new();
        for c in 0..40 {
            let first = Pkt::tcp(&client(c), 20000, VIP, 80, LB0_MAC);
            let want = maglev_choice(&mut lb, &first, true);
            for port in 20000..20010 {
                let pkt = Pkt::tcp(&client(c), port, VIP, 80, LB0_MAC);
                let got = send(&mut lb, &pkt, net.lb0);
                assert_eq!(
                    got,
                    want,
                    "client {} port {port}: backend {got}, expected {want}",
                    client(c)
                );
            }
            used.insert(want);
        }
        assert!(used.len() >= 3, "40 clients used only backends {used:?}");
    });
}

#[test]
fn established_flow_stays_when_the_table_changes_and_moves_when_its_backend_goes() {
    let net = FibNet::new("flowstay");
    net.ns.run(|| {
        let mut lb = load(0, 0, IPPROTO_TCP, 0);
        let syn = Pkt::tcp(&client(1), 33000, VIP, 80, LB0_MAC);
        let ack = syn.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
        let first = send(&mut lb, &syn, net.lb0);
        let entry = lb
            .flow(&syn.flow_key())
            .expect("the SYN created a flow entry");
        assert_eq!(lb.backend_of(entry.member_id), first);

        // Point every slot at another backend: the flow stays, a new flow follows the table.
        let other = if first == 1 { 2 } else { 1 };
        lb.set_ring(0, |_| other);
        let before = lb.counters();
        assert_eq!(
            send(&mut lb, &ack, net.lb0),
            first,
            "established flow moved with the table"
        );
        assert_eq!(
            lb.counters()[&Counter::FlowHits] - before[&Counter::FlowHits],
            1
        );
        let fresh = Pkt::tcp(&client(1), 33001, VIP, 80, LB0_MAC);
        assert_eq!(
            send(&mut lb, &fresh, net.lb0),
            other,
            "new flow ignored the new table"
        );

        // Remove the flow's backend: the next packet is balanced afresh and the entry rewritten.
        lb.set_backend(first, backend_addr(first), false);
        let before = lb.counters();
        assert_eq!(send(&mut lb, &ack, net.lb0), other);
        assert_eq!(
            lb.counters()[&Counter::FlowStale] - before[&Counter::FlowStale],
            1
        );
        let member = lb.flow(&syn.flow_key()).unwrap().member_id;
        assert_eq!(lb.backend_of(member), other);

        // An entry naming an earlier allocation of the member id (another generation) is not
        // followed.
        lb.set_backend(first, backend_addr(first), true);
        lb.set_flow(
            syn.flow_key(),
            FlowValue {
                member_id: lb.member(0, first),
                generation: 2,
                last_seen_ns: 0,
            },
        );
        assert_eq!(
            send(&mut lb, &ack, net.lb0),
            other,
            "followed a flow entry of an earlier allocation"
        );
    });
}

#[test]
fn affinity_holds_until_its_timeout_then_is_replaced() {
    let net = FibNet::new("affinity");
    net.ns.run(|| {
        let mut lb = load(30, 0, IPPROTO_TCP, 0);
        let c = client(7);
        let first = Pkt::tcp(&c, 40000, VIP, 80, LB0_MAC);
        let pinned = send(&mut lb, &first, net.lb0);
        let akey = affinity_key(&first, 0);
        let held = lb.affinity(&akey).expect("affinity entry").member_id;
        assert_eq!(lb.backend_of(held), pinned);

        // New connections from the same client stay on `pinned`, including ports Maglev alone
        // would send elsewhere.
        let mut elsewhere = 0;
        for port in 40001..40041 {
            let pkt = Pkt::tcp(&c, port, VIP, 80, LB0_MAC);
            if maglev_choice(&mut lb, &pkt, false) != pinned {
                elsewhere += 1;
            }
            assert_eq!(
                send(&mut lb, &pkt, net.lb0),
                pinned,
                "port {port} left the affinity backend"
            );
        }
        assert!(
            elsewhere > 10,
            "only {elsewhere} of 40 ports would have gone elsewhere: the test proves little"
        );

        // Age the entry past the timeout: the next new connection follows Maglev and replaces it.
        let stale = AffinityValue {
            member_id: lb.member(0, pinned),
            generation: 1,
            last_seen_ns: 1,
        };
        lb.set_affinity(akey, stale);
        let mut port = 41000;
        let pkt = loop {
            let p = Pkt::tcp(&c, port, VIP, 80, LB0_MAC);
            if maglev_choice(&mut lb, &p, false) != pinned {
                break p;
            }
            port += 1;
        };
        let want = maglev_choice(&mut lb, &pkt, false);
        let before = lb.counters();
        assert_eq!(
            send(&mut lb, &pkt, net.lb0),
            want,
            "expired affinity was still followed"
        );
        assert_eq!(
            lb.counters()[&Counter::AffinityExpired] - before[&Counter::AffinityExpired],
            1
        );
        let renewed = lb.affinity(&akey).unwrap();
        assert_eq!(
            lb.backend_of(renewed.member_id),
            want,
            "expired affinity entry not replaced"
        );
        assert!(renewed.last_seen_ns > 1);
    });
}

#[test]
fn idle_udp_flow_is_balanced_afresh() {
    let net = FibNet::new("udpidle");
    net.ns.run(|| {
        let mut lb = load(0, 0, IPPROTO_UDP, 5_000_000_000);
        let pkt = Pkt::udp(&client(3), 5000, VIP, 80, LB0_MAC);
        let first = send(&mut lb, &pkt, net.lb0);
        let seen = lb.flow(&pkt.flow_key()).unwrap().last_seen_ns;
        assert_eq!(send(&mut lb, &pkt, net.lb0), first);
        assert!(
            lb.flow(&pkt.flow_key()).unwrap().last_seen_ns >= seen,
            "UDP hit did not refresh last-seen"
        );

        // Pin the flow to a backend Maglev would not pick, then let it go idle.
        let other = (1..=4).find(|&b| b != first).unwrap();
        lb.set_flow(
            pkt.flow_key(),
            FlowValue {
                member_id: lb.member(0, other),
                generation: 1,
                last_seen_ns: seen,
            },
        );
        assert_eq!(
            send(&mut lb, &pkt, net.lb0),
            other,
            "fresh UDP flow entry not followed"
        );
        lb.set_flow(
            pkt.flow_key(),
            FlowValue {
                member_id: lb.member(0, other),
                generation: 1,
                last_seen_ns: 1,
            },
        );
        let before = lb.counters();
        assert_eq!(
            send(&mut lb, &pkt, net.lb0),
            first,
            "idle UDP flow entry was followed"
        );
        assert_eq!(
            lb.counters()[&Counter::FlowIdleExpired] - before[&Counter::FlowIdleExpired],
            1
        );
    });
}

#[test]
fn a_vip_with_its_own_table_size_hashes_into_that_many_slots() {
    let net = FibNet::new("vipsize");
    net.ns.run(|| {
        let mut lb = load(0, 0, IPPROTO_TCP, 0);
        const SMALL: u32 = 7;
        lb.add_vip(
            vip_key(VIP, 80, IPPROTO_TCP),
            VipValue {
                id: 0,
                flags: 0,
                affinity_timeout_s: 0,
                mode: MODE_DSR,
                table_size: SMALL,
            },
        );
        // The VIP's 7 slots hold backends 1..=3; the rest of its room in the ring holds 4,
        // which a program hashing into the node's 1009 slots would pick for most flows.
        lb.set_ring(0, |s| if s < SMALL { 1 + s % 3 } else { 4 });
        let mut seen = [0u32; 5];
        for i in 0..200 {
            let pkt = Pkt::tcp(&client(i), 20000 + i as u16, VIP, 80, LB0_MAC);
            let slot = lb_common::maglev_slot(flow_hash(&pkt.flow_key()), SMALL);
            let want = 1 + slot % 3;
            let got = send(&mut lb, &pkt, net.lb0);
            assert_eq!(got, want, "packet {i}: slot {slot} of {SMALL} holds {want}");
            seen[got as usize] += 1;
        }
        assert_eq!(seen[4], 0);
        assert!(seen[1..4].iter().all(|&n| n > 30), "spread {seen:?}");
    });
}
