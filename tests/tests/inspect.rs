//! The inspecting commands of the real `lb` binary against a real agent (`lb run` in a
//! namespace): `lb status`, `/readyz`, and the `-o json` of `lb stats`, `lb backends`,
//! `lb explain`, `lb flows` and `lb stats --watch`, checked against frames the test ran through
//! the program on the agent's maps ([`Lb::adopt`]) and what it read off their outer headers.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::BufRead as _,
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs, http_status, xdp_attachment},
    config::{RawBackend, RawConfig, RawNode, RawVip, backend, lab_node, some, vip, yaml},
    harness::{FibNet, Lb, XDP_TX, action_name, net::*},
    packet::{L4, Pkt, TCP_ACK, TCP_SYN},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:19436";
const WEB: &str = "192.0.2.10";
const API: &str = "192.0.2.11";

/// Two DSR VIPs on port 80: `web` on two backends, `api` on one.
fn vips() -> Vec<RawVip> {
    vec![
        vip("web", WEB, 80, "tcp", &[backend(TX_V4), backend(TX_V4_B)]),
        vip("api", API, 80, "tcp", &[backend(TX_V4)]),
    ]
}

/// `vips` on lb0, metrics served.
fn config_of(vips: Vec<RawVip>) -> String {
    yaml(&RawConfig {
        node: RawNode {
            source_v4: some(NODE_V4),
            source_v6: some(NODE_V6),
            metrics_listen: some(METRICS),
            ..lab_node(&["lb0"])
        },
        vips,
    })
}

/// [`vips`] and `extra`, metrics served.
fn config(extra: &[RawVip]) -> String {
    config_of([vips(), extra.to_vec()].concat())
}

/// An agent running `config` in a fresh namespace.
struct Setup {
    // Dropped in this order: the agent stops before its dirs are removed (else it writes its
    // status file into a state dir made anew), then the network goes.
    agent: Agent,
    dirs: Dirs,
    net: FibNet,
}

fn start(tag: &str, cfg: &str) -> Setup {
    let net = FibNet::new(tag);
    let dirs = Dirs::new(Path::new(BIN), tag);
    dirs.write_config(cfg);
    let mut agent = Agent::start(&net.ns, &dirs);
    // Its status file says it serves (a state, not a log line).
    agent.wait_serving(&net.ns, &dirs, T);
    Setup { net, dirs, agent }
}

fn client(i: u32) -> String {
    format!("198.51.{}.{}", 100 + i / 200, 1 + i % 200)
}

fn syn(i: u32, vip: &str) -> Pkt {
    Pkt::tcp(&client(i), 20000 + (i % 1000) as u16, vip, 80, LB0_MAC)
}

/// Runs `pkt` through the program on the agent's maps; returns the output frame.
fn run(lb: &mut Lb, net: &FibNet, pkt: &Pkt) -> Vec<u8> {
    let r = lb.run(&pkt.frame(), net.lb0);
    assert_eq!(action_name(r.action), action_name(XDP_TX));
    r.output
}

/// The IPv4 destination of an encapsulated (DSR) output frame: the backend.
fn outer_dst(frame: &[u8]) -> String {
    IpAddr::from(<[u8; 4]>::try_from(&frame[30..34]).unwrap()).to_string()
}

/// `lb status -o json` run in the agent's namespace, and whether it exited 0.
fn status(s: &Setup) -> (Value, bool) {
    let out = s.dirs.cli_in(&s.net.ns, &["status", "-o", "json"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lb status: not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

fn lb0(status: &Value) -> &Value {
    status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "lb0")
        .unwrap_or_else(|| panic!("lb0 not listed: {status}"))
}

/// Polls `f` until it gives Some, or panics with `what` after [`T`].
fn poll<R>(what: &str, mut f: impl FnMut() -> Option<R>) -> R {
    let deadline = Instant::now() + T;
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(Instant::now() < deadline, "{what}: not within {T:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_shows_the_running_agent_attached_its_sizes_and_the_flows_it_holds() {
    let s = start("st-run", &config(&[]));
    let flows = 120;
    s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        for i in 0..flows {
            run(&mut lb, &s.net, &syn(i, WEB));
        }
    });
    let (v, ok) = status(&s);
    assert!(ok, "lb status failed for a healthy agent: {v}");
    assert_eq!(v["agent"]["running"], true, "{v}");
    assert_eq!(v["agent"]["pid"], s.agent.pid(), "{v}");
    assert!(v["agent"]["uptime_s"].as_u64().is_some(), "{v}");
    let config = s.dirs.config_path().display().to_string();
    assert_eq!(v["agent"]["config"], config.as_str(), "{v}");
    let i = lb0(&v);
    let (_, prog) = xdp_attachment(&s.net.ns, "lb0").expect("lb0 holds a program");
    assert_eq!(i["attached"], true, "{v}");
    assert_eq!(i["lb_program_id"], prog, "the program iproute2 sees on lb0");
    assert_eq!(i["attached_mode"], "native", "{v}");
    let m = &v["maps"];
    assert_eq!(m["sizes"]["table_size"], 1009, "{v}");
    assert_eq!(m["sizes"]["max_vips"], 8, "{v}");
    assert_eq!(m["vips"], 2, "{v}");
    assert_eq!(m["backends"], 3, "members: web's two, api's one: {v}");
    assert_eq!(m["tables"]["flows_ipv4"]["entries"], flows, "{v}");
    assert_eq!(m["tables"]["flows_ipv6"]["entries"], 0, "{v}");
    let cap = m["tables"]["flows_ipv4"]["capacity"].as_u64().unwrap();
    assert!(cap >= 65536, "{v}");
    let fill = m["tables"]["flows_ipv4"]["fill"].as_f64().unwrap();
    assert!((fill - flows as f64 / cap as f64).abs() < 1e-9, "{v}");
}

#[test]
fn a_reload_rejected_and_one_applied_show_in_status() {
    let s = start("st-reload", &config(&[]));
    let mut heavy = vips();
    heavy[0].backends[0].weight = Some(70000);
    s.dirs.write_config(&config_of(heavy));
    let v = poll("the rejected reload in the status file", || {
        let (v, _) = status(&s);
        (v["agent"]["reloads_rejected"].as_u64() >= Some(1)).then_some(v)
    });
    let r = &v["agent"]["last_reload"];
    assert_eq!(r["ok"], false, "{v}");
    assert_eq!(r["source"], "config", "{v}");
    let why = r["error"].as_str().unwrap();
    assert!(why.contains("vips[0].backends[0].weight"), "{why}");
    assert_eq!(v["agent"]["reloads_applied"], 0, "{v}");

    let mut renamed = vips();
    renamed[1].name = some("api2");
    s.dirs.write_config(&config_of(renamed));
    let v = poll("the applied reload in the status file", || {
        let (v, _) = status(&s);
        (v["agent"]["reloads_applied"].as_u64() >= Some(1)).then_some(v)
    });
    assert_eq!(v["agent"]["last_reload"]["ok"], true, "{v}");
    assert_eq!(v["agent"]["last_reload"]["error"], Value::Null, "{v}");
}

#[test]
fn a_program_detached_behind_the_agents_back_shows_in_status_and_readyz() {
    let s = start("st-detach", &config(&[]));
    poll("/readyz 200", || {
        (http_status(&s.net.ns, METRICS, "/readyz") == Some(200)).then_some(())
    });
    // What `lb down --force` does under a running agent: the link's pin goes, and with it the
    // last reference to the link.
    std::fs::remove_file(s.dirs.pins.join("link-lb0")).expect("removing lb0's link pin");
    poll("lb0 detached", || {
        xdp_attachment(&s.net.ns, "lb0").is_none().then_some(())
    });
    poll("/readyz 503", || {
        (http_status(&s.net.ns, METRICS, "/readyz") == Some(503)).then_some(())
    });
    let (v, ok) = status(&s);
    assert!(!ok, "lb status must fail while lb0 is not attached: {v}");
    assert_eq!(v["agent"]["running"], true, "{v}");
    assert_eq!(lb0(&v)["attached"], false, "{v}");
    assert_eq!(lb0(&v)["attached_mode"], Value::Null, "{v}");
}

#[test]
fn readyz_turns_503_after_lb_down_force_under_the_running_agent() {
    let s = start("st-force", &config(&[]));
    poll("/readyz 200", || {
        (http_status(&s.net.ns, METRICS, "/readyz") == Some(200)).then_some(())
    });
    let out = s.dirs.cli(&["down", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        xdp_attachment(&s.net.ns, "lb0"),
        None,
        "lb down --force detaches"
    );
    assert_eq!(http_status(&s.net.ns, METRICS, "/readyz"), Some(503));
    // `lb down` removed the status file too: the agent writes it again.
    let (v, ok) = poll("the running agent's status file again", || {
        let (v, ok) = status(&s);
        (v["agent"]["running"] == true).then_some((v, ok))
    });
    assert!(!ok, "{v}");
    assert_eq!(lb0(&v)["attached"], false, "{v}");
    assert_eq!(v["maps"], Value::Null, "nothing is pinned any more: {v}");
}

#[test]
fn another_program_on_the_interface_is_not_taken_for_lbs() {
    let s = start("st-other", &config(&[]));
    let (_, ours) = xdp_attachment(&s.net.ns, "lb0").expect("attached");
    std::fs::remove_file(s.dirs.pins.join("link-lb0")).expect("removing lb0's link pin");
    poll("lb0 detached", || {
        xdp_attachment(&s.net.ns, "lb0").is_none().then_some(())
    });
    // Another XDP program (the kernel's tiny "xdp_dummy" is not at hand: a second copy of lb's
    // own program, which has another id) attached in generic mode.
    let mut other = Lb::load(lb_userspace::kernel::program::Sizes {
        table_size: 1009,
        max_vips: 8,
        max_backends: 32,
        flow_table_size: 1024,
        affinity_table_size: 1024,
        nat_table_size: 1024,
    });
    s.net.ns.run(|| {
        other
            .xdp("lb")
            .attach("lb0", aya::programs::XdpMode::Skb)
            .expect("attaching another program to lb0")
    });
    let (_, theirs) = xdp_attachment(&s.net.ns, "lb0").expect("the other program");
    assert_ne!(theirs, ours);
    let (v, ok) = status(&s);
    assert!(!ok, "{v}");
    let i = lb0(&v);
    assert_eq!(i["attached"], false, "{v}");
    assert_eq!(i["program_ids"], serde_json::json!([theirs]), "{v}");
    assert_eq!(i["attached_mode"], "generic", "{v}");
    assert_eq!(
        http_status(&s.net.ns, METRICS, "/readyz"),
        Some(503),
        "another program on lb0 is not lb attached"
    );
}

#[test]
fn a_dead_agents_status_is_shown_as_not_running() {
    let mut s = start("st-dead", &config(&[]));
    let pid = s.agent.pid();
    s.agent.kill9();
    let (v, ok) = status(&s);
    assert!(!ok, "lb status must fail when the agent is dead: {v}");
    assert_eq!(v["agent"]["running"], false, "{v}");
    assert_eq!(v["agent"]["pid"], pid, "the dead agent's pid: {v}");
    assert_eq!(v["agent"]["uptime_s"], Value::Null, "{v}");
    // kill -9 leaves the program attached: traffic keeps flowing without an agent.
    assert_eq!(lb0(&v)["attached"], true, "{v}");
    let out = s.dirs.cli_in(&s.net.ns, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT RUNNING"), "{text}");
}

#[test]
fn stats_backends_and_explain_json_count_the_frames_sent_per_vip_and_backend() {
    let s = start("st-stats", &config(&[]));
    // What the test saw: frames per (VIP label, backend address:port).
    let mut seen: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut last = None;
    s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        for (vip, n) in [(WEB, 40), (API, 15)] {
            for i in 0..n {
                let b = outer_dst(&run(&mut lb, &s.net, &syn(i, vip)));
                *seen
                    .entry((format!("{vip}:80/tcp"), format!("{b}:80")))
                    .or_default() += 1;
                last = Some((syn(i, vip), b));
            }
        }
    });
    let st = s.dirs.json(&["stats"]);
    for (label, n) in [("192.0.2.10:80/tcp", 40), ("192.0.2.11:80/tcp", 15)] {
        let row = st["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["vip"]["label"] == label)
            .unwrap_or_else(|| panic!("{label} not in {st}"));
        assert_eq!(row["packets"], n, "{row}");
        assert_eq!(row["new_flows"], n, "{row}");
    }
    let web = st["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vip"]["address"] == WEB);
    assert_eq!(
        web.unwrap()["vip"]["name"],
        "web",
        "the name from the status file"
    );
    let members: BTreeMap<(String, String), u64> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["packets"].as_u64() > Some(0))
        .map(|r| {
            let key = (
                r["vip"]["label"].as_str().unwrap().to_string(),
                r["backend"]["label"].as_str().unwrap().to_string(),
            );
            (key, r["packets"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(members, seen, "lb stats per backend of each VIP");
    assert!(st["global"]["packets"].as_u64() >= Some(55), "{st}");

    let backends = s.dirs.json(&["backends"]);
    for v in backends.as_array().unwrap() {
        for b in v["backends"].as_array().unwrap() {
            let key = (
                v["vip"]["label"].as_str().unwrap().to_string(),
                b["backend"]["label"].as_str().unwrap().to_string(),
            );
            assert_eq!(
                b["packets"].as_u64(),
                Some(seen.get(&key).copied().unwrap_or(0)),
                "lb backends {key:?}"
            );
        }
    }
    let alias = s.dirs.cli(&["backends", "--json"]);
    assert!(alias.status.success());
    let alias: Value = serde_json::from_slice(&alias.stdout).expect("--json prints JSON");
    assert_eq!(alias, backends, "--json is -o json");

    let (p, b) = last.unwrap();
    let e = s.dirs.json(&[
        "explain",
        &format!("{}:{}", p.src, p.sport),
        &format!("{API}:80"),
        "tcp",
    ]);
    assert_eq!(e["by"], "flow", "{e}");
    assert_eq!(e["backend"]["label"], format!("{b}:80"), "{e}");
    assert_eq!(e["vip"]["label"], "192.0.2.11:80/tcp", "{e}");
}

#[test]
fn flows_json_lists_every_flow_made_with_its_backend_and_counts_beyond_the_limit() {
    let s = start("st-flows", &config(&[]));
    let n = 70;
    let made: BTreeSet<(String, String)> = s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        (0..n)
            .map(|i| {
                let p = syn(i, WEB);
                let b = outer_dst(&run(&mut lb, &s.net, &p));
                (format!("{}:{}", p.src, p.sport), format!("{b}:80"))
            })
            .collect()
    });
    let some = s.dirs.json(&["flows", "--limit", "10"]);
    assert_eq!(some["total"], n, "{some}");
    assert_eq!(some["shown"], 10, "{some}");
    assert_eq!(some["flows"].as_array().unwrap().len(), 10);

    // `--limit 0`: all of them; `--vip` takes the VIP's label as lb prints it.
    let all = s
        .dirs
        .json(&["flows", "--limit", "0", "--vip", "192.0.2.10:80/tcp"]);
    assert_eq!(all["total"], n, "{all}");
    assert_eq!(all["shown"], n, "{all}");
    let listed: BTreeSet<(String, String)> = all["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["state"], "active", "{f}");
            assert_eq!(f["protocol"], "tcp", "{f}");
            assert_eq!(f["vip"]["label"], "192.0.2.10:80/tcp", "{f}");
            assert_eq!(f["nat"], Value::Null, "a DSR flow has no translation: {f}");
            (
                f["client"].as_str().unwrap().to_string(),
                f["backend"]["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed, made);
    let none = s.dirs.json(&["flows", "--vip", "192.0.2.11:80"]);
    assert_eq!(none["total"], 0, "{none}");
}

#[test]
fn flows_filter_by_backend_client_and_state_and_count_each_state() {
    let s = start("st-flowsf", &config(&[]));
    let n = 60;
    // Client (address:port) -> backend, from the frames' outer headers.
    let made: BTreeMap<String, String> = s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        (0..n)
            .map(|i| {
                let p = syn(i, WEB);
                let b = outer_dst(&run(&mut lb, &s.net, &p));
                (format!("{}:{}", p.src, p.sport), b)
            })
            .collect()
    });
    let all = s.dirs.json(&["flows", "--limit", "0"]);
    assert_eq!(all["states"]["active"], n, "{all}");
    assert_eq!(all["states"]["draining"], 0, "{all}");
    // By backend: exactly the flows the frames sent there.
    let b = made.values().next().unwrap().clone();
    let to_b = s.dirs.json(&["flows", "--limit", "0", "--backend", &b]);
    let want = made.values().filter(|v| **v == b).count();
    assert_eq!(to_b["total"], want, "{to_b}");
    for f in to_b["flows"].as_array().unwrap() {
        assert_eq!(f["backend"]["label"], format!("{b}:80"), "{f}");
    }
    // By client (address and port): the one flow.
    let (c, cb) = made.iter().next().unwrap();
    let one = s.dirs.json(&["flows", "--client", c]);
    assert_eq!(one["total"], 1, "{one}");
    assert_eq!(
        one["flows"][0]["backend"]["label"],
        format!("{cb}:80"),
        "{one}"
    );
    // By state: none drains.
    let draining = s.dirs.json(&["flows", "--state", "draining"]);
    assert_eq!(draining["total"], 0, "{draining}");
}

#[test]
fn ipv6_flows_are_listed_and_counted_with_the_ipv4_ones() {
    let v6 = vip("web6", "2001:db8::10", 80, "tcp", &[backend(TX_V6)]);
    let s = start("st-flows6", &config(&[v6]));
    let (n4, n6) = (12, 9);
    let made6: BTreeSet<String> = s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        for i in 0..n4 {
            run(&mut lb, &s.net, &syn(i, WEB));
        }
        (0..n6)
            .map(|i| {
                let p = Pkt::tcp(
                    &format!("2001:db8:c::{}", i + 1),
                    30000,
                    "2001:db8::10",
                    80,
                    LB0_MAC,
                );
                let out = run(&mut lb, &s.net, &p);
                // Ethernet, then the outer IPv6 header: its destination is the backend.
                let dst = IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap());
                assert_eq!(dst.to_string(), TX_V6);
                format!("[{}]:{}", p.src, p.sport)
            })
            .collect()
    });
    let all = s.dirs.json(&["flows", "--limit", "1000"]);
    assert_eq!(all["total"], n4 + n6, "{all}");
    let v6: BTreeSet<String> = all["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["vip"]["label"] == "[2001:db8::10]:80/tcp")
        .map(|f| {
            assert_eq!(f["backend"]["label"], format!("[{TX_V6}]:80"), "{f}");
            f["client"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(v6, made6);
    let only6 = s.dirs.json(&["flows", "--vip", "[2001:db8::10]:80"]);
    assert_eq!(only6["total"], n6, "{only6}");
    let (st, _) = status(&s);
    assert_eq!(st["maps"]["tables"]["flows_ipv4"]["entries"], n4, "{st}");
    assert_eq!(st["maps"]["tables"]["flows_ipv6"]["entries"], n6, "{st}");
}

#[test]
fn a_flow_to_a_backend_of_weight_0_is_listed_as_draining() {
    let mut s = start("st-drain", &config(&[]));
    let flows: Vec<(String, String)> = s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        (0..40)
            .map(|i| {
                let p = syn(i, WEB);
                (
                    format!("{}:{}", p.src, p.sport),
                    outer_dst(&run(&mut lb, &s.net, &p)),
                )
            })
            .collect()
    });
    assert!(
        flows.iter().any(|(_, b)| b == TX_V4_B),
        "no flow on {TX_V4_B}: {flows:?}"
    );
    let mut drained = vips();
    drained[0].backends[1].weight = Some(0);
    s.dirs.write_config(&config_of(drained));
    s.agent.wait_applied(&s.net.ns, &s.dirs, 1, T);
    let v = s.dirs.json(&["flows", "--vip", "192.0.2.10:80"]);
    let states: BTreeMap<String, String> = v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["client"].as_str().unwrap().to_string(),
                f["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (c, b) in &flows {
        let want = if b == TX_V4_B { "draining" } else { "active" };
        assert_eq!(states[c], want, "flow of {c} on {b}");
    }
}

#[test]
fn a_nat_flow_shows_the_source_port_its_translated_frame_carried() {
    let to_9000 = RawBackend {
        port: Some(9000),
        ..backend(TX_V4)
    };
    let nat = RawVip {
        mode: some("nat"),
        ..vip("nat", "192.0.2.12", 80, "tcp", &[to_9000])
    };
    let s = start("st-nat", &config(&[nat]));
    let p = Pkt::tcp("198.51.100.9", 40001, "192.0.2.12", 80, LB0_MAC);
    let out = s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        run(&mut lb, &s.net, &p)
    });
    // Ethernet, a 20-byte IPv4 header, then TCP: source port, destination port.
    let (ip_src, ip_dst) = (&out[26..30], &out[30..34]);
    assert_eq!(
        IpAddr::from(<[u8; 4]>::try_from(ip_dst).unwrap()).to_string(),
        TX_V4
    );
    assert_eq!(
        IpAddr::from(<[u8; 4]>::try_from(ip_src).unwrap()).to_string(),
        NODE_V4
    );
    let nat_port = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), 9000);
    let v = s.dirs.json(&["flows", "--vip", "192.0.2.12:80"]);
    assert_eq!(v["total"], 1, "{v}");
    let f = &v["flows"][0];
    assert_eq!(f["client"], "198.51.100.9:40001", "{f}");
    assert_eq!(f["backend"]["label"], format!("{TX_V4}:9000"), "{f}");
    assert_eq!(f["nat"]["port"], nat_port, "{f}");
    assert_eq!(f["nat"]["state"], "waiting", "no answer yet: {f}");

    // The backend answers (to the node's address and the NAT port): half-open, until the
    // client's ACK.
    let reply = Pkt::tcp(TX_V4, 9000, NODE_V4, nat_port, LB0_MAC).with(|r| {
        r.l4 = L4::Tcp {
            flags: TCP_SYN | TCP_ACK,
        }
    });
    s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        run(&mut lb, &s.net, &reply)
    });
    let v = s.dirs.json(&["flows", "--vip", "192.0.2.12:80"]);
    assert_eq!(v["flows"][0]["nat"]["state"], "half-open", "{v}");
    assert_eq!(v["flows"][0]["nat"]["port"], nat_port, "{v}");

    // The client's ACK completes the handshake: established.
    let ack = p.clone().with(|p| p.l4 = L4::Tcp { flags: TCP_ACK });
    s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        run(&mut lb, &s.net, &ack)
    });
    let v = s.dirs.json(&["flows", "--vip", "192.0.2.12:80"]);
    assert_eq!(v["flows"][0]["nat"]["state"], "established", "{v}");
    assert_eq!(v["flows"][0]["nat"]["port"], nat_port, "{v}");
}

#[test]
fn watch_json_lines_carry_per_vip_and_backend_rates_of_the_frames_sent() {
    let s = start("st-watch", &config(&[]));
    let mut child = Command::new(BIN)
        .arg("--pin-dir")
        .arg(&s.dirs.pins)
        .arg("--state-dir")
        .arg(&s.dirs.state)
        .args(["stats", "--watch", "0.3", "-o", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("lb stats --watch");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let sent = 150u64;
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    s.net.ns.run(|| {
        let mut lb = Lb::adopt(&s.dirs.pins);
        for i in 0..sent as u32 {
            let b = outer_dst(&run(&mut lb, &s.net, &syn(i, WEB)));
            *per_backend.entry(format!("{b}:80")).or_default() += 1;
            // Spread the frames over several intervals.
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(400));
            }
        }
    });
    // Add up the intervals until they hold every frame.
    let (mut vip_total, mut backend_totals) = (0u64, BTreeMap::<String, u64>::new());
    let deadline = Instant::now() + T;
    while vip_total < sent {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a --watch line within the deadline");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let at = v["at"].as_str().unwrap();
        assert!(at.ends_with('Z') && at.contains('T'), "RFC 3339 UTC: {at}");
        let secs = v["interval_s"].as_f64().unwrap();
        let web = v["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["vip"]["label"] == "192.0.2.10:80/tcp")
            .unwrap_or_else(|| panic!("no web row: {v}"));
        let n = web["packets"].as_u64().unwrap();
        let rate = web["packets_per_s"].as_f64().unwrap();
        assert!(
            (rate - n as f64 / secs).abs() < 1e-6,
            "rate of {n} over {secs}s: {rate}"
        );
        let mut of_backends = 0;
        for b in v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["vip"]["label"] == "192.0.2.10:80/tcp")
        {
            let k = b["packets"].as_u64().unwrap();
            of_backends += k;
            *backend_totals
                .entry(b["backend"]["label"].as_str().unwrap().to_string())
                .or_default() += k;
        }
        assert_eq!(
            of_backends, n,
            "the backends' packets add up to the VIP's: {v}"
        );
        assert!(v["global"]["packets"].as_u64() >= Some(n), "{v}");
        vip_total += n;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(vip_total, sent, "frames counted over the intervals");
    backend_totals.retain(|_, n| *n > 0);
    assert_eq!(backend_totals, per_backend);
}
