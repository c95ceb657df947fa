//! The lab a user builds from the README: a client, the load balancer and a backend, each in
//! its own namespace, joined by veth pairs, with nothing on the peers unless a test puts it
//! there (an XDP program, or GRO).
//!
//! ```text
//!  client c0 10.1.0.2 ── l0 10.1.0.1  [lb]  10.2.0.1 l1 ── b0 10.2.0.2 backend
//!         c0 10.1.0.3 (a second backend, on the client's segment)
//! ```
//!
//! Two NAT VIPs: [`VIA_L1`] (192.0.2.10:80) to 10.2.0.2:8080, behind the other interface (the
//! program redirects from l0 to l1 and back), and [`ONE_ARMED`] (192.0.2.20:80) to
//! 10.1.0.3:8080, on the segment it came from (the program sends it back out of l0: `XDP_TX`).
//! Each backend answers a connection with its name.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::programs::XdpMode;
use lb_userspace::kernel::program::Sizes;

use crate::{harness::Lb, netns::NetNs};

/// The VIP whose backend sits behind l1.
pub const VIA_L1: &str = "192.0.2.10:80";
/// The VIP whose backend sits on l0's segment.
pub const ONE_ARMED: &str = "192.0.2.20:80";

pub struct VethLab {
    pub client: NetNs,
    pub lb: NetNs,
    pub backend: NetNs,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// The object whose `lb_pass` runs on peers ([`VethLab::pass_on`]); dropped after the
    /// namespaces.
    pass: Option<Lb>,
}

impl VethLab {
    pub fn new() -> Self {
        let client = NetNs::new("vc");
        let lb = NetNs::new("vl");
        let backend = NetNs::new("vb");
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
            "l0",
            "netns",
            &lb.name,
        ]);
        crate::netns::ip(&[
            "link",
            "add",
            "l1",
            "netns",
            &lb.name,
            "type",
            "veth",
            "peer",
            "name",
            "b0",
            "netns",
            &backend.name,
        ]);
        client.script(
            "addr add 10.1.0.2/24 dev c0
             addr add 10.1.0.3/24 dev c0
             link set c0 up
             route add default via 10.1.0.1 src 10.1.0.2",
        );
        lb.script(
            "addr add 10.1.0.1/24 dev l0
             addr add 10.2.0.1/24 dev l1
             link set l0 up
             link set l1 up",
        );
        backend.script(
            "addr add 10.2.0.2/24 dev b0
             link set b0 up
             route add default via 10.2.0.1",
        );
        // README, Node prerequisites: forwarding, no reverse-path filter, and checksums
        // computed by the senders (a veth leaves them to "hardware", which XDP skips).
        lb.sysctl("net.ipv4.ip_forward", "1");
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0");
        lb.sysctl("net.ipv4.conf.all.accept_local", "1");
        client.exec("ethtool", &["-K", "c0", "tx", "off"]);
        backend.exec("ethtool", &["-K", "b0", "tx", "off"]);
        let mut lab = Self {
            client,
            lb,
            backend,
            stop: Arc::new(AtomicBool::new(false)),
            servers: vec![],
            pass: None,
        };
        lab.serve("10.2.0.2:8080", "b1", true);
        lab.serve("10.1.0.3:8080", "c1", false);
        lab
    }

    /// A server in the backend's namespace (or the client's) answering each connection with
    /// `name`.
    fn serve(&mut self, at: &str, name: &'static str, in_backend: bool) {
        let ns = if in_backend {
            &self.backend
        } else {
            &self.client
        };
        let at: SocketAddr = at.parse().unwrap();
        let l = ns.run(|| TcpListener::bind(at).expect("bind"));
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.servers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }));
    }

    /// The config of the lab's load balancer, `node_extra` being more lines of `node:`.
    pub fn config(node_extra: &str) -> String {
        format!(
            "node:
  interfaces: [l0, l1]
  source_v4: 10.2.0.1
  table_size: 1009
  max_vips: 4
  max_backends: 16
  flow_table_size: 4096
  affinity_table_size: 64
  nat_table_size: 4096
{node_extra}vips:
  - name: via-l1
    address: 192.0.2.10
    port: 80
    protocol: tcp
    mode: nat
    backends: [{{ address: 10.2.0.2, port: 8080 }}]
  - name: one-armed
    address: 192.0.2.20
    port: 80
    protocol: tcp
    mode: nat
    backends: [{{ address: 10.1.0.3, port: 8080 }}]
"
        )
    }

    /// Attaches `lb_pass` (which passes every frame) in native mode to the client's end (c0)
    /// and/or the backend's (b0).
    pub fn pass_on(&mut self, c0: bool, b0: bool) {
        let pass = self.pass.get_or_insert_with(|| {
            Lb::load(Sizes {
                table_size: 13,
                max_vips: 1,
                max_backends: 1,
                flow_table_size: 1,
                affinity_table_size: 1,
                nat_table_size: 1,
            })
        });
        for (on, ns, dev) in [(c0, &self.client, "c0"), (b0, &self.backend, "b0")] {
            if on {
                ns.run(|| {
                    pass.xdp("lb_pass")
                        .attach(dev, XdpMode::Driver)
                        .unwrap_or_else(|e| panic!("attaching lb_pass to {dev}: {e}"));
                });
            }
        }
    }

    /// Turns GRO on on the backend's end (b0).
    pub fn gro_on_b0(&self) {
        self.backend.exec("ethtool", &["-K", "b0", "gro", "on"]);
    }

    /// `n` TCP connections from the client to `vip`: how many got the backend's name (`want`),
    /// and the errors of the others.
    pub fn connect(&self, vip: &str, n: usize, want: &str) -> (usize, Vec<String>) {
        let vip: SocketAddr = vip.parse().unwrap();
        self.client.run(|| {
            let mut ok = 0;
            let mut errors = vec![];
            for _ in 0..n {
                let r = (|| -> std::io::Result<String> {
                    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    Ok(out)
                })();
                match r {
                    Ok(name) if name == want => ok += 1,
                    Ok(name) => errors.push(format!("answered by {name:?}")),
                    Err(e) => errors.push(e.kind().to_string()),
                }
            }
            (ok, errors)
        })
    }
}

impl Default for VethLab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for VethLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
    }
}
