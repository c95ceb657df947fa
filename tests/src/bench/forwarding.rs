//! Forwarding: live frames through real NIC queues (veth), packets per second per core.

use super::*;

/// Every `ethtool -S` counter of `dev` in namespace `ns`.
pub(crate) fn ethtool_stats(ns: &str, dev: &str) -> BTreeMap<String, u64> {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-S", dev])
        .output()
        .expect("ethtool -S");
    assert!(
        o.status.success(),
        "ethtool -S {dev}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Sum over the queues of a per-queue veth counter (`rx_queue_0_xdp_tx` + `rx_queue_1_xdp_tx`
/// for `("rx", "xdp_tx")`).
pub(crate) fn queue_sum(stats: &BTreeMap<String, u64>, dir: &str, key: &str) -> u64 {
    stats
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(&format!("{dir}_queue_"))
                .and_then(|r| r.split_once('_'))
                .is_some_and(|(q, rest)| q.parse::<u32>().is_ok() && rest == key)
        })
        .map(|(_, v)| v)
        .sum()
}

/// Per-CPU figures of the host: NET_RX softirqs run, and the CPU time (clock ticks) of each
/// `ksoftirqd/N`, to see where the veths' NAPI ran.
fn softirq_snapshot() -> (Vec<u64>, Vec<u64>) {
    let net_rx = std::fs::read_to_string("/proc/softirqs")
        .unwrap_or_default()
        .lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let cpus = online_cpus();
    let ksoftirqd = (0..cpus)
        .map(|c| {
            let comm = format!("ksoftirqd/{c}");
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .find(|e| {
                    std::fs::read_to_string(e.path().join("comm")).is_ok_and(|s| s.trim() == comm)
                })
                .and_then(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .map(|s| {
                    let f: Vec<&str> = s
                        .rsplit_once(')')
                        .map(|x| x.1)
                        .unwrap_or("")
                        .split_whitespace()
                        .collect();
                    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                })
                .unwrap_or(0)
        })
        .collect();
    (net_rx, ksoftirqd)
}

/// Threads of the kernel's threaded NAPI (`napi/<dev>-<napi id>`), pid and name.
pub(crate) fn napi_threads() -> BTreeMap<u32, String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with("napi/")
                .then(|| (pid, comm.trim().to_string()))
        })
        .collect()
}

/// Pins the NAPI threads of `dev` that appeared since `before` (queue `q`'s to CPU `q %
/// cpus`: ids are given in queue order) and makes them SCHED_FIFO, so that a frame put in a
/// queue's ring is processed on that CPU before the generator there runs again.
fn pin_new_napi_threads(before: &BTreeMap<u32, String>, dev: &str, queues: usize) {
    let prefix = format!("napi/{dev}-");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ours: Vec<(u64, u32)> = loop {
        let v: Vec<(u64, u32)> = napi_threads()
            .into_iter()
            .filter(|(pid, _)| !before.contains_key(pid))
            .filter_map(|(pid, name)| Some((name.strip_prefix(&prefix)?.parse().ok()?, pid)))
            .collect();
        if v.len() >= queues || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        ours.len(),
        queues,
        "{dev}: expected {queues} new NAPI threads, found {ours:?}"
    );
    ours.sort_unstable();
    let cpus = online_cpus();
    for (q, (_, pid)) in ours.iter().enumerate() {
        // SAFETY: a zeroed cpu_set_t with one bit set, and a sched_param, for thread `pid`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(q % cpus, &mut set);
            let r =
                libc::sched_setaffinity(*pid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set);
            assert_eq!(
                r,
                0,
                "pinning {dev}'s NAPI thread {pid}: {}",
                std::io::Error::last_os_error()
            );
            let param = libc::sched_param { sched_priority: 50 };
            let r = libc::sched_setscheduler(*pid as i32, libc::SCHED_FIFO, &param);
            assert_eq!(
                r,
                0,
                "SCHED_FIFO for {dev}'s NAPI thread {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Turns on threaded NAPI for `dev` (in namespace `ns`).
fn set_threaded_napi(ns: &str, dev: &str) {
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{dev}/threaded"),
        ])
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "threaded NAPI on {dev}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// What one live-frames run did, from the veths' own counters (`ethtool -S`, summed over
/// queues) and lb's: every generated frame is either put in lb0's ring or refused there (full),
/// every frame in the ring is run through lb0's program, and each `XDP_TX` is sent or refused.
#[derive(Debug)]
struct LiveRound {
    wall: Duration,
    /// Frames up0 put in lb0's rings (up0's `tx_queue_N_xdp_xmit`).
    enqueued: u64,
    /// Frames lb0's full rings refused, lost before any program on lb0 ran (up0's
    /// `tx_queue_N_xdp_xmit_errors`).
    ring_full: u64,
    /// Frames lb0's program ran on (lb0's `rx_queue_N_xdp_packets`).
    ran: u64,
    /// `XDP_TX` frames lb0 sent, and those up0's full rings refused.
    forwarded: u64,
    refused: u64,
    /// lb's own `packets` and `tx` counters, by CPU (empty for the floor, which counts nothing).
    lb_packets_by_cpu: Vec<u64>,
    lb_tx: u64,
    /// NET_RX softirqs and ksoftirqd CPU ticks by CPU during the run (host-wide).
    net_rx: Vec<u64>,
    ksoftirqd: Vec<u64>,
}

/// Generates `frames` frames with `lb_gen` on up0, split over one thread per CPU in `cpus`,
/// and waits until lb0 has run its program on every frame that reached its rings.
fn live_round(
    lb: &mut Lb,
    ns: &str,
    up0: u32,
    frame: &[u8],
    frames: u32,
    cpus: &[usize],
    counted: bool,
) -> LiveRound {
    let lb0_0 = ethtool_stats(ns, "lb0");
    let up0_0 = ethtool_stats(ns, "up0");
    let (rx0, ks0) = softirq_snapshot();
    let c0 = lb.per_cpu_counters(&[Counter::Packets, Counter::Tx]);
    let generator: &aya::programs::Xdp = lb.xdp("lb_gen");
    let per = frames / cpus.len() as u32;
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let hs: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                s.spawn(move || {
                    crate::netns::enter(ns);
                    crate::harness::pin_to_cpu(cpu);
                    let t = Instant::now();
                    crate::harness::test_run_live(generator, frame, up0, per);
                    (t, Instant::now())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("generator thread"))
            .collect()
    });
    let wall = spans.iter().map(|x| x.1).max().unwrap() - spans.iter().map(|x| x.0).min().unwrap();
    let delta = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, dir: &str, key: &str| {
        queue_sum(b, dir, key) - queue_sum(a, dir, key)
    };
    // The last frames may still be in the rings when the generators return.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (lb0_1, up0_1) = loop {
        let (l, u) = (ethtool_stats(ns, "lb0"), ethtool_stats(ns, "up0"));
        if delta(&lb0_0, &l, "rx", "xdp_packets") >= delta(&up0_0, &u, "tx", "xdp_xmit")
            || Instant::now() > deadline
        {
            break (l, u);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (rx1, ks1) = softirq_snapshot();
    let c1 = lb.per_cpu_counters(&[Counter::Packets, Counter::Tx]);
    let sub = |a: &[u64], b: &[u64]| b.iter().zip(a).map(|(b, a)| b - a).collect::<Vec<u64>>();
    LiveRound {
        wall,
        enqueued: delta(&up0_0, &up0_1, "tx", "xdp_xmit"),
        ring_full: delta(&up0_0, &up0_1, "tx", "xdp_xmit_errors"),
        ran: delta(&lb0_0, &lb0_1, "rx", "xdp_packets"),
        forwarded: delta(&lb0_0, &lb0_1, "rx", "xdp_tx"),
        refused: delta(&lb0_0, &lb0_1, "rx", "xdp_tx_errors"),
        lb_packets_by_cpu: if counted { sub(&c0[0], &c1[0]) } else { vec![] },
        lb_tx: if counted {
            sub(&c0[1], &c1[1]).iter().sum()
        } else {
            0
        },
        net_rx: sub(&rx0, &rx1),
        ksoftirqd: sub(&ks0, &ks1),
    }
}

/// The checks every live round must pass; returns the round's rate.
fn check_live_round(name: &str, r: &LiveRound, frames: u64, cpus: &[usize]) -> u64 {
    let what = format!("{name}: {r:?}");
    assert_eq!(
        r.enqueued + r.ring_full,
        frames,
        "{what}: generated frames unaccounted for at up0"
    );
    assert_eq!(
        r.ran, r.enqueued,
        "{what}: frames put in lb0's rings but never run through its program"
    );
    assert_eq!(
        r.ring_full, 0,
        "{what}: lb0's rings overflowed (frames lost before XDP)"
    );
    assert_eq!(
        r.refused, 0,
        "{what}: up0's rings refused lb0's XDP_TX frames"
    );
    assert_eq!(r.forwarded, frames, "{what}: not every frame was forwarded");
    if !r.lb_packets_by_cpu.is_empty() {
        assert_eq!(
            r.lb_packets_by_cpu.iter().sum::<u64>(),
            r.ran,
            "{what}: lb's packets counter"
        );
        assert_eq!(r.lb_tx, r.forwarded, "{what}: lb's tx counter");
        for (cpu, n) in r.lb_packets_by_cpu.iter().enumerate() {
            let want = if cpus.contains(&cpu) {
                frames / cpus.len() as u64
            } else {
                0
            };
            assert_eq!(
                *n, want,
                "{what}: lb ran on {n} frames on CPU {cpu} (generators on {cpus:?})"
            );
        }
    }
    (r.forwarded as f64 / r.wall.as_secs_f64()) as u64
}

/// The forwarding bench's program: a DSR VIP on one backend reached through lb0, with lb_pass on
/// up0 (a veth only takes XDP frames when its peer runs NAPI) and the NAPI of up0 threaded and
/// pinned. Returns it with the generator's frame (an ACK of an established flow).
fn forwarding_setup(ns: &str, ingress: u32, queues: usize) -> (Lb, Vec<u8>) {
    let mut lb = Lb::load(Sizes {
        table_size: 1009,
        max_vips: 2,
        max_backends: 8,
        flow_table_size: 1024,
        affinity_table_size: 64,
        nat_table_size: 64,
    });
    lb.set_node(Some(NODE_V4), None, 0);
    lb.set_backend(0, TX_V4, true);
    lb.add_vip(
        vip_key("192.0.2.10", 80, IPPROTO_TCP),
        VipValue {
            id: 0,
            flags: 0,
            affinity_timeout_s: 0,
            mode: MODE_DSR,
            table_size: 0,
        },
    );
    lb.set_ring(0, |_| 0);
    lb.resolve_nexthops();
    let before = napi_threads();
    lb.xdp("lb_pass")
        .attach("up0", aya::programs::XdpMode::Driver)
        .expect("attaching lb_pass to up0");
    set_threaded_napi(ns, "up0");
    pin_new_napi_threads(&before, "up0", queues);
    let syn =
        Pkt::tcp("198.51.100.1", 1111, "192.0.2.10", 80, LB0_MAC).with(|p| p.payload = vec![7; 10]);
    lb.run(&syn.frame(), ingress);
    let frame = syn.with(|p| p.l4 = L4::Tcp { flags: TCP_ACK }).frame();
    lb.set_gen_frame(&frame);
    (lb, frame)
}

/// Median (min, max) rate of each run, its ratio to the floor, and two cores over one.
fn forwarding_figures(pps: &BTreeMap<&str, Vec<u64>>) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let med = |k: &str| median(&mut pps[k].clone());
    let (floor, one_core) = (med("floor"), med("lb"));
    for (name, v) in pps {
        let mut v = v.clone();
        let m = median(&mut v);
        let key = match *name {
            "lb" => "lb_established_v4",
            "floor" => "floor",
            _ => "lb_established_v4_2cores",
        };
        out.insert(key.into(), json!({"pps": m, "min": v[0], "max": v[v.len() - 1], "ratio_to_floor": m as f64 / floor.max(1) as f64}));
    }
    out.insert(
        "ratio_2cores_to_1core".into(),
        json!(med("lb_2cores") as f64 / one_core.max(1) as f64),
    );
    out
}

/// Packets per second forwarded by one core, and by two: `lb_gen` in live-frames mode sends a
/// pristine frame of an established flow out of up0 for every frame (restoring it from a
/// template, since recycled pages come back encapsulated); the program attached to lb0 (`lb`,
/// or the floor) forwards it with `XDP_TX` back to up0, where `lb_pass` hands it to the stack.
/// lb0 and up0 have a queue per CPU; a veth puts an XDP frame in the peer queue of the sending CPU
/// and their NAPI runs threaded, each queue's thread pinned to its CPU with real-time priority:
/// so a generator's CPU also runs the whole path of its frames, and processes each batch before
/// it generates the next (nothing is lost to a full ring). The rate is the generator's, lb0's
/// and up0's work together; the ratio to the floor is the figure to compare.
pub fn forwarding_rate(opts: &Options) -> Value {
    // A queue per CPU (at least two), so that each CPU's frames have a queue of their own.
    let queues = online_cpus().max(2);
    let net = FibNet::with_uplink_queues("fwd", queues as u32);
    let ns = net.ns.name.clone();
    let ingress = net.lb0;
    // The bench is IPv4 only: without IPv6, neither end sends stray frames (router
    // solicitations, MLD) that would wake a queue's NAPI.
    for dev in ["lb0", "up0"] {
        net.ns
            .sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1");
    }
    net.ns.run(|| {
        let cpu = pin_cpu();
        let cpus = online_cpus();
        let up0 = net.ns.ifindex("up0");
        let (mut lb, frame) = forwarding_setup(&ns, ingress, queues);
        if let Some(refused) = live_frames_refused(&mut lb, &frame, up0) {
            return json!({ "unavailable": refused });
        }
        // Frames per round: a multiple of the batch (64) per generator.
        let frames = (opts.calls as u32).div_ceil(128) * 128;
        let one = [cpu];
        let two: Vec<usize> = (0..cpus.min(2)).collect();
        let runs: [(&str, &str, &[usize]); 3] = [("lb", "lb", &one), ("floor", "lb_floor", &one), ("lb_2cores", "lb", &two)];
        let mut pps: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut rounds = Vec::new();
        for _ in 0..opts.rounds {
            for (name, prog, on) in runs {
                let before = napi_threads();
                let id = lb.xdp(prog).attach("lb0", aya::programs::XdpMode::Driver).expect("attaching to lb0");
                // Attaching makes lb0's NAPI instances anew (detaching removed them).
                set_threaded_napi(&ns, "lb0");
                pin_new_napi_threads(&before, "lb0", queues);
                let r = live_round(&mut lb, &ns, up0, &frame, frames, on, prog == "lb");
                lb.xdp(prog).detach(id).expect("detaching");
                rounds.push(json!({"case": name, "wall_s": r.wall.as_secs_f64(), "ring_full": r.ring_full, "refused": r.refused, "forwarded": r.forwarded, "lb_packets_by_cpu": r.lb_packets_by_cpu, "net_rx_softirqs_by_cpu": r.net_rx, "ksoftirqd_ticks_by_cpu": r.ksoftirqd}));
                pps.entry(name).or_default().push(check_live_round(name, &r, frames as u64, on));
            }
        }
        let mut out = forwarding_figures(&pps);
        out.insert("rounds".into(), Value::Array(rounds));
        out.insert("method".into(), json!({"frames_per_round": frames, "rounds": opts.rounds, "cpu": cpu, "cpus_2cores": two, "napi": "threaded, each queue's thread pinned to its CPU, SCHED_FIFO 50", "generator": "lb_gen, BPF_F_TEST_XDP_LIVE_FRAMES on the veth peer, batch 64, one thread per CPU"}));
        Value::Object(out)
    })
}

/// Why this kernel refuses to generate frames with `BPF_F_TEST_XDP_LIVE_FRAMES`, if it does
/// (one frame, with lb attached to lb0 to take it): the forwarding section then reports that
/// reason instead of figures. Seen on a sandboxed VM where the same call on the same kernel
/// version works elsewhere; every other section runs without live frames.
fn live_frames_refused(lb: &mut Lb, frame: &[u8], up0: u32) -> Option<String> {
    let id = lb
        .xdp("lb")
        .attach("lb0", aya::programs::XdpMode::Driver)
        .expect("attaching to lb0");
    let r = crate::harness::try_test_run_live(lb.xdp("lb_gen"), frame, up0, 1);
    lb.xdp("lb").detach(id).expect("detaching");
    r.err().map(|e| {
        format!(
            "this kernel refuses BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES ({}): no forwarding figures here",
            lb_userspace::error_chain(&e)
        )
    })
}
