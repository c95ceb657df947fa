//! Machinery for the upgrade tests (`tests/tests/upgrade.rs`): long-lived connections that send a
//! request every 100-200 ms and time each answer ([`Traffic`]), thousands of idle NAT
//! translations held open and checked at the end ([`HoldServers`], [`Held`]), and a watcher that
//! asks the kernel every few milliseconds whether lb's program is attached ([`LinkWatch`]).
//!
//! Every request is charged to the phase the test was in when it was sent ([`Traffic::phase`]),
//! so a test can say "0 failures and no answer slower than 300 ms during the upgrade" per step.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};

use crate::{
    dc::{BACKENDS, CLIENTS, Lab, client_v4, client_v6, open},
    netns::NetNs,
};

/// Phases a [`Traffic`] can tell apart.
const MAX_PHASES: usize = 32;

/// What the requests sent in one phase met.
#[derive(Clone, Debug, Default)]
pub struct PhaseStats {
    pub name: String,
    pub requests: u64,
    /// Requests that got no right answer (the connection is then broken).
    pub failed: u64,
    /// Connections that broke (a failed request, a reset, a close by the peer).
    pub broken: u64,
    /// Answers that took longer than [`Traffic::SLOW`].
    pub slow: u64,
    /// The longest wait for an answer.
    pub max_wait: Duration,
    /// The first few failures, with the connection they happened on.
    pub errors: Vec<String>,
    /// The request that waited longest: its connection, and when it was sent.
    pub slowest: String,
    /// When the phase began.
    pub began: Option<Instant>,
}

impl PhaseStats {
    /// Whether nothing went wrong: no failure, no broken connection, no slow answer, and some
    /// requests at all.
    pub fn clean(&self) -> bool {
        self.requests > 0 && self.failed == 0 && self.broken == 0 && self.slow == 0
    }
}

impl std::fmt::Display for PhaseStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<34} {:>6} requests  {} failed  {} broken  {} over 300 ms  longest wait {:>6.1} ms",
            self.name,
            self.requests,
            self.failed,
            self.broken,
            self.slow,
            self.max_wait.as_secs_f64() * 1000.0
        )?;
        if self.max_wait > Duration::from_millis(100) {
            write!(f, "\n    longest: {}", self.slowest)?;
        }
        for e in &self.errors {
            write!(f, "\n    {e}")?;
        }
        Ok(())
    }
}

struct Shared {
    stop: AtomicBool,
    phase: AtomicUsize,
    stats: Mutex<Vec<PhaseStats>>,
}

impl Shared {
    fn record(&self, phase: usize, f: impl FnOnce(&mut PhaseStats)) {
        f(&mut self.stats.lock().unwrap()[phase]);
    }
}

/// One group of long-lived connections: `n` to `vip`, named `label` in messages.
pub struct Group<'a> {
    pub label: &'a str,
    pub vip: SocketAddr,
    pub n: usize,
}

/// Long-lived TCP connections to echo servers (the lab's: each first writes its name, then
/// echoes), each on its own thread sending a numbered line every 100-200 ms on the same socket
/// and timing until the whole line is back.
pub struct Traffic {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Per connection: its group's label and the backend that answered it.
    pub connections: Vec<(String, String)>,
}

impl Traffic {
    /// The longest wait for an answer that still counts as on time.
    pub const SLOW: Duration = Duration::from_millis(300);

    /// Opens every group's connections from the lab's client (round-robin over its addresses)
    /// and starts them; the first phase is named `phase`.
    pub fn start(lab: &Lab, groups: &[Group], phase: &str) -> Self {
        let mut stats = vec![PhaseStats::default(); MAX_PHASES];
        stats[0].name = phase.to_string();
        stats[0].began = Some(Instant::now());
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            stats: Mutex::new(stats),
        });
        let mut threads = Vec::new();
        let mut connections = Vec::new();
        let mut id = 0usize;
        for g in groups {
            for i in 0..g.n {
                let c = if g.vip.is_ipv4() {
                    client_v4(i % CLIENTS)
                } else {
                    client_v6(i % CLIENTS)
                };
                let s = lab
                    .client
                    .run(|| open(c, g.vip))
                    .unwrap_or_else(|e| panic!("{} connection {i} from {c}: {e}", g.label));
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut backend = String::new();
                reader
                    .read_line(&mut backend)
                    .unwrap_or_else(|e| panic!("{} connection {i}: no greeting: {e}", g.label));
                let name = format!("{} #{i} from {c} to {}", g.label, backend.trim());
                connections.push((g.label.to_string(), backend.trim().to_string()));
                let shared = shared.clone();
                threads.push(std::thread::spawn(move || {
                    converse(s, reader, id, &name, &shared)
                }));
                id += 1;
            }
        }
        Self {
            shared,
            threads,
            connections,
        }
    }

    /// From now on, requests are charged to a new phase named `name`.
    pub fn phase(&self, name: &str) {
        let next = self.shared.phase.load(Ordering::SeqCst) + 1;
        assert!(next < MAX_PHASES, "more than {MAX_PHASES} phases");
        {
            let mut st = self.shared.stats.lock().unwrap();
            st[next].name = name.to_string();
            st[next].began = Some(Instant::now());
        }
        self.shared.phase.store(next, Ordering::SeqCst);
    }

    /// What the current phase has met so far.
    pub fn current(&self) -> PhaseStats {
        let p = self.shared.phase.load(Ordering::SeqCst);
        self.shared.stats.lock().unwrap()[p].clone()
    }

    /// Stops every connection (each closes its socket) and returns what each phase met.
    pub fn finish(mut self) -> Vec<PhaseStats> {
        let last = self.shared.phase.load(Ordering::SeqCst);
        self.stop();
        self.shared.stats.lock().unwrap()[..=last].to_vec()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One connection's loop: wait 100-200 ms, send a line, read it back, charge the result to the
/// phase current at the send. The first failure ends the connection (it is broken).
fn converse(
    mut s: TcpStream,
    mut reader: BufReader<TcpStream>,
    id: usize,
    name: &str,
    shared: &Shared,
) {
    // Spread the connections' send times (a cheap deterministic jitter, no shared RNG).
    let mut x = (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut n = 0u64;
    let mut line = String::new();
    while !shared.stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pause = Duration::from_millis(100 + x % 101);
        let wake = Instant::now() + pause;
        while Instant::now() < wake {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(
                Duration::from_millis(20).min(wake.saturating_duration_since(Instant::now())),
            );
        }
        let phase = shared.phase.load(Ordering::SeqCst);
        let msg = format!("{id} {n} {}\n", "r".repeat(64 + (n % 64) as usize));
        let sent = Instant::now();
        line.clear();
        let result = s
            .write_all(msg.as_bytes())
            .map_err(|e| format!("write: {e}"))
            .and_then(|()| {
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("read: {e}"))
            })
            .and_then(|k| match k {
                0 => Err("closed by the peer".to_string()),
                _ if line == msg => Ok(()),
                _ => Err(format!("wrong answer {:?}", line.trim_end())),
            });
        let waited = sent.elapsed();
        match result {
            Ok(()) => shared.record(phase, |p| {
                p.requests += 1;
                if waited > p.max_wait {
                    p.max_wait = waited;
                    let into = p.began.map_or(0.0, |b| {
                        sent.saturating_duration_since(b).as_secs_f64() * 1000.0
                    });
                    p.slowest = format!(
                        "{name}: request {n}, sent {into:.0} ms into the phase, answered after {:.1} ms",
                        waited.as_secs_f64() * 1000.0
                    );
                }
                if waited > Traffic::SLOW {
                    p.slow += 1;
                    if p.errors.len() < 10 {
                        p.errors.push(format!(
                            "{name}: request {n} answered after {:.0} ms",
                            waited.as_secs_f64() * 1000.0
                        ));
                    }
                }
            }),
            Err(e) => {
                shared.record(phase, |p| {
                    p.requests += 1;
                    p.failed += 1;
                    p.broken += 1;
                    p.max_wait = p.max_wait.max(waited);
                    if p.errors.len() < 10 {
                        p.errors.push(format!(
                            "{name}: request {n} failed after {:.0} ms: {e}",
                            waited.as_secs_f64() * 1000.0
                        ));
                    }
                });
                return;
            }
        }
        n += 1;
    }
}

/// Servers that hold thousands of idle connections cheaply: one thread per backend, polling its
/// listener (on the backend's own IPv4 address, for NAT VIPs) and every connection it accepted,
/// echoing whatever comes. Nothing is written first (no greeting).
pub struct HoldServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Connections each backend holds now.
    pub held: Vec<Arc<AtomicUsize>>,
}

impl HoldServers {
    pub fn start(lab: &Lab, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut held = Vec::new();
        for ((_, ns), (_, v4, _)) in lab.backends.iter().zip(BACKENDS) {
            // veths leave checksums to "hardware", which XDP forwarding skips (README: Node
            // prerequisites).
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
            let sa = SocketAddr::new(v4.parse().unwrap(), port);
            let l = ns.run(|| listen(sa, 4096));
            l.set_nonblocking(true).unwrap();
            let (stop, count) = (stop.clone(), Arc::new(AtomicUsize::new(0)));
            held.push(count.clone());
            threads.push(std::thread::spawn(move || hold_loop(l, &stop, &count)));
        }
        Self {
            stop,
            threads,
            held,
        }
    }

    /// Connections held by all backends together.
    pub fn total(&self) -> usize {
        self.held.iter().map(|h| h.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for HoldServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A listener with a deep accept queue (std's is 128: thousands of connections opened in a
/// row would overflow it while the poll loop sleeps, and SYNs would wait a second to be retried).
fn listen(sa: SocketAddr, backlog: i32) -> TcpListener {
    let l = TcpListener::bind(sa).unwrap_or_else(|e| panic!("bind {sa}: {e}"));
    // SAFETY: listen(2) again on our own listening socket only changes its backlog.
    let rc = unsafe { libc::listen(l.as_raw_fd(), backlog) };
    assert_eq!(rc, 0, "listen {sa}: {}", std::io::Error::last_os_error());
    l
}

fn hold_loop(l: TcpListener, stop: &AtomicBool, count: &AtomicUsize) {
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(&l.as_raw_fd())
            .copied()
            .chain(conns.iter().map(|c| c.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        let mut gone = Vec::new();
        for (i, p) in fds.iter().enumerate().skip(1) {
            if p.revents == 0 {
                continue;
            }
            let c = &mut conns[i - 1];
            match c.read(&mut buf) {
                Ok(0) => gone.push(i - 1),
                Ok(k) => {
                    if c.write_all(&buf[..k]).is_err() {
                        gone.push(i - 1);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => gone.push(i - 1),
            }
        }
        for i in gone.into_iter().rev() {
            conns.swap_remove(i);
        }
        if fds[0].revents != 0 {
            while let Ok((s, _)) = l.accept() {
                s.set_nonblocking(true).unwrap();
                conns.push(s);
            }
        }
        count.store(conns.len(), Ordering::Relaxed);
    }
}

/// Idle connections held open by the client, each one NAT translation while it lives.
pub struct Held {
    pub conns: Vec<TcpStream>,
}

impl Held {
    /// Connections checked together (see [`Held::check`]).
    pub const BATCH: usize = 100;

    /// Opens `n` connections to `vip` from the lab's client (round-robin over its IPv4
    /// addresses); panics on the first that fails.
    pub fn open(lab: &Lab, vip: SocketAddr, n: usize) -> Self {
        let conns = lab.client.run(|| {
            (0..n)
                .map(|i| {
                    let c = client_v4(i % CLIENTS);
                    open(c, vip)
                        .unwrap_or_else(|e| panic!("held connection {i} from {c} to {vip}: {e}"))
                })
                .collect()
        });
        Self { conns }
    }

    /// Sends a few bytes on every connection, then reads each echo: which connections did not
    /// answer right (index and why). Connections go in batches of [`Held::BATCH`], all of a
    /// batch written before any is read: a round trip per batch, not per connection, and no
    /// burst of thousands of packets at once (all 5,000 at once lost packets of the long-lived
    /// connections on the way, which then waited for TCP's 200 ms retransmission).
    pub fn check(&mut self) -> Vec<(usize, String)> {
        let mut bad = Vec::new();
        for (b, batch) in self.conns.chunks_mut(Self::BATCH).enumerate() {
            let base = b * Self::BATCH;
            let mut sent = vec![false; batch.len()];
            for (j, c) in batch.iter_mut().enumerate() {
                match c.write_all(&((base + j) as u32).to_be_bytes()) {
                    Ok(()) => sent[j] = true,
                    Err(e) => bad.push((base + j, format!("write: {e}"))),
                }
            }
            for (j, c) in batch.iter_mut().enumerate().filter(|(j, _)| sent[*j]) {
                let mut back = [0u8; 4];
                match c.read_exact(&mut back) {
                    Ok(()) if back == ((base + j) as u32).to_be_bytes() => {}
                    Ok(()) => bad.push((base + j, format!("wrong echo {back:?}"))),
                    Err(e) => bad.push((base + j, format!("read: {e}"))),
                }
            }
        }
        bad
    }
}

/// What a [`LinkWatch`] saw.
#[derive(Clone, Debug, Default)]
pub struct WatchReport {
    pub samples: u64,
    /// Samples at which no XDP program at all was attached to the device.
    pub unattached: u64,
    /// Samples (confirmed by a second look at once) at which the program attached was not the
    /// one the pinned link holds (counted only while a link is pinned).
    pub not_ours: u64,
    /// Samples at which no link was pinned for the device (the link may still be attached,
    /// held by an agent's descriptor alone).
    pub unpinned: u64,
    /// Ids of the pinned link seen (one, if it was never replaced).
    pub link_ids: BTreeSet<u32>,
    /// Programs seen attached, in order of first sight.
    pub programs: Vec<u32>,
    /// The longest time between two samples.
    pub max_gap: Duration,
    /// The first few bad samples, with when they happened.
    pub problems: Vec<String>,
}

impl std::fmt::Display for WatchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples (longest gap {:.1} ms): {} with no XDP program, {} with another program than the pinned link's, {} with no link pinned; link ids {:?}, programs {:?}",
            self.samples,
            self.max_gap.as_secs_f64() * 1000.0,
            self.unattached,
            self.not_ours,
            self.unpinned,
            self.link_ids,
            self.programs
        )?;
        for p in &self.problems {
            write!(f, "\n    {p}")?;
        }
        Ok(())
    }
}

/// The id of the link pinned at `path` (None if nothing is pinned there).
pub fn link_id(path: &Path) -> Option<u32> {
    let l = PinnedLink::from_pin(path).ok()?;
    FdLink::from(l).info().ok().map(|i| i.id())
}

/// Asks the kernel, every [`LinkWatch::EVERY`], what XDP program is attached to `dev` in a
/// namespace (netlink, as `ip link` does) and whether it is the program of lb's pinned link.
pub struct LinkWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<WatchReport>>,
}

impl LinkWatch {
    pub const EVERY: Duration = Duration::from_millis(2);

    pub fn start(ns: &NetNs, pins: &Path, dev: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns_name, pins, dev) = (ns.name.clone(), pins.to_path_buf(), dev.to_string());
        let st = stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            crate::netns::enter(&ns_name);
            let _ = ready_tx.send(());
            watch(&st, &pins, &dev)
        });
        ready.recv().expect("the watcher started");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> WatchReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().expect("the watcher")
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn watch(stop: &AtomicBool, pins: &Path, dev: &str) -> WatchReport {
    let link: PathBuf = pins.join(format!("link-{dev}"));
    let started = Instant::now();
    let mut r = WatchReport::default();
    let mut last = Instant::now();
    let problem = |r: &mut WatchReport, what: String| {
        if r.problems.len() < 10 {
            r.problems.push(format!(
                "at {:.3} s: {what}",
                started.elapsed().as_secs_f64()
            ));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let a = lb_userspace::kernel::links::attachment(pins, dev);
        let now = Instant::now();
        r.max_gap = r.max_gap.max(now - last);
        last = now;
        r.samples += 1;
        if let Some(id) = link_id(&link) {
            r.link_ids.insert(id);
        } else {
            r.unpinned += 1;
            problem(&mut r, format!("no link pinned at {}", link.display()));
        }
        for p in &a.program_ids {
            if !r.programs.contains(p) {
                r.programs.push(*p);
            }
        }
        if a.program_ids.is_empty() {
            r.unattached += 1;
            problem(&mut r, format!("no XDP program on {dev}: {a:?}"));
        } else if a.lb_program_id.is_some() && !a.ours() {
            // The link's program and the device's are read one after the other: a program
            // swapped in between makes them differ for one look. A second look settles it.
            let again = lb_userspace::kernel::links::attachment(pins, dev);
            if again.lb_program_id.is_some() && !again.ours() {
                r.not_ours += 1;
                problem(&mut r, format!("not lb's program on {dev}: {again:?}"));
            }
        }
        std::thread::sleep(LinkWatch::EVERY);
    }
    r
}

/// Raises this process's open-file limit to its hard limit (thousands of held connections, both
/// ends in this process); returns the new limit.
pub fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/set of our own limits.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = l.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
    }
    l.rlim_cur
}

/// Gives the calling thread, and every thread and process it starts from now on, a higher
/// scheduling priority (nice -5): the 300 ms bound on an answer is about the load balancer, not
/// about compilers sharing the machine's cores with the test. Linux applies `setpriority` of
/// the process 0 to the calling thread only; new threads inherit it.
/// One lab of this kind at a time in a test process: each holds thousands of connections and
/// times every request against a 300 ms bound, which two at once on a 2-core machine would
/// measure the machine by, not the load balancer. Hold the guard for the test's life.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn raise_priority() {
    // SAFETY: plain setpriority on ourselves; failure (no privilege) leaves the priority as it is.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -5) };
}

/// One line per map of a `last_migration` (see `lb status -o json`), and its totals.
pub fn describe_migration(m: &serde_json::Value) -> String {
    let mut out = format!(
        "migration at {} ({}, from release {}): {} entries copied, {} merged, in {:.1} ms",
        m["at"].as_str().unwrap_or("?"),
        m["trigger"].as_str().unwrap_or("?"),
        m["from_release"].as_str().unwrap_or("unknown"),
        m["entries"],
        m["merged"],
        m["duration_ms"].as_f64().unwrap_or(f64::NAN)
    );
    let maps = m["maps"].as_array().map(Vec::as_slice).unwrap_or_default();
    let (reused, moved): (Vec<_>, Vec<_>) = maps.iter().partition(|x| x["action"] == "reused");
    if !reused.is_empty() {
        let names: Vec<&str> = reused.iter().filter_map(|x| x["map"].as_str()).collect();
        out.push_str(&format!(
            "\n    reused as they are ({}): {}",
            names.len(),
            names.join(" ")
        ));
    }
    for x in moved {
        out.push_str(&format!(
            "\n    {:<22} {:<9} {:>9} -> {:<9} {:>8} copied {:>6} merged {:>8.2} ms",
            x["map"].as_str().unwrap_or("?"),
            x["action"].as_str().unwrap_or("?"),
            x["from_entries"],
            x["to_entries"],
            x["entries"],
            x["merged"],
            x["ms"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    out
}

/// Every drop and error counter of the lab's interfaces (the kernel's `rx_dropped`/`tx_dropped`
/// and the veth driver's per-queue XDP counters), keyed `namespace-tag/device counter`, and the
/// TCP segments each namespace retransmitted: where a packet lost outside lb's program (which
/// counts its own) was lost, and whether any was.
pub fn interface_losses(lab: &Lab) -> BTreeMap<String, u64> {
    let mut all: Vec<(&str, &NetNs)> = vec![
        ("client", &lab.client),
        ("router", &lab.router),
        ("lb", &lab.lb),
    ];
    all.extend(lab.backends.iter().map(|(n, ns)| (n.as_str(), ns)));
    let mut out = BTreeMap::new();
    for (tag, ns) in all {
        // TCP's retransmissions in the namespace: a packet lost anywhere on the way.
        let snmp = Command::new("ip")
            .args(["netns", "exec", &ns.name, "cat", "/proc/net/snmp"])
            .output()
            .expect("reading /proc/net/snmp");
        let text = String::from_utf8_lossy(&snmp.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        if let (Some(names), Some(values)) = (tcp.next(), tcp.next())
            && let Some(n) = names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find_map(|(k, v)| (k == "RetransSegs").then(|| v.parse().ok())?)
        {
            out.insert(format!("{tag} tcp_retransmitted"), n);
        }
        let links = Command::new("ip")
            .args(["-n", &ns.name, "-s", "-j", "link", "show"])
            .output()
            .expect("running ip");
        let v: serde_json::Value = serde_json::from_slice(&links.stdout).unwrap_or_default();
        for l in v.as_array().into_iter().flatten() {
            let Some(dev) = l["ifname"].as_str().filter(|d| *d != "lo") else {
                continue;
            };
            for dir in ["rx", "tx"] {
                for k in ["dropped", "errors"] {
                    if let Some(n) = l["stats64"][dir][k].as_u64() {
                        out.insert(format!("{tag}/{dev} {dir}_{k}"), n);
                    }
                }
            }
            let stats = Command::new("ip")
                .args(["netns", "exec", &ns.name, "ethtool", "-S", dev])
                .output()
                .expect("running ethtool");
            for line in String::from_utf8_lossy(&stats.stdout).lines() {
                if let Some((k, v)) = line.trim().split_once(": ")
                    && (k.contains("drop") || k.contains("err"))
                    && let Ok(n) = v.trim().parse()
                {
                    out.insert(format!("{tag}/{dev} {k}"), n);
                }
            }
        }
    }
    out
}

/// The counters that grew from `before` to `after`, as `name +n`; "none" if none did.
pub fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let grew: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.checked_sub(*before.get(k)?)?;
            (d > 0).then(|| format!("{k} +{d}"))
        })
        .collect();
    if grew.is_empty() {
        "none".to_string()
    } else {
        grew.join(", ")
    }
}
