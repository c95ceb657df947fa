//! The lab: a small data centre in network namespaces, for end-to-end tests and the demo.
//!
//! ```text
//!  client ── router ──┬── lb        (the agent; XDP on eth0)
//!  10.10.0.2-9        ├── b1 10.20.0.11  ┐
//!  fd10::2-9          ├── b2 10.20.0.12  ├ TCP/UDP servers on the VIPs (loopback),
//!                     └── b3 10.20.0.13  ┘ lb_decap on eth0, answer the client directly
//!            fabric: bridge br0 in the router namespace, 10.20.0.0/24, fd20::/64, MTU 1600
//!            (or any: [`Lab::with_fabric_mtu`])
//! ```
//!
//! The router sends VIP traffic (192.0.2.0/24, 2001:db8::/64) to the load balancer, which
//! encapsulates it back onto the fabric (`XDP_TX`) to a backend; the backend's reply goes to the
//! router and on to the client. The fabric's MTU leaves room for the outer header, as real fabrics
//! do with jumbo frames. Only addresses inside these namespaces are used; everything is removed
//! on drop (and by [`crate::netns::remove_all_of_this_process`] on Ctrl-C).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use lb_userspace::kernel::program::Sizes;

use crate::{harness::Lb, netns::NetNs};

/// (name, IPv4, IPv6) of each backend.
pub const BACKENDS: [(&str, &str, &str); 3] = [
    ("b1", "10.20.0.11", "fd20::11"),
    ("b2", "10.20.0.12", "fd20::12"),
    ("b3", "10.20.0.13", "fd20::13"),
];
/// Client addresses (v4, v6).
pub const CLIENTS: usize = 8;
pub const LB_V4: &str = "10.20.0.2";
pub const LB_V6: &str = "fd20::2";
/// The VIPs every backend serves (TCP and UDP, port 80; 8080 for a second service).
pub const VIPS_V4: [&str; 3] = ["192.0.2.10", "192.0.2.20", "192.0.2.30"];
pub const VIPS_V6: [&str; 1] = ["2001:db8::10"];
pub const PORTS: [u16; 2] = [80, 8080];

/// The config `cargo xtask demo` runs (its lab is [`Lab::new`]).
pub const DEMO_CONFIG: &str = "node:
  interfaces: [eth0]          # the load balancer's uplink
  source_v4: 10.20.0.2        # outer source of encapsulated packets
  source_v6: fd20::2
  table_size: 65537
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - { address: 10.20.0.11, weight: 200 }   # b1
      - { address: 10.20.0.12, weight: 100 }   # b2
      - { address: 10.20.0.13, weight: 100 }   # b3
  - name: sticky
    address: 192.0.2.20
    port: 80
    protocol: tcp
    affinity_timeout: 10m      # each client stays on one backend
    backends:
      - { address: 10.20.0.11 }
      - { address: 10.20.0.12 }
      - { address: 10.20.0.13 }
";

/// A config for the lab's load balancer: `node` is more lines of `node:` (indented), `vips` the
/// YAML of the `vips:` list.
pub fn lab_config(node: &str, vips: &str) -> String {
    format!(
        "node:
  interfaces: [eth0]
  source_v4: {LB_V4}
  source_v6: {LB_V6}
  table_size: 65537
  max_vips: 16
  max_backends: 64
{node}vips:
{vips}"
    )
}

/// YAML for one entry of a config's `vips:` list, over the lab's backends: `backends` as
/// (index into [`BACKENDS`], weight), their IPv6 addresses if `v6`; with `nat_port`, a NAT VIP
/// whose backends listen on that port. `extra` is more lines of the VIP, indented.
pub fn vip_yaml(
    addr: &str,
    port: u16,
    proto: &str,
    extra: &str,
    backends: &[(usize, u32)],
    v6: bool,
    nat_port: Option<u16>,
) -> String {
    let bport = nat_port.map_or(String::new(), |p| format!("port: {p}, "));
    let list: Vec<String> = backends
        .iter()
        .map(|(i, w)| {
            let (_, a4, a6) = BACKENDS[*i];
            let a = if v6 { a6 } else { a4 };
            format!("      - {{ address: {a}, {bport}weight: {w} }}")
        })
        .collect();
    let mode = if nat_port.is_some() {
        "    mode: nat\n"
    } else {
        ""
    };
    format!(
        "  - address: {addr}\n    port: {port}\n    protocol: {proto}\n{mode}{extra}    backends:\n{}\n",
        list.join("\n")
    )
}

/// The share of answers in a tally (from [`Lab::tcp_tally`] and friends) that came from `who`.
pub fn share(t: &BTreeMap<String, usize>, who: &str) -> f64 {
    let total: usize = t.values().sum();
    *t.get(who).unwrap_or(&0) as f64 / total.max(1) as f64
}

/// How many attempts in a tally failed.
pub fn errors(t: &BTreeMap<String, usize>) -> usize {
    t.iter()
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, v)| v)
        .sum()
}

pub fn client_v4(i: usize) -> IpAddr {
    format!("10.10.0.{}", 2 + i).parse().unwrap()
}

pub fn client_v6(i: usize) -> IpAddr {
    format!("fd10::{}", 2 + i).parse().unwrap()
}

pub struct Lab {
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<(String, NetNs)>,
    pub router: NetNs,
    /// Holds the programs the harness attached: `lb_pass` on the router's port to the load
    /// balancer, `lb_decap` on the backends (not in [`Lab::with_bare_backends`]).
    _decap: Lb,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Per backend, how many TCP connections it accepted.
    pub accepted: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// The fabric's MTU in [`Lab::new`]: room for the outer header of a full-size packet.
pub const JUMBO_FABRIC_MTU: u32 = 1600;

/// The client's link to the router and the router's fabric bridge: c0 (the client, with
/// [`CLIENTS`] addresses of each family) to r0 (the router), the bridge br0 of MTU `mtu`
/// (10.20.0.1/24, fd20::1/64), forwarding on; the client's TX checksum offload off.
pub fn wire_client(router: &NetNs, client: &NetNs, mtu: &str) {
    crate::netns::ip(&[
        "link",
        "add",
        "c0",
        "netns",
        &client.name,
        "type",
        "veth",
        "peer",
        "name",
        "r0",
        "netns",
        &router.name,
    ]);
    router.script(&format!(
        "link add br0 type bridge
         link set br0 mtu {mtu}
         link set br0 up
         addr add 10.20.0.1/24 dev br0
         addr add fd20::1/64 dev br0 nodad
         addr add 10.10.0.1/24 dev r0
         addr add fd10::1/64 dev r0 nodad
         link set r0 up"
    ));
    router.sysctl("net.ipv4.ip_forward", "1");
    router.sysctl("net.ipv6.conf.all.forwarding", "1");
    let mut c = "link set c0 up\n".to_string();
    for i in 0..CLIENTS {
        c.push_str(&format!(
            "addr add {}/24 dev c0\naddr add {}/64 dev c0 nodad\n",
            client_v4(i),
            client_v6(i)
        ));
    }
    c.push_str("route add default via 10.10.0.1\nroute add default via fd10::1\n");
    client.script(&c);
    // veths leave checksums for "hardware"; XDP transmit loses that promise (see README: Node
    // prerequisites).
    client.exec("ethtool", &["-K", "c0", "tx", "off"]);
}

/// `ns`'s eth0 on the router's fabric bridge (its port there named `port`), with addresses `v4`
/// and `v6` and default routes through the router.
pub fn attach_fabric(router: &NetNs, ns: &NetNs, port: &str, v4: &str, v6: &str, mtu: &str) {
    crate::netns::ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &ns.name,
        "mtu",
        mtu,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        &router.name,
        "mtu",
        mtu,
    ]);
    router.ip(&["link", "set", port, "master", "br0"]);
    router.ip(&["link", "set", port, "up"]);
    ns.script(&format!(
        "addr add {v4}/24 dev eth0
         addr add {v6}/64 dev eth0 nodad
         link set eth0 up
         route add default via 10.20.0.1
         route add default via fd20::1"
    ));
}

/// What a load balancer node needs of its namespace: forwarding on, no reverse-path filter on
/// its uplink (see README: Node prerequisites).
pub fn lb_node(ns: &NetNs) {
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
    ns.sysctl("net.ipv4.conf.eth0.rp_filter", "0");
}

/// What a DSR backend needs: the VIPs on loopback, no reverse-path filter (answers leave from
/// the VIP, requests came in encapsulated).
pub fn dsr_backend(ns: &NetNs, vips_v4: &[&str], vips_v6: &[&str]) {
    for v in vips_v4 {
        ns.ip(&["addr", "add", &format!("{v}/32"), "dev", "lo"]);
    }
    for v in vips_v6 {
        ns.ip(&["addr", "add", &format!("{v}/128"), "dev", "lo", "nodad"]);
    }
    for k in ["all", "default", "eth0", "lo"] {
        ns.sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0");
    }
}

impl Lab {
    pub fn new() -> Self {
        Self::with_fabric_mtu(JUMBO_FABRIC_MTU)
    }

    /// The lab with a fabric of MTU `mtu` (the client's link is 1500).
    pub fn with_fabric_mtu(mtu: u32) -> Self {
        let mut lab = Self::wired(mtu);
        for (_, ns) in &lab.backends {
            dsr_backend(ns, &VIPS_V4, &VIPS_V6);
        }
        // Backends decapsulate with lb's XDP decap program (no tunnel devices on this kernel).
        for (_, ns) in &lab.backends {
            ns.run(|| {
                lab._decap
                    .xdp("lb_decap")
                    .attach("eth0", XdpMode::Driver)
                    .expect("attaching lb_decap");
            });
        }
        lab.start_servers();
        lab
    }

    /// The lab whose backends are only wired to the fabric (addresses, default routes through
    /// the router): no VIP on loopback, no sysctl changed, nothing decapsulates, no servers. The
    /// test makes them DSR backends its own way.
    pub fn with_bare_backends() -> Self {
        Self::wired(JUMBO_FABRIC_MTU)
    }

    /// The namespaces and links, the router's routes, the load balancer node's sysctls.
    fn wired(mtu: u32) -> Self {
        let mtu = mtu.to_string();
        let router = NetNs::new("router");
        let client = NetNs::new("client");
        let lb = NetNs::new("lb");
        let backends: Vec<(String, NetNs)> = BACKENDS
            .iter()
            .map(|(n, _, _)| (n.to_string(), NetNs::new(n)))
            .collect();

        wire_client(&router, &client, &mtu);
        router.script(
            "route add 192.0.2.0/24 via 10.20.0.2
             route add 2001:db8::/64 via fd20::2",
        );

        // Fabric ports: lb and backends.
        attach_fabric(&router, &lb, "p-lb", LB_V4, LB_V6, &mtu);
        lb_node(&lb);
        for ((_, ns), (name, v4, v6)) in backends.iter().zip(BACKENDS) {
            attach_fabric(&router, ns, &format!("p-{name}"), v4, v6, &mtu);
        }

        let mut programs = Lb::load(Sizes {
            table_size: 13,
            max_vips: 1,
            max_backends: 1,
            flow_table_size: 1,
            affinity_table_size: 1,
            nat_table_size: 1,
        });
        // XDP_TX out of the lb's eth0 lands on p-lb, which must run NAPI to take XDP frames: an
        // XDP program turns it on (GRO alone did not, here).
        router.run(|| {
            programs
                .xdp("lb_pass")
                .attach("p-lb", XdpMode::Driver)
                .expect("attaching lb_pass");
        });

        Self {
            client,
            lb,
            backends,
            router,
            _decap: programs,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            accepted: Arc::default(),
        }
    }

    /// TCP: on accept, the server writes its name and a newline, then echoes everything until EOF.
    /// UDP: answers every datagram with its name.
    fn start_servers(&mut self) {
        for (name, ns) in &self.backends {
            let addrs: Vec<IpAddr> = VIPS_V4
                .iter()
                .chain(VIPS_V6.iter())
                .map(|a| a.parse().unwrap())
                .collect();
            for addr in addrs {
                for port in PORTS {
                    let sa = SocketAddr::new(addr, port);
                    let (tcp, udp) = ns.run(|| {
                        (
                            TcpListener::bind(sa).expect("bind tcp"),
                            UdpSocket::bind(sa).expect("bind udp"),
                        )
                    });
                    tcp.set_nonblocking(true).unwrap();
                    udp.set_read_timeout(Some(Duration::from_millis(20)))
                        .unwrap();
                    let (stop, tcp_name, accepted) =
                        (self.stop.clone(), name.clone(), self.accepted.clone());
                    self.servers.push(std::thread::spawn(move || {
                        let name = tcp_name;
                        while !stop.load(Ordering::Relaxed) {
                            match tcp.accept() {
                                Ok((s, _)) => {
                                    *accepted.lock().unwrap().entry(name.clone()).or_insert(0) += 1;
                                    let (name, stop) = (name.clone(), stop.clone());
                                    std::thread::spawn(move || echo(s, &name, &stop));
                                }
                                Err(_) => std::thread::sleep(Duration::from_millis(1)),
                            }
                        }
                    }));
                    let (stop, name) = (self.stop.clone(), name.clone());
                    self.servers.push(std::thread::spawn(move || {
                        let mut buf = [0u8; 2048];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok((n, from)) = udp.recv_from(&mut buf)
                                && n > 0
                            {
                                let _ = udp.send_to(name.as_bytes(), from);
                            }
                        }
                    }));
                }
            }
        }
    }

    /// One TCP connection from client `c` to `vip:port`: which backend answered, or the error.
    pub fn connect(&self, c: IpAddr, vip: SocketAddr) -> Result<String, String> {
        self.client.run(|| who_tcp(c, vip))
    }

    /// One TCP connection from client `c` at source port `port` to `vip` per port in `ports`,
    /// each closed with an RST (no TIME_WAIT, so the next round can reuse the port at once, as
    /// busy clients do); who answered how often.
    pub fn tcp_tally_ports(
        &self,
        c: IpAddr,
        ports: std::ops::Range<u16>,
        vip: SocketAddr,
    ) -> BTreeMap<String, usize> {
        self.client.run(|| {
            let mut t = BTreeMap::new();
            for p in ports {
                let answer = who_tcp_from(SocketAddr::new(c, p), vip)
                    .unwrap_or_else(|e| format!("error: {e}"));
                *t.entry(answer).or_insert(0) += 1;
            }
            t
        })
    }

    /// One datagram per port in `ports`, from a UDP socket of its own bound to client `c` at that
    /// source port and *connected* to `vip`, each waiting up to `patience` for its one answer
    /// (no retry), as the Gateway API conformance suite's client sends them: a connected socket
    /// takes a reply only from the address and port it sent to. Who answered how often.
    pub fn udp_tally_ports(
        &self,
        c: IpAddr,
        ports: std::ops::Range<u16>,
        vip: SocketAddr,
        patience: Duration,
    ) -> BTreeMap<String, usize> {
        self.client.run(|| {
            let mut t = BTreeMap::new();
            for p in ports {
                let answer = who_udp_connected(SocketAddr::new(c, p), vip, patience)
                    .unwrap_or_else(|e| format!("error: {e}"));
                *t.entry(answer).or_insert(0) += 1;
            }
            t
        })
    }

    /// `n` TCP connections, round-robin over `clients` client addresses; who answered how often.
    pub fn tcp_tally(&self, vip: SocketAddr, n: usize, clients: usize) -> BTreeMap<String, usize> {
        self.tally(vip, n, clients, who_tcp)
    }

    /// `n` UDP requests, each from a new socket; who answered how often.
    pub fn udp_tally(&self, vip: SocketAddr, n: usize, clients: usize) -> BTreeMap<String, usize> {
        self.tally(vip, n, clients, who_udp)
    }

    fn tally(
        &self,
        vip: SocketAddr,
        n: usize,
        clients: usize,
        who: fn(IpAddr, SocketAddr) -> Result<String, String>,
    ) -> BTreeMap<String, usize> {
        self.client.run(|| {
            let mut t = BTreeMap::new();
            for i in 0..n {
                let c = if vip.is_ipv4() {
                    client_v4(i % clients)
                } else {
                    client_v6(i % clients)
                };
                let answer = who(c, vip).unwrap_or_else(|e| format!("error: {e}"));
                *t.entry(answer).or_insert(0) += 1;
            }
            t
        })
    }

    /// Opens `n` long-lived connections that keep sending and checking echoes until stopped.
    pub fn streams(&self, vip: SocketAddr, n: usize) -> Vec<Stream> {
        self.patient_streams(vip, n, Duration::from_secs(3))
    }

    /// [`Lab::streams`] whose connections count as broken only when reset, or when an echo
    /// takes longer than `patience` (heavy loss makes TCP back off for seconds and recover).
    pub fn patient_streams(&self, vip: SocketAddr, n: usize, patience: Duration) -> Vec<Stream> {
        (0..n)
            .map(|i| {
                let c = if vip.is_ipv4() {
                    client_v4(i % CLIENTS)
                } else {
                    client_v6(i % CLIENTS)
                };
                let s = self
                    .client
                    .run(|| open(c, vip))
                    .unwrap_or_else(|e| panic!("opening stream {i}: {e}"));
                s.set_read_timeout(Some(patience)).unwrap();
                s.set_write_timeout(Some(patience)).unwrap();
                Stream::start(s)
            })
            .collect()
    }
}

/// Plain servers for NAT mode: on each backend, TCP and UDP on the backend's own addresses
/// (IPv4 and IPv6) at one port, answering like the VIP servers. Nothing NAT-specific on the
/// backends: no VIP on loopback, no tunnel; they answer the load balancer's address, which
/// routes back through it. A backend's TCP server can be taken down (its port then refuses every
/// SYN with an RST) and brought back.
pub struct NatServers {
    stop: Arc<AtomicBool>,
    down: BTreeMap<String, Arc<AtomicBool>>,
    threads: Vec<JoinHandle<()>>,
}

impl NatServers {
    pub fn start(lab: &Lab, port: u16) -> Self {
        Self::start_as(lab, port, "", false)
    }

    /// The servers, answering with the backend's name followed by `suffix` (sets on different
    /// ports tell their "pods" apart); `any`: on every IPv4 address of the backend (0.0.0.0),
    /// so that addresses a test adds to a backend serve too, instead of its own two.
    pub fn start_as(lab: &Lab, port: u16, suffix: &str, any: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut down = BTreeMap::new();
        let mut threads = Vec::new();
        for ((backend, ns), (_, v4, v6)) in lab.backends.iter().zip(BACKENDS) {
            let name = &format!("{backend}{suffix}");
            // veths leave checksums to "hardware", which XDP forwarding skips (README: Node
            // prerequisites).
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
            let flag = Arc::new(AtomicBool::new(false));
            down.insert(backend.clone(), flag.clone());
            let addrs = if any { vec!["0.0.0.0"] } else { vec![v4, v6] };
            for a in addrs {
                let sa = SocketAddr::new(a.parse().unwrap(), port);
                let udp = ns.run(|| UdpSocket::bind(sa).expect("bind udp"));
                udp.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let (stop_u, name_u) = (stop.clone(), name.clone());
                threads.push(std::thread::spawn(move || {
                    let (stop, name) = (stop_u, name_u);
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = udp.recv_from(&mut buf)
                            && n > 0
                        {
                            let _ = udp.send_to(name.as_bytes(), from);
                        }
                    }
                }));
                let netns = ns.name.clone();
                let (stop, name, flag) = (stop.clone(), name.clone(), flag.clone());
                let listen = move || TcpListener::bind(sa).expect("bind tcp");
                let (ready_tx, ready) = std::sync::mpsc::channel();
                threads.push(std::thread::spawn(move || {
                    crate::netns::enter(&netns);
                    let mut tcp = Some(listen());
                    let _ = ready_tx.send(());
                    while !stop.load(Ordering::Relaxed) {
                        if flag.load(Ordering::Relaxed) {
                            tcp = None; // closed: the kernel answers SYNs with RST
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        let l = tcp.get_or_insert_with(|| {
                            let l = listen();
                            l.set_nonblocking(true).unwrap();
                            l
                        });
                        l.set_nonblocking(true).unwrap();
                        match l.accept() {
                            Ok((s, _)) => {
                                let (name, stop) = (name.clone(), stop.clone());
                                std::thread::spawn(move || echo(s, &name, &stop));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                }));
                ready.recv().expect("TCP server started");
            }
        }
        Self {
            stop,
            down,
            threads,
        }
    }

    /// Takes backend `name`'s TCP server down (every SYN refused) or brings it back.
    pub fn set_down(&self, name: &str, down: bool) {
        self.down[name].store(down, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for NatServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// TCP sinks for uploads: on every backend, on `port` of the first IPv4 and the IPv6 VIP, each
/// connection is read to its end and answered with the number of bytes read (a line).
pub struct Sinks {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Sinks {
    pub fn start(lab: &Lab, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (_, ns) in &lab.backends {
            for vip in [VIPS_V4[0], VIPS_V6[0]] {
                let sa = SocketAddr::new(vip.parse().unwrap(), port);
                let l = ns.run(|| TcpListener::bind(sa).expect("bind the sink"));
                l.set_nonblocking(true).unwrap();
                let stop = stop.clone();
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((s, _)) => {
                                std::thread::spawn(move || drain(s));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                }));
            }
        }
        Self { stop, threads }
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Reads `s` to its end (or 5 s of silence), then writes how many bytes came.
fn drain(mut s: TcpStream) {
    s.set_nonblocking(false).unwrap();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("{n}\n").as_bytes());
}

impl Lab {
    /// Sends `bytes` bytes from client address `c` to a [`Sinks`] sink at `vip`, and returns how
    /// many the sink says it read; an error if that takes longer than `within` or the connection
    /// fails (a stalled upload times out within 3 s of its last progress).
    pub fn upload(
        &self,
        c: IpAddr,
        vip: SocketAddr,
        bytes: usize,
        within: Duration,
    ) -> Result<u64, String> {
        self.client.run(|| {
            let start = Instant::now();
            let mut s = open(c, vip).map_err(|e| format!("connect: {}", e.kind()))?;
            let chunk = vec![0x5au8; 1 << 16];
            let mut sent = 0;
            while sent < bytes {
                if start.elapsed() > within {
                    return Err(format!("{sent} of {bytes} bytes sent after {within:?}"));
                }
                let k = chunk.len().min(bytes - sent);
                s.write_all(&chunk[..k])
                    .map_err(|e| format!("write after {sent} bytes: {}", e.kind()))?;
                sent += k;
            }
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {}", e.kind()))?;
            s.set_read_timeout(Some(
                within
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_secs(1)),
            ))
            .unwrap();
            let mut line = String::new();
            BufReader::new(&s)
                .read_line(&mut line)
                .map_err(|e| format!("reading the sink's count: {}", e.kind()))?;
            line.trim()
                .parse()
                .map_err(|_| format!("the sink answered {line:?}"))
        })
    }
}

impl Lab {
    /// Sends `bytes` bytes from client address `c` to an echo server at `vip` and reads them
    /// back, 16 KB at a time (so the backend sends full-size segments towards the client).
    /// Returns the backend's name; an error if a read stalls for 3 s, the connection fails, or it
    /// all takes longer than `within`.
    pub fn echo_through(
        &self,
        c: IpAddr,
        vip: SocketAddr,
        bytes: usize,
        within: Duration,
    ) -> Result<String, String> {
        self.client.run(|| {
            let start = Instant::now();
            let s = open(c, vip).map_err(|e| format!("connect: {}", e.kind()))?;
            let mut r = BufReader::new(&s);
            let mut name = String::new();
            r.read_line(&mut name)
                .map_err(|e| format!("reading the name: {}", e.kind()))?;
            let chunk = vec![0x33u8; 16 << 10];
            let mut back = vec![0u8; chunk.len()];
            let mut done = 0;
            while done < bytes {
                if start.elapsed() > within {
                    return Err(format!("{done} of {bytes} bytes echoed after {within:?}"));
                }
                (&s).write_all(&chunk)
                    .map_err(|e| format!("write after {done} bytes: {}", e.kind()))?;
                r.read_exact(&mut back)
                    .map_err(|e| format!("read after {done} bytes: {}", e.kind()))?;
                done += chunk.len();
            }
            Ok(name.trim().to_string())
        })
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
    }
}

pub fn echo(mut s: TcpStream, name: &str, stop: &AtomicBool) {
    s.set_nonblocking(false).unwrap();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Which backend answers a connection from `from` (address and port) to `vip`; the connection
/// is then reset (SO_LINGER 0), leaving no TIME_WAIT behind.
fn who_tcp_from(from: SocketAddr, vip: SocketAddr) -> Result<String, String> {
    let s = bind_to(from).map_err(|e| format!("bind: {}", e.kind()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let (sa, len) = sockaddr(vip);
    s.set_write_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    // SAFETY: connecting our own socket (blocking; SO_SNDTIMEO bounds it).
    if unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(format!(
            "connect: {}",
            std::io::Error::last_os_error().kind()
        ));
    }
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {}", e.kind()))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setting an option on our own socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    Ok(line.trim().to_string())
}

fn bind_from(c: IpAddr) -> std::io::Result<std::net::TcpStream> {
    bind_to(SocketAddr::new(c, 0))
}

/// A TCP socket bound to `a` (SO_REUSEADDR, so a port just reset can be bound again).
fn bind_to(a: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let c = a.ip();
    // std has no bind-before-connect for TCP: go through a socket2-free path with libc.
    let domain = if c.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor we own; on error it is closed.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let (sa, len) = sockaddr(a);
        if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family-specific part.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// Connects from client address `c` to `vip` (with a timeout).
pub fn open(c: IpAddr, vip: SocketAddr) -> std::io::Result<TcpStream> {
    let s = bind_from(c)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let (sa, len) = sockaddr(vip);
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    // SAFETY: connecting our own socket (blocking; SO_SNDTIMEO bounds it).
    if unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

fn who_tcp(c: IpAddr, vip: SocketAddr) -> Result<String, String> {
    let s = open(c, vip).map_err(|e| format!("connect: {}", e.kind()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {}", e.kind()))?;
    Ok(line.trim().to_string())
}

fn who_udp(c: IpAddr, vip: SocketAddr) -> Result<String, String> {
    let s = UdpSocket::bind(SocketAddr::new(c, 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..4 {
        s.send_to(b"who?", vip).map_err(|e| e.to_string())?;
        if let Ok(n) = s.recv(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    Err("no answer".into())
}

/// One datagram from `from` on a socket connected to `vip`, and the one answer within `patience`.
fn who_udp_connected(
    from: SocketAddr,
    vip: SocketAddr,
    patience: Duration,
) -> Result<String, String> {
    let s = UdpSocket::bind(from).map_err(|e| format!("bind: {}", e.kind()))?;
    s.connect(vip)
        .map_err(|e| format!("connect: {}", e.kind()))?;
    s.set_read_timeout(Some(patience))
        .map_err(|e| e.to_string())?;
    s.send(b"who?").map_err(|e| format!("send: {}", e.kind()))?;
    let mut buf = [0u8; 64];
    let n = s
        .recv(&mut buf)
        .map_err(|e| format!("no answer: {}", e.kind()))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A long-lived connection that sends a numbered line every 20 ms and checks each echo.
pub struct Stream {
    pub backend: String,
    stop: Arc<AtomicBool>,
    pub exchanged: Arc<AtomicU64>,
    handle: Option<JoinHandle<Option<String>>>,
}

/// Waits until every stream of `streams` that still runs has exchanged `more` echoes since the
/// call (traffic has flowed through whatever state the lab is in now), or `within` passes.
/// Returns whether they all did; a stream that ended is left to [`Stream::finish`] to report.
pub fn exchange(streams: &[Stream], more: u64, within: Duration) -> bool {
    let from: Vec<u64> = streams
        .iter()
        .map(|s| s.exchanged.load(Ordering::Relaxed))
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let done = streams
            .iter()
            .zip(&from)
            .all(|(s, n)| s.ended() || s.exchanged.load(Ordering::Relaxed) >= n + more);
        if done {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Stream {
    /// Whether its connection has ended (broken: [`Stream::finish`] says how).
    pub fn ended(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    fn start(s: TcpStream) -> Self {
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut backend = String::new();
        reader
            .read_line(&mut backend)
            .expect("reading the backend's name");
        let backend = backend.trim().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let exchanged = Arc::new(AtomicU64::new(0));
        let (st, ex) = (stop.clone(), exchanged.clone());
        let mut w = s;
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            let started = Instant::now();
            while !st.load(Ordering::Relaxed) {
                let msg = format!("{n} {}\n", "x".repeat(1400 + (n % 100) as usize));
                if let Err(e) = w.write_all(msg.as_bytes()) {
                    return Some(format!(
                        "write after {n} exchanges ({:?}): {e}",
                        started.elapsed()
                    ));
                }
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => return Some(format!("closed by the peer after {n} exchanges")),
                    Ok(_) if line == msg => {}
                    Ok(_) => return Some(format!("wrong echo after {n} exchanges")),
                    Err(e) => {
                        return Some(format!(
                            "read after {n} exchanges ({:?}): {e}",
                            started.elapsed()
                        ));
                    }
                }
                n += 1;
                ex.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        });
        Self {
            backend,
            stop,
            exchanged,
            handle: Some(handle),
        }
    }

    /// Stops the stream: `None` if it never broke, else what happened.
    pub fn finish(mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}
