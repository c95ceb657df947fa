//! Migrations of the pinned maps by the real agent (`lb run` in a namespace): a reload or a
//! restart with other `node.*` sizes moves every flow, affinity entry and NAT translation into
//! maps of the new sizes while the pinned link stays; a shrink that would drop live entries,
//! and maps the kernel refuses to make, are refused and change nothing. The state is made, and
//! checked, by running frames through another copy of the program on the agent's pins
//! ([`Lb::adopt`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    maps::MapInfo,
    programs::links::{FdLink, PinnedLink},
};
use lb_common::Counter;
use lb_tests::{
    agent::{Agent, Dirs},
    config::{RawBackend, RawConfig, RawNode, RawVip, backend, lab_node, some, vip, yaml},
    harness::{FibNet, Lb, XDP_TX, action_name, affinity_key, net::*, vip_key},
    hex,
    memcg::MemCgroup,
    packet::{L4, Pkt, TCP_ACK},
};
use lb_userspace::kernel::migrate::pins::STAGED;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(30);
/// Where the agents below serve metrics (each in its own namespace).
const METRICS: &str = "127.0.0.1:19437";
const WEB: &str = "192.0.2.10";
const STICKY: &str = "192.0.2.11";
const NAT: &str = "192.0.2.12";
const WEB6: &str = "2001:db8::10";

/// The sizes the tests start with; `flows / 4` is above the IPv6 table's floor of 1,024, so a
/// change of `flows` resizes both flow tables.
const FLOWS: u32 = 16_384;
const NATS: u32 = 4_096;

/// A DSR VIP for each family, a DSR VIP with client affinity and a NAT VIP, on two backends
/// each, with `node`'s settings.
fn config_with(node: RawNode) -> String {
    let to_9000 = |a: &str| RawBackend {
        port: Some(9000),
        ..backend(a)
    };
    let sticky = RawVip {
        affinity_timeout: some("1h"),
        ..vip(
            "sticky",
            STICKY,
            80,
            "tcp",
            &[backend(TX_V4), backend(TX_V4_B)],
        )
    };
    let nat = RawVip {
        mode: some("nat"),
        ..vip("nat", NAT, 80, "tcp", &[to_9000(TX_V4), to_9000(TX_V4_B)])
    };
    yaml(&RawConfig {
        node,
        vips: vec![
            vip("web", WEB, 80, "tcp", &[backend(TX_V4), backend(TX_V4_B)]),
            vip("web6", WEB6, 80, "tcp", &[backend(TX_V6), backend(TX_V6_B)]),
            sticky,
            nat,
        ],
    })
}

/// The node with the given flow and NAT table sizes, metrics served.
fn node(flows: u32, nat: u32) -> RawNode {
    RawNode {
        source_v4: some(NODE_V4),
        source_v6: some(NODE_V6),
        flow_table_size: Some(flows.into()),
        affinity_table_size: Some(4096),
        nat_table_size: Some(nat.into()),
        metrics_listen: some(METRICS),
        ..lab_node(&["lb0"])
    }
}

/// [`config_with`] the node of [`node`].
fn config(flows: u32, nat: u32) -> String {
    config_with(node(flows, nat))
}

/// How many flows of each kind [`frames`] makes.
#[derive(Clone, Copy, Debug)]
struct Counts {
    web: u32,
    web6: u32,
    sticky: u32,
    nat: u32,
}

const SOME: Counts = Counts {
    web: 300,
    web6: 40,
    sticky: 30,
    nat: 120,
};

/// One SYN per flow: `web` IPv4 DSR flows, `web6` IPv6 DSR flows, `sticky` clients held by
/// affinity (one flow each) and `nat` NAT translations.
fn frames(c: Counts) -> Vec<Pkt> {
    let v4 = |net: u32, i: u32| format!("198.51.{}.{}", net + i / 200, 1 + i % 200);
    let mut all = Vec::new();
    for i in 0..c.web {
        all.push(Pkt::tcp(&v4(100, i), 20000 + i as u16, WEB, 80, LB0_MAC));
    }
    for i in 0..c.web6 {
        let src = format!("2001:db8:c::{:x}", i + 1);
        all.push(Pkt::tcp(&src, 30000 + i as u16, WEB6, 80, LB0_MAC));
    }
    for i in 0..c.sticky {
        all.push(Pkt::tcp(&v4(110, i), 40000, STICKY, 80, LB0_MAC));
    }
    for i in 0..c.nat {
        all.push(Pkt::tcp(&v4(120, i), 50000 + i as u16, NAT, 80, LB0_MAC));
    }
    all
}

/// Runs every frame through the program on the pins; the output frames (each must be sent
/// back out: `XDP_TX`) and what the global counters moved by.
fn run_all(net: &FibNet, pins: &Path, pkts: &[Pkt]) -> (Vec<Vec<u8>>, BTreeMap<&'static str, u64>) {
    net.ns.run(|| {
        let mut lb = Lb::adopt(pins);
        let before = lb.counters();
        let out = pkts
            .iter()
            .map(|p| {
                let r = lb.run(&p.frame(), net.lb0);
                assert_eq!(
                    action_name(r.action),
                    action_name(XDP_TX),
                    "{} -> {}:{}",
                    p.src,
                    p.dst,
                    p.dport
                );
                r.output
            })
            .collect();
        let after = lb.counters();
        let moved = [
            Counter::FlowHits,
            Counter::NewFlows,
            Counter::AffinityHits,
            Counter::MaglevLookups,
        ]
        .into_iter()
        .map(|c| (c.name(), after[&c] - before[&c]))
        .collect();
        (out, moved)
    })
}

/// Asserts that `now` are the very frames `first` were, frame by frame.
fn same_frames(pkts: &[Pkt], first: &[Vec<u8>], now: &[Vec<u8>], when: &str) {
    assert_eq!(first.len(), now.len());
    for ((p, a), b) in pkts.iter().zip(first).zip(now) {
        assert!(
            a == b,
            "{when}: the frame of {}:{} -> {}:{} changed:\nbefore\n{}\nnow\n{}",
            p.src,
            p.sport,
            p.dst,
            p.dport,
            hex(a),
            hex(b)
        );
    }
}

/// The affinity entry of each client of `sticky` in `pkts` (all of them must have one).
fn affinity(net: &FibNet, pins: &Path, pkts: &[Pkt]) -> Vec<lb_common::AffinityValue> {
    net.ns.run(|| {
        let mut lb = Lb::adopt(pins);
        let vips: aya::maps::HashMap<_, lb_common::VipKey, lb_common::VipValue> =
            aya::maps::HashMap::try_from(lb.ebpf.map("LB_VIPS").expect("LB_VIPS")).unwrap();
        let id = vips
            .get(&vip_key(STICKY, 80, 6), 0)
            .expect("the sticky VIP")
            .id;
        pkts.iter()
            .filter(|p| p.dst.to_string() == STICKY)
            .map(|p| {
                lb.affinity(&affinity_key(p, id))
                    .unwrap_or_else(|| panic!("no affinity entry for {}", p.src))
            })
            .collect()
    })
}

/// A flow as `lb flows` lists it: (client, VIP, backend, NAT port).
type Listed = BTreeSet<(String, String, String, Option<u64>)>;

/// `lb flows -o json`: what must survive.
fn flows(dirs: &Dirs) -> Listed {
    let v = dirs.json(&["flows", "--limit", "100000"]);
    v["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("lb flows: {v}"))
        .iter()
        .map(|f| {
            (
                f["client"].as_str().unwrap().to_string(),
                f["vip"]["label"].as_str().unwrap().to_string(),
                f["backend"]["label"].as_str().unwrap().to_string(),
                f["nat"]["port"].as_u64(),
            )
        })
        .collect()
}

/// `lb status -o json` in the agent's namespace.
fn status(net: &FibNet, dirs: &Dirs) -> Value {
    let out = dirs.cli_in(&net.ns, &["status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lb status: not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Polls `lb status` until `f` takes it, or panics with the last one and the agent's log.
fn poll_status(
    net: &FibNet,
    dirs: &Dirs,
    agent: &Agent,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let v = status(net, dirs);
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {T:?}:\n{v:#}\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The id of every pinned map, by pin name.
fn map_ids(dirs: &Dirs) -> BTreeMap<String, u32> {
    dirs.pin_names()
        .into_iter()
        .filter(|n| n.starts_with("LB_"))
        .map(|n| {
            let info = MapInfo::from_pin(dirs.pins.join(&n))
                .unwrap_or_else(|e| panic!("the pinned {n}: {e}"));
            (n, info.id())
        })
        .collect()
}

/// (link id, program id) of lb0's pinned link.
fn link(dirs: &Dirs) -> (u32, u32) {
    let l = PinnedLink::from_pin(dirs.pins.join("link-lb0")).expect("lb0's pinned link");
    let i = FdLink::from(l).info().expect("the link's info");
    (i.id(), i.program_id())
}

/// The value of the sample `name` (with its labels, as written) on the agent's /metrics.
fn sample(net: &FibNet, name: &str) -> Option<f64> {
    lb_tests::agent::metrics_text(&net.ns, METRICS)?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

const OK: &str = "lb_map_migrations_total{result=\"ok\"}";
const FAILED: &str = "lb_map_migrations_total{result=\"failed\"}";

/// The map a pin name stands for (`LB_VIPS@v2` -> `LB_VIPS`).
fn map_of(pin: &str) -> &str {
    lb_userspace::kernel::migrate::schema::parse_pin_name(pin).map_or(pin, |(m, _)| m)
}

/// The map's entry in a migration report.
fn moved<'a>(m: &'a Value, map: &str) -> &'a Value {
    m["maps"]
        .as_array()
        .unwrap_or_else(|| panic!("no maps in {m}"))
        .iter()
        .find(|x| x["map"] == map)
        .unwrap_or_else(|| panic!("{map} not in {m:#}"))
}

/// An agent on [`config`]`(FLOWS, NATS)` in a fresh namespace.
fn start(tag: &str) -> (FibNet, Dirs, Agent) {
    let net = FibNet::new(tag);
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config(FLOWS, NATS));
    let mut agent = Agent::start(&net.ns, &dirs);
    // The config file is watched before the agent's status says it serves.
    agent.wait_serving(&net.ns, &dirs, T);
    (net, dirs, agent)
}

/// The state the frames of [`SOME`] made, taken before a migration, to compare with after.
struct Before {
    pkts: Vec<Pkt>,
    out: Vec<Vec<u8>>,
    flows: Listed,
    /// The counters a second run of the frames moved (all of them followed the flow table).
    rerun: BTreeMap<&'static str, u64>,
    affinity: Vec<lb_common::AffinityValue>,
}

/// The same flows' next packets: ACKs (a SYN is balanced afresh, an ACK follows its flow).
fn acks(pkts: &[Pkt]) -> Vec<Pkt> {
    pkts.iter()
        .map(|p| p.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK }))
        .collect()
}

fn make_flows(net: &FibNet, dirs: &Dirs) -> Before {
    let syns = frames(SOME);
    let (_, made) = run_all(net, &dirs.pins, &syns);
    let n = syns.len() as u64;
    assert_eq!(made["new_flows"], n, "every SYN a new flow: {made:?}");
    let flows = flows(dirs);
    assert_eq!(flows.len() as u64, n, "lb flows lists every flow made");
    let nat_ports: BTreeSet<u64> = flows.iter().filter_map(|f| f.3).collect();
    assert_eq!(nat_ports.len() as u32, SOME.nat, "a NAT port each");
    // The flows' next packets follow the flows (and translations) just made: what they send
    // is the reference for after the migration.
    let pkts = acks(&syns);
    let (out, rerun) = run_all(net, &dirs.pins, &pkts);
    assert_eq!(rerun["new_flows"], 0, "{rerun:?}");
    assert_eq!(rerun["maglev_lookups"], 0, "{rerun:?}");
    assert_eq!(rerun["flow_hits"], n, "{rerun:?}");
    let (again, _) = run_all(net, &dirs.pins, &pkts);
    same_frames(&pkts, &out, &again, "a second run before any migration");
    let affinity = affinity(net, &dirs.pins, &pkts);
    assert_eq!(affinity.len() as u32, SOME.sticky);
    Before {
        pkts,
        out,
        flows,
        rerun,
        affinity,
    }
}

/// Checks that every flow, affinity entry and translation of `b` is still in the pins, with its
/// backend and NAT port: listed alike, followed by the program (no new flow, no Maglev lookup),
/// and the output frames byte for byte those of the first run.
fn check_kept(net: &FibNet, dirs: &Dirs, b: &Before, when: &str) {
    assert_eq!(flows(dirs), b.flows, "{when}: lb flows changed");
    assert_eq!(
        affinity(net, &dirs.pins, &b.pkts),
        b.affinity,
        "{when}: the affinity entries changed"
    );
    let (out, moved) = run_all(net, &dirs.pins, &b.pkts);
    same_frames(&b.pkts, &b.out, &out, when);
    assert_eq!(
        moved, b.rerun,
        "{when}: the frames did not follow the flows as before"
    );
}

/// Checks a migration report: the flow and NAT tables resized from `from` to `to` sizes with
/// every entry of [`SOME`] copied, the affinity table reused as it is.
fn check_report(m: &Value, trigger: &str, from: (u32, u32), to: (u32, u32)) {
    assert_eq!(m["trigger"], trigger, "{m:#}");
    let buckets = lb_common::flowtab::buckets_for;
    let v6 = |f: u32| (f / 4).max(1024);
    let v4_flows = SOME.web + SOME.sticky + SOME.nat;
    let rows = [
        ("LB_FLOWS4", buckets(from.0), buckets(to.0), v4_flows),
        ("LB_FLOWS", v6(from.0), v6(to.0), SOME.web6),
        ("LB_NAT", from.1, to.1, SOME.nat),
        ("LB_NAT_REV", from.1, to.1, SOME.nat),
    ];
    for (map, a, b, entries) in rows {
        let x = moved(m, map);
        assert_eq!(x["action"], "resized", "{map}: {x}");
        assert_eq!(x["from_entries"], a, "{map}: {x}");
        assert_eq!(x["to_entries"], b, "{map}: {x}");
        assert_eq!(x["entries"], entries, "{map}: entries copied: {x}");
    }
    assert_eq!(moved(m, "LB_AFFINITY")["action"], "reused", "{m:#}");
    assert_eq!(moved(m, "LB_VIPS")["action"], "reused", "{m:#}");
}

#[test]
fn a_reload_that_doubles_then_halves_the_tables_keeps_every_flow_and_translation() {
    let (net, dirs, agent) = start("mig-reload");
    let before = make_flows(&net, &dirs);
    let (link_id, prog) = link(&dirs);

    for (step, (from, to)) in [
        ((FLOWS, NATS), (2 * FLOWS, 2 * NATS)),
        ((2 * FLOWS, 2 * NATS), (FLOWS, NATS)),
    ]
    .into_iter()
    .enumerate()
    {
        let when = format!("after the reload to {to:?}");
        let ids = map_ids(&dirs);
        dirs.write_config(&config(to.0, to.1));
        // The sizes under `maps` are read from the pins, which are renamed before the agent
        // records its report: the report itself says which migration it is.
        let this_one = |m: &Value| {
            m["trigger"] == "reload"
                && m["maps"].as_array().is_some_and(|maps| {
                    maps.iter().any(|x| {
                        x["map"] == "LB_FLOWS4"
                            && x["to_entries"] == lb_common::flowtab::buckets_for(to.0)
                    })
                })
        };
        let v = poll_status(&net, &dirs, &agent, "the migrating reload", |v| {
            this_one(&v["agent"]["last_migration"])
                && v["maps"]["sizes"]["flow_entries"] == to.0
                && v["maps"]["sizes"]["nat_entries"] == to.1
        });
        let a = &v["agent"];
        assert_eq!(a["last_reload"]["ok"], true, "{v:#}");
        assert_eq!(a["reloads_rejected"], 0, "{v:#}");
        check_report(&a["last_migration"], "reload", from, to);
        // The resized maps are new maps under the old names; the others are the same maps.
        let now = map_ids(&dirs);
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            ids.keys().collect::<Vec<_>>(),
            "{when}: the pin names changed"
        );
        for (name, id) in &ids {
            let resized = ["LB_FLOWS4", "LB_FLOWS", "LB_NAT", "LB_NAT_REV"].contains(&map_of(name))
                || moved(&a["last_migration"], map_of(name))["action"] == "renewed";
            assert_eq!(
                now[name] != *id,
                resized,
                "{when}: {name} {id} -> {}",
                now[name]
            );
        }
        let (l, p) = link(&dirs);
        assert_eq!(l, link_id, "{when}: the pinned link was replaced");
        assert_ne!(
            p, prog,
            "{when}: the new program was not swapped into the link"
        );
        check_kept(&net, &dirs, &before, &when);
        assert_eq!(sample(&net, OK), Some(step as f64 + 1.0), "{when}");
        assert_eq!(sample(&net, FAILED), Some(0.0), "{when}");
        let m = &a["last_migration"];
        let copied = u64::from(SOME.web + SOME.sticky + 2 * SOME.nat + SOME.nat + SOME.web6);
        assert_eq!(m["entries"], copied, "{when}: {m:#}");
        let merged = m["merged"].as_u64().unwrap();
        assert_eq!(
            sample(&net, "lb_map_migration_last_entries"),
            Some((copied + merged) as f64),
            "{when}"
        );
        // The scrape reads the new maps.
        let table =
            |t: &str, what: &str| sample(&net, &format!("lb_table_{what}{{table=\"{t}\"}}"));
        for t in ["nat", "nat_reverse"] {
            assert_eq!(table(t, "capacity"), Some(to.1 as f64), "{when}: {t}");
            assert_eq!(table(t, "entries"), Some(SOME.nat as f64), "{when}: {t}");
        }
        assert_eq!(
            table("flows_ipv6", "capacity"),
            Some((to.0 / 4) as f64),
            "{when}"
        );
        assert_eq!(
            table("flows_ipv4", "entries"),
            Some((SOME.web + SOME.sticky + SOME.nat) as f64),
            "{when}"
        );
    }
}

#[test]
fn a_restart_with_other_sizes_migrates_the_pins() {
    let (net, dirs, mut agent) = start("mig-restart");
    let before = make_flows(&net, &dirs);
    let (link_id, _) = link(&dirs);
    assert_eq!(agent.stop().code(), Some(0));

    let to = (2 * FLOWS, 2 * NATS);
    dirs.write_config(&config(to.0, to.1));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    let v = poll_status(&net, &dirs, &agent, "the restarted agent", |v| {
        v["agent"]["running"] == true && v["agent"]["pid"] == agent.pid()
    });
    let a = &v["agent"];
    assert_eq!(v["maps"]["sizes"]["flow_entries"], to.0, "{v:#}");
    assert_eq!(v["maps"]["sizes"]["nat_entries"], to.1, "{v:#}");
    let m = &a["last_migration"];
    check_report(m, "start", (FLOWS, NATS), to);
    assert_eq!(m["from_release"], env!("CARGO_PKG_VERSION"), "{m:#}");
    assert_eq!(link(&dirs).0, link_id, "the pinned link was replaced");
    check_kept(&net, &dirs, &before, "after the restart");
    assert_eq!(sample(&net, OK), Some(1.0));
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_shrink_below_the_live_entries_is_refused_saying_how_many_and_changes_nothing() {
    let (net, dirs, agent) = start("mig-shrink");
    let syns = frames(Counts {
        web: 0,
        web6: 0,
        sticky: 0,
        nat: 300,
    });
    run_all(&net, &dirs.pins, &syns);
    let pkts = acks(&syns);
    let (out, _) = run_all(&net, &dirs.pins, &pkts);
    let listed = flows(&dirs);
    assert_eq!(listed.len(), 300);
    let ids = map_ids(&dirs);
    let link_before = link(&dirs);

    dirs.write_config(&config(FLOWS, 100));
    let v = poll_status(&net, &dirs, &agent, "the rejected reload", |v| {
        v["agent"]["reloads_rejected"] == 1
    });
    let a = &v["agent"];
    assert_eq!(a["last_reload"]["ok"], false, "{v:#}");
    let why = a["last_reload"]["error"].as_str().unwrap();
    assert!(
        why.contains("node.nat_table_size 100") && why.contains("of the 300 live entries"),
        "{why}"
    );
    assert_eq!(v["maps"]["sizes"]["nat_entries"], NATS, "{v:#}");
    assert_eq!(a["last_migration"], Value::Null, "{v:#}");
    assert_eq!(map_ids(&dirs), ids, "the pinned maps changed");
    assert_eq!(link(&dirs), link_before, "the link or its program changed");
    assert_eq!(flows(&dirs), listed, "the translations changed");
    let (again, _) = run_all(&net, &dirs.pins, &pkts);
    same_frames(&pkts, &out, &again, "after the refused shrink");
    assert_eq!(sample(&net, FAILED), Some(1.0));
    assert_eq!(sample(&net, OK), Some(0.0));
}

/// `lb`'s config takes `node.nat_table_size` up to 2^27; the kernel refuses an LRU hash only
/// from 2^29 (E2BIG), and one of 2^27 it tries to make (2 GiB of buckets, 20 GiB of entries).
/// So the failure is injected with a memory cgroup: the agent is moved into one limited to
/// [`LIMIT`] before the reload, and a NAT table of 2^24 entries needs 256 MiB of buckets alone:
/// the kernel refuses it (ENOMEM) once the group's limit is reached, and nothing else is used.
const LIMIT: u64 = 128 << 20;

#[test]
fn a_map_the_kernel_refuses_to_create_leaves_the_old_program_and_maps_serving() {
    let cg = MemCgroup::new("mig-enomem", LIMIT);
    let (net, dirs, agent) = start("mig-enomem");
    let before = make_flows(&net, &dirs);
    let ids = map_ids(&dirs);
    let link_before = link(&dirs);

    cg.add(agent.pid());
    let t = Instant::now();
    // These sizes need more than the default node.kernel_memory_limit, which would refuse them
    // before the kernel is asked: the limit is raised, so that the kernel's refusal is tested.
    let big = config_with(RawNode {
        kernel_memory_limit: some("8GiB"),
        ..node(FLOWS, 1 << 24)
    });
    dirs.write_config(&big);
    let v = poll_status(&net, &dirs, &agent, "the rejected reload", |v| {
        v["agent"]["reloads_rejected"] == 1
    });
    let took = t.elapsed();
    let a = &v["agent"];
    assert_eq!(a["last_reload"]["ok"], false, "{v:#}");
    let why = a["last_reload"]["error"].as_str().unwrap();
    assert!(
        why.contains("making the maps of the new program")
            && why.contains("the old program and its maps serve on"),
        "{why}"
    );
    assert!(
        why.contains("LB_NAT") && why.contains("os error 12"),
        "not the kernel refusing the NAT table (ENOMEM): {why}"
    );
    assert!(
        took < Duration::from_secs(10),
        "refused only after {took:?}"
    );
    let peak = cg.peak().expect("the group's peak");
    eprintln!("refused within {took:?}, the group's peak {peak} bytes: {why}");
    assert!(peak <= LIMIT, "the agent used {peak} bytes in the group");
    assert_eq!(v["maps"]["sizes"]["nat_entries"], NATS, "{v:#}");
    let names = dirs.pin_names();
    assert!(
        !names.iter().any(|n| n.ends_with(STAGED)),
        "staged pins left: {names:?}"
    );
    assert_eq!(map_ids(&dirs), ids, "the pinned maps changed");
    assert_eq!(link(&dirs), link_before, "the link or its program changed");
    check_kept(&net, &dirs, &before, "after the refused maps");
    assert_eq!(sample(&net, FAILED), Some(1.0));
    assert_eq!(sample(&net, OK), Some(0.0));
    drop(agent);
}

/// Sends a SYN of each `client(i)` into lb0 (through its veth peer) all through a reload to
/// `cfg`, so the attached program makes their flows in the old maps until the swap (those made
/// after the first copy are merged in after it) and in the new ones after; stops some 200 after
/// the migration. Returns how many were sent, once `lb flows` lists every one of them, and the
/// migration's report.
fn reload_under_traffic(
    net: &FibNet,
    dirs: &Dirs,
    agent: &Agent,
    cfg: &str,
    client: impl Fn(u32) -> Pkt + Sync,
) -> (u32, Listed, Value) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    const MAX: u32 = 6_000;
    let stop = AtomicBool::new(false);
    let sent = AtomicU32::new(0);
    let v = std::thread::scope(|s| {
        s.spawn(|| {
            lb_tests::netns::enter(&net.ns.name);
            let raw = lb_tests::raw::Raw::new("up0");
            for i in 0..MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                raw.send(&client(i).frame());
                sent.store(i + 1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        poll_status(
            net,
            dirs,
            agent,
            "flows made by the attached program",
            |v| v["maps"]["tables"]["flows_ipv4"]["entries"].as_u64() >= Some(200),
        );
        dirs.write_config(cfg);
        let v = poll_status(net, dirs, agent, "the migrating reload", |v| {
            v["agent"]["last_migration"]["trigger"] == "reload"
        });
        let at = sent.load(Ordering::Relaxed);
        let deadline = Instant::now() + T;
        while sent.load(Ordering::Relaxed) < (at + 200).min(MAX) {
            assert!(Instant::now() < deadline, "the sender stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        v
    });
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        sent < MAX,
        "the sender ran out of clients before the migration ended"
    );
    let m = v["agent"]["last_migration"].clone();
    eprintln!(
        "sent {sent}; migration: {} entries copied, {} merged, {} ms",
        m["entries"], m["merged"], m["duration_ms"]
    );
    let want: BTreeSet<String> = (0..sent)
        .map(|i| {
            let p = client(i);
            format!("{}:{}", p.src, p.sport)
        })
        .collect();
    let deadline = Instant::now() + T;
    loop {
        let listed = flows(dirs);
        let got: BTreeSet<String> = listed.iter().map(|f| f.0.clone()).collect();
        if got == want {
            return (sent, listed, m);
        }
        if Instant::now() > deadline {
            let lost: Vec<&String> = want.difference(&got).collect();
            panic!(
                "{} of the {sent} flows lost ({} listed): {lost:?}\nmigration: {m:#}",
                lost.len(),
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn live_client(i: u32, vip: &str) -> Pkt {
    Pkt::tcp(
        &format!("198.51.{}.{}", 130 + i / 200, 1 + i % 200),
        20000,
        vip,
        80,
        LB0_MAC,
    )
}

#[test]
fn flows_the_attached_program_makes_while_a_reload_migrates_are_all_kept() {
    let (net, dirs, agent) = start("mig-live");
    let (_, _, m) = reload_under_traffic(&net, &dirs, &agent, &config(2 * FLOWS, NATS), |i| {
        live_client(i, WEB)
    });
    assert!(
        moved(&m, "LB_FLOWS4")["merged"].as_u64() > Some(0),
        "no late flow to merge: {m:#}"
    );
}

/// NAT translations the old program makes while a reload migrates (a narrow port range makes a
/// port handed out twice likely, were it possible) keep their ports: from just before the swap
/// until the merge, the new program holds new translations back (`drop_nat_held`), so it cannot
/// hand out a port the old program gave away in its last moments.
#[test]
fn nat_translations_made_while_a_reload_migrates_keep_their_ports() {
    let (net, dirs, agent) = start("mig-live-nat");
    let narrow = |flows, nats| {
        config_with(RawNode {
            nat_port_range: some("20000-22999"),
            ..node(flows, nats)
        })
    };
    dirs.write_config(&narrow(FLOWS, NATS));
    poll_status(&net, &dirs, &agent, "the narrow port range", |v| {
        v["agent"]["reloads_applied"] == 1
    });
    let client = |i: u32| live_client(i, NAT);
    let (sent, listed, m) =
        reload_under_traffic(&net, &dirs, &agent, &narrow(2 * FLOWS, 2 * NATS), client);
    let index = |c: &str| {
        (0..sent)
            .find(|&i| format!("{}:{}", client(i).src, client(i).sport) == c)
            .unwrap()
    };
    // Each translation is listed with its port, and its reverse entry is its own; a flow whose
    // SYN came while new translations were held back has none yet.
    let mut wrong = Vec::new();
    let mut held = Vec::new();
    let mut nat: Vec<(Pkt, u16)> = Vec::new();
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        for (c, _, backend, port) in &listed {
            let ack = client(index(c)).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
            let Some(port) = port.map(|p| p as u16) else {
                held.push(client(index(c)));
                continue;
            };
            let backend: std::net::Ipv4Addr = backend.split(':').next().unwrap().parse().unwrap();
            let node: std::net::Ipv4Addr = NODE_V4.parse().unwrap();
            let rkey = lb_common::FlowKey {
                src: v4_16(backend.octets()),
                dst: v4_16(node.octets()),
                src_port: 9000u16.to_be(),
                dst_port: port.to_be(),
                proto: 6,
                family: 4,
                _pad: [0; 2],
            };
            let r = lb.nat_reverse(&rkey);
            match r.is_some_and(|r| r.client.src == v4_16(ip4(&ack))) {
                true => nat.push((ack, port)),
                false => wrong.push(format!("{c} port {port}: the reverse entry is {r:?}")),
            }
        }
    });
    // With the range this narrow and every translation half-open (the clients send SYNs only),
    // a search that finds no free port takes over the oldest half-open candidate once it is a
    // second old (by design: see `nat_half_open_reclaimed`), and a migration that takes over a
    // second leaves such ones; each such takeover may leave one listed port to another client.
    // A port handed out twice would break one without a takeover counted.
    let reclaimed = dirs.json(&["stats"])["global"]["nat_half_open_reclaimed"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        wrong.len() as u64 <= reclaimed,
        "{} of {} translations broken, {reclaimed} half-open ones taken over:\n{}\nmigration: {m:#}",
        wrong.len(),
        listed.len(),
        wrong.join("\n")
    );
    // As many were held back as the program counted, and each gets its translation when the
    // client sends its SYN again (as TCP retransmits it, a second later).
    let counters = dirs.json(&["stats"]);
    let dropped_held = counters["global"]["drop_nat_held"].as_u64();
    assert_eq!(dropped_held, Some(held.len() as u64), "{counters:#}");
    if !held.is_empty() {
        let (again, _) = run_all(&net, &dirs.pins, &held);
        assert_eq!(again.len(), held.len());
    }
    let pkts: Vec<Pkt> = nat.iter().map(|(p, _)| p.clone()).collect();
    let (out, _) = run_all(&net, &dirs.pins, &pkts);
    for ((p, port), o) in nat.iter().zip(&out) {
        // Ethernet, a 20-byte IPv4 header, then TCP: the source port is the NAT port.
        assert_eq!(
            u16::from_be_bytes([o[34], o[35]]),
            *port,
            "{}: translated with another port than listed",
            p.src
        );
    }
}

fn ip4(p: &Pkt) -> [u8; 4] {
    match p.src {
        std::net::IpAddr::V4(a) => a.octets(),
        a => panic!("{a} is not IPv4"),
    }
}

fn v4_16(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

/// The IPv4 flow table pinned at `pin`: (its flows' keys, how many of them are confirmed).
fn flow_table(pin: &Path) -> (BTreeSet<u64>, usize) {
    let data =
        aya::maps::MapData::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let buckets = data.info().unwrap().max_entries() as usize;
    let table = lb_userspace::kernel::flowmap::FlowMap::map(&data, buckets).unwrap();
    let ways: Vec<_> = table.ways().collect();
    (
        ways.iter().map(|w| w.key).collect(),
        ways.iter().filter(|w| w.confirmed).count(),
    )
}

#[test]
fn a_rollback_to_the_previous_release_clears_the_confirmed_bits_and_keeps_every_ipv4_flow() {
    let (net, dirs, mut agent) = start("rb-flows4");
    make_flows(&net, &dirs);
    assert_eq!(agent.stop().code(), Some(0));
    // Every IPv4 flow had its ACK after its SYN: confirmed, under schema 2's pin.
    let (keys, confirmed) = flow_table(&dirs.pins.join("LB_FLOWS4@v2"));
    assert!(!keys.is_empty());
    assert_eq!(confirmed, keys.len(), "every flow confirmed by its ACK");

    let previous = lb_tests::release::previous_version();
    let out = dirs.cli(&["migrate", "--to-release", &previous]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dirs.pins.join("LB_FLOWS4@v2").exists(),
        "schema 2's pin renamed"
    );
    let (after, confirmed) = flow_table(&dirs.pins.join("LB_FLOWS4"));
    assert_eq!(after, keys, "the same flows, in the same map");
    assert_eq!(confirmed, 0, "{previous}'s padding is zero again");
}

#[test]
fn a_rollback_to_the_previous_release_unpins_the_connection_counts_and_clears_the_least_connections_flag()
 {
    let net = FibNet::new("rb-lc");
    let dirs = Dirs::new(Path::new(BIN), "rb-lc");
    dirs.write_config(&config(FLOWS, NATS).replacen(
        "    protocol: tcp\n",
        "    protocol: tcp\n    algorithm: least-connections\n",
        1,
    ));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    make_flows(&net, &dirs);
    assert_eq!(agent.stop().code(), Some(0));
    assert!(dirs.pins.join("LB_MEMBER_CONNS").exists());
    let (keys, _) = flow_table(&dirs.pins.join("LB_FLOWS4@v2"));

    let previous = lb_tests::release::previous_version();
    let out = dirs.cli(&["migrate", "--to-release", &previous]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dirs.pins.join("LB_MEMBER_CONNS").exists(),
        "{previous} knows no LB_MEMBER_CONNS"
    );
    let data = aya::maps::MapData::from_pin(dirs.pins.join("LB_VIPS")).unwrap();
    let vips: aya::maps::HashMap<_, lb_common::VipKey, lb_common::VipValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    let web = vips
        .get(&vip_key(WEB, 80, lb_common::IPPROTO_TCP), 0)
        .expect("the web VIP kept");
    assert_eq!(
        web.flags & lb_common::VIP_F_LEAST_CONN,
        0,
        "the flag cleared"
    );
    let (after, _) = flow_table(&dirs.pins.join("LB_FLOWS4"));
    assert_eq!(after, keys, "the same flows, in the same map");
}
