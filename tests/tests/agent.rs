//! The agent as people run it: `lb run` in a namespace, as its own process, driven through its
//! config file, signals and CLI, and checked through the pinned maps and packets run through the
//! program on those maps.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, TcpListener},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_common::Counter;
use lb_tests::{
    agent::{Agent, Dirs, metric, xdp_attachment},
    config::{
        RawBackend, RawConfig, RawHealthCheck, RawNode, RawPassiveHealth, RawVip, backend,
        lab_node, some, vip, weighted, yaml,
    },
    harness::{FibNet, Lb, XDP_TX, action_name, net::*},
    netns::NetNs,
    packet::{L4, Pkt, TCP_ACK},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
/// Where the agents of the tests below serve metrics (each in its own namespace).
const METRICS: &str = "127.0.0.1:19435";
const XDP_ATTACHED_DRV: u64 = 1;
const XDP_ATTACHED_SKB: u64 = 2;

/// VIP web (192.0.2.10:80/tcp) on `backends` (address, weight).
fn web(backends: &[(&str, u32)]) -> RawVip {
    let list: Vec<RawBackend> = backends.iter().map(|(a, w)| weighted(a, *w)).collect();
    vip("web", "192.0.2.10", 80, "tcp", &list)
}

/// `node` serving [`web`] on `backends`, then `extra_vips`.
fn config_with(node: RawNode, backends: &[(&str, u32)], extra_vips: &[RawVip]) -> String {
    yaml(&RawConfig {
        node,
        vips: [vec![web(backends)], extra_vips.to_vec()].concat(),
    })
}

/// On lb0: [`web`] on `backends`, then `extra_vips`.
fn config(backends: &[(&str, u32)], extra_vips: &[RawVip]) -> String {
    config_with(lab_node(&["lb0"]), backends, extra_vips)
}

/// Runs `pkt` through the program on the agent's maps; returns the outer destination.
fn send(lb: &mut Lb, pkt: &Pkt, ingress: u32) -> IpAddr {
    let run = lb.run(&pkt.frame(), ingress);
    assert_eq!(action_name(run.action), action_name(XDP_TX));
    IpAddr::from(<[u8; 4]>::try_from(&run.output[30..34]).unwrap())
}

fn syn(i: u32) -> Pkt {
    Pkt::tcp(
        &format!("198.51.{}.{}", 100 + i / 200, 1 + i % 200),
        20000 + (i % 1000) as u16,
        "192.0.2.10",
        80,
        LB0_MAC,
    )
}

fn slots(dirs: &Dirs) -> BTreeMap<String, u64> {
    let v = dirs.json(&["backends"]);
    v[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["backend"]["address"].as_str().unwrap().to_string(),
                b["slots"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_agent_programs_the_maps_and_packets_follow_them() {
    let net = FibNet::new("agent");
    let dirs = Dirs::new(Path::new(BIN), "agent");
    let sticky = RawVip {
        affinity_timeout: some("1h"),
        ..vip(
            "sticky",
            "192.0.2.11",
            80,
            "tcp",
            &[backend("10.1.0.1"), backend("10.1.0.2")],
        )
    };
    let node = RawNode {
        metrics_listen: some("127.0.0.1:19435"),
        ..lab_node(&["lb0"])
    };
    let cfg = config_with(node, &[(TX_V4, 200), (TX_V4_B, 100)], &[sticky]);
    dirs.write_config(&cfg);
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);

    let s = slots(&dirs);
    assert_eq!(s[TX_V4] + s[TX_V4_B], 1009, "{s:?}");
    assert!(
        (s[TX_V4] as i64 - 673).abs() <= 2,
        "weights 200:100 over 1009 slots: {s:?}"
    );

    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let mut got: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for i in 0..300 {
            *got.entry(send(&mut lb, &syn(i), net.lb0)).or_insert(0) += 1;
        }
        // `lb explain` (another process, reading the pinned maps) agrees with the program.
        for i in [0, 7, 42, 299] {
            let p = syn(i);
            let e = dirs.json(&[
                "explain",
                &format!("{}:{}", p.src, p.sport),
                "192.0.2.10:80",
                "tcp",
            ]);
            assert_eq!(e["by"], "flow", "{e}");
            assert_eq!(
                e["backend"]["address"]
                    .as_str()
                    .unwrap()
                    .parse::<IpAddr>()
                    .unwrap(),
                send(&mut lb, &p, net.lb0),
                "{e}"
            );
        }
        let fresh = syn(5000);
        let e = dirs.json(&[
            "explain",
            &format!("{}:{}", fresh.src, fresh.sport),
            "192.0.2.10:80",
            "tcp",
        ]);
        assert_eq!(e["by"], "maglev", "{e}");
        assert_eq!(
            e["backend"]["address"]
                .as_str()
                .unwrap()
                .parse::<IpAddr>()
                .unwrap(),
            send(&mut lb, &fresh, net.lb0),
            "{e}"
        );

        let a = got[&TX_V4.parse::<IpAddr>().unwrap()] as f64;
        assert!(
            (a / 300.0 - 2.0 / 3.0).abs() < 0.1,
            "300 flows split {got:?}"
        );
        let stats = dirs.json(&["stats"]);
        assert!(stats["global"]["tx"].as_u64().unwrap() >= 300, "{stats}");
        assert!(
            stats["global"]["new_flows"].as_u64().unwrap() >= 301,
            "{stats}"
        );
        let flows = dirs.json(&["flows", "--limit", "1000"]);
        let listed = flows["flows"].as_array().unwrap().len();
        assert!(listed >= 301, "flows listed: {listed}");
        assert_eq!(
            flows["total"].as_u64(),
            Some(listed as u64),
            "{}",
            flows["total"]
        );
    });
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn kill9_and_restart_keeps_the_attachment_the_flows_and_their_backends() {
    let net = FibNet::new("restart");
    let dirs = Dirs::new(Path::new(BIN), "restart");
    let cfg = config(&[(TX_V4, 1), (TX_V4_B, 1)], &[]);
    dirs.write_config(&cfg);
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let flows: Vec<(Pkt, IpAddr)> = net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        (0..100)
            .map(|i| (syn(i), send(&mut lb, &syn(i), net.lb0)))
            .collect()
    });
    let xdp_prog = |ns: &NetNs| {
        let out = std::process::Command::new("ip")
            .args(["-n", &ns.name, "-d", "link", "show", "lb0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("prog/xdp id ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string)
    };
    let attached = xdp_prog(&net.ns).expect("program attached to lb0");

    agent.kill9();
    assert_eq!(
        xdp_prog(&net.ns).as_deref(),
        Some(attached.as_str()),
        "kill -9 detached the program"
    );
    assert!(dirs.pins.join("link-lb0").exists() && dirs.pins.join("LB_FLOWS").exists());

    // Same config: the new agent adopts everything and writes nothing.
    let mut agent = Agent::start(&net.ns, &dirs);
    let status = agent.wait_running(&net.ns, &dirs, T);
    assert_eq!(
        status["agent"]["start"],
        serde_json::json!({ "adopted": true, "map_writes": 0 }),
        "{status:#}"
    );
    let swapped = xdp_prog(&net.ns).expect("still attached");
    assert_ne!(
        swapped, attached,
        "the restarted agent should swap in its own program"
    );
    agent.kill9();

    // A third backend changes the table; established flows keep their backends.
    dirs.write_config(&config(&[(TX_V4, 1), (TX_V4_B, 1), (NO_NEIGH_V4, 1)], &[]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let before = lb.counters();
        for (p, backend) in &flows {
            let ack = p.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
            assert_eq!(
                send(&mut lb, &ack, net.lb0),
                *backend,
                "a flow changed backend across the restart"
            );
        }
        let after = lb.counters();
        assert_eq!(
            after[&Counter::FlowHits] - before[&Counter::FlowHits],
            100,
            "not all from the flow table"
        );
        let moved = (100..400).filter(|&i| {
            let p = syn(i);
            lb.run(&p.frame(), net.lb0).output[30..34]
                == NO_NEIGH_V4.parse::<std::net::Ipv4Addr>().unwrap().octets()
        });
        assert!(moved.count() > 50, "new flows do not reach the new backend");
    });
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_bad_config_changes_nothing_and_a_good_one_applies() {
    let net = FibNet::new("reload");
    let dirs = Dirs::new(Path::new(BIN), "reload");
    dirs.write_config(&config(&[(TX_V4, 2), (TX_V4_B, 1)], &[]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let before = dirs.json(&["backends"]);

    dirs.write_config(&config(&[(TX_V4, 70000), (TX_V4_B, 1)], &[]));
    let status = agent.wait_rejected(&net.ns, &dirs, 1, T);
    let why = &status["agent"]["last_reload"]["error"];
    assert!(
        why.as_str()
            .is_some_and(|e| e.contains("vips[0].backends[0].weight: must be 0..=65535")),
        "{status:#}"
    );
    agent.hup();
    agent.wait_rejected(&net.ns, &dirs, 2, T);
    dirs.write_config("node: [");
    agent.wait_rejected(&net.ns, &dirs, 3, T);
    assert_eq!(
        dirs.json(&["backends"]),
        before,
        "a rejected config changed the maps"
    );

    let dns = RawVip {
        name: None,
        ..vip("", "192.0.2.11", 53, "udp", &[backend("10.1.0.1")])
    };
    dirs.write_config(&config(&[(TX_V4, 1), (TX_V4_B, 1)], &[dns]));
    agent.wait_applied(&net.ns, &dirs, 1, T);
    let after = dirs.json(&["backends"]);
    assert_eq!(after.as_array().unwrap().len(), 2, "{after}");
    let s = slots(&dirs);
    assert!(
        (s[TX_V4] as i64 - 505).abs() <= 2,
        "new weights not applied: {s:?}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn pins_of_other_sizes_are_migrated_pins_of_a_pre_release_layout_refused_and_down_removes_everything()
 {
    let net = FibNet::new("down");
    let dirs = Dirs::new(Path::new(BIN), "down");
    dirs.write_config(&config(&[(TX_V4, 1)], &[]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    assert_eq!(agent.stop().code(), Some(0));
    assert!(
        dirs.pins.join("LB_RING").exists(),
        "SIGTERM must leave the pins"
    );

    // Another Maglev table size: the ring is made anew and written before the swap.
    let node = RawNode {
        table_size: Some(1013),
        ..lab_node(&["lb0"])
    };
    dirs.write_config(&config_with(node, &[(TX_V4, 1)], &[]));
    let mut migrated = Agent::start(&net.ns, &dirs);
    migrated.wait_serving(&net.ns, &dirs, T);
    let out = dirs.cli_in(&net.ns, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &status["agent"]["last_migration"];
    assert_eq!(m["trigger"], "start", "{status:#}");
    let ring = m["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["map"] == "LB_RING")
        .unwrap();
    assert_eq!(ring["action"], "resized", "{m:#}");
    assert_eq!(ring["to_entries"].as_u64(), Some(1013 * 8), "{m:#}");
    assert_eq!(migrated.stop().code(), Some(0));

    // Pins of a build before release 0.1.0 (layout version 6) are refused.
    {
        let map =
            lb_userspace::kernel::program::open_pinned(&dirs.pins, lb_common::maps::META).unwrap();
        let mut meta: aya::maps::Array<_, lb_common::LayoutMeta> =
            aya::maps::Array::try_from(map).unwrap();
        let mut m = meta.get(&0, 0).unwrap();
        m.version = 6;
        meta.set(0, m, 0).unwrap();
    }
    let mut refused = Agent::start(&net.ns, &dirs);
    let said = refused.refusal(T);
    assert!(
        said.contains("layout version 6") && said.contains("lb down"),
        "{said}"
    );

    // Back to the layout this release records (8: LB_VIPS is at schema 2, which 0.1.0 cannot
    // read), for the rollback commands below.
    {
        let map =
            lb_userspace::kernel::program::open_pinned(&dirs.pins, lb_common::maps::META).unwrap();
        let mut meta: aya::maps::Array<_, lb_common::LayoutMeta> =
            aya::maps::Array::try_from(map).unwrap();
        let mut m = meta.get(&0, 0).unwrap();
        m.version = 8;
        meta.set(0, m, 0).unwrap();
    }
    let out = dirs.cli(&["migrate", "--to-release", "0.1.0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("converted LB_VIPS v2 -> v1")
            && said.contains("LB_META records layout 7 (was 8)"),
        "{said}"
    );
    let out = dirs.cli(&["migrate", "--to-release", "0.1.0"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to convert"),
        "a second time: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = dirs.cli(&["migrate", "--to-release", "0.0.9"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("knows no release 0.0.9"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = dirs.cli(&["down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached from lb0"));
    assert!(!dirs.pins.exists(), "pins left behind");
    let shown = std::process::Command::new("ip")
        .args(["-n", &net.ns.name, "-d", "link", "show", "lb0"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&shown.stdout).contains("prog/xdp"),
        "still attached after lb down"
    );
}

/// A TCP listener or HTTP responder on a loopback address of the namespace, for health checks.
struct Server {
    stop: Arc<AtomicBool>,
    /// The connections accepted (probes) so far.
    accepted: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves on `addr:port`; with `status`, answers HTTP with its current value.
    fn start(ns: &NetNs, addr: &str, port: u16, status: Option<Arc<AtomicU16>>) -> Self {
        let l =
            ns.run(|| TcpListener::bind((addr.parse::<IpAddr>().unwrap(), port)).expect("bind"));
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), accepted.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        if let Some(st) = &status {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                            let mut buf = [0u8; 1024];
                            let _ = c.read(&mut buf);
                            let code = st.load(Ordering::Relaxed);
                            let _ = write!(
                                c,
                                "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                            );
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            accepted,
            handle: Some(handle),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn health_checks_take_failing_backends_out_and_put_them_back() {
    let net = FibNet::new("health");
    for a in ["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"] {
        net.ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    let dirs = Dirs::new(Path::new(BIN), "health");
    let check = |kind: &str, port: i64, path: Option<&str>| {
        Some(RawHealthCheck {
            kind: some(kind),
            port: Some(port),
            path: path.map(str::to_string),
            interval: some("200ms"),
            timeout: some("150ms"),
            healthy_threshold: Some(1),
            unhealthy_threshold: Some(2),
            ..RawHealthCheck::default()
        })
    };
    let checked = RawVip {
        health_check: check("tcp", 8080, None),
        ..web(&[("10.9.0.1", 1), ("10.9.0.2", 1)])
    };
    let api = RawVip {
        health_check: check("http", 8081, Some("/healthz")),
        ..vip(
            "api",
            "192.0.2.11",
            80,
            "tcp",
            &[backend("10.9.0.3"), backend("10.9.0.4")],
        )
    };
    dirs.write_config(&yaml(&RawConfig {
        node: lab_node(&["lb0"]),
        vips: vec![checked, api],
    }));
    let tcp1 = Server::start(&net.ns, "10.9.0.1", 8080, None);
    let tcp2 = Server::start(&net.ns, "10.9.0.2", 8080, None);
    let status3 = Arc::new(AtomicU16::new(200));
    let http3 = Server::start(&net.ns, "10.9.0.3", 8081, Some(status3.clone()));
    let http4 = Server::start(
        &net.ns,
        "10.9.0.4",
        8081,
        Some(Arc::new(AtomicU16::new(204))),
    );
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    // Three probes of each (one more than unhealthy_threshold), all answered: every backend
    // is healthy, and none was ever judged otherwise (a change would have left its reason).
    let start = std::time::Instant::now();
    for s in [&tcp1, &tcp2, &http3, &http4] {
        while s.accepted.load(Ordering::Relaxed) < 3 {
            assert!(
                start.elapsed() < T,
                "the servers are not probed three times"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = dirs.status_file();
    for vip in status["vips"].as_array().expect("the status file's VIPs") {
        for b in vip["backends"].as_array().unwrap() {
            assert_eq!(
                b["healthy"], true,
                "healthy servers reported unhealthy: {status:#}"
            );
            assert_eq!(b["health_reason"], serde_json::Value::Null, "{status:#}");
        }
    }

    let health = |vip: usize, addr: &str| -> (String, u64) {
        let v = dirs.json(&["backends"]);
        let b = v[vip]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backend"]["address"] == addr)
            .cloned()
            .unwrap_or_else(|| panic!("{addr} not listed: {v}"));
        (
            b["health"].as_str().unwrap().to_string(),
            b["slots"].as_u64().unwrap(),
        )
    };
    assert_eq!(health(0, "10.9.0.1").0, "healthy");
    // Poll the status file (health) and the maps (slots) until they say `want`, with a
    // deadline.
    let settled = |vip: usize, addr: &str, want: (&str, u64)| {
        let start = std::time::Instant::now();
        loop {
            let got = health(vip, addr);
            if (got.0.as_str(), got.1) == want {
                return got;
            }
            assert!(
                start.elapsed() < T,
                "{addr}: {got:?}, not {want:?} within {T:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // TCP: stop the server (connections refused).
    drop(tcp1);
    settled(0, "10.9.0.1", ("unhealthy", 0));
    assert_eq!(
        health(0, "10.9.0.2").1,
        1009,
        "the healthy backend should take every slot"
    );
    // A restarted agent remembers: the dead backend gets no slot while its checks warm up.
    agent.kill9();
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    assert_eq!(
        health(0, "10.9.0.1"),
        ("unhealthy".into(), 0),
        "health forgotten across a restart"
    );
    // HTTP: answer 500.
    status3.store(500, Ordering::Relaxed);
    settled(1, "10.9.0.3", ("unhealthy", 0));
    // Why, in the status file (written with the health `lb backends` read).
    let status = dirs.status_file();
    let row = status["vips"][1]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "10.9.0.3")
        .cloned()
        .unwrap_or_else(|| panic!("10.9.0.3 not in {status:#}"));
    assert!(
        row["health_reason"]
            .as_str()
            .is_some_and(|r| r.contains("status 500")),
        "{row}"
    );
    // Both recover.
    let _tcp1 = Server::start(&net.ns, "10.9.0.1", 8080, None);
    status3.store(200, Ordering::Relaxed);
    for (vip, addr) in [(0, "10.9.0.1"), (1, "10.9.0.3")] {
        let start = std::time::Instant::now();
        loop {
            let (h, s) = health(vip, addr);
            if h == "healthy" && s > 400 {
                break;
            }
            assert!(start.elapsed() < T, "{addr} is {h} with {s} slots");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(agent.stop().code(), Some(0));
}

/// [`config`] serving metrics at [`METRICS`], on `interfaces` (`lb0, lb1`) in `xdp_mode`.
fn config_on(
    interfaces: &str,
    xdp_mode: &str,
    backends: &[(&str, u32)],
    extra_vips: &[RawVip],
) -> String {
    let names: Vec<&str> = interfaces.split(", ").collect();
    let node = RawNode {
        xdp_mode: some(xdp_mode),
        metrics_listen: some(METRICS),
        ..lab_node(&names)
    };
    config_with(node, backends, extra_vips)
}

#[test]
fn a_bad_interface_list_changes_nothing_and_is_counted_as_rejected() {
    let net = FibNet::new("ifaces");
    let dirs = Dirs::new(Path::new(BIN), "ifaces");
    dirs.write_config(&config_on(
        "lb0, lb1",
        "native",
        &[(TX_V4, 2), (TX_V4_B, 1)],
        &[],
    ));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let maps = dirs.json(&["backends"]);
    let pins = dirs.pin_names();
    let attached = |ns: &NetNs| ["lb0", "lb1", "lb2"].map(|d| xdp_attachment(ns, d));
    let before = attached(&net.ns);
    assert!(
        before[0].is_some() && before[1].is_some() && before[2].is_none(),
        "{before:?}"
    );

    // lb1 dropped, lb2 added, a name that does not exist, and new weights.
    dirs.write_config(&config_on(
        "lb0, nope0, lb2",
        "native",
        &[(TX_V4, 1), (TX_V4_B, 1)],
        &[],
    ));
    agent.wait_metric(&net.ns, METRICS, "lb_config_reloads_rejected_total", 1, T);
    assert_eq!(metric(&net.ns, METRICS, "lb_config_reloads_total"), Some(0));
    assert_eq!(attached(&net.ns), before, "the attachments changed");
    assert_eq!(dirs.pin_names(), pins, "the pins changed");
    assert_eq!(
        dirs.json(&["backends"]),
        maps,
        "the maps or the config changed"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn an_xdp_mode_change_on_reload_attaches_again_in_the_new_mode() {
    let net = FibNet::new("mode");
    let dirs = Dirs::new(Path::new(BIN), "mode");
    dirs.write_config(&config_on(
        "lb0",
        "native",
        &[(TX_V4, 1), (TX_V4_B, 1)],
        &[],
    ));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let (mode, prog) = xdp_attachment(&net.ns, "lb0").expect("attached");
    assert_eq!(mode, XDP_ATTACHED_DRV);
    let maps = dirs.json(&["backends"]);

    dirs.write_config(&config_on(
        "lb0",
        "generic",
        &[(TX_V4, 1), (TX_V4_B, 1)],
        &[],
    ));
    agent.wait_metric(&net.ns, METRICS, "lb_config_reloads_total", 1, T);
    assert_eq!(
        xdp_attachment(&net.ns, "lb0"),
        Some((XDP_ATTACHED_SKB, prog)),
        "not attached in generic mode (with the agent's program)"
    );
    assert!(
        dirs.pins.join("link-lb0").exists(),
        "the new link is not pinned"
    );
    assert_eq!(
        dirs.json(&["backends"]),
        maps,
        "re-attaching changed the maps"
    );
    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(
        xdp_attachment(&net.ns, "lb0").map(|a| a.0),
        Some(XDP_ATTACHED_SKB),
        "the new link does not outlive the agent"
    );
}

#[test]
fn a_restart_with_another_xdp_mode_attaches_in_it() {
    let net = FibNet::new("remode");
    let dirs = Dirs::new(Path::new(BIN), "remode");
    dirs.write_config(&config_on("lb0", "generic", &[(TX_V4, 1)], &[]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    assert_eq!(
        xdp_attachment(&net.ns, "lb0").map(|a| a.0),
        Some(XDP_ATTACHED_SKB)
    );
    agent.kill9();

    dirs.write_config(&config_on("lb0", "native", &[(TX_V4, 1)], &[]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    assert_eq!(
        xdp_attachment(&net.ns, "lb0").map(|a| a.0),
        Some(XDP_ATTACHED_DRV),
        "the pinned generic link was kept"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn an_xdp_mode_one_interface_cannot_take_is_refused_and_changes_nothing() {
    let net = FibNet::new("nomode");
    net.ns.ip(&["link", "add", "br0", "type", "bridge"]);
    net.ns.ip(&["link", "set", "br0", "up"]);
    let dirs = Dirs::new(Path::new(BIN), "nomode");
    dirs.write_config(&config_on("lb0, br0", "generic", &[(TX_V4, 1)], &[]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let attached = |ns: &NetNs| ["lb0", "br0"].map(|d| xdp_attachment(ns, d).map(|a| a.0));
    assert_eq!(attached(&net.ns), [Some(XDP_ATTACHED_SKB); 2]);

    // A bridge has no native XDP: lb0 (listed first) takes it, br0 cannot.
    dirs.write_config(&config_on("lb0, br0", "native", &[(TX_V4, 1)], &[]));
    agent.wait_metric(&net.ns, METRICS, "lb_config_reloads_rejected_total", 1, T);
    assert_eq!(
        attached(&net.ns),
        [Some(XDP_ATTACHED_SKB); 2],
        "not put back as it was"
    );
    assert!(dirs.pins.join("link-lb0").exists() && dirs.pins.join("link-br0").exists());
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_restarted_agent_keeps_out_the_backends_passive_health_took_out() {
    let net = FibNet::new("passive");
    let dirs = Dirs::new(Path::new(BIN), "passive");
    // Nothing answers at the backends' addresses: the recheck probes time out.
    let nat = RawVip {
        mode: some("nat"),
        passive_health: Some(RawPassiveHealth {
            failures: Some(3),
            recheck_interval: some("1h"),
            timeout: some("200ms"),
        }),
        ..web(&[(TX_V4, 1), (TX_V4_B, 1)])
    };
    dirs.write_config(&yaml(&RawConfig {
        node: lab_node(&["lb0"]),
        vips: vec![nat],
    }));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    assert_eq!(agent.stop().code(), Some(0));

    // What the agent writes when passive health takes TX_V4 out.
    let path = dirs.state.join("status.json");
    let mut status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("the status file")).unwrap();
    let rows = status["vips"][0]["backends"].as_array_mut().unwrap();
    let row = rows.iter_mut().find(|b| b["address"] == TX_V4).unwrap();
    assert_eq!(row["passive_out"], false);
    row["passive_out"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&status).unwrap()).unwrap();

    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let v = dirs.json(&["backends"]);
    let row = |addr: &str| {
        v[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backend"]["address"] == addr)
            .cloned()
            .unwrap_or_else(|| panic!("{addr} not listed: {v}"))
    };
    assert_eq!(row(TX_V4)["health"], "out-passive", "{v}");
    assert_eq!(row(TX_V4)["slots"], 0, "{v}");
    assert_eq!(row(TX_V4_B)["slots"], 1009, "{v}");
    assert_eq!(agent.stop().code(), Some(0));
}

/// Starts an agent on `interfaces` over the maps and the link (lb0, in the same `xdp_mode`) a
/// first agent left, and checks that it refuses to start, naming `bad`, and leaves them as they
/// were.
fn refused_start_changes_nothing(tag: &str, interfaces: &str, xdp_mode: &str, bad: &str) {
    let net = FibNet::new(tag);
    net.ns.ip(&["link", "add", "br0", "type", "bridge"]);
    net.ns.ip(&["link", "set", "br0", "up"]);
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(&config_on(
        "lb0",
        xdp_mode,
        &[(TX_V4, 2), (TX_V4_B, 1)],
        &[],
    ));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    agent.kill9();
    let maps = dirs.json(&["backends"]);
    let pins = dirs.pin_names();
    let attached = |ns: &NetNs| ["lb0", "lb1", "br0"].map(|d| xdp_attachment(ns, d));
    let before = attached(&net.ns);

    // New weights, and what cannot start.
    dirs.write_config(&config_on(
        interfaces,
        xdp_mode,
        &[(TX_V4, 1), (TX_V4_B, 1)],
        &[],
    ));
    let mut refused = Agent::start(&net.ns, &dirs);
    let said = refused.refusal(T);
    assert!(said.contains(bad), "{said}");
    assert_eq!(
        dirs.json(&["backends"]),
        maps,
        "a failed start changed the maps"
    );
    assert_eq!(
        attached(&net.ns),
        before,
        "a failed start changed the attachments"
    );
    assert_eq!(dirs.pin_names(), pins, "a failed start changed the pins");
}

#[test]
fn a_start_with_a_missing_interface_fails_and_changes_nothing() {
    refused_start_changes_nothing("bad-if", "lb0, lb1, nope0", "generic", "nope0");
}

#[test]
fn a_start_that_cannot_attach_fails_and_changes_nothing() {
    // lb0 and lb1 take native XDP; a bridge cannot.
    refused_start_changes_nothing("no-attach", "lb0, lb1, br0", "native", "br0");
}
