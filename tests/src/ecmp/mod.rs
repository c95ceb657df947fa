//! The scale-out lab: several lb nodes behind an ECMP router, each announcing its VIPs over
//! BGP with a real routing daemon (BIRD 2, started here), for the multi-node tests.
//!
//! ```text
//!  client ── router ──┬── n1 10.20.0.2  ┐ agent (XDP on eth0, node.announce: table 100)
//!  10.10.0.2-9   BIRD ├── n2 10.20.0.3  ├ + BIRD: learns table 100, BGP to the router
//!  fd10::2-9     ECMP ├── n3 10.20.0.4  ┘   (BFD 100 ms x 5)
//!                     ├── b1 10.20.0.11 ┐ echo servers on the VIPs (DSR, lb_decap on eth0)
//!                     ├── b2 10.20.0.12 ├ and on their own addresses (NAT)
//!                     └── b3 10.20.0.13 ┘
//!            fabric: bridge br0 in the router namespace, 10.20.0.0/24, fd20::/64, MTU 1600
//! ```
//!
//! The router's BIRD peers with every node (AS 65000 to AS 65001, one IPv4 and one IPv6
//! session each) and installs each VIP as one multipath route over the nodes that announce it;
//! the kernel spreads connections over them by their 4-tuple (`fib_multipath_hash_policy` 1).
//! Only addresses inside these namespaces are used. Everything (agents, daemons, pins,
//! namespaces) is removed on drop, also when a test panics.

mod bird;
mod stream;

pub use bird::{BFD, BGP_TIMERS, Bird, node_bird_conf, router_bird_conf};
pub use stream::{Conn, STALL, STREAM_CAP, wait_progress};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use lb_userspace::{kernel::inspect::Pinned, kernel::program::Sizes};

use crate::{
    agent::{Agent, Dirs},
    dc::{
        BACKENDS, CLIENTS, attach_fabric, client_v4, client_v6, dsr_backend, echo, lb_node, open,
        wire_client,
    },
    harness::Lb,
    netns::NetNs,
};

/// The routing table the nodes announce through (`node.announce.table`).
pub const TABLE: u32 = 100;
pub const VIP4: &str = "192.0.2.10";
pub const VIP6: &str = "2001:db8::10";
/// A NAT VIP; its backends listen on [`NAT_PORT`] of their own addresses.
pub const NAT_VIP4: &str = "192.0.2.20";
pub const NAT_PORT: u16 = 9080;

/// A node's fabric addresses (node `i`, from 0).
pub fn node_v4(i: usize) -> IpAddr {
    format!("10.20.0.{}", 2 + i).parse().unwrap()
}

pub fn node_v6(i: usize) -> IpAddr {
    format!("fd20::{}", 2 + i).parse().unwrap()
}

/// The config of node `i`: `vips` is the YAML of the `vips:` list.
pub fn node_config(i: usize, vips: &str) -> String {
    format!(
        "node:
  interfaces: [eth0]
  source_v4: {}
  source_v6: {}
  table_size: 65537
  max_vips: 8
  max_backends: 32
  announce: {{ table: {TABLE} }}
vips:
{vips}",
        node_v4(i),
        node_v6(i)
    )
}

/// A DSR VIP entry (port 80, TCP) over backends `backends` (indices into [`BACKENDS`]) with
/// weight `weight`.
pub fn dsr_vip(addr: &str, backends: &[usize], weight: u32) -> String {
    let v6 = addr.contains(':');
    let list: Vec<String> = backends
        .iter()
        .map(|b| {
            let (_, a4, a6) = BACKENDS[*b];
            format!(
                "{{ address: {}, weight: {weight} }}",
                if v6 { a6 } else { a4 }
            )
        })
        .collect();
    format!(
        "  - {{ address: \"{addr}\", port: 80, protocol: tcp, mode: dsr, backends: [{}] }}\n",
        list.join(", ")
    )
}

/// The NAT VIP entry, over all the backends.
pub fn nat_vip() -> String {
    let list: Vec<String> = BACKENDS
        .iter()
        .map(|(_, a4, _)| format!("{{ address: {a4}, port: {NAT_PORT} }}"))
        .collect();
    format!(
        "  - {{ address: {NAT_VIP4}, port: 80, protocol: tcp, mode: nat, backends: [{}] }}\n",
        list.join(", ")
    )
}

/// An lb node: its namespace, agent, pins and BIRD.
pub struct Node {
    pub name: String,
    pub ns: NetNs,
    pub dirs: Dirs,
    pub agent: Option<Agent>,
    pub bird: Option<Bird>,
}

impl Node {
    /// The node's pinned maps.
    pub fn pinned(&self) -> Pinned {
        Pinned::open(&self.dirs.pins)
            .unwrap_or_else(|e| panic!("{}: opening the pinned maps: {e}", self.name))
    }

    /// Starts the agent (the config already written) and waits for its first apply.
    pub fn start_agent(&mut self) {
        let mut a = Agent::start(&self.ns, &self.dirs);
        a.wait_serving(&self.ns, &self.dirs, Duration::from_secs(30));
        self.agent = Some(a);
    }

    /// `lb down` inside the node's namespace (where its routes are).
    pub fn down(&self) -> Vec<String> {
        self.ns
            .run(|| lb_userspace::agent::run::down(&self.dirs.pins, &self.dirs.state))
            .unwrap_or_else(|e| panic!("{}: lb down: {e:#}", self.name))
    }

    /// The addresses of lb's routes in the node's announcement table.
    pub fn table_routes(&self) -> BTreeSet<IpAddr> {
        let mut out = BTreeSet::new();
        for fam in ["-4", "-6"] {
            let o = Command::new("ip")
                .args(["-n", &self.ns.name, "-j", fam, "route", "show", "table"])
                .arg(TABLE.to_string())
                .args([
                    "proto",
                    &lb_userspace::kernel::announce::RTPROT_LB.to_string(),
                ])
                .output()
                .expect("running ip");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for r in v.as_array().into_iter().flatten() {
                if let Some(a) = r["dst"].as_str().and_then(|d| d.parse().ok()) {
                    out.insert(a);
                }
            }
        }
        out
    }

    /// The `announce` part of the agent's status file.
    pub fn announced(&self) -> Vec<IpAddr> {
        lb_userspace::status::file::read_status(&self.dirs.state)
            .and_then(|s| s.announce)
            .map(|a| a.announced)
            .unwrap_or_default()
    }
}

pub struct Ecmp {
    pub client: NetNs,
    pub router: NetNs,
    pub nodes: Vec<Node>,
    pub backends: Vec<(String, NetNs)>,
    pub router_bird: Option<Bird>,
    router_dir: PathBuf,
    _decap: Lb,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

const MTU: &str = "1600";

fn tiny() -> Sizes {
    Sizes {
        table_size: 13,
        max_vips: 1,
        max_backends: 1,
        flow_table_size: 1,
        affinity_table_size: 1,
        nat_table_size: 1,
    }
}

impl Ecmp {
    /// The lab with `n` nodes, node `i` serving `vips(i)` (the YAML of its `vips:` list);
    /// returns once every node's agent has applied its config (announcements take longer:
    /// see [`Ecmp::wait_nexthops`]).
    pub fn new(bin: &Path, n: usize, vips: impl Fn(usize) -> String) -> Self {
        let router = NetNs::new("router");
        let client = NetNs::new("client");
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                Node {
                    ns: NetNs::new(&name),
                    dirs: Dirs::new(bin, &name),
                    name,
                    agent: None,
                    bird: None,
                }
            })
            .collect();
        let backends: Vec<(String, NetNs)> = BACKENDS
            .iter()
            .map(|(b, _, _)| (b.to_string(), NetNs::new(b)))
            .collect();
        let router_dir = std::env::temp_dir().join(format!("{}-bird", router.name));
        std::fs::create_dir_all(&router_dir).unwrap();
        let mut lab = Self {
            client,
            router,
            nodes,
            backends,
            router_bird: None,
            router_dir,
            _decap: Lb::load(tiny()),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        lab.wire();
        lab.start_servers();
        let conf = router_bird_conf(n, &lab.router_dir.join("bird.log"));
        lab.router_bird = Some(Bird::start(&lab.router, &lab.router_dir, &conf));
        for (i, node) in lab.nodes.iter_mut().enumerate() {
            node.dirs.write_config(&node_config(i, &vips(i)));
            node.start_agent();
            let conf = node_bird_conf(i, &node.dirs.state.join("bird.log"));
            node.bird = Some(Bird::start(&node.ns, &node.dirs.state, &conf));
        }
        lab
    }

    /// Links and addresses, the router's forwarding and ECMP hashing, the backends' decap.
    fn wire(&mut self) {
        let (router, client) = (&self.router, &self.client);
        wire_client(router, client, MTU);
        // Spread by the 4-tuple, not by the addresses alone (the clients are few).
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        router.sysctl("net.ipv6.fib_multipath_hash_policy", "1");
        let port = |ns: &NetNs, port: &str, v4: &str, v6: &str| {
            attach_fabric(router, ns, port, v4, v6, MTU)
        };
        let decap = &mut self._decap;
        for (i, node) in self.nodes.iter().enumerate() {
            let p = format!("p-{}", node.name);
            port(
                &node.ns,
                &p,
                &node_v4(i).to_string(),
                &node_v6(i).to_string(),
            );
            lb_node(&node.ns);
            // XDP_TX out of the node's eth0 lands on its router port, which needs NAPI.
            router.run(|| {
                decap
                    .xdp("lb_pass")
                    .attach(&p, XdpMode::Driver)
                    .expect("attaching lb_pass");
            });
        }
        for ((_, ns), (name, v4, v6)) in self.backends.iter().zip(BACKENDS) {
            port(ns, &format!("p-{name}"), v4, v6);
            // veths leave checksums to "hardware", which NAT's XDP forwarding skips (README:
            // Node prerequisites).
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
            dsr_backend(ns, &[VIP4], &[VIP6]);
            ns.run(|| {
                decap
                    .xdp("lb_decap")
                    .attach("eth0", XdpMode::Driver)
                    .expect("attaching lb_decap");
            });
        }
    }

    /// Echo servers (see [`crate::dc::echo`]: the backend's name, then every line back) on
    /// every backend: on the VIPs port 80 (DSR) and on its own IPv4 address port [`NAT_PORT`].
    fn start_servers(&mut self) {
        for ((name, ns), (_, a4, _)) in self.backends.iter().zip(BACKENDS) {
            let addrs = [
                SocketAddr::new(VIP4.parse().unwrap(), 80),
                SocketAddr::new(VIP6.parse().unwrap(), 80),
                SocketAddr::new(a4.parse().unwrap(), NAT_PORT),
            ];
            for sa in addrs {
                let l = ns.run(|| TcpListener::bind(sa).expect("bind the echo server"));
                l.set_nonblocking(true).unwrap();
                let (stop, name) = (self.stop.clone(), name.clone());
                self.servers.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((s, _)) => {
                                let (name, stop) = (name.clone(), stop.clone());
                                std::thread::spawn(move || echo(s, &name, &stop));
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                }));
            }
        }
    }

    /// The next hops (node addresses) of the router's route to `vip`; empty if it has none.
    pub fn nexthops(&self, vip: &str) -> BTreeSet<IpAddr> {
        let family = if vip.contains(':') { "-6" } else { "-4" };
        let o = Command::new("ip")
            .args(["-n", &self.router.name, "-j", family, "route", "show", vip])
            .output()
            .expect("running ip");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let mut out = BTreeSet::new();
        for r in v.as_array().into_iter().flatten() {
            let hops = r["nexthops"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| vec![r.clone()]);
            for h in hops {
                if let Some(g) = h["gateway"].as_str().and_then(|g| g.parse().ok()) {
                    out.insert(g);
                }
            }
        }
        out
    }

    /// The addresses of nodes `which`, in the family of `vip`.
    pub fn node_addrs(&self, vip: &str, which: &[usize]) -> BTreeSet<IpAddr> {
        which
            .iter()
            .map(|i| {
                if vip.contains(':') {
                    node_v6(*i)
                } else {
                    node_v4(*i)
                }
            })
            .collect()
    }

    /// Waits until the router reaches `vip` through exactly nodes `which`; returns how long it
    /// took. Panics (with the router daemon's view) after `timeout`.
    pub fn wait_nexthops(&self, vip: &str, which: &[usize], timeout: Duration) -> Duration {
        let want = self.node_addrs(vip, which);
        let start = Instant::now();
        loop {
            let now = self.nexthops(vip);
            if now == want {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!(
                    "the router reaches {vip} through {now:?}, not {want:?}, after {timeout:?}\n{}",
                    self.router_bird
                        .as_ref()
                        .map_or(String::new(), |b| b.birdc(&["show", "protocols"]))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes node `i`'s link on the router down (`up` false) or brings it back.
    pub fn set_link(&self, i: usize, up: bool) {
        let p = format!("p-{}", self.nodes[i].name);
        self.router
            .ip(&["link", "set", &p, if up { "up" } else { "down" }]);
    }

    /// Opens `n` streams from the clients to `vip:port`, round-robin over the clients.
    pub fn streams(&self, vip: &str, port: u16, n: usize) -> Vec<Conn> {
        let ip: IpAddr = vip.parse().unwrap();
        let to = SocketAddr::new(ip, port);
        (0..n)
            .map(|i| {
                let c = if ip.is_ipv4() {
                    client_v4(i % CLIENTS)
                } else {
                    client_v6(i % CLIENTS)
                };
                let s = self
                    .client
                    .run(|| open(c, to))
                    .unwrap_or_else(|e| panic!("opening stream {i} to {to}: {e}"));
                Conn::start(s, to)
            })
            .collect()
    }

    /// The nodes whose maps hold `c`'s connection (a flow entry in DSR, a translation in NAT).
    pub fn carriers(&self, c: &Conn) -> Vec<usize> {
        let key = c.flow_key();
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                let p = n.pinned();
                p.flow(&key).is_some() || p.nat(&key).is_some()
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Node `i`'s table for the VIP `vip:80/tcp`, slot by slot, as backend addresses (from the
    /// pinned maps: the VIP's id, the ring and the members).
    pub fn ring(&self, i: usize, vip: &str) -> Vec<Option<IpAddr>> {
        let p = self.nodes[i].pinned();
        let (addr, family) = lb_userspace::model::desired::addr16(vip.parse().unwrap());
        let vips = p.vips().expect("reading the VIPs");
        let (_, v) = vips
            .iter()
            .find(|(k, _)| {
                k.addr == addr
                    && k.family == family
                    && u16::from_be(k.port) == 80
                    && k.proto == libc::IPPROTO_TCP as u8
            })
            .unwrap_or_else(|| panic!("node {} has no VIP {vip}:80/tcp", i + 1));
        (0..p.table_size(v))
            .map(|s| {
                p.member(p.ring_slot(v.id, s))
                    .map(|m| lb_userspace::model::desired::ip_of(&m.addr, m.family))
            })
            .collect()
    }
}

impl Drop for Ecmp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                a.kill9();
            }
            // In the node's namespace, where its routes are (the pins' own drop runs in ours,
            // and then finds nothing left to withdraw).
            let _ =
                n.ns.run(|| lb_userspace::agent::run::down(&n.dirs.pins, &n.dirs.state));
            n.bird = None;
        }
        self.router_bird = None;
        let _ = std::fs::remove_dir_all(&self.router_dir);
    }
}

/// Which node carries each stream (by index), from the nodes' maps; panics if a stream is held
/// by no node or by several.
pub fn carrier_of_each(lab: &Ecmp, conns: &[Conn]) -> Vec<usize> {
    conns
        .iter()
        .map(|c| match lab.carriers(c)[..] {
            [one] => one,
            ref other => panic!("{} is held by nodes {other:?}", c.local),
        })
        .collect()
}

/// The streams (by index) now held by a node other than the one in `before`: ECMP moved them
/// there, and that node balanced them (a flow entry; a NAT translation). The router's own view
/// cannot tell: its multipath hash here is the sending socket's random flow hash, which the
/// kernel carries across the namespaces (and renews on a retransmission timeout), not a hash
/// of the headers.
pub fn moved_since(lab: &Ecmp, conns: &[Conn], before: &[usize]) -> BTreeSet<usize> {
    (0..conns.len())
        .filter(|i| lab.carriers(&conns[*i]).iter().any(|n| *n != before[*i]))
        .collect()
}

/// How many streams each node carries.
pub fn per_node(carriers: &[usize], nodes: usize) -> BTreeMap<usize, usize> {
    let mut m: BTreeMap<usize, usize> = (0..nodes).map(|i| (i, 0)).collect();
    for c in carriers {
        *m.entry(*c).or_default() += 1;
    }
    m
}
