//! A small live network: a client, the load balancer and two DSR backends in their own namespaces,
//! with the XDP program attached for real. One backend sits on the client's segment (the program
//! answers with `XDP_TX`), the other behind a second interface (`XDP_REDIRECT`).
//!
//! ```text
//!  client 10.10.0.2 fd10::2 ─┐
//!                            ├─ switch (bridge) ── l0 [XDP lb] load balancer l1 ── backend b1 10.20.0.2 fd20::2
//!  backend b2 10.10.0.3 ─────┘       10.10.0.1 fd10::1            10.20.0.1 fd20::1
//! ```
//!
//! Backends decapsulate with lb's own XDP program (`lb_decap`: this kernel, like many minimal ones,
//! has no IPIP or IPv6 tunnel devices), own the VIPs on loopback and answer the client directly.
//! Everything is torn down on drop.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::programs::XdpMode;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, MODE_DSR, VipValue};
use lb_userspace::kernel::program::Sizes;

use crate::{
    harness::{Lb, vip_key},
    netns::NetNs,
};

pub const VIP4: &str = "192.0.2.10";
pub const VIP6: &str = "2001:db8::10";
pub const PORT: u16 = 80;

/// (name, IPv4, IPv6) of each backend.
pub const BACKENDS: [(&str, &str, &str); 2] = [
    ("b1", "10.20.0.2", "fd20::2"),
    ("b2", "10.10.0.3", "fd10::3"),
];

pub struct MiniLab {
    pub lb: Lb,
    // Namespaces are dropped (deleted) after the program: keep this field order.
    pub client: NetNs,
    pub lbns: NetNs,
    pub backends: Vec<NetNs>,
    pub switch: NetNs,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl MiniLab {
    pub fn new() -> Self {
        let switch = NetNs::new("sw");
        let client = NetNs::new("cl");
        let lbns = NetNs::new("lb");
        let b1 = NetNs::new("b1");
        let b2 = NetNs::new("b2");
        let (sw, cl, lbn) = (&switch.name, &client.name, &lbns.name);
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        for (peer_ns, dev, port) in [
            (cl, "c0", "swc"),
            (lbn, "l0", "swl"),
            (&b2.name, "b0", "swb2"),
        ] {
            crate::netns::ip(&[
                "link", "add", dev, "netns", peer_ns, "type", "veth", "peer", "name", port,
                "netns", sw,
            ]);
            switch.ip(&["link", "set", port, "master", "br0"]);
            switch.ip(&["link", "set", port, "up"]);
        }
        crate::netns::ip(&[
            "link", "add", "l1", "netns", lbn, "type", "veth", "peer", "name", "b0", "netns",
            &b1.name,
        ]);

        client.script(
            "addr add 10.10.0.2/24 dev c0
             addr add fd10::2/64 dev c0 nodad
             link set c0 up
             route add 192.0.2.0/24 via 10.10.0.1
             route add 2001:db8::/64 via fd10::1",
        );
        // A veth leaves TCP/UDP checksums for "hardware" to fill in, and that promise is lost when
        // XDP transmits the frame: the backend would drop it as corrupt. A real NIC fills them in;
        // here the client must compute them itself.
        client.exec("ethtool", &["-K", "c0", "tx", "off"]);
        lbns.script(
            "addr add 10.10.0.1/24 dev l0
             addr add fd10::1/64 dev l0 nodad
             addr add 10.20.0.1/24 dev l1
             addr add fd20::1/64 dev l1 nodad
             link set l0 up
             link set l1 up",
        );
        lbns.sysctl("net.ipv4.ip_forward", "1");
        // Until a backend's neighbour is known the program hands the encapsulated packet to the
        // kernel, which must forward it (and so resolve the neighbour) although its source is a
        // local address: accept_local allows that, and rp_filter would refuse it.
        lbns.sysctl("net.ipv4.conf.all.accept_local", "1");
        lbns.sysctl("net.ipv4.conf.all.rp_filter", "0");
        lbns.sysctl("net.ipv4.conf.l0.rp_filter", "0");
        lbns.sysctl("net.ipv6.conf.all.forwarding", "1");
        for (ns, (_, v4, v6), gw4, gw6) in [
            (&b1, BACKENDS[0], "10.20.0.1", "fd20::1"),
            (&b2, BACKENDS[1], "10.10.0.1", "fd10::1"),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "b0"]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "b0", "nodad"]);
            ns.ip(&["link", "set", "b0", "up"]);
            if ns.name == b1.name {
                ns.ip(&["route", "add", "default", "via", gw4]);
                ns.ip(&["route", "add", "default", "via", gw6]);
            } else {
                ns.ip(&["route", "add", "10.20.0.0/24", "via", gw4]);
            }
            ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
            ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"]);
            for k in ["all", "default", "b0"] {
                ns.sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0");
            }
        }

        let mut lb = Lb::load(Sizes {
            table_size: 1009,
            max_vips: 4,
            max_backends: 16,
            flow_table_size: 65536,
            affinity_table_size: 1024,
            nat_table_size: 1024,
        });
        lb.set_node(Some("10.10.0.1"), Some("fd10::1"), 0);
        for (i, (_, v4, v6)) in BACKENDS.iter().enumerate() {
            lb.set_backend(1 + i as u32, v4, true);
            lb.set_backend(11 + i as u32, v6, true);
        }
        for (id, (addr, proto, base)) in [
            (VIP4, IPPROTO_TCP, 1),
            (VIP4, IPPROTO_UDP, 1),
            (VIP6, IPPROTO_TCP, 11),
            (VIP6, IPPROTO_UDP, 11),
        ]
        .into_iter()
        .enumerate()
        {
            let id = id as u32;
            lb.add_vip(
                vip_key(addr, PORT, proto),
                VipValue {
                    id,
                    flags: 0,
                    affinity_timeout_s: 0,
                    mode: MODE_DSR,
                    table_size: 0,
                },
            );
            lb.set_ring(id, |s| base + s % 2);
        }
        lbns.run(|| {
            lb.add_tx_port(lbns.ifindex("l1"));
            attach(&mut lb, "lb", "l0");
        });
        // The peer that receives XDP_TX frames needs NAPI: give it a pass program. The backends'
        // decap programs do the same for the redirect target's peer.
        switch.run(|| attach(&mut lb, "lb_pass", "swl"));
        b1.run(|| attach(&mut lb, "lb_decap", "b0"));
        b2.run(|| attach(&mut lb, "lb_decap", "b0"));

        let mut lab = Self {
            lb,
            client,
            lbns,
            backends: vec![b1, b2],
            switch,
            stop: Arc::new(AtomicBool::new(false)),
            servers: vec![],
        };
        lab.start_servers();
        lab
    }

    fn start_servers(&mut self) {
        for (ns, (name, _, _)) in self.backends.iter().zip(BACKENDS) {
            for vip in [VIP4, VIP6] {
                let addr = SocketAddr::new(vip.parse().unwrap(), PORT);
                let (tcp, udp) = ns.run(|| {
                    (
                        TcpListener::bind(addr).expect("bind tcp"),
                        UdpSocket::bind(addr).expect("bind udp"),
                    )
                });
                tcp.set_nonblocking(true).unwrap();
                udp.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let stop = self.stop.clone();
                self.servers.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        match tcp.accept() {
                            Ok((mut s, _)) => {
                                s.set_nonblocking(false).unwrap();
                                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                                let _ = s.read(&mut buf);
                                let _ = s.write_all(name.as_bytes());
                            }
                            Err(_) => {
                                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                                    let _ = udp.send_to(name.as_bytes(), from);
                                }
                            }
                        }
                    }
                }));
            }
        }
    }

    /// Opens `n` TCP connections from the client to `vip` and counts who answered
    /// (`"error: ..."` keys count failures).
    pub fn tcp_tally(&self, vip: &str, n: usize) -> BTreeMap<String, usize> {
        let addr = SocketAddr::new(vip.parse::<IpAddr>().unwrap(), PORT);
        self.client.run(|| {
            let mut tally = BTreeMap::new();
            for _ in 0..n {
                let who = (|| -> std::io::Result<String> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"who?")?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    Ok(out)
                })()
                .unwrap_or_else(|e| format!("error: {}", e.kind()));
                *tally.entry(who).or_insert(0) += 1;
            }
            tally
        })
    }

    /// Sends `n` UDP datagrams, each from a new socket (a new source port), and counts who answered.
    pub fn udp_tally(&self, vip: &str, n: usize) -> BTreeMap<String, usize> {
        let addr = SocketAddr::new(vip.parse::<IpAddr>().unwrap(), PORT);
        let any: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .unwrap();
        self.client.run(|| {
            let mut tally = BTreeMap::new();
            for _ in 0..n {
                let who = (|| -> std::io::Result<String> {
                    let s = UdpSocket::bind(any)?;
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    // A first datagram may wait in the kernel for neighbour resolution: retry once.
                    let mut buf = [0u8; 64];
                    for attempt in 0..3 {
                        s.send_to(b"who?", addr)?;
                        match s.recv(&mut buf) {
                            Ok(len) => return Ok(String::from_utf8_lossy(&buf[..len]).into_owned()),
                            Err(e) if attempt == 2 => return Err(e),
                            Err(_) => {}
                        }
                    }
                    unreachable!()
                })()
                .unwrap_or_else(|e| format!("error: {}", e.kind()));
                *tally.entry(who).or_insert(0) += 1;
            }
            tally
        })
    }
}

impl Default for MiniLab {
    fn default() -> Self {
        Self::new()
    }
}

fn attach(lb: &mut Lb, program: &str, dev: &str) {
    lb.xdp(program)
        .attach(dev, XdpMode::Driver)
        .unwrap_or_else(|e| {
            panic!(
                "attaching {program} to {dev}: {}",
                crate::harness::error_chain(&e)
            )
        });
}

impl Drop for MiniLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
    }
}
