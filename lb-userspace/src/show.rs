//! What the inspection commands print (`lb stats`, `lb backends`, `lb flows`, `lb explain`),
//! read from a running agent's pinned maps.
//!
//! Counters are kept per member (one backend of one VIP): a backend serving two VIPs shows its
//! traffic under each, and `lb stats` adds them up per backend.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_common::{
    AffinityKey, Counter, FlowKey, Member, NO_BACKEND, TrafficStats, VIP_F_HASH_SRC_ONLY, VipKey,
    VipValue,
    select::{
        AffinityCheck, FlowCheck, check_affinity, check_flow, maglev_hash, opens_connection,
        ring_index, ring_member_ok,
    },
};
use serde_json::json;

use crate::{
    inspect::{Pinned, backend_label, monotonic_coarse_ns},
    model::{Protocol, addr16, ip_of, vip_label},
    run::{self, Status, status_path},
};

fn vip_json(k: &VipKey) -> serde_json::Value {
    json!({
        "address": ip_of(&k.addr, k.family).to_string(),
        "port": u16::from_be(k.port),
        "protocol": Protocol::from_number(k.proto).map(|p| p.to_string()),
    })
}

fn add(a: TrafficStats, b: TrafficStats) -> TrafficStats {
    TrafficStats {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    }
}

/// Each VIP's label, by VIP id.
pub fn vip_labels(p: &Pinned) -> Result<BTreeMap<u32, String>> {
    Ok(p.vips()?
        .iter()
        .map(|(k, v)| (v.id, vip_label(k)))
        .collect())
}

/// Every live member with its VIP's label and its counters, by member id.
fn member_rows(p: &Pinned) -> Result<Vec<(u32, Member, String, TrafficStats)>> {
    let labels = vip_labels(p)?;
    let mut rows = Vec::new();
    for (id, m) in p.members()? {
        let vip = labels.get(&m.vip_id).cloned().unwrap_or_default();
        rows.push((id, m, vip, p.member_stats(id)?));
    }
    Ok(rows)
}

/// Per-backend totals: the sums of its members' counters, and how many VIPs it serves.
fn backend_totals(
    rows: &[(u32, Member, String, TrafficStats)],
) -> BTreeMap<String, (TrafficStats, usize)> {
    let mut out: BTreeMap<String, (TrafficStats, usize)> = BTreeMap::new();
    for (_, m, _, s) in rows {
        let e = out.entry(backend_label(m)).or_default();
        e.0 = add(e.0, *s);
        e.1 += 1;
    }
    out
}

pub fn stats(p: &Pinned, as_json: bool) -> Result<()> {
    let counters = p.counters()?;
    let vips = p.vips()?;
    let members = member_rows(p)?;
    let totals = backend_totals(&members);
    if as_json {
        let mut vip_rows = Vec::new();
        for (k, v) in &vips {
            let s = p.vip_stats(v.id)?;
            vip_rows.push(json!({"vip": vip_label(k), "id": v.id, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows}));
        }
        let member_rows: Vec<_> = members
            .iter()
            .map(|(id, m, vip, s)| json!({"vip": vip, "backend": backend_label(m), "id": id, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows}))
            .collect();
        let be_rows: Vec<_> = totals
            .iter()
            .map(|(b, (s, n))| json!({"backend": b, "vips": n, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows}))
            .collect();
        let global: serde_json::Map<String, serde_json::Value> = counters
            .iter()
            .map(|(c, v)| (c.name().to_string(), json!(v)))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"global": global, "vips": vip_rows, "members": member_rows, "backends": be_rows})
            )?
        );
        return Ok(());
    }
    print_global(&counters);
    let row = |name: &str, s: &TrafficStats| {
        println!(
            "  {:<48} {:>14} {:>16} {:>12}",
            name, s.packets, s.bytes, s.new_flows
        )
    };
    let header = |title: &str, col: &str| {
        println!("\n{title}");
        println!(
            "  {:<48} {:>14} {:>16} {:>12}",
            col, "PACKETS", "BYTES", "NEW FLOWS"
        );
    };
    header("VIPS", "VIP");
    for (k, v) in &vips {
        row(&vip_label(k), &p.vip_stats(v.id)?);
    }
    header("BACKENDS PER VIP", "VIP -> BACKEND");
    for (_, m, vip, s) in &members {
        row(&format!("{vip} -> {}", backend_label(m)), s);
    }
    header("BACKENDS (all VIPs)", "BACKEND");
    for (b, (s, _)) in &totals {
        row(b, s);
    }
    Ok(())
}

fn print_global(counters: &[(Counter, u64)]) {
    let packets = counters
        .iter()
        .find(|(c, _)| *c == Counter::Packets)
        .map_or(0, |(_, v)| *v);
    println!("GLOBAL (every packet ends in exactly one verdict)");
    for (c, v) in counters {
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
}

pub fn watch_stats(p: &Pinned, every: Duration) -> Result<()> {
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

pub fn backends(p: &Pinned, state_dir: &std::path::Path, as_json: bool) -> Result<()> {
    let status: Option<Status> = run::read_status(state_dir);
    let members = p.members()?;
    let mut out = Vec::new();
    for (k, v) in p.vips()? {
        let label = vip_label(&k);
        let st = status
            .as_ref()
            .and_then(|s| s.vips.iter().find(|x| x.vip == label));
        out.push(vip_backends(p, &k, &v, &members, st)?);
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

/// One VIP's members (its backends, with their own counters), then configured backends that have
/// no member (yet).
fn vip_backends(
    p: &Pinned,
    k: &VipKey,
    v: &VipValue,
    members: &BTreeMap<u32, Member>,
    st: Option<&run::VipStatus>,
) -> Result<serde_json::Value> {
    let m = p.table_size(v) as f64;
    let counts = p.slot_counts(v);
    // Address -> (member id, NAT port).
    let mut by_addr: BTreeMap<String, (Option<u32>, Option<u16>)> = BTreeMap::new();
    for (id, mem) in members.iter().filter(|(_, mem)| mem.vip_id == v.id) {
        let addr = ip_of(&mem.addr, mem.family).to_string();
        let port = Some(u16::from_be(mem.port)).filter(|p| *p != 0);
        by_addr.insert(addr, (Some(*id), port));
    }
    for b in st.map(|s| s.backends.as_slice()).unwrap_or_default() {
        by_addr.entry(b.address.clone()).or_insert((None, None));
    }
    let mut rows = Vec::new();
    for (addr, (id, port)) in by_addr {
        let cfg = st.and_then(|s| s.backends.iter().find(|b| b.address == addr));
        let slots = id.and_then(|id| counts.get(&id).copied()).unwrap_or(0);
        let traffic = id.map(|id| p.member_stats(id)).transpose()?;
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
            "port": port,
            "id": id,
            "weight": cfg.map(|c| c.weight),
            "health": health,
            "slots": slots,
            "share": slots as f64 / m,
            "packets": traffic.map(|t| t.packets),
            "bytes": traffic.map(|t| t.bytes),
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
    Ok(
        json!({"vip": vip_label(k), "name": st.map(|s| s.name.clone()), "id": v.id, "table_size": m as u32, "mode": if v.mode == lb_common::MODE_NAT { "nat" } else { "dsr" }, "empty_slots": counts.get(&NO_BACKEND).copied().unwrap_or(0), "backends": rows}),
    )
}

pub fn flows(p: &Pinned, vip: Option<SocketAddr>, limit: usize, as_json: bool) -> Result<()> {
    let members = p.members()?;
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
        // Only the allocation the entry names: a retired or re-allocated id is "(removed)".
        let backend = members
            .get(&v.member_id)
            .filter(|m| m.generation == v.generation)
            .map(backend_label);
        rows.push(json!({
            "client": SocketAddr::new(ip_of(&k.src, k.family), u16::from_be(k.src_port)).to_string(),
            "vip": SocketAddr::new(ip_of(&k.dst, k.family), u16::from_be(k.dst_port)).to_string(),
            "protocol": Protocol::from_number(k.proto).map(|p| p.to_string()),
            "backend": backend,
            "member_id": v.member_id,
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

/// What `lb explain` found: the verdict (JSON) and the steps that led to it.
struct Explained {
    result: serde_json::Value,
    steps: Vec<String>,
}

impl Explained {
    fn step(&mut self, s: impl Into<String>) {
        self.steps.push(s.into());
    }
}

/// `lb explain`: the member a packet would get, by the program's own rules
/// (`lb_common::select`), step by step.
pub fn explain(
    p: &Pinned,
    source: &str,
    dst: SocketAddr,
    proto: Protocol,
    syn: bool,
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
    let key = FlowKey {
        src: addr16(src).0,
        dst: daddr,
        src_port: sport.unwrap_or(0).to_be(),
        dst_port: dst.port().to_be(),
        proto: proto.number(),
        family,
        _pad: [0; 2],
    };
    let mut e = Explained {
        result: json!(null),
        steps: Vec::new(),
    };
    match p.vips()?.get(&vkey) {
        None => {
            e.step(format!(
                "{} is not a VIP: the packet passes to the kernel untouched",
                vip_label(&vkey)
            ));
            e.result = json!({"verdict": "pass", "reason": "not a VIP"});
        }
        Some(vip) => {
            e.step(format!("{} is VIP id {}", vip_label(&vkey), vip.id));
            let tcp_flags = if syn {
                lb_common::select::TCP_FLAG_SYN
            } else {
                0
            };
            e.result = choose(p, &key, vip, sport.is_some(), tcp_flags, &mut e.steps)?;
            if vip.mode == lb_common::MODE_NAT && sport.is_some() {
                explain_nat(p, &key, &mut e);
            }
        }
    }
    if as_json {
        let mut r = e.result;
        r["vip"] = vip_json(&vkey);
        r["steps"] = json!(e.steps);
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for s in e.steps {
            println!("{s}");
        }
    }
    Ok(())
}

fn describe(p: &Pinned, id: u32) -> String {
    p.member(id)
        .map(|m| backend_label(&m))
        .unwrap_or_else(|| format!("member {id} (removed)"))
}

fn forward(p: &Pinned, by: &str, id: u32) -> serde_json::Value {
    json!({"verdict": "forward", "by": by, "backend": describe(p, id), "member_id": id})
}

/// The program's choice for `key` on `vip`: flow entry, affinity, Maglev (see
/// `lb-ebpf/src/select.rs`, which makes the same calls).
fn choose(
    p: &Pinned,
    key: &FlowKey,
    vip: &VipValue,
    have_port: bool,
    tcp_flags: u8,
    steps: &mut Vec<String>,
) -> Result<serde_json::Value> {
    let now = monotonic_coarse_ns();
    let udp_idle = p.node()?.udp_idle_timeout_ns;
    if opens_connection(key.proto, tcp_flags) {
        steps.push("a TCP SYN opens a new connection: it follows no flow entry".into());
    } else if have_port {
        match p.flow(key) {
            None => steps.push("flow table: no entry (a new flow)".into()),
            Some(f) => {
                let m = p.member(f.member_id);
                match check_flow(&f, m.as_ref(), vip, key.proto, now, udp_idle) {
                    FlowCheck::Follow | FlowCheck::FollowAndRefresh => {
                        steps.push(format!(
                            "flow table: this flow is pinned to backend {}",
                            describe(p, f.member_id)
                        ));
                        return Ok(forward(p, "flow", f.member_id));
                    }
                    FlowCheck::Stale => steps.push(
                        "flow table: an entry exists but its member is gone or was re-allocated: balanced afresh"
                            .into(),
                    ),
                    FlowCheck::IdleExpired => steps.push(format!(
                        "flow table: the UDP flow was idle for longer than {:?}: balanced afresh",
                        Duration::from_nanos(udp_idle)
                    )),
                }
            }
        }
    }
    if vip.affinity_timeout_s > 0 {
        let akey = AffinityKey {
            addr: key.src,
            vip_id: vip.id,
        };
        match p.affinity(&akey) {
            None => steps.push("affinity: no entry for this client".into()),
            Some(a) => match check_affinity(&a, p.member(a.member_id).as_ref(), vip, now) {
                AffinityCheck::Follow => {
                    steps.push(format!(
                        "affinity: client {} is held on backend {} (timeout {}s)",
                        ip_of(&key.src, key.family),
                        describe(p, a.member_id),
                        vip.affinity_timeout_s
                    ));
                    return Ok(forward(p, "affinity", a.member_id));
                }
                AffinityCheck::Expired => {
                    steps.push("affinity: the client's entry has expired".into())
                }
                AffinityCheck::Stale => steps.push(
                    "affinity: the client's backend is gone or takes no new flows: chosen afresh"
                        .into(),
                ),
            },
        }
    }
    maglev_choice(p, key, vip, have_port, steps)
}

fn maglev_choice(
    p: &Pinned,
    key: &FlowKey,
    vip: &VipValue,
    have_port: bool,
    steps: &mut Vec<String>,
) -> Result<serde_json::Value> {
    let src_only = vip.flags & VIP_F_HASH_SRC_ONLY != 0;
    if !src_only && !have_port {
        bail!("this VIP hashes the 5-tuple: give the source as ADDRESS:PORT");
    }
    let hash = maglev_hash(key, vip);
    let (slot, index) = ring_index(hash, vip, p.sizes.maglev_m);
    let id = p.ring_at(index);
    let member = p.member(id).filter(|m| ring_member_ok(m, vip));
    steps.push(format!(
        "maglev: hash({}) = {hash:#010x} -> slot {slot} of {} -> {}",
        if src_only {
            "source address"
        } else {
            "5-tuple"
        },
        p.table_size(vip),
        match member {
            Some(_) => format!("backend {}", describe(p, id)),
            None => "no backend: dropped".to_string(),
        }
    ));
    if id == NO_BACKEND || member.is_none() {
        return Ok(json!({"verdict": "drop", "reason": "no backend", "hash": hash, "slot": slot}));
    }
    if member.is_some_and(|m| m.rejects()) {
        // A share with nowhere to go (lb-ebpf/src/reject.rs): TCP is reset, the rest dropped.
        let verdict = if key.proto == lb_common::IPPROTO_TCP {
            "reset"
        } else {
            "drop"
        };
        steps.push(format!("member {id} rejects its share: {verdict}"));
        return Ok(
            json!({"verdict": verdict, "reason": "rejected share", "hash": hash, "slot": slot, "member_id": id}),
        );
    }
    let mut r = forward(p, "maglev", id);
    r["hash"] = json!(hash);
    r["slot"] = json!(slot);
    Ok(r)
}

fn explain_nat(p: &Pinned, key: &FlowKey, e: &mut Explained) {
    match p.nat(key) {
        Some(n) => {
            e.step(format!(
                "nat: translated with source port {} towards backend {}{}",
                u16::from_be(n.nat_port),
                describe(p, n.backend_id),
                match p.nat_reverse(key, &n) {
                    Some(r) if r.closed() => " (closed)",
                    Some(_) => "",
                    None => " (gone: the next packet takes a port again)",
                }
            ));
            e.result["nat_port"] = json!(u16::from_be(n.nat_port));
        }
        None => e.step(
            "nat: no translation yet (the first packet takes a source port from the flow hash)",
        ),
    }
}
