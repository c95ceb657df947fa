//! `cargo xtask bench --only nat_peer`: lb's NAT forwarding rate on one core next to a measured
//! peer, kube-proxy's nftables NAT (the ruleset its nftables mode writes for a LoadBalancer IP:
//! `numgen random mod N` to per-endpoint `dnat to` chains, `masquerade fully-random`, conntrack),
//! forwarding the same frame on the same core in the same run.
//!
//! The rig is a loop, not a generator: a node namespace (`lb0`, the NAT address 10.0.0.1) and a
//! wire namespace (`up0`, the other end of the veth). Client and backends are both reached through
//! `lb0`, so a forwarder sends each frame it translates back to `up0`, where `lb_gen` (the bench's
//! generator, attached as an XDP program) overwrites it with the client's frame again and
//! transmits it back into `lb0` with `XDP_TX`. A population of frames injected once circulates
//! for as long as the forwarder keeps forwarding: nothing generates frames in user space, and the
//! kernel's live-frames mode (refused by some kernels) is not needed. Both veth ends run threaded
//! NAPI, each its own kernel thread pinned to the same CPU: the forwarder's whole work for a frame
//! (lb0's receive, the XDP program or the stack with conntrack, NAT and routing, the transmit
//! into up0's ring) runs in lb0's thread, the reflector's in up0's. The figure is frames forwarded
//! per second of lb0's thread's CPU time (`/proc/<pid>/schedstat`): one core's rate, whatever
//! else the machine runs.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use lb_common::{Counter, IPPROTO_UDP, MODE_NAT, VipValue};
use lb_userspace::kernel::program::Sizes;
use serde_json::{Value, json};

use crate::{
    bench::{Options, ethtool_stats, median, napi_threads, queue_sum},
    harness::{Lb, net::*, vip_key},
    netns::{NetNs, enter},
    packet::Pkt,
    raw::Raw,
};

/// The issue's acceptance: lb's NAT rate on one core at least this many times the peer's.
pub const TARGET_NAT_PEER_RATIO: f64 = 3.0;

const VIP: &str = "192.0.2.20";
const VIP_PORT: u16 = 53;
const CLIENT: &str = "198.51.100.1";
const CLIENT_PORT: u16 = 40000;
const BACKENDS: [&str; 4] = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];
const BACKEND_PORT: u16 = 8053;
/// The next hop towards clients and backends (its MAC is up0's).
const GW: &str = "10.0.0.2";
const UP0_MAC: &str = "02:00:00:00:00:02";
/// Frames injected into the loop: below a veth ring (256), so no ring can overflow.
const POPULATION: usize = 128;
/// Frames each round sends through the forwarder and captures on up0 to check them whole.
const SAMPLES: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fwd {
    /// lb's XDP program, a NAT VIP.
    Lb,
    /// No XDP: the node's stack with kube-proxy's nftables ruleset.
    Nft,
}

impl Fwd {
    fn name(self) -> &'static str {
        match self {
            Fwd::Lb => "lb",
            Fwd::Nft => "nftables",
        }
    }
}

/// kube-proxy's nftables ruleset (its `nftables` mode, as `nft list table ip kube-proxy` shows
/// it) for one UDP Service `bench/dns` with ClusterIP 10.96.0.10, the LoadBalancer IP `VIP` and
/// four ready endpoints, externalTrafficPolicy Cluster (traffic from outside is masqueraded).
/// Established packets meet the filter chains' `ct state new` tests and the NAT conntrack
/// recorded for their connection's first packet, as on a node.
fn kube_proxy_ruleset() -> String {
    let svc = "service-2LWKM7GA-bench/dns/udp/dns";
    let ext = "external-2LWKM7GA-bench/dns/udp/dns";
    let ep = |i: usize| {
        format!(
            "endpoint-{:08X}-bench/dns/udp/dns__{}/{BACKEND_PORT}",
            0x5EED_0000 + i,
            BACKENDS[i]
        )
    };
    let vmap: Vec<String> = (0..BACKENDS.len())
        .map(|i| format!("{i} : goto {}", ep(i)))
        .collect();
    let mut s = format!(
        r#"table ip kube-proxy {{
	comment "rules for kube-proxy"
	set cluster-ips {{ type ipv4_addr; comment "Active ClusterIPs"; elements = {{ 10.96.0.10 }} }}
	set nodeport-ips {{ type ipv4_addr; comment "IPs that accept NodePort traffic"; elements = {{ {NODE_V4} }} }}
	map no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; comment "vmap to drop or reject packets to services with no endpoints"; }}
	map no-endpoint-nodeports {{ type inet_proto . inet_service : verdict; comment "vmap to drop or reject packets to service nodeports with no endpoints"; }}
	map firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; comment "destinations that are subject to LoadBalancerSourceRanges"; }}
	map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"; elements = {{ 10.96.0.10 . udp . {VIP_PORT} : goto {svc}, {VIP} . udp . {VIP_PORT} : goto {ext} }} }}
	map service-nodeports {{ type inet_proto . inet_service : verdict; comment "NodePort traffic"; elements = {{ udp . 30053 : goto {ext} }} }}
	chain filter-prerouting {{ type filter hook prerouting priority dstnat - 10; policy accept; ct state new jump firewall-check; }}
	chain filter-input {{ type filter hook input priority -110; policy accept; ct state new jump nodeport-endpoints-check; ct state new jump service-endpoints-check; }}
	chain filter-forward {{ type filter hook forward priority -110; policy accept; ct state new jump service-endpoints-check; ct state new jump cluster-ips-check; }}
	chain filter-output {{ type filter hook output priority -110; policy accept; ct state new jump service-endpoints-check; ct state new jump firewall-check; }}
	chain filter-output-post-dnat {{ type filter hook output priority -90; policy accept; ct state new jump cluster-ips-check; }}
	chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}
	chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}
	chain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; }}
	chain firewall-check {{ ip daddr . meta l4proto . th dport vmap @firewall-ips; }}
	chain reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports"; reject; }}
	chain cluster-ips-check {{ ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"; ip daddr 10.96.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs"; }}
	chain service-endpoints-check {{ ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }}
	chain nodeport-endpoints-check {{ ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports; }}
	chain mark-for-masquerade {{ meta mark set meta mark | 0x00004000; }}
	chain masquerading {{ meta mark & 0x00004000 == 0x00000000 return; meta mark set meta mark ^ 0x00004000; masquerade fully-random; }}
	chain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports; }}
	chain {svc} {{ ip daddr 10.96.0.10 udp dport {VIP_PORT} ip saddr != 10.1.0.0/16 jump mark-for-masquerade; numgen random mod {n} vmap {{ {vmap} }}; }}
	chain {ext} {{ jump mark-for-masquerade comment "masquerade traffic from external sources"; goto {svc}; }}
"#,
        n = BACKENDS.len(),
        vmap = vmap.join(", "),
    );
    for (i, b) in BACKENDS.iter().enumerate() {
        s += &format!(
            "\tchain {} {{ ip saddr {b} jump mark-for-masquerade; meta l4proto udp dnat to {b}:{BACKEND_PORT}; }}\n",
            ep(i)
        );
    }
    s + "}\n"
}

/// Runs a command in namespace `ns` (through `ip netns exec`, which also shows the namespace's
/// own /sys), with `stdin`; panics with its output if it fails.
fn ns_exec(ns: &str, args: &[&str], stdin: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting");
    assert!(
        out.status.success(),
        "{} in {ns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// CPU time (ns) a thread has run, from `/proc/<pid>/schedstat`.
fn cpu_ns(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .unwrap_or_else(|e| panic!("schedstat of NAPI thread {pid}: {e}"));
    s.split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .expect("schedstat's first field")
}

/// Busy and total clock ticks of `cpu` (from /proc/stat).
fn cpu_ticks(cpu: usize) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .unwrap_or("");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The calling thread's namespace's IP counters (`/proc/thread-self/net/snmp`, `Ip:` line).
fn ip_mib() -> BTreeMap<String, u64> {
    let s = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("reading net/snmp");
    let ip: Vec<&str> = s.lines().filter(|l| l.starts_with("Ip:")).collect();
    assert_eq!(ip.len(), 2, "net/snmp: {s}");
    ip[0]
        .split_whitespace()
        .zip(ip[1].split_whitespace())
        .skip(1)
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// A raw socket that receives the frames arriving at an interface (not those it sends).
struct Capture {
    fd: i32,
}

impl Capture {
    fn new(dev: &str) -> Self {
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: plain socket calls on values owned here.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert_ne!(ifindex, 0, "no interface {dev}");
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto as u16;
            sa.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            );
            Self { fd }
        }
    }

    /// The next incoming frame, or None after a quiet 200 ms.
    fn next(&self, deadline: Instant) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: buffers owned here and sized as passed.
            let (n, sa) = unsafe {
                let mut sa: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sa as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                );
                (n, sa)
            };
            if n < 0 {
                continue;
            }
            if sa.sll_pkttype != libc::PACKET_OUTGOING {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
        None
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: the socket is ours.
        unsafe { libc::close(self.fd) };
    }
}

/// Ones'-complement sum of 16-bit words.
fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a forwarder made of the client's frame, checked whole: IPv4/UDP to a backend's port
/// from the node's NAT address, valid IP and UDP checksums, the payload untouched. Returns
/// (backend, NAT source port).
fn check_translated(who: &str, f: &[u8], sent: &[u8]) -> (String, u16) {
    let what = format!("{who}: frame at up0 {f:02x?}");
    assert!(
        f.len() >= 42 && f[12..14] == [8, 0] && f[23] == IPPROTO_UDP,
        "{what}: not IPv4/UDP"
    );
    let ihl = usize::from(f[14] & 0xf) * 4;
    let ip = &f[14..14 + ihl];
    assert_eq!(csum(&[ip]), 0, "{what}: bad IP checksum");
    let src = std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).to_string();
    let dst = std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).to_string();
    assert_eq!(src, NODE_V4, "{what}: source is not the node's NAT address");
    assert!(
        BACKENDS.contains(&dst.as_str()),
        "{what}: {dst} is not a backend"
    );
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let udp = &f[14 + ihl..14 + total];
    assert_eq!(
        u16::from_be_bytes([udp[2], udp[3]]),
        BACKEND_PORT,
        "{what}: destination port"
    );
    let pseudo = [&ip[12..20], &[0, IPPROTO_UDP], &udp[4..6]].concat();
    assert_eq!(csum(&[&pseudo, udp]), 0, "{what}: bad UDP checksum");
    assert_eq!(udp[8..], sent[42..], "{what}: payload changed");
    (dst, u16::from_be_bytes([udp[0], udp[1]]))
}

/// The rig: namespaces, the veth, the programs, the NAPI threads.
struct Rig {
    node: NetNs,
    wire: NetNs,
    lb: Lb,
    frame: Vec<u8>,
    cpu: usize,
    /// NAPI threads that existed before the rig (other namespaces' lb0 and up0).
    foreign: BTreeMap<u32, String>,
}

impl Rig {
    /// Called on the bench's control thread, which it leaves in the node namespace.
    fn new(cpu: usize) -> Self {
        let node = NetNs::new("natpeer");
        let wire = NetNs::new("natwire");
        let foreign = napi_threads();
        node.ip(&[
            "link",
            "add",
            "lb0",
            "address",
            "02:00:00:00:00:01",
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "address",
            UP0_MAC,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "netns",
            &wire.name,
        ]);
        // IPv4 only: neither end sends frames of its own (router solicitations, MLD).
        node.sysctl("net.ipv6.conf.lb0.disable_ipv6", "1");
        wire.sysctl("net.ipv6.conf.up0.disable_ipv6", "1");
        node.script(&format!(
            "link set lb0 up
             addr add {NODE_V4}/24 dev lb0
             neigh replace {GW} lladdr {UP0_MAC} dev lb0 nud permanent
             route add 10.1.0.0/16 via {GW} dev lb0
             route add 198.51.100.0/24 via {GW} dev lb0"
        ));
        wire.ip(&["link", "set", "up0", "up"]);
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            // Client and backends are both behind lb0: forwarding out of the interface a
            // packet came in on, without redirects, and no reverse-path check.
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.lb0.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.lb0.rp_filter", "0"),
            // A NIC verifies checksums on receive (CHECKSUM_UNNECESSARY); a veth's frames come
            // without, and conntrack would check every one in software: the peer is spared it.
            ("net.netfilter.nf_conntrack_checksum", "0"),
        ] {
            node.sysctl(k, v);
        }
        // NAPI on both ends without an XDP program (GRO asks for it), so that attaching and
        // detaching programs keeps the same NAPI instances, and threads, for the whole run.
        ns_exec(&node.name, &["ethtool", "-K", "lb0", "gro", "on"], "");
        ns_exec(&wire.name, &["ethtool", "-K", "up0", "gro", "on"], "");
        for (ns, dev) in [(&node, "lb0"), (&wire, "up0")] {
            ns_exec(
                &ns.name,
                &[
                    "sh",
                    "-c",
                    &format!("echo 1 > /sys/class/net/{dev}/threaded"),
                ],
                "",
            );
        }
        enter(&node.name);
        let mut lb = Lb::load(Sizes {
            table_size: 1009,
            max_vips: 2,
            max_backends: 8,
            flow_table_size: 1024,
            affinity_table_size: 64,
            nat_table_size: 1024,
        });
        lb.set_node(Some(NODE_V4), None, 3600 * 1_000_000_000);
        for (i, b) in BACKENDS.iter().enumerate() {
            lb.set_backend_port(i as u32, b, BACKEND_PORT, true);
        }
        lb.add_vip(
            vip_key(VIP, VIP_PORT, IPPROTO_UDP),
            VipValue {
                id: 0,
                flags: 0,
                affinity_timeout_s: 0,
                mode: MODE_NAT,
                table_size: 0,
            },
        );
        let n = BACKENDS.len() as u32;
        lb.set_ring(0, |s| s % n);
        lb.resolve_nexthops();
        // 64 bytes, the generator's template size: Ethernet, IPv4, UDP, 22 bytes of payload.
        let frame = Pkt::udp(CLIENT, CLIENT_PORT, VIP, VIP_PORT, LB0_MAC)
            .with(|p| p.payload = (0..22).collect())
            .frame();
        lb.set_gen_frame(&frame);
        let rig = Self {
            node,
            wire,
            lb,
            frame,
            cpu,
            foreign,
        };
        rig.napi();
        rig
    }

    /// lb0's and up0's NAPI threads (this rig's: not in `foreign`), pinned to the rig's CPU.
    fn napi(&self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let find = |dev: &str| -> Vec<u32> {
            napi_threads()
                .into_iter()
                .filter(|(pid, name)| {
                    !self.foreign.contains_key(pid) && name.starts_with(&format!("napi/{dev}-"))
                })
                .map(|(pid, _)| pid)
                .collect()
        };
        let (a, b) = loop {
            let (a, b) = (find("lb0"), find("up0"));
            if (a.len() == 1 && b.len() == 1) || Instant::now() > deadline {
                break (a, b);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            a.len() == 1 && b.len() == 1,
            "expected one NAPI thread each for lb0 and up0, found {a:?} and {b:?}"
        );
        for pid in [a[0], b[0]] {
            // SAFETY: a zeroed cpu_set_t with one bit set, for thread `pid`.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(self.cpu, &mut set);
                let r = libc::sched_setaffinity(pid as i32, size_of::<libc::cpu_set_t>(), &set);
                assert_eq!(
                    r,
                    0,
                    "pinning NAPI thread {pid}: {}",
                    std::io::Error::last_os_error()
                );
                // SCHED_BATCH: a woken thread waits for the running one to finish its poll (no
                // wakeup preemption), so frames move between the two in batches, as between
                // softirq NAPI polls, not one context switch per frame the stack transmits.
                let param = libc::sched_param { sched_priority: 0 };
                let r = libc::sched_setscheduler(pid as i32, libc::SCHED_BATCH, &param);
                assert_eq!(
                    r,
                    0,
                    "SCHED_BATCH for NAPI thread {pid}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        (a[0], b[0])
    }

    /// Every counter of both veth ends that could mean a lost frame.
    fn losses(&self) -> u64 {
        let l = ethtool_stats(&self.node.name, "lb0");
        let u = ethtool_stats(&self.wire.name, "up0");
        [&l, &u]
            .iter()
            .map(|s| {
                queue_sum(s, "rx", "drops")
                    + queue_sum(s, "rx", "xdp_drops")
                    + queue_sum(s, "rx", "xdp_tx_errors")
                    + queue_sum(s, "tx", "xdp_xmit_errors")
            })
            .sum()
    }

    /// The XDP program on lb0 while `fwd` forwards: lb, or for the peer `lb_pass` (`XDP_PASS`,
    /// two instructions): a veth wakes its peer's NAPI for the XDP frames it transmits only if
    /// the peer has a program (`veth_xdp_flush`), so without one up0's reflected frames would
    /// wait in lb0's ring. Each frame then goes to the stack as it would from a NIC's driver.
    fn program(fwd: Fwd) -> &'static str {
        match fwd {
            Fwd::Lb => "lb",
            Fwd::Nft => "lb_pass",
        }
    }

    fn start(&mut self, fwd: Fwd) -> aya::programs::xdp::XdpLinkId {
        if fwd == Fwd::Nft {
            ns_exec(&self.node.name, &["nft", "-f", "-"], &kube_proxy_ruleset());
        }
        self.lb
            .xdp(Self::program(fwd))
            .attach("lb0", aya::programs::XdpMode::Driver)
            .expect("attaching to lb0")
    }

    fn stop(&mut self, fwd: Fwd, link: aya::programs::xdp::XdpLinkId) {
        self.lb
            .xdp(Self::program(fwd))
            .detach(link)
            .expect("detaching from lb0");
        if fwd == Fwd::Nft {
            ns_exec(
                &self.node.name,
                &["nft", "delete", "table", "ip", "kube-proxy"],
                "",
            );
        }
    }

    /// Sends `SAMPLES` client frames from up0 (with `lb_pass` there, so nothing is reflected)
    /// and checks each frame the forwarder sent back. Returns (backend, NAT port) of the last.
    fn samples(&mut self, fwd: Fwd) -> (String, u16) {
        enter(&self.wire.name);
        let pass = self
            .lb
            .xdp("lb_pass")
            .attach("up0", aya::programs::XdpMode::Driver)
            .expect("attaching lb_pass to up0");
        let cap = Capture::new("up0");
        let tx = Raw::new("up0");
        let mut seen = Vec::new();
        for _ in 0..SAMPLES {
            tx.send(&self.frame);
            let f = cap
                .next(Instant::now() + Duration::from_secs(2))
                .unwrap_or_else(|| panic!("{}: a client frame was not forwarded", fwd.name()));
            seen.push(check_translated(fwd.name(), &f, &self.frame));
        }
        self.lb
            .xdp("lb_pass")
            .detach(pass)
            .expect("detaching lb_pass");
        enter(&self.node.name);
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "{}: one flow's frames were translated differently: {seen:?}",
            fwd.name()
        );
        seen.pop().unwrap()
    }

    /// One timed run of `fwd`: inject the population, let it circulate, measure a window, stop
    /// it; checks that every frame is accounted for.
    fn round(&mut self, fwd: Fwd, window: Duration) -> Value {
        let link = self.start(fwd);
        let (backend, nat_port) = self.samples(fwd);
        let (t_lb0, t_up0) = self.napi();
        let losses0 = self.losses();
        let l0 = ethtool_stats(&self.node.name, "lb0");
        let u0 = ethtool_stats(&self.wire.name, "up0");
        let mib0 = ip_mib();
        let c0 = self.lb.counters();
        enter(&self.wire.name);
        let reflector = self
            .lb
            .xdp("lb_gen")
            .attach("up0", aya::programs::XdpMode::Driver)
            .expect("attaching lb_gen to up0");
        let tx = Raw::new("up0");
        let injected = (0..POPULATION).filter(|_| tx.try_send(&self.frame)).count() as u64;
        enter(&self.node.name);
        // Warm up, then the window.
        std::thread::sleep(window / 4);
        let read = |rig: &Self| {
            let u = ethtool_stats(&rig.wire.name, "up0");
            (
                Instant::now(),
                queue_sum(&u, "rx", "xdp_packets"),
                cpu_ns(t_lb0),
                cpu_ns(t_up0),
                cpu_ticks(rig.cpu),
            )
        };
        let (w0, f0, a0, b0, k0) = read(self);
        std::thread::sleep(window);
        let (w1, f1, a1, b1, k1) = read(self);
        // Stop: lb_pass instead of lb_gen on up0, and one more frame, whose arrival at up0
        // wakes its NAPI for the frames in flight (a veth wakes its peer's NAPI for XDP frames
        // only while the peer has a program): all of them end in up0's stack (not for it).
        enter(&self.wire.name);
        self.lb
            .xdp("lb_gen")
            .detach(reflector)
            .expect("detaching lb_gen");
        let pass = self
            .lb
            .xdp("lb_pass")
            .attach("up0", aya::programs::XdpMode::Driver)
            .expect("attaching lb_pass to up0");
        tx.send(&self.frame);
        let injected = injected + 1;
        enter(&self.node.name);
        std::thread::sleep(Duration::from_millis(50));
        let l1 = ethtool_stats(&self.node.name, "lb0");
        let u1 = ethtool_stats(&self.wire.name, "up0");
        let mib1 = ip_mib();
        let c1 = self.lb.counters();
        let conntrack =
            std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap_or_default();
        enter(&self.wire.name);
        self.lb
            .xdp("lb_pass")
            .detach(pass)
            .expect("detaching lb_pass");
        enter(&self.node.name);
        self.stop(fwd, link);
        let d = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, dir: &str, k: &str| {
            queue_sum(b, dir, k) - queue_sum(a, dir, k)
        };
        let at_up0 = d(&u0, &u1, "rx", "xdp_packets");
        let reflected = d(&u0, &u1, "rx", "xdp_tx");
        let at_lb0 = d(&l0, &l1, "rx", "xdp_packets");
        let frames = f1 - f0;
        // What changed, for the failure messages.
        let changed =
            |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
                b.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.checked_sub(*a.get(k)?)?)))
                    .filter(|(_, v)| *v != 0)
                    .collect()
            };
        let what = format!(
            "{}: injected {injected}, {at_up0} frames reached up0, {reflected} reflected, lb0 received {at_lb0} through NAPI, window {frames} frames; lb0 {:?}; up0 {:?}; IP {:?}",
            fwd.name(),
            changed(&l0, &l1),
            changed(&u0, &u1),
            changed(&mib0, &mib1),
        );
        assert_eq!(
            injected,
            POPULATION as u64 + 1,
            "{what}: up0 refused injected frames"
        );
        assert_eq!(
            self.losses(),
            losses0,
            "{what}: frames lost at a veth (drops or refused XDP frames)"
        );
        assert!(frames >= 1000, "{what}: the loop did not keep circulating");
        // Every frame the forwarder sent reached up0, and was translated (counters below).
        let forwarded = match fwd {
            Fwd::Lb => {
                let dc = |c: Counter| c1[&c] - c0[&c];
                // Injected frames come through the stack's transmit (skbs), reflected ones as
                // XDP frames: lb0's NAPI receives both, and lb runs on each.
                assert_eq!(at_lb0, injected + reflected, "{what}: frames into lb0");
                assert_eq!(dc(Counter::Packets), at_lb0, "{what}: lb's packets counter");
                assert_eq!(
                    dc(Counter::NatForward),
                    at_lb0,
                    "{what}: lb did not translate every frame"
                );
                assert_eq!(
                    dc(Counter::Tx),
                    at_lb0,
                    "{what}: lb did not transmit every frame"
                );
                dc(Counter::Tx)
            }
            Fwd::Nft => {
                let fwd_dgrams = mib1["ForwDatagrams"] - mib0["ForwDatagrams"];
                // Injected and reflected frames both come through lb0's NAPI (lb_pass), and the
                // stack forwards each.
                assert_eq!(at_lb0, injected + reflected, "{what}: frames into lb0");
                assert_eq!(
                    fwd_dgrams,
                    injected + reflected,
                    "{what}: the node's IP forwarded {fwd_dgrams}"
                );
                // One conntrack entry for the client's flow, its reply tuple from the backend
                // the samples went to, to the node's address: NAT applies to its every packet.
                let ours: Vec<&str> = conntrack
                    .lines()
                    .filter(|l| {
                        l.contains(&format!(
                            "src={CLIENT} dst={VIP} sport={CLIENT_PORT} dport={VIP_PORT}"
                        ))
                    })
                    .collect();
                assert_eq!(ours.len(), 1, "{what}: conntrack: {conntrack}");
                assert!(
                    ours[0].contains(&format!(
                        "src={backend} dst={NODE_V4} sport={BACKEND_PORT} dport={nat_port}"
                    )),
                    "{what}: conntrack entry {} is not the samples' translation (to {backend}, port {nat_port})",
                    ours[0]
                );
                fwd_dgrams
            }
        };
        // Every frame forwarded reached up0. Those the stack sends while up0 has no program
        // (between lb_gen and lb_pass, at most the frames in flight) take up0's receive without
        // NAPI, uncounted there.
        assert!(
            forwarded >= at_up0 && forwarded - at_up0 <= injected,
            "{what}: {forwarded} frames forwarded, {at_up0} at up0"
        );
        let (fwd_ns, refl_ns) = (a1 - a0, b1 - b0);
        let wall = (w1 - w0).as_secs_f64();
        let per_s = |ns: u64| frames as f64 * 1e9 / ns.max(1) as f64;
        json!({
            "forwarder": fwd.name(),
            "frames": frames,
            "window_s": wall,
            "forwarder_cpu_s": fwd_ns as f64 / 1e9,
            "reflector_cpu_s": refl_ns as f64 / 1e9,
            "pps_per_core": per_s(fwd_ns),
            "loop_pps_per_core": per_s(fwd_ns + refl_ns),
            "wall_pps": frames as f64 / wall,
            "cpu_busy_share": (k1.0 - k0.0) as f64 / (k1.1 - k0.1).max(1) as f64,
            "forwarded_in_round": forwarded,
            "sample": {"backend": backend, "nat_port": nat_port},
        })
    }
}

/// Median, lowest and highest of `v`.
fn spread(v: &[f64]) -> Value {
    let mut s: Vec<u64> = v.iter().map(|x| *x as u64).collect();
    let m = median(&mut s);
    json!({"median": m, "min": s[0], "max": s[s.len() - 1]})
}

/// lb's and the nftables peer's NAT forwarding rates on one core, alternating over the rounds.
pub fn nat_peer(opts: &Options) -> Value {
    let cpus = crate::bench::online_cpus();
    let cpu = cpus - 1;
    let window = Duration::from_millis(opts.peer_window_ms);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The control thread stays off the loop's CPU (where it can).
            if cpus > 1 {
                crate::harness::pin_to_cpu(0);
            }
            let mut rig = Rig::new(cpu);
            let mut rounds = Vec::new();
            let mut rates: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            for r in 0..opts.rounds {
                // Alternate which goes first, so neither always follows the other.
                let order = if r % 2 == 0 { [Fwd::Lb, Fwd::Nft] } else { [Fwd::Nft, Fwd::Lb] };
                for fwd in order {
                    let v = rig.round(fwd, window);
                    let e = rates.entry(fwd.name()).or_default();
                    e.0.push(v["pps_per_core"].as_f64().unwrap());
                    e.1.push(v["loop_pps_per_core"].as_f64().unwrap());
                    rounds.push(v);
                }
            }
            let med = |k: &str, loop_: bool| {
                let (a, b) = &rates[k];
                spread(if loop_ { b } else { a })
            };
            let lb = med("lb", false);
            let nft = med("nftables", false);
            let ratio = lb["median"].as_f64().unwrap() / nft["median"].as_f64().unwrap().max(1.0);
            let (lb_loop, nft_loop) = (med("lb", true), med("nftables", true));
            let loop_ratio = lb_loop["median"].as_f64().unwrap() / nft_loop["median"].as_f64().unwrap().max(1.0);
            drop(rig);
            json!({
                "lb_pps": lb,
                "nftables_pps": nft,
                "ratio": ratio,
                "target_ratio": TARGET_NAT_PEER_RATIO,
                "met": ratio >= TARGET_NAT_PEER_RATIO,
                "loop": {"lb_pps": lb_loop, "nftables_pps": nft_loop, "ratio": loop_ratio},
                "rounds": rounds,
                "method": {
                    "cpu": cpu,
                    "rounds": opts.rounds,
                    "window_ms": opts.peer_window_ms,
                    "population": POPULATION,
                    "frame": "64-byte UDP frame of one established client flow to a NAT VIP (4 backends)",
                    "figure": "frames forwarded per second of CPU time of lb0's NAPI thread (schedstat): the forwarder's whole per-frame work on one core; loop figures add the reflector's thread (up0, lb_gen)",
                    "peer": "kube-proxy nftables-mode ruleset (LoadBalancer IP, numgen random mod 4 vmap to dnat chains, masquerade fully-random), conntrack on, nf_conntrack_checksum=0",
                },
            })
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The line `cargo xtask bench` prints for the section.
pub fn table(v: &Value) -> String {
    let n = |x: &Value| x["median"].as_u64().unwrap_or(0);
    let r = |x: &Value| {
        format!(
            "{}..{}",
            x["min"].as_u64().unwrap_or(0),
            x["max"].as_u64().unwrap_or(0)
        )
    };
    let ratio = v["ratio"].as_f64().unwrap_or(0.0);
    format!(
        "NAT forwarding, one core (frames per CPU-second of the forwarding NAPI thread): lb {} pps ({}), nftables peer {} pps ({}), ratio {ratio:.2} (target >= {TARGET_NAT_PEER_RATIO}: {})\n  \
         with the reflector's thread: lb {} pps, nftables {} pps, ratio {:.2}\n",
        n(&v["lb_pps"]),
        r(&v["lb_pps"]),
        n(&v["nftables_pps"]),
        r(&v["nftables_pps"]),
        crate::bench::mark(ratio >= TARGET_NAT_PEER_RATIO),
        n(&v["loop"]["lb_pps"]),
        n(&v["loop"]["nftables_pps"]),
        v["loop"]["ratio"].as_f64().unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_valid_header_is_zero() {
        let f = Pkt::udp(CLIENT, CLIENT_PORT, VIP, VIP_PORT, LB0_MAC).frame();
        assert_eq!(csum(&[&f[14..34]]), 0);
    }

    #[test]
    fn ruleset_has_an_endpoint_chain_per_backend() {
        let r = kube_proxy_ruleset();
        assert!(r.contains("numgen random mod 4 vmap"));
        for b in BACKENDS {
            assert!(r.contains(&format!("dnat to {b}:{BACKEND_PORT}")), "{r}");
        }
    }
}
