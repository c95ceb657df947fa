//! Upgrades, rollbacks and table resizes under load, done as docs/upgrades.md tells an operator:
//! the running agent is stopped with SIGTERM (its program stays attached through the pinned link and
//! keeps forwarding), and the other release's binary is started with the same `--pin-dir`,
//! `--state-dir` and config file; before a rollback, `lb migrate --to-release` (the newer binary)
//! leaves the pins as the older release reads them. A size change is an edit of the config file,
//! which the agent reloads. No `lb down`, no other step.
//!
//! Through every step, long-lived connections send a request every 100-200 ms on the same socket
//! (NAT and DSR VIPs, IPv4 and IPv6), 5,000 more idle NAT connections keep that many
//! translations (and backend source ports) busy, and a watcher asks the kernel every 2 ms
//! whether lb's program is attached. Passing means: 0 broken connections, 0 failed requests, no
//! answer waited for longer than 300 ms, the pinned link never replaced and never without a
//! program, every held connection still usable at the end. Each step prints what the agent says
//! it migrated and how long that took (`last_migration` in `lb status -o json`; the previous
//! release predates it).
//!
//! The previous release is built from the commit `release/previous` names ([`release`]): a few
//! minutes the first time, then cached in `target/previous`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{BACKENDS, Lab, NatServers, errors, lab_config, vip_yaml},
    netns::NetNs,
    release,
    upgrade::{
        Group, Held, HoldServers, LinkWatch, PhaseStats, Traffic, describe_migration, grown,
        interface_losses, link_id, raise_nofile, raise_priority,
    },
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(30);
/// The NAT backends' port for the long-lived connections ([`NatServers`]).
const NAT_PORT: u16 = 9000;
/// The NAT backends' port for the held connections ([`HoldServers`]).
const HOLD_PORT: u16 = 9100;
/// Idle NAT connections held across every step.
const HELD: usize = 5_000;
const FLOW_ENTRIES: u32 = 65_536;
const NAT_ENTRIES: u32 = 16_384;
/// How long traffic runs on after each step is done (and before the first).
const RUN_ON: Duration = Duration::from_secs(2);

const DSR_V4: &str = "192.0.2.10:80";
const DSR_V6: &str = "[2001:db8::10]:80";
const NAT_V4: &str = "192.0.2.20:80";
const NAT_V6: &str = "[2001:db8::20]:80";
const HOLD_VIP: &str = "192.0.2.30:80";
/// The NAT VIP whose backend changes with each step, as `lb backends` labels it, and the
/// backend whose weight changes.
const CHANGING_VIP: &str = "192.0.2.20:80/tcp";
const CHANGING_BACKEND: usize = 2;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The lab's config: two DSR VIPs and two NAT VIPs (IPv4 and IPv6) for the long-lived
/// connections, a NAT VIP for the held ones; the IPv4 NAT VIP's third backend weighs `weight`.
fn config(weight: u32, flow_table_size: u32, nat_table_size: u32) -> String {
    let all = [(0, 1), (1, 1), (2, 1)];
    let mut changing = all;
    changing[CHANGING_BACKEND].1 = weight;
    let node =
        format!("  flow_table_size: {flow_table_size}\n  nat_table_size: {nat_table_size}\n");
    let vips = [
        vip_yaml("192.0.2.10", 80, "tcp", "", &all, false, None),
        vip_yaml("2001:db8::10", 80, "tcp", "", &all, true, None),
        vip_yaml(
            "192.0.2.20",
            80,
            "tcp",
            "",
            &changing,
            false,
            Some(NAT_PORT),
        ),
        vip_yaml("2001:db8::20", 80, "tcp", "", &all, true, Some(NAT_PORT)),
        vip_yaml("192.0.2.30", 80, "tcp", "", &all, false, Some(HOLD_PORT)),
    ]
    .concat();
    lab_config(&node, &vips)
}

/// The long-lived connections: 50 through each IPv4 VIP, 10 through each IPv6 one.
fn groups() -> [Group<'static>; 4] {
    [
        Group {
            label: "nat4",
            vip: sa(NAT_V4),
            n: 50,
        },
        Group {
            label: "dsr4",
            vip: sa(DSR_V4),
            n: 50,
        },
        Group {
            label: "nat6",
            vip: sa(NAT_V6),
            n: 10,
        },
        Group {
            label: "dsr6",
            vip: sa(DSR_V6),
            n: 10,
        },
    ]
}

/// `lb status -o json` by this build's binary, whichever release's agent runs (it reads an
/// earlier agent's status file too: 0.1.0 wrote no release, and it says 0.1.0), run in the
/// agent's namespace `ns` (it exits 1 while the agent is not running or not attached, but still
/// prints the status).
fn status(dirs: &Dirs, ns: &NetNs) -> serde_json::Value {
    try_status(dirs, ns).unwrap_or_else(|e| panic!("{e}"))
}

/// [`status`], or what `lb status` said instead of a status (it cannot read pins that an agent
/// is making or replacing in that moment).
fn try_status(dirs: &Dirs, ns: &NetNs) -> Result<serde_json::Value, String> {
    // nsenter enters the network namespace only (`ip netns exec` would also mount a sysfs of
    // its own over /sys, hiding the pins on /sys/fs/bpf).
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .args([BIN, "--pin-dir"])
        .arg(&dirs.pins)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args(["status", "-o", "json"])
        .output()
        .expect("running lb status");
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "lb status -o json: not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Polls `lb status` until `ok` holds of it; panics with the last status and the agent's log.
fn wait_status(
    dirs: &Dirs,
    ns: &NetNs,
    agent: &Agent,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let s = try_status(dirs, ns);
        if let Ok(s) = &s
            && ok(s)
        {
            return s.clone();
        }
        let s = s.map_or_else(|e| e, |s| format!("{s:#}"));
        assert!(
            Instant::now() < deadline,
            "{what}: not within {T:?}; lb status:\n{s}\nthe agent's log:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `agent` is the agent `lb status` reports running, with its program attached to
/// eth0.
fn wait_running(dirs: &Dirs, ns: &NetNs, agent: &Agent) -> serde_json::Value {
    let pid = agent.pid() as u64;
    wait_status(dirs, ns, agent, "the agent running and attached", |s| {
        s["agent"]["running"] == true
            && s["agent"]["pid"].as_u64() == Some(pid)
            && s["interfaces"].as_array().is_some_and(|i| {
                i.iter()
                    .any(|i| i["name"] == "eth0" && i["attached"] == true)
            })
    })
}

/// Entries in the pinned NAT tables (forward, reverse) as `lb status` counts them.
fn nat_entries(s: &serde_json::Value) -> (u64, u64) {
    let t = &s["maps"]["tables"];
    (
        t["nat"]["entries"].as_u64().unwrap_or(0),
        t["nat_reverse"]["entries"].as_u64().unwrap_or(0),
    )
}

fn assert_translations_held(s: &serde_json::Value, when: &str) {
    let (fwd, rev) = nat_entries(s);
    eprintln!("  {when}: {fwd} NAT translations (reverse entries {rev})");
    assert!(
        fwd >= HELD as u64 && rev >= HELD as u64,
        "{when}: {fwd} NAT entries and {rev} reverse ones, not {HELD}+: {:#}",
        s["maps"]
    );
}

/// Prints what the agent says it migrated at its last start or reload (`agent.last_migration`
/// in `lb status -o json`). The agent of this build (`current`) must name this build's release
/// and report a migration by `trigger`; the previous release's must name that release (its
/// status file has none: `lb status` says 0.1.0) and reports nothing.
fn report_migration(
    s: &serde_json::Value,
    trigger: &str,
    current: bool,
) -> Option<serde_json::Value> {
    let a = &s["agent"];
    let release = a["release"].as_str();
    if !current {
        assert_eq!(
            release,
            Some(release::previous_version().as_str()),
            "the previous release's agent: {a:#}"
        );
        eprintln!("  release {} (no migration report)", release.unwrap());
        return None;
    }
    assert_eq!(
        release,
        Some(env!("CARGO_PKG_VERSION")),
        "the agent of this build does not name its release in lb status: {a:#}"
    );
    let m = a["last_migration"]
        .as_object()
        .map(|_| &a["last_migration"])
        .unwrap_or_else(|| panic!("the agent reports no last_migration in lb status: {a:#}"));
    eprintln!("  release {}: {}", release.unwrap(), describe_migration(m));
    assert_eq!(m["trigger"], trigger, "the last migration: {m:#}");
    Some(m.clone())
}

/// Polls `lb backends` until the changing backend of the changing VIP has `weight` in the config
/// and its share of the VIP's Maglev slots (in the pinned maps) is its weight's.
fn wait_weight(dirs: &Dirs, agent: &Agent, weight: u32) {
    let deadline = Instant::now() + T;
    let addr = BACKENDS[CHANGING_BACKEND].1;
    let want = weight as f64 / (weight + 2) as f64;
    loop {
        let out = dirs.cli(&["backends", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let row = v.as_array().and_then(|vips| {
            vips.iter().find(|x| x["vip"]["label"] == CHANGING_VIP)?["backends"]
                .as_array()?
                .iter()
                .find(|b| {
                    b["backend"]["address"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(addr))
                })
                .cloned()
        });
        if let Some(r) = &row
            && r["weight"].as_u64() == Some(weight as u64)
            && r["share"].as_f64().is_some_and(|s| (s - want).abs() < 0.02)
        {
            eprintln!(
                "  backend change applied: {addr} weight {weight}, {:.1} % of the slots",
                r["share"].as_f64().unwrap() * 100.0
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} of {CHANGING_VIP} never got weight {weight} ({:.1} % of the slots): {row:?}\n{}",
            want * 100.0,
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// New connections through the NAT VIP while the held ones keep their ports: all answered.
fn assert_new_connections(lab: &Lab, when: &str) {
    let t = lab.tcp_tally(sa(NAT_V4), 200, 8);
    assert_eq!(errors(&t), 0, "{when}: new NAT connections failed: {t:?}");
    assert!(
        BACKENDS.iter().all(|(b, _, _)| t.contains_key(*b)),
        "{when}: new NAT connections did not reach every backend: {t:?}"
    );
}

/// The global counters of `lb stats` (by the binary `dirs` names).
fn counters(dirs: &Dirs) -> BTreeMap<String, u64> {
    let v = dirs.json(&["stats"]);
    v["global"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Counters that count packets lost or sent the unusual way (drops, passes to the kernel,
/// resets, misses), and how much each grew from `before` to `after`; the ordinary traffic
/// counters are left out.
fn unusual(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    const ORDINARY: [&str; 14] = [
        "packets",
        "vip_packets",
        "tx",
        "redirect",
        "flow_hits",
        "maglev_lookups",
        "new_flows",
        "nat_new",
        "nat_forward",
        "nat_reverse",
        "nat_closed",
        "pass_not_for_vip",
        "flow_idle_expired",
        "affinity_hits",
    ];
    let keep = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        m.iter()
            .filter(|(k, _)| !ORDINARY.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    grown(&keep(before), &keep(after))
}

/// Waits until the hold servers hold `n` connections between them.
fn wait_held(holds: &HoldServers, n: usize) {
    let deadline = Instant::now() + T;
    while holds.total() < n {
        assert!(
            Instant::now() < deadline,
            "the backends hold {} connections, not {n}",
            holds.total()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The common part of both tests: the lab, its servers, the agent of `bin` on `config`, the held
/// connections, the watcher and the long-lived traffic, in an order that drops them safely
/// (traffic and watcher first, the agent, then the pins, then the namespaces).
struct Rig {
    traffic: Option<Traffic>,
    watch: Option<LinkWatch>,
    held: Held,
    agent: Agent,
    dirs: Dirs,
    holds: HoldServers,
    _nat: NatServers,
    lab: Lab,
    link: PathBuf,
    link_id: u32,
    /// When the rig was ready (the traffic started).
    started: Instant,
}

impl Rig {
    fn start(bin: &Path, tag: &str, config: &str, first_phase: &str) -> Self {
        raise_priority();
        let limit = raise_nofile();
        assert!(
            limit >= 3 * HELD as u64,
            "the open-file limit is {limit}: {HELD} held connections need both ends here"
        );
        let lab = Lab::new();
        let nat = NatServers::start(&lab, NAT_PORT);
        let holds = HoldServers::start(&lab, HOLD_PORT);
        let dirs = Dirs::new(bin, tag);
        dirs.write_config(config);
        let agent = Agent::start(&lab.lb, &dirs);
        let s = wait_running(&dirs, &lab.lb, &agent);
        match s["agent"]["last_migration"].as_object() {
            Some(_) => eprintln!(
                "start: {}",
                describe_migration(&s["agent"]["last_migration"])
            ),
            None => eprintln!("start on empty pins (no migration reported)"),
        }
        let link = dirs.pins.join("link-eth0");
        let id = link_id(&link).expect("a link pinned for eth0");
        let watch = LinkWatch::start(&lab.lb, &dirs.pins, "eth0");

        let t0 = Instant::now();
        let held = Held::open(&lab, sa(HOLD_VIP), HELD);
        wait_held(&holds, HELD);
        eprintln!(
            "{HELD} idle connections through {HOLD_VIP} (NAT) opened in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let traffic = Traffic::start(&lab, &groups(), first_phase);
        eprintln!(
            "{} long-lived connections: 50 NAT and 50 DSR over IPv4, 10 and 10 over IPv6",
            traffic.connections.len()
        );
        Self {
            traffic: Some(traffic),
            watch: Some(watch),
            held,
            agent,
            dirs,
            holds,
            _nat: nat,
            lab,
            link,
            link_id: id,
            started: Instant::now(),
        }
    }

    fn traffic(&self) -> &Traffic {
        self.traffic.as_ref().unwrap()
    }

    /// Lets the traffic run for `d`, printing what the current phase met.
    fn run_on(&self, d: Duration) {
        std::thread::sleep(d);
        eprintln!("  {}", self.traffic().current());
    }

    /// The same link, still pinned.
    fn assert_same_link(&self, when: &str) {
        assert_eq!(
            link_id(&self.link),
            Some(self.link_id),
            "{when}: the link pinned for eth0 was replaced or removed"
        );
    }

    /// Every held connection still answers.
    fn assert_held(&mut self, when: &str) {
        let bad = self.held.check();
        assert!(
            bad.is_empty(),
            "{when}: {} of {HELD} held connections broke, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }

    /// One step as docs/upgrades.md tells an operator: SIGTERM to the running agent; for a rollback
    /// (`rollback_to` the older release), `lb migrate --to-release` with the newer binary, which
    /// leaves the pins as the older release reads them; then `bin` with the same pin dir, state
    /// dir and config file (now `config`). Returns what `lb status` says once the new agent runs
    /// attached, and how long the step took (SIGTERM to that).
    fn switch(
        &mut self,
        bin: &Path,
        config: &str,
        rollback_to: Option<&str>,
    ) -> (serde_json::Value, Duration) {
        let t0 = Instant::now();
        let exit = self.agent.stop();
        assert!(
            exit.success(),
            "SIGTERM: the agent exited {exit}:\n{}",
            self.agent.log_dump()
        );
        let stopped = t0.elapsed();
        if let Some(version) = rollback_to {
            let out = self.dirs.cli(&["migrate", "--to-release", version]);
            assert!(
                out.status.success(),
                "lb migrate --to-release {version}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!(
                "  lb migrate --to-release {version}: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        self.dirs.bin = bin.to_path_buf();
        self.dirs.write_config(config);
        self.agent = Agent::start(&self.lab.lb, &self.dirs);
        let s = wait_running(&self.dirs, &self.lab.lb, &self.agent);
        let took = t0.elapsed();
        eprintln!(
            "  the old agent stopped in {:.0} ms; the new one ran {:.0} ms after the SIGTERM",
            stopped.as_secs_f64() * 1000.0,
            took.as_secs_f64() * 1000.0
        );
        (s, took)
    }

    /// Stops the traffic and the watcher, checks the held connections, and asserts everything
    /// the tests promise.
    fn finish(mut self) {
        let phases = self.traffic.take().unwrap().finish();
        let watch = self.watch.take().unwrap().finish();
        let t0 = Instant::now();
        let bad = self.held.check();
        eprintln!(
            "\nheld connections: {} of {HELD} answer ({:.0} ms to check them all)",
            HELD - bad.len(),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        eprintln!("per phase:");
        for p in &phases {
            eprintln!("  {p}");
        }
        eprintln!("the link on eth0: {watch}");
        eprintln!("{:.1} s of traffic", self.started.elapsed().as_secs_f64());
        let dirty: Vec<&PhaseStats> = phases.iter().filter(|p| !p.clean()).collect();
        assert!(
            dirty.is_empty(),
            "broken connections, failed or slow requests:\n{}",
            dirty
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            bad.is_empty(),
            "{} held connections broke, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
        assert_eq!(
            (watch.unattached, watch.not_ours),
            (0, 0),
            "the program was not attached at every sample: {watch}"
        );
        // Not a failure (the program stayed attached), but a hazard worth seeing: while an agent
        // swaps its program into the pinned link it unpins the link and pins it again (aya hands
        // out a pinned link only by unpinning it), so an agent killed in between would take the
        // link, and the attachment, with it.
        if watch.unpinned > 0 {
            eprintln!(
                "warning: no link was pinned for eth0 at {} samples (the link stayed attached)",
                watch.unpinned
            );
        }
        assert_eq!(
            watch.link_ids.iter().copied().collect::<Vec<_>>(),
            vec![self.link_id],
            "the pinned link was replaced: {watch}"
        );
        assert!(
            watch.samples > 100,
            "the watcher took too few samples: {watch}"
        );
        self.assert_same_link("at the end");
        assert_eq!(
            self.agent.stop().code(),
            Some(0),
            "{}",
            self.agent.log_dump()
        );
    }
}

#[test]
fn upgrade_rollback_upgrade_keeps_every_connection_and_the_link() {
    let _one = lb_tests::upgrade::exclusive();
    let previous = release::previous_bin();
    let current = PathBuf::from(BIN);
    let mut rig = Rig::start(
        &previous,
        "upgrade",
        &config(1, FLOW_ENTRIES, NAT_ENTRIES),
        "previous release running",
    );
    rig.run_on(RUN_ON);
    assert_translations_held(&status(&rig.dirs, &rig.lab.lb), "before the first step");

    // Each step also changes a backend of a NAT VIP: the weight of b3 goes 1 -> 2 -> 3 -> 4.
    let previous_version = release::previous_version();
    let steps = [
        ("upgrade", &current, 2, None),
        ("rollback", &previous, 3, Some(previous_version.as_str())),
        ("upgrade again", &current, 4, None),
    ];
    for (name, bin, weight, rollback_to) in steps {
        eprintln!("\n{name}: {} (b3 weight {weight})", bin.display());
        let before = (counters(&rig.dirs), interface_losses(&rig.lab));
        rig.traffic().phase(name);
        let (s, took) = rig.switch(bin, &config(weight, FLOW_ENTRIES, NAT_ENTRIES), rollback_to);
        let m = report_migration(&s, "start", *bin == current);
        if let Some(m) = m {
            assert!(
                m["duration_ms"]
                    .as_f64()
                    .is_some_and(|ms| ms < took.as_secs_f64() * 1000.0),
                "the migration took longer than the whole step ({took:?}): {m:#}"
            );
        }
        wait_weight(&rig.dirs, &rig.agent, weight);
        assert_translations_held(
            &status(&rig.dirs, &rig.lab.lb),
            &format!("after the {name}"),
        );
        rig.assert_same_link(name);
        rig.assert_held(name);
        eprintln!(
            "  during the {name}: unusual lb counters: {}; interface drops and errors: {}",
            unusual(&before.0, &counters(&rig.dirs)),
            grown(&before.1, &interface_losses(&rig.lab))
        );
        rig.traffic().phase(&format!("after the {name}"));
        assert_new_connections(&rig.lab, &format!("after the {name}"));
        rig.run_on(RUN_ON);
    }
    assert_eq!(
        rig.holds.total(),
        HELD,
        "the backends lost held connections"
    );
    rig.finish();
}

/// Applies `config` by saving the config file (the agent watches it) and waits until a reload
/// has been applied with those sizes; panics with the agent's reason if it is refused.
fn reload_sizes(
    rig: &Rig,
    config: &str,
    flow_table_size: u32,
    nat_table_size: u32,
) -> serde_json::Value {
    let before = status(&rig.dirs, &rig.lab.lb);
    let counted = |s: &serde_json::Value| {
        s["agent"]["reloads_applied"].as_u64().unwrap_or(0)
            + s["agent"]["reloads_rejected"].as_u64().unwrap_or(0)
    };
    let n = counted(&before);
    let t0 = Instant::now();
    rig.dirs.write_config(config);
    let s = wait_status(&rig.dirs, &rig.lab.lb, &rig.agent, "a reload", |s| {
        counted(s) > n
    });
    let last = &s["agent"]["last_reload"];
    assert_eq!(
        last["ok"], true,
        "the reload to flow_table_size {flow_table_size}, nat_table_size {nat_table_size} was refused: {}",
        last["error"]
    );
    let s = wait_status(&rig.dirs, &rig.lab.lb, &rig.agent, "the new sizes", |s| {
        let z = &s["maps"]["sizes"];
        z["flow_entries"].as_u64() == Some(flow_table_size as u64)
            && z["nat_entries"].as_u64() == Some(nat_table_size as u64)
    });
    eprintln!(
        "  reloaded in {:.0} ms (config saved to sizes in the pinned maps)",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    s
}

#[test]
fn doubling_then_halving_the_tables_by_reload_keeps_every_connection() {
    let _one = lb_tests::upgrade::exclusive();
    let mut rig = Rig::start(
        Path::new(BIN),
        "resize",
        &config(1, FLOW_ENTRIES, NAT_ENTRIES),
        "running",
    );
    rig.run_on(RUN_ON);
    assert_translations_held(&status(&rig.dirs, &rig.lab.lb), "before the first reload");
    let steps = [
        ("doubling", FLOW_ENTRIES * 2, NAT_ENTRIES, NAT_ENTRIES * 2),
        ("halving", FLOW_ENTRIES, NAT_ENTRIES * 2, NAT_ENTRIES),
    ];
    for (name, flows, from_nat, nat) in steps {
        eprintln!("\n{name}: flow_table_size {flows}, nat_table_size {nat}");
        let before = (counters(&rig.dirs), interface_losses(&rig.lab));
        rig.traffic().phase(name);
        let s = reload_sizes(&rig, &config(1, flows, nat), flows, nat);
        let m = report_migration(&s, "reload", true)
            .unwrap_or_else(|| panic!("the agent reports no migration after the {name}"));
        // The NAT table is resized and every translation copied (the held ones at least).
        let lb_nat = m["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|x| x["map"] == "LB_NAT"))
            .unwrap_or_else(|| panic!("the {name} does not say what became of LB_NAT: {m:#}"));
        assert_eq!(lb_nat["action"], "resized", "{m:#}");
        assert_eq!(
            (
                lb_nat["from_entries"].as_u64(),
                lb_nat["to_entries"].as_u64()
            ),
            (Some(from_nat as u64), Some(nat as u64)),
            "{m:#}"
        );
        assert!(
            lb_nat["entries"].as_u64().is_some_and(|n| n >= HELD as u64),
            "the {name} copied fewer than {HELD} translations: {m:#}"
        );
        assert_translations_held(&s, &format!("after the {name}"));
        rig.assert_same_link(name);
        rig.assert_held(name);
        eprintln!(
            "  during the {name}: unusual lb counters: {}; interface drops and errors: {}",
            unusual(&before.0, &counters(&rig.dirs)),
            grown(&before.1, &interface_losses(&rig.lab))
        );
        rig.traffic().phase(&format!("after the {name}"));
        assert_new_connections(&rig.lab, &format!("after the {name}"));
        rig.run_on(RUN_ON);
    }
    assert_eq!(
        rig.holds.total(),
        HELD,
        "the backends lost held connections"
    );
    rig.finish();
}

/// The instruments themselves: a program taken off the interface (`lb down` after the agent
/// stopped) is seen by the watcher, and the connections it breaks are counted, so the tests
/// above would see it too.
#[test]
fn the_watcher_and_the_traffic_see_what_lb_down_breaks() {
    let _one = lb_tests::upgrade::exclusive();
    let lab = Lab::new();
    let _nat = NatServers::start(&lab, NAT_PORT);
    let dirs = Dirs::new(Path::new(BIN), "instruments");
    let all = [(0, 1), (1, 1), (2, 1)];
    dirs.write_config(&lab_config(
        "",
        &vip_yaml("192.0.2.20", 80, "tcp", "", &all, false, Some(NAT_PORT)),
    ));
    let mut agent = Agent::start(&lab.lb, &dirs);
    wait_running(&dirs, &lab.lb, &agent);
    let watch = LinkWatch::start(&lab.lb, &dirs.pins, "eth0");
    let n = 10;
    let traffic = Traffic::start(
        &lab,
        &[Group {
            label: "nat4",
            vip: sa(NAT_V4),
            n,
        }],
        "running",
    );
    let deadline = Instant::now() + T;
    while traffic.current().requests < 3 * n as u64 {
        assert!(Instant::now() < deadline, "{}", traffic.current());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(traffic.current().clean(), "{}", traffic.current());

    traffic.phase("lb down");
    assert!(agent.stop().success(), "{}", agent.log_dump());
    let out = dirs.cli(&["down"]);
    assert!(
        out.status.success(),
        "lb down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A request waits up to 3 s (the sockets' timeout) before it counts as failed.
    while traffic.current().broken < n as u64 {
        assert!(
            Instant::now() < deadline,
            "not every connection broke: {}",
            traffic.current()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let w = watch.finish();
    eprintln!("{}\n{w}", traffic.current());
    assert!(w.unattached > 0, "the watcher missed the detach: {w}");
    assert_eq!(w.link_ids.len(), 1, "{w}");
}
