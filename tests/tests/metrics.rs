//! `/metrics` of the real agent, scraped as Prometheus does: both formats served by `Accept`,
//! each checked by the tool of its format (`promtool check metrics` for text 0.0.4, the
//! OpenMetrics reference parser for OpenMetrics 1.0.0), and the values checked against the
//! frames the test ran through the program on the agent's maps.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_tests::{
    agent::{Agent, Dirs, xdp_attachment},
    config::{RawConfig, RawHealthCheck, RawNode, RawVip, backend, lab_node, some, vip, yaml},
    harness::{FibNet, Lb, XDP_TX, action_name, net::*},
    netns::NetNs,
    packet::Pkt,
    scrape::{samples, sum},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:19436";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// What Prometheus 2.x asks for when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Flows sent to each VIP.
const WEB_FLOWS: u32 = 120;
const STICKY_FLOWS: u32 = 30;
const V6_FLOWS: u32 = 40;

/// Three VIPs (IPv4, IPv4 with affinity, IPv6) of two backends each, and one VIP with a health
/// check that no traffic reaches (so that `lb_backend_healthy` has series).
fn config() -> String {
    let sticky = RawVip {
        affinity_timeout: some("1h"),
        ..vip(
            "sticky",
            "192.0.2.11",
            80,
            "tcp",
            &[backend(TX_V4), backend(TX_V4_B)],
        )
    };
    let checked = RawVip {
        health_check: Some(RawHealthCheck {
            kind: some("tcp"),
            ..RawHealthCheck::default()
        }),
        ..vip("checked", "192.0.2.12", 8080, "tcp", &[backend(TX_V4)])
    };
    yaml(&RawConfig {
        node: RawNode {
            metrics_listen: some(METRICS),
            ..lab_node(&["lb0"])
        },
        vips: vec![
            vip(
                "web",
                "192.0.2.10",
                80,
                "tcp",
                &[backend(TX_V4), backend(TX_V4_B)],
            ),
            sticky,
            vip(
                "six",
                "2001:db8::10",
                443,
                "tcp",
                &[backend(TX_V6), backend(TX_V6_B)],
            ),
            checked,
        ],
    })
}

/// Every (vip, backend) label pair the config gives, spelled as SHAPES.md says.
fn expected_pairs() -> Vec<(&'static str, &'static str)> {
    vec![
        ("192.0.2.10:80/tcp", "10.1.0.1:80"),
        ("192.0.2.10:80/tcp", "10.1.0.2:80"),
        ("192.0.2.11:80/tcp", "10.1.0.1:80"),
        ("192.0.2.11:80/tcp", "10.1.0.2:80"),
        ("[2001:db8::10]:443/tcp", "[fd01::1]:443"),
        ("[2001:db8::10]:443/tcp", "[fd01::2]:443"),
        ("192.0.2.12:8080/tcp", "10.1.0.1:8080"),
    ]
}

/// The namespace, with nothing but the test sending frames to lb0: its peer's IPv6 (router
/// solicitations, DAD) would otherwise reach the attached program and count.
fn quiet_net(tag: &str) -> FibNet {
    let net = FibNet::new(tag);
    net.ns.sysctl("net.ipv6.conf.up0.disable_ipv6", "1");
    net
}

/// An agent serving metrics in `net`, running.
fn agent(net: &FibNet, dirs: &Dirs) -> Agent {
    dirs.write_config(&config());
    let mut agent = Agent::start(&net.ns, dirs);
    agent.wait_running(&net.ns, dirs, T);
    agent
}

/// Runs `pkt` through the program on the agent's maps; returns the outer destination (the
/// backend the flow went to).
fn send(lb: &mut Lb, pkt: &Pkt, ingress: u32) -> IpAddr {
    let run = lb.run(&pkt.frame(), ingress);
    assert_eq!(action_name(run.action), action_name(XDP_TX), "{pkt:?}");
    let o = &run.output;
    match u16::from_be_bytes([o[12], o[13]]) {
        0x0800 => IpAddr::from(<[u8; 4]>::try_from(&o[30..34]).unwrap()),
        0x86dd => IpAddr::from(<[u8; 16]>::try_from(&o[38..54]).unwrap()),
        t => panic!("outer ethertype {t:#x}"),
    }
}

/// New flows per (vip label, backend label), as the test made them.
type Made = BTreeMap<(String, String), u64>;

/// Sends the flows of every VIP; returns the new flows per (vip, backend), and the frames sent.
fn traffic(net: &FibNet, dirs: &Dirs) -> (Made, u64) {
    net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        let mut made = Made::new();
        let mut frames = 0;
        let mut go = |pkt: Pkt, vip: &str, port: u16| {
            let b = send(&mut lb, &pkt, net.lb0);
            let backend = std::net::SocketAddr::new(b, port).to_string();
            *made.entry((vip.to_string(), backend)).or_default() += 1;
            frames += 1;
        };
        for i in 0..WEB_FLOWS {
            let src = format!("198.51.100.{}", 1 + i % 200);
            go(
                Pkt::tcp(&src, 20000 + i as u16, "192.0.2.10", 80, LB0_MAC),
                "192.0.2.10:80/tcp",
                80,
            );
        }
        // One flow per client: the affinity table gets one entry each.
        for i in 0..STICKY_FLOWS {
            let src = format!("198.51.101.{}", 1 + i);
            go(
                Pkt::tcp(&src, 30000, "192.0.2.11", 80, LB0_MAC),
                "192.0.2.11:80/tcp",
                80,
            );
        }
        for i in 0..V6_FLOWS {
            let src = format!("2001:db8:c::{:x}", 1 + i);
            go(
                Pkt::tcp(&src, 40000, "2001:db8::10", 443, LB0_MAC),
                "[2001:db8::10]:443/tcp",
                443,
            );
        }
        (made, frames)
    })
}

/// GET /metrics at [`METRICS`] in `ns` with `accept` (none: no header); (Content-Type, body).
fn scrape(ns: &NetNs, accept: Option<&str>) -> (String, String) {
    let response = ns.run(|| {
        let mut s = std::net::TcpStream::connect(METRICS).expect("connecting to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: lb\r\n{accept}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("reading /metrics");
        out
    });
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n\n{body}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Content-Type: {head}"));
    (content_type, body.to_string())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd` with `input` on stdin; (success, stdout and stderr).
fn pipe(cmd: &mut Command, input: &str) -> (bool, String) {
    let p = lb_tests::pipe(cmd, input);
    (p.ok, p.stdout + &p.stderr)
}

/// `promtool check metrics` on a text 0.0.4 body: a clean lint prints nothing and exits 0.
fn promtool_check(body: &str) {
    let (ok, said) = pipe(Command::new("promtool").args(["check", "metrics"]), body);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}\n\n{body}"
    );
}

/// The OpenMetrics reference parser (Python's prometheus_client, in the venv `cargo xtask
/// setup` makes) on an OpenMetrics body: strict about `# EOF`, suffixes, types and escaping.
fn openmetrics_check(body: &str) {
    let python = workspace_root().join("target/tools/venv/bin/python");
    let script = "import sys\n\
                  from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
                  for f in text_string_to_metric_families(sys.stdin.read()):\n    pass\n";
    let (ok, said) = pipe(Command::new(python).args(["-c", script]), body);
    assert!(
        ok,
        "the OpenMetrics parser refused the body: {said}\n\n{body}"
    );
}

#[test]
fn each_accept_header_gets_its_format_and_both_pass_their_checkers() {
    let net = quiet_net("met-fmt");
    let dirs = Dirs::new(Path::new(BIN), "met-fmt");
    let _agent = agent(&net, &dirs);
    traffic(&net, &dirs);
    for (accept, want) in [
        (None, TEXT),
        (Some("text/plain"), TEXT),
        (Some("*/*"), TEXT),
        (Some(PROMETHEUS_ACCEPT), OPENMETRICS),
        (Some("application/openmetrics-text"), OPENMETRICS),
        (
            Some("application/openmetrics-text;q=0.3, text/plain;q=0.7"),
            TEXT,
        ),
    ] {
        let (content_type, body) = scrape(&net.ns, accept);
        assert_eq!(content_type, want, "Accept: {accept:?}");
        match want {
            TEXT => promtool_check(&body),
            _ => openmetrics_check(&body),
        }
    }
}

#[test]
fn scraped_values_match_the_frames_sent_in_both_formats() {
    let net = quiet_net("met-val");
    let dirs = Dirs::new(Path::new(BIN), "met-val");
    let _agent = agent(&net, &dirs);
    let (made, frames) = traffic(&net, &dirs);
    for accept in [None, Some(PROMETHEUS_ACCEPT)] {
        let (_, body) = scrape(&net.ns, accept);
        let s = samples(&body);
        let ctx = format!("Accept: {accept:?}\n{body}");
        // Every packet ends in one verdict: the family adds up to the frames sent, all sent on.
        assert_eq!(sum(&s, "lb_packets_total", &[]), frames as f64, "{ctx}");
        assert_eq!(
            sum(&s, "lb_packets_total", &[("verdict", "tx")]),
            frames as f64,
            "{ctx}"
        );
        assert!(
            s.iter()
                .filter(|x| x.name == "lb_packets_total")
                .all(|x| x.labels.keys().eq(["verdict"])),
            "lb_packets_total has labels other than verdict: {ctx}"
        );
        assert_eq!(
            sum(&s, "lb_events_total", &[("event", "new_flows")]),
            frames as f64,
            "{ctx}"
        );
        for ((vip, backend), n) in &made {
            let at = [("vip", vip.as_str()), ("backend", backend.as_str())];
            assert_eq!(
                sum(&s, "lb_backend_new_flows_total", &at),
                *n as f64,
                "{vip} {backend}: {ctx}"
            );
            // Its gateway's neighbour entry is known (see FibNet): the agent resolved it.
            let forward = [at[0], at[1], ("action", "forward")];
            assert_eq!(
                sum(&s, "lb_backend_nexthop", &forward),
                1.0,
                "{vip} {backend}: {ctx}"
            );
        }
        let table = |name: &str, t: &str| sum(&s, name, &[("table", t)]);
        let v4 = (WEB_FLOWS + STICKY_FLOWS) as f64;
        assert_eq!(table("lb_table_entries", "flows_ipv4"), v4, "{ctx}");
        assert_eq!(
            table("lb_table_entries", "flows_ipv6"),
            V6_FLOWS as f64,
            "{ctx}"
        );
        assert_eq!(
            table("lb_table_entries", "affinity"),
            STICKY_FLOWS as f64,
            "{ctx}"
        );
        assert_eq!(table("lb_table_entries", "nat"), 0.0, "{ctx}");
        // 65536 flows: a quarter (at least 1024) for IPv6; IPv4 buckets of 3 ways.
        assert_eq!(table("lb_table_capacity", "flows_ipv6"), 16384.0, "{ctx}");
        assert_eq!(
            table("lb_table_capacity", "flows_ipv4"),
            (65536f64 / 3.0).ceil() * 3.0,
            "{ctx}"
        );
        assert_eq!(
            sum(
                &s,
                "lb_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0,
            "{ctx}"
        );
    }
}

#[test]
fn every_per_backend_family_labels_the_vip_and_the_backend_as_address_and_port() {
    let net = quiet_net("met-lbl");
    let dirs = Dirs::new(Path::new(BIN), "met-lbl");
    let _agent = agent(&net, &dirs);
    let (_, body) = scrape(&net.ns, None);
    let s = samples(&body);
    let want = expected_pairs();
    for family in [
        "lb_backend_packets_total",
        "lb_backend_bytes_total",
        "lb_backend_new_flows_total",
        "lb_backend_connection_attempts_total",
        "lb_backend_consecutive_failures",
        "lb_backend_healthy",
        "lb_backend_nexthop",
    ] {
        let mut pairs: Vec<(&str, &str)> = s
            .iter()
            .filter(|x| x.name == family)
            .map(|x| {
                let get = |k: &str| {
                    x.labels
                        .get(k)
                        .unwrap_or_else(|| panic!("{family} without {k}: {x:?}"))
                        .as_str()
                };
                (get("vip"), get("backend"))
            })
            .collect();
        pairs.sort();
        pairs.dedup();
        let expected: Vec<_> = match family {
            // Only backends with a health check have a health.
            "lb_backend_healthy" => want
                .iter()
                .filter(|p| p.0 == "192.0.2.12:8080/tcp")
                .copied()
                .collect(),
            _ => {
                let mut w = want.clone();
                w.sort();
                w
            }
        };
        assert_eq!(pairs, expected, "{family}:\n{body}");
    }
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `lb_config_last_reload_success_timestamp_seconds` now.
fn last_reload(ns: &NetNs) -> f64 {
    let (_, body) = scrape(ns, None);
    sum(
        &samples(&body),
        "lb_config_last_reload_success_timestamp_seconds",
        &[],
    )
}

#[test]
fn the_last_reload_timestamp_is_the_start_then_moves_on_a_sighup_reload() {
    let net = quiet_net("met-reload");
    let dirs = Dirs::new(Path::new(BIN), "met-reload");
    // Milliseconds in the gauge, and the clock read here a little before and after.
    let before_start = now_seconds() - 0.001;
    let mut agent = agent(&net, &dirs);
    let started = last_reload(&net.ns);
    assert!(
        started >= before_start && started <= now_seconds(),
        "set at start: {started}, the agent started after {before_start}"
    );
    let before_hup = now_seconds() - 0.001;
    agent.hup();
    agent.wait_metric(&net.ns, METRICS, "lb_config_reloads_total", 1, T);
    let reloaded = last_reload(&net.ns);
    assert!(
        reloaded >= before_hup && reloaded > started && reloaded <= now_seconds(),
        "after the reload: {reloaded}, sent SIGHUP after {before_hup}, started at {started}"
    );
}

#[test]
fn the_interface_attached_gauge_is_1_then_0_once_the_link_is_removed_behind_the_agents_back() {
    let net = quiet_net("met-att");
    let dirs = Dirs::new(Path::new(BIN), "met-att");
    let _agent = agent(&net, &dirs);
    let attached = || {
        let (_, body) = scrape(&net.ns, None);
        let s = samples(&body);
        let series: Vec<_> = s
            .iter()
            .filter(|x| x.name == "lb_interface_attached")
            .map(|x| (x.labels.clone(), x.value))
            .collect();
        assert_eq!(series.len(), 1, "one series, lb0's:\n{body}");
        assert_eq!(
            series[0].0.get("interface").map(String::as_str),
            Some("lb0"),
            "{body}"
        );
        series[0].1
    };
    assert_eq!(attached(), 1.0, "lb0 holds lb's program");
    // What `lb down --force` does under a running agent: the link's pin goes, and with it the
    // last reference to the link.
    std::fs::remove_file(dirs.pins.join("link-lb0")).expect("removing lb0's link pin");
    let start = std::time::Instant::now();
    while xdp_attachment(&net.ns, "lb0").is_some() {
        assert!(start.elapsed() < T, "lb0 still attached after {T:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(attached(), 0.0, "lb0 no longer holds lb's program");
}
