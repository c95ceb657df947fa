//! The `lb` command line. It lives in the library so that the test suite can build the very same
//! binary (and kill it with SIGKILL); `src/main.rs` only calls [`main`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use lb_common::{
    AffinityKey, Counter, FlowKey, NO_BACKEND, VIP_F_HASH_SRC_ONLY, VipKey, flow_hash, maglev_slot,
    maps, source_hash,
};
use serde_json::json;

use crate::{
    inspect::{Pinned, monotonic_coarse_ns},
    model::{Protocol, addr16, ip_of, vip_label},
    program::{self, DEFAULT_PIN_DIR, Sizes},
    run::{self, RunOptions, Status, status_path},
};

const DEFAULT_STATE_DIR: &str = "/run/lb";

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "An XDP layer-4 load balancer: weighted Maglev, direct server return, pinned state",
    long_about = "An XDP layer-4 load balancer. `lb run` is the agent: it loads the XDP program, \
                  keeps its maps in step with a config file and pins them, so that traffic keeps \
                  flowing when the agent stops. The other commands read the pinned maps of a \
                  running agent from a separate process."
)]
struct Cli {
    /// Where the agent pins its maps and links (bpffs).
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
    pin_dir: PathBuf,
    /// Where the agent writes status.json (configured weights and health, for `lb backends`).
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR, env = "LB_STATE_DIR")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (needs root).
    ///
    /// Loads (or adopts) the program and its pinned maps, applies the config, attaches to the
    /// configured interfaces, runs health checks, and reloads on SIGHUP or when the file changes.
    /// A config with problems is refused and the previous one keeps serving. On SIGTERM the agent
    /// exits and traffic keeps flowing; `lb down` stops it.
    Run {
        /// The config file (YAML; see lb.example.yaml). With --kubernetes it holds the node
        /// settings only.
        #[arg(long, short)]
        config: PathBuf,
        /// Take VIPs from Kubernetes: Services labelled `lb.dev/class: <class>`, their
        /// EndpointSlices and UpstreamPolicies (in-cluster config, or KUBECONFIG).
        #[arg(long)]
        kubernetes: bool,
        /// The class of Services this agent serves (with --kubernetes).
        #[arg(long, default_value = crate::k8s::translate::DEFAULT_CLASS, requires = "kubernetes")]
        class: String,
        /// This node's name, for externalTrafficPolicy: Local (with --kubernetes; the
        /// DaemonSet sets it from the downward API).
        #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
        node_name: Option<String>,
        /// This node's addresses, comma-separated (one IPv4, one IPv6), in place of the
        /// config's node.source_v4 / source_v6 (a DaemonSet sets HOST_IPS from status.hostIPs).
        #[arg(long, env = "HOST_IPS", value_delimiter = ',')]
        source: Vec<std::net::IpAddr>,
    },
    /// Detach the program from every interface and remove the pinned maps (flow table included).
    Down,
    /// Counters: global (every packet ends in one verdict), per VIP, per backend.
    Stats {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Print rates per second every SECONDS instead.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<f64>,
    },
    /// Each VIP's backends: configured weight, health, share of table slots, traffic.
    Backends {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Entries of the flow table (client -> VIP, and the backend the flow is pinned to).
    Flows {
        /// Only flows to this VIP (ADDRESS:PORT, [V6]:PORT).
        #[arg(long)]
        vip: Option<SocketAddr>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Which backend a flow gets, and why: its flow entry, its client's affinity, or hash -> slot -> backend.
    Explain {
        /// Client address, with a port for VIPs that hash the 5-tuple (10.0.0.1:40000, [2001:db8::1]:40000).
        source: String,
        /// VIP address and port.
        destination: SocketAddr,
        /// tcp or udp.
        protocol: Protocol,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Check that this kernel can run lb (needs root).
    ///
    /// Loads and verifies the XDP program with the given sizes, without attaching it.
    Check {
        #[arg(long, default_value_t = maps::DEFAULT_MAGLEV_M)]
        table_size: u32,
        #[arg(long, default_value_t = maps::DEFAULT_MAX_VIPS)]
        max_vips: u32,
        #[arg(long, default_value_t = maps::DEFAULT_MAX_BACKENDS)]
        max_backends: u32,
        #[arg(long, default_value_t = maps::DEFAULT_FLOW_ENTRIES)]
        flow_entries: u32,
    },
    /// Print the CustomResourceDefinition of lb's UpstreamPolicy (YAML, for `kubectl apply -f -`).
    Crd,
}

/// Runs the CLI with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // `lb stats | head` should end quietly, as other Unix tools do.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let pins = cli.pin_dir;
    match cli.command {
        Command::Run {
            config,
            kubernetes,
            class,
            node_name,
            source,
        } => {
            let kubernetes = match (kubernetes, node_name) {
                (false, _) => None,
                (true, Some(node_name)) if !node_name.is_empty() => {
                    Some(crate::k8s::KubeOptions { class, node_name })
                }
                (true, _) => bail!(
                    "--kubernetes needs this node's name: set NODE_NAME (the DaemonSet takes it from spec.nodeName) or --node-name"
                ),
            };
            tokio::runtime::Runtime::new()?.block_on(run::run(RunOptions {
                config,
                pin_dir: pins,
                state_dir: cli.state_dir,
                kubernetes,
                sources: source,
            }))
        }
        Command::Down => {
            let done = run::down(&pins, &cli.state_dir)?;
            if done.is_empty() {
                println!("nothing pinned in {}", pins.display());
            }
            for d in done {
                println!("{d}");
            }
            Ok(())
        }
        Command::Stats { json, watch } => {
            let p = Pinned::open(&pins)?;
            match watch {
                Some(secs) => watch_stats(&p, Duration::from_secs_f64(secs.max(0.1))),
                None => stats(&p, json),
            }
        }
        Command::Backends { json } => backends(&Pinned::open(&pins)?, &cli.state_dir, json),
        Command::Flows { vip, limit, json } => flows(&Pinned::open(&pins)?, vip, limit, json),
        Command::Explain {
            source,
            destination,
            protocol,
            json,
        } => explain(&Pinned::open(&pins)?, &source, destination, protocol, json),
        Command::Crd => {
            print!("{}", crate::k8s::policy::crd_yaml());
            Ok(())
        }
        Command::Check {
            table_size,
            max_vips,
            max_backends,
            flow_entries,
        } => {
            let sizes = Sizes {
                maglev_m: table_size,
                max_vips,
                max_backends,
                flow_entries,
                ..Default::default()
            };
            let ebpf = program::load(&sizes, None).context("loading the lb XDP program")?;
            println!("the XDP program loads and verifies on this kernel; its maps:");
            let mut names: Vec<_> = ebpf.maps().map(|(n, _)| n.to_string()).collect();
            names.sort();
            for n in names {
                println!("  {n}");
            }
            Ok(())
        }
    }
}

fn vip_json(k: &VipKey) -> serde_json::Value {
    json!({
        "address": ip_of(&k.addr, k.family).to_string(),
        "port": u16::from_be(k.port),
        "protocol": Protocol::from_number(k.proto).map(|p| p.to_string()),
    })
}

fn stats(p: &Pinned, as_json: bool) -> Result<()> {
    let counters = p.counters()?;
    let vips = p.vips()?;
    let backends = p.backends()?;
    if as_json {
        let mut vip_rows = Vec::new();
        for (k, v) in &vips {
            let s = p.vip_stats(v.id)?;
            vip_rows.push(json!({"vip": vip_label(k), "id": v.id, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows}));
        }
        let mut be_rows = Vec::new();
        for (id, b) in &backends {
            let s = p.backend_stats(*id)?;
            be_rows.push(json!({"backend": ip_of(&b.addr, b.family).to_string(), "id": id, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows}));
        }
        let global: serde_json::Map<String, serde_json::Value> = counters
            .iter()
            .map(|(c, v)| (c.name().to_string(), json!(v)))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"global": global, "vips": vip_rows, "backends": be_rows})
            )?
        );
        return Ok(());
    }
    let packets = counters
        .iter()
        .find(|(c, _)| *c == Counter::Packets)
        .map_or(0, |(_, v)| *v);
    println!("GLOBAL (every packet ends in exactly one verdict)");
    for (c, v) in &counters {
        let kind = if c.is_verdict() {
            "verdict"
        } else if *c == Counter::Packets {
            ""
        } else {
            "event"
        };
        let share = if c.is_verdict() && packets > 0 {
            format!("{:>6.2}%", *v as f64 * 100.0 / packets as f64)
        } else {
            String::new()
        };
        println!("  {:<24} {:>14} {:<8} {}", c.name(), v, kind, share);
    }
    println!("\nVIPS");
    println!(
        "  {:<32} {:>14} {:>16} {:>12}",
        "VIP", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for (k, v) in &vips {
        let s = p.vip_stats(v.id)?;
        println!(
            "  {:<32} {:>14} {:>16} {:>12}",
            vip_label(k),
            s.packets,
            s.bytes,
            s.new_flows
        );
    }
    println!("\nBACKENDS");
    println!(
        "  {:<32} {:>14} {:>16} {:>12}",
        "BACKEND", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for (id, b) in &backends {
        let s = p.backend_stats(*id)?;
        println!(
            "  {:<32} {:>14} {:>16} {:>12}",
            ip_of(&b.addr, b.family).to_string(),
            s.packets,
            s.bytes,
            s.new_flows
        );
    }
    Ok(())
}

fn watch_stats(p: &Pinned, every: Duration) -> Result<()> {
    let mut last = p.counters()?;
    let mut t = Instant::now();
    loop {
        std::thread::sleep(every);
        let now = p.counters()?;
        let dt = t.elapsed().as_secs_f64();
        t = Instant::now();
        let rates: Vec<String> = now
            .iter()
            .zip(&last)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((c, a), (_, b))| format!("{}={:.0}/s", c.name(), (a - b) as f64 / dt))
            .collect();
        println!(
            "{}",
            if rates.is_empty() {
                "idle".to_string()
            } else {
                rates.join("  ")
            }
        );
        last = now;
    }
}

fn backends(p: &Pinned, state_dir: &std::path::Path, as_json: bool) -> Result<()> {
    let status: Option<Status> = run::read_status(state_dir);
    let mut out = Vec::new();
    for (k, v) in p.vips()? {
        let label = vip_label(&k);
        let m = p.table_size(&v) as f64;
        let counts = p.slot_counts(&v);
        let st = status
            .as_ref()
            .and_then(|s| s.vips.iter().find(|x| x.vip == label));
        let mut rows = Vec::new();
        // Backends in the table, then configured ones that hold no slot (draining, unhealthy).
        let mut addrs: BTreeMap<String, (Option<u32>, u32)> = BTreeMap::new();
        for (id, n) in &counts {
            if *id == NO_BACKEND {
                continue;
            }
            if let Some(b) = p.backend(*id) {
                addrs.insert(ip_of(&b.addr, b.family).to_string(), (Some(*id), *n));
            }
        }
        if let Some(st) = st {
            let all = p.backends()?;
            for b in &st.backends {
                // Still known by id (weight 0 keeps its id), just holding no slot.
                let id = all
                    .iter()
                    .find(|(_, x)| ip_of(&x.addr, x.family).to_string() == b.address)
                    .map(|(id, _)| *id);
                addrs.entry(b.address.clone()).or_insert((id, 0));
            }
        }
        for (addr, (id, slots)) in addrs {
            let cfg = st.and_then(|s| s.backends.iter().find(|b| b.address == addr));
            let traffic = match id {
                Some(id) => Some(p.backend_stats(id)?),
                None => None,
            };
            let passive = match id {
                Some(id) if v.mode == lb_common::MODE_NAT => Some(p.passive(id)?),
                _ => None,
            };
            let health = cfg.map(|c| {
                if c.passive_out {
                    "out-passive"
                } else {
                    match c.healthy {
                        None => "unchecked",
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                    }
                }
            });
            rows.push(json!({
                "address": addr,
                "id": id,
                "weight": cfg.map(|c| c.weight),
                "health": health,
                "slots": slots,
                "share": slots as f64 / m,
                "packets": traffic.map(|t| t.packets),
                "new_flows": traffic.map(|t| t.new_flows),
                "passive": passive.map(|h| json!({
                    "answered": h.answered,
                    "refused": h.refused,
                    "unreachable": h.unreachable,
                    "syn_timeouts": h.syn_timeouts,
                    "consecutive_failures": h.consecutive_failures,
                })),
            }));
        }
        out.push(json!({"vip": label, "name": st.map(|s| s.name.clone()), "id": v.id, "table_size": m as u32, "mode": if v.mode == lb_common::MODE_NAT { "nat" } else { "dsr" }, "empty_slots": counts.get(&NO_BACKEND).copied().unwrap_or(0), "backends": rows}));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if status.is_none() {
        println!(
            "(no {}: weights and health unknown)",
            status_path(state_dir).display()
        );
    }
    for v in &out {
        println!(
            "{} {} [{}]",
            v["vip"].as_str().unwrap_or(""),
            v["name"]
                .as_str()
                .map(|n| format!("({n})"))
                .unwrap_or_default(),
            v["mode"].as_str().unwrap_or("")
        );
        println!(
            "  {:<28} {:>7} {:<11} {:>8} {:>8} {:>12} {:>10}",
            "BACKEND", "WEIGHT", "HEALTH", "SLOTS", "SHARE", "PACKETS", "NEW FLOWS"
        );
        for b in v["backends"].as_array().into_iter().flatten() {
            let opt = |x: &serde_json::Value| {
                if x.is_null() {
                    "-".to_string()
                } else {
                    x.to_string().trim_matches('"').to_string()
                }
            };
            let passive = &b["passive"];
            let passive = if passive.is_null() {
                String::new()
            } else {
                format!(
                    "  attempts: {} answered, {} refused, {} unreachable, {} SYN timeouts; {} failures in a row",
                    passive["answered"],
                    passive["refused"],
                    passive["unreachable"],
                    passive["syn_timeouts"],
                    passive["consecutive_failures"]
                )
            };
            println!(
                "  {:<28} {:>7} {:<11} {:>8} {:>7.2}% {:>12} {:>10}{passive}",
                opt(&b["address"]),
                opt(&b["weight"]),
                opt(&b["health"]),
                b["slots"].as_u64().unwrap_or(0),
                b["share"].as_f64().unwrap_or(0.0) * 100.0,
                opt(&b["packets"]),
                opt(&b["new_flows"])
            );
        }
        if v["empty_slots"].as_u64() > Some(0) {
            println!(
                "  {} slots have no backend: new flows landing there are dropped",
                v["empty_slots"]
            );
        }
    }
    Ok(())
}

fn flows(p: &Pinned, vip: Option<SocketAddr>, limit: usize, as_json: bool) -> Result<()> {
    let backends = p.backends()?;
    let now = monotonic_coarse_ns();
    let mut rows = Vec::new();
    for (k, v) in p.flows(usize::MAX)? {
        if let Some(want) = vip
            && (ip_of(&k.dst, k.family) != want.ip() || u16::from_be(k.dst_port) != want.port())
        {
            continue;
        }
        if rows.len() == limit {
            break;
        }
        let backend = backends
            .get(&v.backend_id)
            .map(|b| ip_of(&b.addr, b.family).to_string());
        rows.push(json!({
            "client": SocketAddr::new(ip_of(&k.src, k.family), u16::from_be(k.src_port)).to_string(),
            "vip": SocketAddr::new(ip_of(&k.dst, k.family), u16::from_be(k.dst_port)).to_string(),
            "protocol": Protocol::from_number(k.proto).map(|p| p.to_string()),
            "backend": backend,
            "backend_id": v.backend_id,
            "age_s": now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        }));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<46} {:<46} {:<5} {:<28} {:>8}",
        "CLIENT", "VIP", "PROTO", "BACKEND", "AGE (s)"
    );
    for r in &rows {
        let s = |x: &serde_json::Value| x.as_str().unwrap_or("(removed)").to_string();
        println!(
            "{:<46} {:<46} {:<5} {:<28} {:>8}",
            s(&r["client"]),
            s(&r["vip"]),
            s(&r["protocol"]),
            s(&r["backend"]),
            r["age_s"].as_u64().unwrap_or(0)
        );
    }
    println!(
        "({} shown; the age of a TCP flow counts from its first packet, of a UDP flow from its last)",
        rows.len()
    );
    Ok(())
}

/// Parses `ADDR` or `ADDR:PORT` / `[V6]:PORT`.
fn parse_source(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    match s.parse::<IpAddr>() {
        Ok(a) => Ok((a, None)),
        Err(_) => bail!("{s:?} is not an address or address:port"),
    }
}

fn explain(
    p: &Pinned,
    source: &str,
    dst: SocketAddr,
    proto: Protocol,
    as_json: bool,
) -> Result<()> {
    let (src, sport) = parse_source(source)?;
    if src.is_ipv4() != dst.is_ipv4() {
        bail!("source and destination are of different address families");
    }
    let (daddr, family) = addr16(dst.ip());
    let vkey = VipKey {
        addr: daddr,
        port: dst.port().to_be(),
        proto: proto.number(),
        family,
    };
    let describe = |id: u32| {
        p.backend(id)
            .map(|b| ip_of(&b.addr, b.family).to_string())
            .unwrap_or_else(|| format!("id {id} (removed)"))
    };
    let mut steps: Vec<String> = Vec::new();
    let result = (|| -> Result<serde_json::Value> {
        let vips = p.vips()?;
        let Some(vip) = vips.get(&vkey) else {
            steps.push(format!(
                "{} is not a VIP: the packet passes to the kernel untouched",
                vip_label(&vkey)
            ));
            return Ok(json!({"verdict": "pass", "reason": "not a VIP"}));
        };
        steps.push(format!("{} is VIP id {}", vip_label(&vkey), vip.id));
        let src_only = vip.flags & VIP_F_HASH_SRC_ONLY != 0;
        let key = FlowKey {
            src: addr16(src).0,
            dst: daddr,
            src_port: sport.unwrap_or(0).to_be(),
            dst_port: dst.port().to_be(),
            proto: proto.number(),
            family,
            _pad: [0; 2],
        };
        if sport.is_some() {
            if let Some(f) = p.flow(&key) {
                if f.vip_id == vip.id && p.backend(f.backend_id).is_some() {
                    steps.push(format!(
                        "flow table: this flow is pinned to backend {}",
                        describe(f.backend_id)
                    ));
                    return Ok(
                        json!({"verdict": "forward", "by": "flow", "backend": describe(f.backend_id), "backend_id": f.backend_id}),
                    );
                }
                steps.push(
                    "flow table: an entry exists but its backend is gone: balanced afresh".into(),
                );
            } else {
                steps.push("flow table: no entry (a new flow)".into());
            }
        }
        if vip.affinity_timeout_s > 0 {
            match p.affinity(&AffinityKey {
                addr: addr16(src).0,
                vip_id: vip.id,
            }) {
                Some(a)
                    if monotonic_coarse_ns().saturating_sub(a.last_seen_ns)
                        <= vip.affinity_timeout_s as u64 * 1_000_000_000
                        && p.backend(a.backend_id).is_some() =>
                {
                    steps.push(format!(
                        "affinity: client {src} is held on backend {} (timeout {}s)",
                        describe(a.backend_id),
                        vip.affinity_timeout_s
                    ));
                    return Ok(
                        json!({"verdict": "forward", "by": "affinity", "backend": describe(a.backend_id), "backend_id": a.backend_id}),
                    );
                }
                Some(_) => steps.push("affinity: the client's entry has expired".into()),
                None => steps.push("affinity: no entry for this client".into()),
            }
        }
        if !src_only && sport.is_none() {
            bail!("this VIP hashes the 5-tuple: give the source as ADDRESS:PORT");
        }
        let hash = if src_only {
            source_hash(&key.src, family)
        } else {
            flow_hash(&key)
        };
        let table_size = p.table_size(vip);
        let slot = maglev_slot(hash, table_size);
        let id = p.ring_slot(vip.id, slot);
        steps.push(format!(
            "maglev: hash({}) = {hash:#010x} -> slot {slot} of {} -> {}",
            if src_only {
                "source address"
            } else {
                "5-tuple"
            },
            table_size,
            if id == NO_BACKEND {
                "no backend: dropped".to_string()
            } else {
                format!("backend {}", describe(id))
            }
        ));
        if id == NO_BACKEND || p.backend(id).is_none() {
            return Ok(
                json!({"verdict": "drop", "reason": "no backend", "hash": hash, "slot": slot}),
            );
        }
        Ok(
            json!({"verdict": "forward", "by": "maglev", "hash": hash, "slot": slot, "backend": describe(id), "backend_id": id}),
        )
    })()?;
    let mut result = result;
    if let Some(vip) = p.vips()?.get(&vkey)
        && vip.mode == lb_common::MODE_NAT
        && let Some(sport) = sport
    {
        let key = FlowKey {
            src: addr16(src).0,
            dst: daddr,
            src_port: sport.to_be(),
            dst_port: dst.port().to_be(),
            proto: proto.number(),
            family,
            _pad: [0; 2],
        };
        match p.nat(&key) {
            Some(n) => {
                steps.push(format!(
                    "nat: translated with source port {} towards backend {}{}",
                    u16::from_be(n.nat_port),
                    describe(n.backend_id),
                    match p.nat_reverse(&key, &n) {
                        Some(r) if r.closed() => " (closed)",
                        Some(_) => "",
                        None => " (gone: the next packet takes a port again)",
                    }
                ));
                result["nat_port"] = json!(u16::from_be(n.nat_port));
            }
            None => steps.push(
                "nat: no translation yet (the first packet takes a source port from the flow hash)"
                    .into(),
            ),
        }
    }
    if as_json {
        let mut r = result;
        r["vip"] = vip_json(&vkey);
        r["steps"] = json!(steps);
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for s in steps {
            println!("{s}");
        }
    }
    Ok(())
}
