//! A SYN flood in the lab of [`lb_tests::dc`]: spoofed SYNs at a NAT VIP and a DSR VIP, sent as
//! fast as one thread can into the load balancer's interface (sources from a /16 inside the lab
//! that no host holds: the router drops what is sent back to them), while a real client opens
//! connections to both VIPs and long-lived connections opened before the flood carry on.
//!
//! The NAT VIP's three backends have the default 31,744 ports each, which the flood (some 40,000
//! SYNs a second at the NAT VIP here) holds within about two seconds, as it did in the lab of
//! the issue. Their SYN-ACKs make the translations answered, never established: the oldest
//! half-open ones are taken over for new connections, and every one is over
//! `nat_half_open_timeout` after it was made.

use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{Lab, NatServers, lab_config, vip_yaml},
    packet::Pkt,
    raw::Raw,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(30);
const NAT_VIP: &str = "192.0.2.20";
const DSR_VIP: &str = "192.0.2.10";
/// The NAT VIP's backends listen here.
const NAT_PORT: u16 = 9000;
const FLOOD: Duration = Duration::from_secs(10);
const HALF_OPEN: Duration = Duration::from_secs(2);
/// Real connections go on this long after the flood.
const AFTER: Duration = Duration::from_secs(3);

/// The `i`th spoofed source, in 10.66.0.0/16.
fn spoofed(i: u32) -> String {
    format!("10.66.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// How long a real client gives a connection: three SYNs (sent at 0, 1 and 3 s) and their
/// answers, as a client with the kernel's defaults (which tries for two minutes) would.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a connection opened before the flood waits for an answer: a segment the flood's
/// drops in the veth rings keep losing is retransmitted after 0.2, 0.6, 1.4, 3, 6.2 and 12.6 s
/// (the kernel's backoff), so one sent as the 10 s flood starts may first get through 12.6 s
/// later. A connection broken for good still fails here.
const STREAM_PATIENCE: Duration = Duration::from_secs(20);

/// One real connection to `vip`, as an HTTP client makes one: connect, send a request line,
/// read the answer's first line (the lab's servers send the backend's name first). The request
/// matters under a flood: the backends answer SYNs with SYN cookies, and a client that sends
/// first resends its data, and so the handshake's last ACK, if the flood's drops take it.
/// Returns the backend's name and how long it took, or what went wrong.
fn connect(vip: SocketAddr) -> Result<(String, Duration), String> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&vip, PATIENCE).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET / HTTP/1.0\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    match line.trim() {
        "" => Err("closed before the backend's name".into()),
        name => Ok((name.to_string(), t.elapsed())),
    }
}

/// Packets `dev` in namespace `ns` could not hand on (a veth: its peer's receive ring was full).
fn tx_dropped(ns: &str, dev: &str) -> u64 {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["ip", "-j", "-s", "link", "show", dev])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .expect("tx dropped")
}

/// What the real client saw: (connections made, failures with when they happened).
type Tally = (Vec<Duration>, Vec<(Duration, SocketAddr, String)>);

#[test]
fn a_spoofed_syn_flood_fails_no_real_connection_and_leaves_no_half_open_nat_port_behind() {
    let lab = Lab::new();
    let _servers = NatServers::start(&lab, NAT_PORT);
    lab.router
        .ip(&["route", "add", "blackhole", "10.66.0.0/16"]);
    let dirs = Dirs::new(Path::new(BIN), "flood");
    let backends = [(0, 1), (1, 1), (2, 1)];
    let vips = [
        vip_yaml(NAT_VIP, 80, "tcp", "", &backends, false, Some(NAT_PORT)),
        vip_yaml(DSR_VIP, 80, "tcp", "", &backends, false, None),
    ]
    .concat();
    dirs.write_config(&lab_config("  nat_half_open_timeout: 2s\n", &vips));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);
    let (nat, dsr) = (sa(NAT_VIP, 80), sa(DSR_VIP, 80));
    for vip in [nat, dsr] {
        lab.client
            .run(|| connect(vip))
            .unwrap_or_else(|e| panic!("{vip} before the flood: {e}"));
    }
    // Broken: reset, or an echo that takes longer than a client's patience (the flood's
    // drops make TCP back off for seconds, and it recovers).
    let streams: Vec<_> = lab
        .patient_streams(nat, 10, STREAM_PATIENCE)
        .into_iter()
        .chain(lab.patient_streams(dsr, 10, STREAM_PATIENCE))
        .collect();
    let before = dirs.json(&["stats"])["global"].clone();

    let lb_mac = lab.lb.mac("eth0");
    let sent = AtomicU64::new(0);
    let flood_over = AtomicBool::new(false);
    let started = Instant::now();
    let (flood_end, (freed_at, ports), (mut made, failed)): (Instant, _, Tally) =
        std::thread::scope(|s| {
            let flooder = s.spawn(|| {
                lb_tests::netns::enter(&lab.router.name);
                let raw = Raw::new("p-lb");
                // Whatever happens here, the real client stops.
                struct Over<'a>(&'a AtomicBool);
                impl Drop for Over<'_> {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::Relaxed);
                    }
                }
                let _over = Over(&flood_over);
                let (mut i, mut n) = (0u32, 0u64);
                while started.elapsed() < FLOOD {
                    let vip = if i % 2 == 0 { NAT_VIP } else { DSR_VIP };
                    let syn =
                        Pkt::tcp(&spoofed(i / 2), 1024 + (i % 60_000) as u16, vip, 80, lb_mac);
                    // A full queue refuses some: those were not sent.
                    n += raw.try_send(&syn.frame()) as u64;
                    i = i.wrapping_add(1);
                }
                sent.store(n, Ordering::Relaxed);
                Instant::now()
            });
            let client = s.spawn(|| {
                lb_tests::netns::enter(&lab.client.name);
                let (mut made, mut failed) = (Vec::new(), Vec::new());
                let mut over_at = None;
                for k in 0usize.. {
                    if flood_over.load(Ordering::Relaxed) {
                        let at = *over_at.get_or_insert_with(Instant::now);
                        if at.elapsed() > AFTER {
                            break;
                        }
                    }
                    let vip = if k % 2 == 0 { nat } else { dsr };
                    match connect(vip) {
                        Ok((_, took)) => made.push(took),
                        Err(e) => failed.push((started.elapsed(), vip, e)),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (made, failed)
            });
            let end = flooder.join().expect("the flooder");
            // Within twice the half-open timeout of the flood's end, no port is held by a
            // translation whose handshake was not completed (the spoofed sources never complete
            // one; the real client's take a millisecond), while the real client goes on.
            let v = agent.wait_status(&lab.lb, &dirs, T, |v| {
                let p = &v["maps"]["nat_ports"];
                p["half_open"] == 0 && p["waiting"] == 0
            });
            let (at, ports) = (Instant::now(), v["maps"]["nat_ports"].clone());
            (end, (at, ports), client.join().expect("the real client"))
        });
    let sent = sent.load(Ordering::Relaxed);
    // The generator can outrun the load balancer's receive ring on a small machine: what the
    // ring dropped, real packets among them, never reached the program.
    let ring_drops = tx_dropped(&lab.router.name, "p-lb");
    eprintln!("the lb's receive ring dropped {ring_drops} frames of the flood's interface");
    let after = dirs.json(&["stats"])["global"].clone();
    let moved = |c: &str| after[c].as_u64().unwrap_or(0) - before[c].as_u64().unwrap_or(0);
    made.sort();
    let slow = made
        .iter()
        .filter(|t| **t > Duration::from_millis(900))
        .count();
    let worst = made.last().copied().unwrap_or_default();
    let made = made.len();
    eprintln!(
        "real connections: {made} made ({slow} took a retransmission, the slowest {worst:?})"
    );
    eprintln!(
        "flood: {sent} spoofed SYNs in {FLOOD:?} ({:.0}/s); real connections: {made} made, {} failed; \
         nat_new {}, nat_half_open_reclaimed {}, nat_half_open_expired {}, nat_established {}, \
         drop_nat_ports_exhausted {}, new_flows {}",
        sent as f64 / FLOOD.as_secs_f64(),
        failed.len(),
        moved("nat_new"),
        moved("nat_half_open_reclaimed"),
        moved("nat_half_open_expired"),
        moved("nat_established"),
        moved("drop_nat_ports_exhausted"),
        moved("new_flows"),
    );
    if !failed.is_empty() {
        for (ns, cmd) in [
            (&lab.lb.name, "ip -s link show eth0"),
            (&lab.router.name, "ip -s link show p-lb"),
            (
                &lab.backends[0].1.name,
                "nstat -az TcpExtSyncookiesSent TcpExtSyncookiesRecv TcpExtSyncookiesFailed TcpExtListenOverflows TcpExtListenDrops TcpExtTCPReqQFullDrop",
            ),
        ] {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{ns}"))
                .args(["sh", "-c", cmd])
                .output()
                .expect("nsenter");
            eprintln!("{ns}: {cmd}:\n{}", String::from_utf8_lossy(&out.stdout));
        }
    }
    assert!(
        failed.is_empty(),
        "real connections failed during or after the flood: {failed:?}"
    );
    assert!(made > 100, "the real client made only {made} connections");
    // The flood was one: it wanted more ports than there are, so ports were taken over.
    assert!(
        moved("nat_new") > 3 * 31_744,
        "the flood made {} translations",
        moved("nat_new")
    );
    assert!(
        moved("nat_half_open_reclaimed") + moved("nat_half_open_expired") > 0,
        "no port was freed from a half-open translation: {after}"
    );

    assert!(
        freed_at <= flood_end + 2 * HALF_OPEN,
        "half-open NAT ports remained {:?} after the flood (the timeout is {HALF_OPEN:?}): {ports}",
        freed_at - flood_end,
    );
    eprintln!(
        "no half-open NAT port {:?} after the flood: {ports}",
        freed_at - flood_end
    );

    // The connections opened before the flood all carried on.
    for (i, st) in streams.into_iter().enumerate() {
        let backend = st.backend.clone();
        assert_eq!(
            st.finish(),
            None,
            "connection {i} (to {backend}) opened before the flood broke"
        );
    }
    drop(agent);
}
