//! Next hops kept by the agent while the network changes under it: `lb run` in a namespace with
//! `nexthop_check: true`, and after each change (a neighbour's MAC, a route moving, an MTU
//! shrinking, a link going down and up, a backend becoming local or unreachable) the test waits
//! until the agent reports a refresh and the member's `LB_NEXTHOPS` entry equals what iproute2
//! says (`ip -j route get`, `ip -j neigh`, `ip -j link`: not lb's resolver), then runs a frame
//! through the program on the agent's maps and checks that the verdict is the one the route
//! lookup gives, and that check mode counted no disagreement.
//!
//! ```text
//!  lb0 (ingress)  10.0.0.1/24 fd00::1/64    gw 10.0.0.2 / fd00::2   02:00:00:00:00:fe
//!  lb1            10.0.1.1/24 fd00:1::1/64  gw 10.0.1.2 / fd00:1::2 02:00:00:00:01:fe
//!  backends 10.1.0.1 (VIP 192.0.2.10:80/udp) and fd01::1 (VIP 192.0.2.11:80/udp),
//!  at first via lb0's gateway; the clients' networks via lb0's gateway too.
//! ```

use std::{path::Path, process::Command, time::Duration, time::Instant};

use lb_common::{Counter, NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNREACHABLE, NextHop};
use lb_tests::{
    agent::{Agent, Dirs, metric},
    config::{RawBackend, RawConfig, RawNode, RawVip, backend, lab_node, some, vip, yaml},
    harness::Lb,
    netns::NetNs,
    packet::Pkt,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const B4: &str = "10.1.0.1";
const B6: &str = "fd01::1";
const SRC4: &str = "10.0.0.1";
const SRC6: &str = "fd00::1";
/// Where the agent serves metrics (in the test's namespace).
const METRICS: &str = "127.0.0.1:19436";

/// Two UDP VIPs, one on `v4_backends`, the other on an IPv6 backend; next hops checked.
fn config(v4_backends: &[&str]) -> String {
    let unnamed = |address: &str, backends: &[&str]| {
        let list: Vec<RawBackend> = backends.iter().map(|b| backend(b)).collect();
        RawVip {
            name: None,
            ..vip("", address, 80, "udp", &list)
        }
    };
    yaml(&RawConfig {
        node: RawNode {
            max_vips: Some(4),
            max_backends: Some(16),
            flow_table_size: None,
            nexthop_check: Some(true),
            metrics_listen: some("127.0.0.1:19436"),
            ..lab_node(&["lb0", "lb1"])
        },
        vips: vec![
            unnamed("192.0.2.10", v4_backends),
            unnamed("192.0.2.11", &["fd01::1"]),
        ],
    })
}

struct NhLab {
    // Dropped in this order: the agent stops before its dirs are removed (else it writes its
    // status file into a state dir made anew), then the namespace goes.
    agent: Agent,
    dirs: Dirs,
    ns: NetNs,
    lb0: u32,
}

impl NhLab {
    fn start(tag: &str) -> Self {
        let ns = NetNs::new(tag);
        ns.script(
            "link add lb0 address 02:00:00:00:00:01 type veth peer name up0
             link add lb1 address 02:00:00:00:01:01 type veth peer name dn1
             link set lb0 addrgenmode none
             link set up0 addrgenmode none
             link set lb1 addrgenmode none
             link set dn1 addrgenmode none
             link set lb0 up
             link set up0 up
             link set lb1 up
             link set dn1 up
             addr add 10.0.0.1/24 dev lb0
             addr add fd00::1/64 dev lb0 nodad
             addr add 10.0.1.1/24 dev lb1
             addr add fd00:1::1/64 dev lb1 nodad
             neigh replace 10.0.0.2 lladdr 02:00:00:00:00:fe dev lb0 nud permanent
             neigh replace fd00::2 lladdr 02:00:00:00:00:fe dev lb0 nud permanent
             neigh replace 10.0.1.2 lladdr 02:00:00:00:01:fe dev lb1 nud permanent
             neigh replace fd00:1::2 lladdr 02:00:00:00:01:fe dev lb1 nud permanent
             route add 10.1.0.0/16 via 10.0.0.2 dev lb0
             route add fd01::/64 via fd00::2 dev lb0
             route add 198.51.100.0/24 via 10.0.0.2 dev lb0
             route add 2001:db8:c::/64 via fd00::2 dev lb0",
        );
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        // (No link-local addresses: their late arrival would make netlink events of its own,
        // and the path MTU test needs a quiet namespace.)
        let dirs = Dirs::new(Path::new(BIN), tag);
        dirs.write_config(&config(&["10.1.0.1"]));
        let mut agent = Agent::start(&ns, &dirs);
        agent.wait_running(&ns, &dirs, T);
        let lb0 = ns.ifindex("lb0");
        Self {
            ns,
            dirs,
            agent,
            lb0,
        }
    }

    /// The agent's refresh count, from its status file.
    fn refreshes(&self) -> u64 {
        lb_userspace::status::file::read_status(&self.dirs.state)
            .map_or(0, |s| s.nexthops.refreshes)
    }

    /// Runs `change` (ip commands), then waits until the agent has refreshed since and the
    /// entry of `backend`'s member equals the kernel's view; returns that entry.
    fn change(&mut self, lb: &mut Lb, backend: &str, change: &str) -> NextHop {
        let before = self.refreshes();
        self.ns.script(change);
        self.settled(lb, backend, before)
    }

    /// Waits until a refresh after the `before`-th has written what iproute2 says.
    fn settled(&mut self, lb: &mut Lb, backend: &str, before: u64) -> NextHop {
        let start = Instant::now();
        let src = if backend.contains(':') { SRC6 } else { SRC4 };
        loop {
            let (id, generation) = member_of(lb, backend);
            let mut want = kernel_view(&self.ns, backend, src);
            want.generation = generation;
            let got = lb.nexthop(id);
            if got == want && self.refreshes() > before {
                return got;
            }
            assert!(
                start.elapsed() < T,
                "member {id} ({backend}): entry {got:?}, the kernel says {want:?} (refreshes {} since {before}):\n{}",
                self.refreshes(),
                self.agent.log_dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The member of `backend` (its id and generation) in the agent's maps.
fn member_of(lb: &mut Lb, backend: &str) -> (u32, u32) {
    let addr: std::net::IpAddr = backend.parse().unwrap();
    lb.live_members()
        .into_iter()
        .find(|(_, m)| lb_userspace::model::desired::ip_of(&m.addr, m.family) == addr)
        .map(|(id, m)| (id, m.generation))
        .unwrap_or_else(|| panic!("no member for {backend}"))
}

fn ip_json(ns: &NetNs, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-j"])
        .args(args)
        .output()
        .expect("running ip");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("ip -j prints JSON"))
}

fn ip_text(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .expect("running ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().expect("a 6-byte MAC")
}

/// What `bpf_fib_lookup` answers for an outer packet `src` -> `dst`, read from iproute2's view of
/// the kernel (generation 0): the route lookup's error or type, the route's device and gateway,
/// its neighbour's state and address, the device's MAC and MTU, or the route's locked MTU.
fn kernel_view(ns: &NetNs, dst: &str, src: &str) -> NextHop {
    let only = |action| NextHop {
        action,
        ..Default::default()
    };
    let route = match ip_json(ns, &["route", "get", dst, "from", src]) {
        Ok(r) => r[0].clone(),
        // No route at all: the helper says "not forwarded", which the program passes on.
        Err(e) if e.contains("Network is unreachable") => return only(NH_LOCAL),
        Err(e)
            if ["No route to host", "Invalid argument", "Permission denied"]
                .iter()
                .any(|m| e.contains(m)) =>
        {
            return only(NH_UNREACHABLE);
        }
        Err(e) => panic!("ip route get {dst}: {e}"),
    };
    match route["type"].as_str() {
        None | Some("unicast") => {}
        Some("unreachable" | "blackhole" | "prohibit") => return only(NH_UNREACHABLE),
        Some(_) => return only(NH_LOCAL),
    }
    let dev = route["dev"].as_str().expect("a unicast route has a device");
    let hop = route["gateway"].as_str().unwrap_or(dst);
    let link = ip_json(ns, &["link", "show", "dev", dev]).unwrap()[0].clone();
    // A locked route mtu counts, and so does a path MTU exception (it expires); an unlocked
    // route mtu does not.
    let text = ip_text(ns, &["route", "get", dst, "from", src]);
    let word_after = |w: &str| {
        text.split(w)
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
    };
    let locked = word_after("mtu lock ").or(if text.contains("expires") {
        word_after("mtu ")
    } else {
        None
    });
    let neigh = ip_json(ns, &["neigh", "show", "to", hop, "dev", dev]).unwrap();
    let valid = ["PERMANENT", "NOARP", "REACHABLE", "PROBE", "STALE", "DELAY"];
    let usable = neigh[0]["state"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| valid.contains(&s.as_str().unwrap_or(""))));
    NextHop {
        dmac: match usable {
            true => parse_mac(neigh[0]["lladdr"].as_str().expect("lladdr")),
            false => [0; 6],
        },
        smac: parse_mac(link["address"].as_str().unwrap()),
        ifindex: link["ifindex"].as_u64().unwrap() as u32,
        mtu: locked.unwrap_or(link["mtu"].as_u64().unwrap() as u32),
        action: if usable { NH_FORWARD } else { NH_NO_NEIGH },
        ..Default::default()
    }
}

/// A UDP frame to the VIP of `backend` whose IP packet is `ip_len` bytes (IPv4 without DF, so
/// one too big is dropped, not answered).
fn frame(backend: &str, ip_len: usize) -> Vec<u8> {
    let vip = if backend.contains(':') {
        "192.0.2.11"
    } else {
        "192.0.2.10"
    };
    Pkt::udp("198.51.100.7", 40000, vip, 80, LB0_MAC)
        .with(|p| {
            p.v4_df = false;
            p.payload = vec![0x5a; ip_len - 28];
        })
        .frame()
}

/// The verdict the route lookup gives a packet whose outer packet is `outer` bytes, by the
/// entry: the MTU first (as the helper checks it before the neighbour), then the action.
fn verdict(nh: &NextHop, outer: usize, ingress: u32) -> Counter {
    match nh.action {
        NH_FORWARD | NH_NO_NEIGH if outer > nh.mtu as usize => Counter::DropTooBig,
        NH_FORWARD if nh.ifindex == ingress => Counter::Tx,
        NH_FORWARD => Counter::Redirect,
        NH_NO_NEIGH => Counter::PassNoNeighbour,
        NH_LOCAL => Counter::PassLocalBackend,
        NH_UNREACHABLE => Counter::DropFibFailed,
        a => panic!("no verdict for action {a}"),
    }
}

/// Runs a frame of `ip_len` bytes for `backend` through the program on the agent's maps and
/// checks its verdict against `nh` (and, when forwarded, the MAC addresses the route lookup
/// wrote), with no next-hop disagreement counted.
fn send(lab: &NhLab, lb: &mut Lb, backend: &str, nh: &NextHop, ip_len: usize) {
    let outer = ip_len + if backend.contains(':') { 40 } else { 20 };
    let want = verdict(nh, outer, lab.lb0);
    let before = lb.counters();
    let run = lb.run(&frame(backend, ip_len), lab.lb0);
    let after = lb.counters();
    let delta = |c: Counter| after[&c] - before[&c];
    assert_eq!(delta(want), 1, "{backend}: expected {want:?} for {nh:?}");
    assert_eq!(
        delta(Counter::NexthopMismatches),
        0,
        "{backend}: check mode counted a disagreement with the route lookup for {nh:?}"
    );
    assert_eq!(
        delta(Counter::NexthopFallbacks),
        0,
        "{backend}: the entry {nh:?} was not taken"
    );
    if matches!(want, Counter::Tx | Counter::Redirect) {
        assert_eq!(run.output[0..6], nh.dmac, "{backend}: destination MAC");
        assert_eq!(run.output[6..12], nh.smac, "{backend}: source MAC");
    }
}

/// Starts the lab, waits for both backends' first entries and checks them with traffic.
fn started(tag: &str, test: impl FnOnce(&mut NhLab, &mut Lb) + Send) {
    let mut lab = NhLab::start(tag);
    let ns = lab.ns.name.clone();
    let pins = lab.dirs.pins.clone();
    std::thread::scope(|s| {
        s.spawn(|| {
            lb_tests::netns::enter(&ns);
            let mut lb = Lb::adopt(&pins);
            let flags = lb.node().flags;
            assert_ne!(
                flags & lb_common::NODE_F_NEXTHOP_CHECK,
                0,
                "check mode is on"
            );
            for b in [B4, B6] {
                let nh = lab.settled(&mut lb, b, 0);
                assert_eq!(nh.action, NH_FORWARD, "{b} at the start: {nh:?}");
                send(&lab, &mut lb, b, &nh, 100);
            }
            test(&mut lab, &mut lb);
        });
    });
}

#[test]
fn a_neighbours_new_mac_is_applied() {
    started("nh-mac", |lab, lb| {
        for (b, gw) in [(B4, "10.0.0.2"), (B6, "fd00::2")] {
            let nh = lab.change(
                lb,
                b,
                &format!("neigh replace {gw} lladdr 02:00:00:00:00:ee dev lb0 nud reachable"),
            );
            assert_eq!(nh.dmac, [2, 0, 0, 0, 0, 0xee], "{b}");
            send(lab, lb, b, &nh, 100);
        }
    });
}

#[test]
fn a_route_moved_to_another_interface_and_gateway_is_applied() {
    started("nh-move", |lab, lb| {
        for (b, change) in [
            (B4, "route replace 10.1.0.0/16 via 10.0.1.2 dev lb1"),
            (B6, "route replace fd01::/64 via fd00:1::2 dev lb1"),
        ] {
            let nh = lab.change(lb, b, change);
            assert_eq!(nh.ifindex, lab.ns.ifindex("lb1"), "{b}");
            assert_eq!(nh.dmac, [2, 0, 0, 0, 1, 0xfe], "{b}");
            send(lab, lb, b, &nh, 100);
        }
    });
}

#[test]
fn a_shrunk_link_mtu_is_applied() {
    started("nh-linkmtu", |lab, lb| {
        let nh = lab.change(lb, B4, "link set lb0 mtu 1400");
        assert_eq!(nh.mtu, 1400);
        let nh6 = lab.settled(lb, B6, 0);
        assert_eq!(nh6.mtu, 1400);
        send(lab, lb, B4, &nh, 1381); // 1401 outer: too big
        send(lab, lb, B4, &nh, 1380); // 1400: fits
        send(lab, lb, B6, &nh6, 1360); // 1400: fits
    });
}

#[test]
fn a_locked_route_mtu_is_applied() {
    started("nh-lockmtu", |lab, lb| {
        let nh = lab.change(
            lb,
            B4,
            "route replace 10.1.0.0/16 via 10.0.0.2 dev lb0 mtu lock 1300",
        );
        assert_eq!(nh.mtu, 1300);
        send(lab, lb, B4, &nh, 1281);
        send(lab, lb, B4, &nh, 1280);
        let nh = lab.change(
            lb,
            B6,
            "route replace fd01::/64 via fd00::2 dev lb0 mtu lock 1300",
        );
        assert_eq!(nh.mtu, 1300);
        send(lab, lb, B6, &nh, 1260);
    });
}

#[test]
fn an_unlocked_route_mtu_is_ignored_as_the_route_lookup_ignores_it() {
    started("nh-mtu", |lab, lb| {
        let nh = lab.change(
            lb,
            B4,
            "route replace 10.1.0.0/16 via 10.0.0.2 dev lb0 mtu 1300",
        );
        assert_eq!(
            nh.mtu, 1500,
            "forwarding uses an unlocked route mtu only with ip_forward_use_pmtu"
        );
        send(lab, lb, B4, &nh, 1400);
    });
}

#[test]
fn a_link_going_down_and_up_is_applied() {
    started("nh-updown", |lab, lb| {
        // The backend on lb1's segment, with a fallback route through lb0.
        let nh = lab.change(
            lb,
            B4,
            "route replace 10.1.0.0/16 dev lb1
             neigh replace 10.1.0.1 lladdr 02:00:00:00:01:bb dev lb1 nud permanent
             route add 10.0.0.0/8 via 10.0.0.2 dev lb0",
        );
        assert_eq!((nh.action, nh.dmac), (NH_FORWARD, [2, 0, 0, 0, 1, 0xbb]));
        send(lab, lb, B4, &nh, 100);
        // Down: lb1's routes and neighbours go; the fallback through lb0 takes over.
        let nh = lab.change(lb, B4, "link set lb1 down");
        assert_eq!(nh.ifindex, lab.lb0);
        send(lab, lb, B4, &nh, 100);
        // Up again: the static route through lb1 is gone for good, so re-add it; its neighbour
        // entry was flushed, and nothing answers for it: no neighbour.
        lab.change(lb, B4, "link set lb1 up");
        let nh = lab.change(lb, B4, "route replace 10.1.0.0/16 dev lb1");
        assert_eq!(nh.action, NH_NO_NEIGH);
        send(lab, lb, B4, &nh, 100);
    });
}

#[test]
fn a_backend_address_becoming_local_is_applied() {
    started("nh-local", |lab, lb| {
        for (b, len) in [(B4, "32"), (B6, "128")] {
            let nh = lab.change(lb, b, &format!("addr add {b}/{len} dev lo"));
            assert_eq!(nh.action, NH_LOCAL, "{b}");
            send(lab, lb, b, &nh, 100);
        }
    });
}

#[test]
fn a_backend_becoming_unreachable_is_applied() {
    started("nh-unreach", |lab, lb| {
        for (b, change) in [
            (B4, "route replace unreachable 10.1.0.0/16"),
            (B6, "route replace blackhole fd01::/64"),
        ] {
            let nh = lab.change(lb, b, change);
            assert_eq!(nh.action, NH_UNREACHABLE, "{b}");
            send(lab, lb, b, &nh, 100);
        }
    });
}

#[test]
fn a_backend_with_no_route_at_all_passes_as_the_route_lookup_does() {
    started("nh-noroute", |lab, lb| {
        let nh = lab.change(lb, B4, "route del 10.1.0.0/16");
        assert_eq!(nh.action, NH_LOCAL, "not forwarded: passed to the kernel");
        send(lab, lb, B4, &nh, 100);
    });
}

#[test]
fn a_gateway_without_a_neighbour_gets_a_managed_entry_and_passes_meanwhile() {
    started("nh-noneigh", |lab, lb| {
        let nh = lab.change(lb, B4, "route replace 10.1.0.0/16 via 10.0.0.3 dev lb0");
        assert_eq!(nh.action, NH_NO_NEIGH);
        send(lab, lb, B4, &nh, 100);
        // The route lookup checks the MTU before the neighbour: too big all the same.
        send(lab, lb, B4, &nh, 1481);
        let start = Instant::now();
        loop {
            let n = ip_json(&lab.ns, &["neigh", "show", "to", "10.0.0.3", "dev", "lb0"]).unwrap();
            if n[0].get("managed").is_some() {
                break;
            }
            assert!(start.elapsed() < T, "no managed entry for the gateway: {n}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Once it answers (here: an entry the operator writes), the next hop follows.
        let nh = lab.change(
            lb,
            B4,
            "neigh replace 10.0.0.3 lladdr 02:00:00:00:00:33 dev lb0 nud reachable",
        );
        assert_eq!(nh.dmac, [2, 0, 0, 0, 0, 0x33]);
        send(lab, lb, B4, &nh, 100);
    });
}

#[test]
fn a_route_the_resolver_cannot_take_is_left_to_the_route_lookup_and_counted() {
    started("nh-unres", |lab, lb| {
        // A lightweight-tunnel route: the route helper refuses it, and so does the resolver.
        lab.ns
            .script("route replace 10.1.0.0/16 encap ip id 100 dst 10.0.0.9 dev lb0");
        let (id, generation) = member_of(lb, B4);
        let start = Instant::now();
        let status = loop {
            let s = lb_userspace::status::file::read_status(&lab.dirs.state).map(|s| s.nexthops);
            let nh = lb.nexthop(id);
            if let Some(s) = s.clone().filter(|s| s.unresolved == 1 && s.failures > 0)
                && nh.action == lb_common::NH_UNRESOLVED
                && nh.generation == generation
            {
                break s;
            }
            assert!(
                start.elapsed() < T,
                "entry {nh:?}, status {s:?}:\n{}",
                lab.agent.log_dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            status.resolved, 1,
            "the other backend stays resolved: {status:?}"
        );
        let failures = metric(&lab.ns, METRICS, "lb_nexthop_failures_total");
        assert!(
            failures >= Some(1),
            "lb_nexthop_failures_total: {failures:?}"
        );
        let before = lb.counters();
        lb.run(&frame(B4, 100), lab.lb0);
        let after = lb.counters();
        assert_eq!(
            after[&Counter::DropFibFailed] - before[&Counter::DropFibFailed],
            1,
            "the route lookup's verdict for a route it does not support"
        );
        // The agent keeps going: a route it can take is resolved again.
        let nh = lab.change(lb, B4, "route replace 10.1.0.0/16 via 10.0.0.2 dev lb0");
        assert_eq!(nh.action, NH_FORWARD);
        send(lab, lb, B4, &nh, 100);
    });
}

#[test]
fn route_changes_are_applied_on_netlink_events_before_the_periodic_refresh() {
    started("nh-events", |lab, lb| {
        // Three changes, each applied well within the 5 s of the periodic refresh: a refresh
        // that happened to fall right after each of them would take luck three times over.
        for change in [
            "route replace 10.1.0.0/16 via 10.0.1.2 dev lb1",
            "route replace 10.1.0.0/16 via 10.0.0.2 dev lb0",
            "route replace 10.1.0.0/16 via 10.0.1.2 dev lb1",
        ] {
            let start = Instant::now();
            lab.change(lb, B4, change);
            let took = start.elapsed();
            assert!(
                took < lb_userspace::kernel::nexthop::REFRESH_INTERVAL / 2,
                "{change}: applied after {took:?}"
            );
        }
    });
}

#[test]
fn a_backend_added_by_a_reload_gets_its_next_hop_at_once() {
    started("nh-reload", |lab, lb| {
        let before = lab.refreshes();
        let start = Instant::now();
        lab.dirs.write_config(&config(&["10.1.0.1", "10.0.1.7"]));
        while !lb
            .live_members()
            .values()
            .any(|m| m.addr[..4] == [10, 0, 1, 7])
        {
            assert!(
                start.elapsed() < T,
                "the reload made no member for 10.0.1.7"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Nothing answers for it on lb1's segment: no neighbour.
        let nh = lab.settled(lb, "10.0.1.7", before);
        let took = start.elapsed();
        assert_eq!(nh.action, NH_NO_NEIGH);
        assert!(
            took < lb_userspace::kernel::nexthop::REFRESH_INTERVAL / 2,
            "resolved {took:?} after the reload: not by the plan that made the member"
        );
    });
}

#[test]
fn lb_nexthops_lists_each_members_entry_and_the_keepers_figures() {
    started("nh-cli", |lab, lb| {
        let nh = lab.change(lb, B6, "route replace fd01::/64 via fd00:1::2 dev lb1");
        let v = lab.dirs.json(&["nexthops"]);
        assert!(v["keeper"]["refreshes"].as_u64() >= Some(1), "{v}");
        assert_eq!(v["keeper"]["resolved"], 2, "{v}");
        let rows = v["members"].as_array().expect("members");
        let row = rows
            .iter()
            .find(|r| r["backend"]["address"] == B6)
            .unwrap_or_else(|| panic!("no row for {B6}: {v}"));
        assert_eq!(row["action"], "forward", "{row}");
        assert_eq!(row["current"], true, "{row}");
        assert_eq!(row["ifindex"], nh.ifindex, "{row}");
        assert_eq!(row["dmac"], "02:00:00:00:01:fe", "{row}");
        assert_eq!(row["smac"], "02:00:00:00:01:01", "{row}");
        assert_eq!(row["mtu"], 1500, "{row}");
    });
}

/// Sends `frame` out of `dev` (a raw socket in the calling thread's namespace).
fn inject(dev: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(dev).unwrap();
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert_ne!(ifindex, 0, "no interface {dev}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n, frame.len() as isize, "sending on {dev}: {err}");
    }
}

#[test]
fn a_path_mtu_exception_which_sends_no_event_is_applied_by_the_periodic_refresh() {
    use lb_tests::packet::{IcmpError, icmp_error};
    started("nh-pmtu", |lab, lb| {
        // The gateway tells the node that its UDP packets to each backend are too big: the
        // kernel records an exception of MTU 1300 on the route (no netlink event says so).
        let gw_mac = [2, 0, 0, 0, 0, 0xfe];
        for (b, src, gw, kind) in [
            (B4, SRC4, "10.0.0.2", IcmpError::FragNeeded(1300)),
            (B6, SRC6, "fd00::2", IcmpError::PacketTooBig(1300)),
        ] {
            let sock = std::net::UdpSocket::bind((src.parse::<std::net::IpAddr>().unwrap(), 5555))
                .expect("bind");
            sock.connect((b.parse::<std::net::IpAddr>().unwrap(), 9))
                .expect("connect");
            let sent = Pkt::udp(src, 5555, b, 9, gw_mac).with(|p| p.payload = vec![0; 1400]);
            let quote = &sent.ip_bytes()[..548];
            let error = icmp_error(
                kind,
                gw.parse().unwrap(),
                src.parse().unwrap(),
                64,
                quote,
                LB0_MAC,
                gw_mac,
            );
            let before = lab.refreshes();
            inject("up0", &error);
            let nh = lab.settled(lb, b, before);
            assert_eq!(nh.mtu, 1300, "{b}: {nh:?}");
            let (big, fits) = if b == B4 { (1281, 1280) } else { (1261, 1260) };
            if b == B4 {
                send(lab, lb, b, &nh, big);
            }
            send(lab, lb, b, &nh, fits);
            drop(sock);
        }
    });
}
