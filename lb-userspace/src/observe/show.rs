//! What the inspection commands print (`lb stats`, `lb backends`, `lb explain`; `lb flows`,
//! `lb stats --watch` and `lb status` in the modules below), read from a running agent's pinned
//! maps, as a table, a wide table or JSON ([`Format`]). In JSON a VIP is always a
//! [`VipRef`] under `"vip"` and a backend a [`BackendRef`] under `"backend"`.
//!
//! Counters are kept per member (one backend of one VIP): a backend serving two VIPs shows its
//! traffic under each, and `lb stats` adds them up per backend.

pub mod flows;
pub mod status;
pub mod watch;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

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
    kernel::inspect::{Pinned, monotonic_coarse_ns},
    model::desired::{Protocol, addr16, ip_of, vip_label},
    model::view::{BackendRef, VipRef},
    status::file::{BackendStatus, Status, VipStatus, read_status, status_path},
};

/// Why an inspecting command (`lb stats`, `backends`, `explain`, `flows`, `status`, `nexthops`)
/// could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    #[error(transparent)]
    Maps(#[from] crate::kernel::inspect::InspectError),
    #[error("reading {what}")]
    Map {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening {}", path.display())]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("writing the output")]
    Output(#[from] std::io::Error),
    #[error("writing JSON")]
    Json(#[from] serde_json::Error),
    #[error("{0:?} is not an address or address:port")]
    NotAnAddress(String),
    #[error("source and destination are of different address families")]
    MixedFamilies,
    #[error("this VIP hashes the 5-tuple: give the source as ADDRESS:PORT")]
    NeedsSourcePort,
    /// What `lb status` found wrong (it printed the status first).
    #[error("{}", .0.join("; "))]
    Problems(Vec<String>),
}

/// The inspecting commands' result.
pub type Result<T, E = ShowError> = std::result::Result<T, E>;

/// How an inspecting command prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Columns for people.
    #[default]
    Table,
    /// The table with more columns: ids, generations, slots.
    Wide,
    /// JSON, for scripts.
    Json,
}

/// `rows` as columns as wide as their widest cell, two spaces apart (elastic tabstops); the
/// first row is the headings. Each row ends with a newline.
pub(crate) fn table(rows: impl IntoIterator<Item = Vec<String>>) -> String {
    use std::io::Write as _;
    let mut tw = tabwriter::TabWriter::new(Vec::new()).padding(2);
    for r in rows {
        writeln!(tw, "{}", r.join("\t")).expect("writing to memory");
    }
    let bytes = tw.into_inner().expect("flushing to memory");
    String::from_utf8(bytes).expect("UTF-8 in, UTF-8 out")
}

/// The names of VIPs (by label) as the agent's status file gives them: the maps do not hold
/// names. And their backups (see [`crate::model::desired::BackendSpec::backup`]), which `lb explain`
/// names.
#[derive(Default)]
pub struct VipNames {
    names: BTreeMap<String, String>,
    /// VIP label -> (backend address, why it is a backup, whether it stands in now).
    backups: BTreeMap<String, Vec<(String, String, bool)>>,
    /// The ports of the port-range VIPs (keyed with port 0), for their labels.
    ranges: BTreeMap<VipKey, crate::model::desired::PortRange>,
}

impl VipNames {
    pub fn read(state_dir: &Path) -> Self {
        Self::of(read_status(state_dir).as_ref())
    }

    /// The same, with the port ranges of the VIPs in `p` (their labels say them).
    pub fn with_ranges(mut self, p: &Pinned) -> Self {
        self.ranges = p.port_ranges().unwrap_or_default();
        self
    }

    fn of(status: Option<&Status>) -> Self {
        let vips = || status.iter().flat_map(|s| &s.vips);
        let backups = vips().map(|v| {
            let b = v.backends.iter().filter_map(|b| {
                let why = b.backup.clone()?;
                Some((b.address.clone(), why, b.effective_weight > 0))
            });
            (v.vip.clone(), b.collect::<Vec<_>>())
        });
        Self {
            names: vips()
                .filter(|v| !v.name.is_empty())
                .map(|v| (v.vip.clone(), v.name.clone()))
                .collect(),
            backups: backups.filter(|(_, b)| !b.is_empty()).collect(),
            ranges: BTreeMap::new(),
        }
    }

    /// The VIP `k` as every JSON output shows it.
    pub fn vip(&self, k: &VipKey) -> VipRef {
        let r = VipRef::of_range(k, self.ranges.get(k).copied());
        let name = self.names.get(&r.label).cloned();
        r.named(name)
    }

    /// The backups of the VIP labelled `label`: (address, why, standing in).
    pub fn backups(&self, label: &str) -> &[(String, String, bool)] {
        self.backups.get(label).map_or(&[], Vec::as_slice)
    }
}

/// Each VIP as [`VipRef`], with its key, by VIP id.
pub fn vip_refs(p: &Pinned, names: &VipNames) -> Result<BTreeMap<u32, (VipKey, VipRef)>> {
    Ok(p.vips()?
        .iter()
        .map(|(k, v)| (v.id, (*k, names.vip(k))))
        .collect())
}

/// One member (a backend of a VIP) and its counters.
pub(crate) struct MemberRow {
    pub id: u32,
    pub member: Member,
    pub vip: VipRef,
    pub backend: BackendRef,
    pub stats: TrafficStats,
}

/// Every live member whose VIP is known, with its counters, by member id.
pub(crate) fn member_rows(p: &Pinned, names: &VipNames) -> Result<Vec<MemberRow>> {
    let vips = vip_refs(p, names)?;
    let mut rows = Vec::new();
    for (id, m) in p.members()? {
        let Some((key, vip)) = vips.get(&m.vip_id) else {
            continue;
        };
        rows.push(MemberRow {
            id,
            member: m,
            vip: vip.clone(),
            backend: BackendRef::of(&m, key),
            stats: p.member_stats(id)?,
        });
    }
    Ok(rows)
}

/// Per-backend totals: the sums of its members' counters, and how many VIPs it serves.
fn backend_totals(rows: &[MemberRow]) -> BTreeMap<BackendRef, (TrafficStats, usize)> {
    let mut out: BTreeMap<BackendRef, (TrafficStats, usize)> = BTreeMap::new();
    for r in rows {
        let e = out.entry(r.backend.clone()).or_default();
        e.0 = e.0.plus(r.stats);
        e.1 += 1;
    }
    out
}

fn traffic_json(s: &TrafficStats) -> serde_json::Value {
    json!({"packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows})
}

/// `target` with the fields of the object `more` added.
fn merged(mut target: serde_json::Value, more: serde_json::Value) -> serde_json::Value {
    if let (Some(t), serde_json::Value::Object(m)) = (target.as_object_mut(), more) {
        t.extend(m);
    }
    target
}

pub fn stats(p: &Pinned, names: &VipNames, format: Format) -> Result<()> {
    let counters = p.counters()?;
    let vips = vip_refs(p, names)?;
    let mut vip_rows = Vec::new();
    for (id, (_, vip)) in &vips {
        vip_rows.push((*id, vip.clone(), p.vip_stats(*id)?));
    }
    let members = member_rows(p, names)?;
    let totals = backend_totals(&members);
    if format == Format::Json {
        let v = stats_json(p, &counters, &vip_rows, &members, &totals)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let wide = format == Format::Wide;
    print_global(&counters);
    let row = |id: String, name: &str, s: &TrafficStats| {
        let id = if wide {
            format!("{id:>9} ")
        } else {
            String::new()
        };
        println!(
            "  {id}{:<48} {:>14} {:>16} {:>12}",
            name, s.packets, s.bytes, s.new_flows
        )
    };
    let header = |title: &str, col: &str, idcol: &str| {
        println!("\n{title}");
        let id = if wide {
            format!("{idcol:>9} ")
        } else {
            String::new()
        };
        println!(
            "  {id}{:<48} {:>14} {:>16} {:>12}",
            col, "PACKETS", "BYTES", "NEW FLOWS"
        );
    };
    header("VIPS", "VIP", "ID");
    for (id, vip, s) in &vip_rows {
        row(id.to_string(), &vip.label, s);
    }
    print_vip_drops(p, &vip_rows);
    header("BACKENDS PER VIP", "VIP -> BACKEND", "MEMBER/GEN");
    for r in &members {
        let name = format!("{} -> {}", r.vip.label, r.backend.label);
        row(format!("{}/{}", r.id, r.member.generation), &name, &r.stats);
    }
    header("BACKENDS (all VIPs)", "BACKEND", "VIPS");
    for (b, (s, n)) in &totals {
        row(n.to_string(), &b.label, s);
    }
    print_replies(p, &vip_rows, &members)
}

/// `lb stats -o json`: the global counters, per VIP, per member and per backend.
fn stats_json(
    p: &Pinned,
    counters: &[(Counter, u64)],
    vip_rows: &[(u32, VipRef, TrafficStats)],
    members: &[MemberRow],
    totals: &BTreeMap<BackendRef, (TrafficStats, usize)>,
) -> Result<serde_json::Value> {
    let vip_rows: Vec<_> = vip_rows
        .iter()
        .map(|(id, vip, s)| {
            let head = json!({
                "vip": vip,
                "id": id,
                "drop_source_range": p.vip_source_drops(*id),
                "drop_new_flow_budget": p.vip_budget_drops(*id),
            });
            Ok(merged(
                merged(head, traffic_json(s)),
                replies_json(p.vip_replies(*id)?),
            ))
        })
        .collect::<Result<_>>()?;
    let member_rows: Vec<_> = members
        .iter()
        .map(|r| {
            let head = json!({"vip": r.vip, "backend": r.backend, "id": r.id, "generation": r.member.generation});
            Ok(merged(merged(head, traffic_json(&r.stats)), replies_json(p.member_replies(r.id)?)))
        })
        .collect::<Result<_>>()?;
    let be_rows: Vec<_> = totals
        .iter()
        .map(|(b, (s, n))| merged(json!({"backend": b, "vips": n}), traffic_json(s)))
        .collect();
    let global: serde_json::Map<String, serde_json::Value> = counters
        .iter()
        .map(|(c, v)| (c.name().to_string(), json!(v)))
        .collect();
    Ok(json!({"global": global, "vips": vip_rows, "members": member_rows, "backends": be_rows}))
}

/// The VIPs' refused sources and new flows over budget, where there are any.
fn print_vip_drops(p: &Pinned, vip_rows: &[(u32, VipRef, TrafficStats)]) {
    let sections: [(&str, &dyn Fn(u32) -> u64); 2] = [
        (
            "REFUSED SOURCES (drop_source_range: outside the VIP's source_ranges)",
            &|id| p.vip_source_drops(id),
        ),
        (
            "NEW FLOWS OVER BUDGET (drop_new_flow_budget: no token left in the VIP's new_flow_budget)",
            &|id| p.vip_budget_drops(id),
        ),
    ];
    for (title, count) in sections {
        let rows: Vec<(&VipRef, u64)> = vip_rows
            .iter()
            .map(|(id, vip, _)| (vip, count(*id)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if rows.is_empty() {
            continue;
        }
        println!("\n{title}");
        for (vip, n) in rows {
            println!("  {:<48} {n:>14}", vip.label);
        }
    }
}

/// `{"replies": {"packets", "bytes"}}`: NAT replies translated back to clients.
fn replies_json(r: TrafficStats) -> serde_json::Value {
    json!({"replies": {"packets": r.packets, "bytes": r.bytes}})
}

/// The NAT replies (backend -> client) of each NAT VIP and of each of its backends, if any VIP
/// is in NAT mode.
fn print_replies(
    p: &Pinned,
    vips: &[(u32, VipRef, TrafficStats)],
    members: &[MemberRow],
) -> Result<()> {
    let nat: BTreeMap<u32, VipValue> = p
        .vips()?
        .into_values()
        .filter(|v| v.mode == lb_common::MODE_NAT)
        .map(|v| (v.id, v))
        .collect();
    if nat.is_empty() {
        return Ok(());
    }
    println!("\nNAT REPLIES (backend -> client)");
    println!(
        "  {:<48} {:>14} {:>16}",
        "VIP / VIP -> BACKEND", "PACKETS", "BYTES"
    );
    for (id, vip, _) in vips.iter().filter(|(id, _, _)| nat.contains_key(id)) {
        let r = p.vip_replies(*id)?;
        println!("  {:<48} {:>14} {:>16}", vip.label, r.packets, r.bytes);
        for m in members.iter().filter(|m| m.member.vip_id == *id) {
            let r = p.member_replies(m.id)?;
            let name = format!("-> {}", m.backend.label);
            println!("    {name:<46} {:>14} {:>16}", r.packets, r.bytes);
        }
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

pub fn backends(p: &Pinned, state_dir: &Path, format: Format) -> Result<()> {
    let status: Option<Status> = read_status(state_dir);
    let names = VipNames::of(status.as_ref()).with_ranges(p);
    let members = p.members()?;
    let conns = p.tables()?.connections;
    let mut out = Vec::new();
    for (k, v) in p.vips()? {
        let vip = names.vip(&k);
        let st = status
            .as_ref()
            .and_then(|s| s.vips.iter().find(|x| x.vip == vip.label));
        out.push(vip_backends(p, &k, vip, &v, &members, st, &conns)?);
    }
    if format == Format::Json {
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
        print_vip_backends(v, format == Format::Wide);
    }
    Ok(())
}

/// A VIP's line above its backends in `lb backends`: label, name, mode, client affinity (and
/// with `-o wide` its id and table size).
fn vip_heading(v: &serde_json::Value, wide: bool) -> String {
    let name = v["vip"]["name"].as_str().map(|n| format!("({n})"));
    let affinity = match v["affinity_timeout_s"].as_u64() {
        Some(t) if t > 0 => format!(" client affinity {t} s"),
        _ => String::new(),
    };
    let ids = if wide {
        format!("  id {}, table size {}", v["id"], v["table_size"])
    } else {
        String::new()
    };
    let lc = match v["algorithm"].as_str() {
        Some("least-connections") => " least connections",
        _ => "",
    };
    format!(
        "{} {} [{}]{lc}{affinity}{ids}",
        v["vip"]["label"].as_str().unwrap_or(""),
        name.unwrap_or_default(),
        v["mode"].as_str().unwrap_or(""),
    )
}

fn print_vip_backends(v: &serde_json::Value, wide: bool) {
    let opt = |x: &serde_json::Value| {
        if x.is_null() {
            "-".to_string()
        } else {
            x.to_string().trim_matches('"').to_string()
        }
    };
    println!("{}", vip_heading(v, wide));
    let nat = v["mode"] == "nat";
    let mut head = vec!["BACKEND", "WEIGHT", "HEALTH", "SLOTS", "SHARE", "PACKETS"];
    if nat {
        head.push("REPLIES");
    }
    head.extend(["NEW FLOWS", "ACTIVE", "INACTIVE"]);
    let lc = v["algorithm"] == "least-connections";
    if lc {
        head.push("OPEN");
    }
    if wide {
        head.insert(0, "MEMBER");
    }
    let backends: Vec<&serde_json::Value> =
        v["backends"].as_array().into_iter().flatten().collect();
    let rows = backends.iter().map(|b| {
        let mut row = vec![
            opt(&b["backend"]["label"]),
            opt(&b["weight"]),
            opt(&b["health"]),
            b["slots"].as_u64().unwrap_or(0).to_string(),
            format!("{:.2}%", b["share"].as_f64().unwrap_or(0.0) * 100.0),
            opt(&b["packets"]),
        ];
        if nat {
            row.push(opt(&b["replies"]["packets"]));
        }
        row.extend([
            opt(&b["new_flows"]),
            opt(&b["connections"]["active"]),
            opt(&b["connections"]["inactive"]),
        ]);
        if lc {
            row.push(opt(&b["open_connections"]));
        }
        if wide {
            row.insert(0, opt(&b["id"]));
        }
        row
    });
    let head = head.into_iter().map(String::from).collect();
    let text = table(std::iter::once(head).chain(rows));
    let mut lines = text.lines();
    println!("  {}", lines.next().unwrap_or(""));
    for (b, line) in backends.iter().zip(lines) {
        println!("  {line}");
        print_backend_notes(b);
    }
    if v["empty_slots"].as_u64() > Some(0) {
        println!(
            "  {} slots have no backend: new flows landing there are dropped",
            v["empty_slots"]
        );
    }
}

/// The lines under a backend's row: its passive health counts, its override, why it is a backup.
fn print_backend_notes(b: &serde_json::Value) {
    let passive = &b["passive"];
    if !passive.is_null() {
        println!(
            "      attempts: {} answered, {} refused, {} unreachable, {} SYN timeouts; {} in a row failed",
            passive["answered"],
            passive["refused"],
            passive["unreachable"],
            passive["syn_timeouts"],
            passive["consecutive_failures"]
        );
    }
    if let Ok(o) = serde_json::from_value(b["override"].clone()) {
        println!("      {}", override_note(&o));
    }
    if let Some(why) = b["backup"]["why"].as_str() {
        println!(
            "      {}",
            backup_note(why, b["backup"]["standing_in"] == true)
        );
    }
}

/// `backup, standing by: why`: a backup backend's note (standing in: it takes new flows,
/// since no other backend of its VIP does).
pub(crate) fn backup_note(why: &str, standing_in: bool) -> String {
    let now = if standing_in {
        "standing in"
    } else {
        "standing by"
    };
    format!("backup, {now}: {why}")
}

/// A configured backend's health as the status file says.
fn health_word(c: &BackendStatus) -> &'static str {
    crate::observe::top::sample::Health::of(c).label()
}

/// `drained since 2026-12-07T16:07:21Z, configured 100`: an overridden backend's note.
pub(crate) fn override_note(o: &crate::sources::overrides::Override) -> String {
    let what = match o.kind {
        crate::sources::overrides::Kind::Drain => "drained".to_string(),
        crate::sources::overrides::Kind::Weight => format!("weight {}", o.weight),
    };
    let configured = o.configured.map_or("-".into(), |w| w.to_string());
    format!("{what} since {}, configured {configured}", o.since)
}

/// One VIP's members (its backends, with their own counters), then configured backends that have
/// no member (yet).
fn vip_backends(
    p: &Pinned,
    k: &VipKey,
    vip: VipRef,
    v: &VipValue,
    members: &BTreeMap<u32, Member>,
    st: Option<&VipStatus>,
    conns: &crate::kernel::inspect::Conns,
) -> Result<serde_json::Value> {
    let m = p.table_size(v) as f64;
    let counts = p.slot_counts(v);
    // Address -> (member id, backend). The status file names backends by address.
    let mut by_addr: BTreeMap<IpAddr, (Option<u32>, BackendRef)> = BTreeMap::new();
    for (id, mem) in members.iter().filter(|(_, mem)| mem.vip_id == v.id) {
        let b = BackendRef::of(mem, k);
        by_addr.insert(b.address, (Some(*id), b));
    }
    for b in st.map(|s| s.backends.as_slice()).unwrap_or_default() {
        if let Ok(a) = b.address.parse::<IpAddr>() {
            let at = crate::model::view::endpoint(a, b.port, vip.port);
            by_addr.entry(a).or_insert((None, BackendRef::at(at)));
        }
    }
    let mut rows = Vec::new();
    for (addr, (id, backend)) in by_addr {
        let cfg = st.and_then(|s| {
            s.backends
                .iter()
                .find(|b| b.address.parse::<IpAddr>().ok() == Some(addr))
        });
        let slots = id.and_then(|id| counts.get(&id).copied()).unwrap_or(0);
        let traffic = id.map(|id| p.member_stats(id)).transpose()?;
        let passive = match id {
            Some(id) if v.mode == lb_common::MODE_NAT => Some(p.passive(id)?),
            _ => None,
        };
        rows.push(json!({
            "backend": backend,
            "id": id,
            "weight": cfg.map(|c| c.weight),
            "override": cfg.and_then(|c| c.overridden.as_ref()),
            "backup": cfg.and_then(|c| c.backup.as_ref()).map(|why| json!({
                "why": why,
                "standing_in": cfg.is_some_and(|c| c.effective_weight > 0),
            })),
            "health": cfg.map(health_word),
            "slots": slots,
            "share": slots as f64 / m,
            "packets": traffic.map(|t| t.packets),
            "bytes": traffic.map(|t| t.bytes),
            "new_flows": traffic.map(|t| t.new_flows),
            "replies": id.filter(|_| v.mode == lb_common::MODE_NAT)
                .map(|id| p.member_replies(id))
                .transpose()?
                .map(|r| json!({"packets": r.packets, "bytes": r.bytes})),
            "connections": id.map(|id| conns.get(&id).copied().unwrap_or_default()),
            "open_connections": open_connections(p, v, id),
            "passive": passive.map(|h| json!({
                "answered": h.answered,
                "refused": h.refused,
                "unreachable": h.unreachable,
                "syn_timeouts": h.syn_timeouts,
                "consecutive_failures": h.consecutive_failures,
            })),
        }));
    }
    Ok(json!({
        "vip": vip,
        "id": v.id,
        "table_size": m as u32,
        "mode": mode_name(v),
        "algorithm": algorithm_name(v),
        "affinity_timeout_s": v.affinity_timeout_s,
        "empty_slots": counts.get(&NO_BACKEND).copied().unwrap_or(0),
        "backends": rows,
    }))
}

/// `maglev` or `least-connections` (`VIP_F_LEAST_CONN`).
pub(crate) fn algorithm_name(v: &VipValue) -> &'static str {
    if v.flags & lb_common::VIP_F_LEAST_CONN != 0 {
        crate::model::desired::Algorithm::LeastConnections.name()
    } else {
        crate::model::desired::Algorithm::Maglev.name()
    }
}

/// A least-connections VIP's member's open connections as the program counts them for its
/// choice (`LB_MEMBER_CONNS`); None for other VIPs.
fn open_connections(p: &Pinned, v: &VipValue, id: Option<u32>) -> Option<u64> {
    if v.flags & lb_common::VIP_F_LEAST_CONN == 0 {
        return None;
    }
    p.member_conns(id?).map(|c| c.open())
}

pub(crate) fn mode_name(v: &VipValue) -> &'static str {
    if v.mode == lb_common::MODE_NAT {
        "nat"
    } else {
        "dsr"
    }
}

/// Parses `ADDR` or `ADDR:PORT` / `[V6]:PORT`.
fn parse_source(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    match s.parse::<IpAddr>() {
        Ok(a) => Ok((a, None)),
        Err(_) => Err(ShowError::NotAnAddress(s.to_string())),
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

/// The VIP key and the flow key of a packet from `src` (port `sport`, 0 if none) to `dst`.
fn keys(src: IpAddr, sport: Option<u16>, dst: SocketAddr, proto: Protocol) -> (VipKey, FlowKey) {
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
    (vkey, key)
}

/// `lb explain`: the member a packet would get, by the program's own rules
/// (`lb_common::select`), step by step.
pub fn explain(
    p: &Pinned,
    source: &str,
    dst: SocketAddr,
    proto: Protocol,
    syn: bool,
    names: &VipNames,
    format: Format,
) -> Result<()> {
    let (src, sport) = parse_source(source)?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(ShowError::MixedFamilies);
    }
    let (vkey, key) = keys(src, sport, dst, proto);
    let mut e = Explained {
        result: json!(null),
        steps: Vec::new(),
    };
    let found = p.vip_of(&vkey);
    // The VIP's own key: port 0 for a port range the packet's port is in.
    let own = found.map_or(vkey, |(k, _)| k);
    let label = names.vip(&own).label;
    match found.as_ref().map(|(_, v)| v) {
        None => {
            e.step(format!(
                "{} is not a VIP: the packet passes to the kernel untouched",
                vip_label(&vkey)
            ));
            e.result = json!({"verdict": "pass", "reason": "not a VIP"});
        }
        Some(vip)
            if vip.flags & lb_common::VIP_F_SOURCE_RANGES != 0
                && p.source_range(vip.id, &key.src).is_none() =>
        {
            vip_step(&mut e, &vkey, &own, &label, vip.id);
            e.step(format!(
                "source ranges: {src} is in none of the VIP's ranges: dropped (drop_source_range), before any flow, affinity or NAT state"
            ));
            e.result = json!({"verdict": "drop", "reason": "source range"});
        }
        Some(vip) => {
            vip_step(&mut e, &vkey, &own, &label, vip.id);
            if vip.flags & lb_common::VIP_F_SOURCE_RANGES != 0
                && let Some((bits, a)) = p.source_range(vip.id, &key.src)
            {
                e.step(format!(
                    "source ranges: {src} is in {}/{bits}: allowed",
                    ip_of(&a, key.family)
                ));
            }
            let tcp_flags = if syn {
                lb_common::select::TCP_FLAG_SYN
            } else {
                0
            };
            for (addr, why, standing_in) in names.backups(&label) {
                e.step(format!("{addr}: {}", backup_note(why, *standing_in)));
            }
            if vip.flags & lb_common::VIP_F_LEAST_CONN != 0 {
                e.step(
                    "algorithm: least-connections (a new connection goes to the sampled backend \
                     with the fewest open connections for its weight)",
                );
            }
            e.result = choose(p, &key, vip, sport.is_some(), tcp_flags, &mut e.steps)?;
            e.result["algorithm"] = json!(algorithm_name(vip));
            if vip.mode == lb_common::MODE_NAT && sport.is_some() {
                explain_nat(p, &key, &mut e);
            }
        }
    }
    print_explained(e, names.vip(&own), format)
}

/// The explanation as JSON (its result, the VIP and the steps) or as its steps, one a line.
fn print_explained(e: Explained, vip: VipRef, format: Format) -> Result<()> {
    if format == Format::Json {
        let mut r = e.result;
        r["vip"] = json!(vip);
        r["steps"] = json!(e.steps);
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for s in e.steps {
            println!("{s}");
        }
    }
    Ok(())
}

/// The step that says which VIP a packet to `exact` matched: VIP `own` (labelled `label`), the
/// same key, or a port range (after the exact lookup missed).
fn vip_step(e: &mut Explained, exact: &VipKey, own: &VipKey, label: &str, id: u32) {
    if exact == own {
        e.step(format!("{label} is VIP id {id}"));
    } else {
        e.step(format!(
            "{} is no exact VIP; port {} is in the port range of {label}, VIP id {id}",
            vip_label(exact),
            u16::from_be(exact.port)
        ));
    }
}

/// Member `id`'s backend, if the member is live and its VIP known.
fn backend_of(p: &Pinned, id: u32) -> Option<BackendRef> {
    let m = p.member(id)?;
    let vips = p.vips().ok()?;
    let (k, _) = vips.iter().find(|(_, v)| v.id == m.vip_id)?;
    Some(BackendRef::of(&m, k))
}

fn describe(p: &Pinned, id: u32) -> String {
    backend_of(p, id).map_or_else(|| format!("member {id} (removed)"), |b| b.label)
}

fn forward(p: &Pinned, by: &str, id: u32) -> serde_json::Value {
    json!({"verdict": "forward", "by": by, "backend": backend_of(p, id), "member_id": id})
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
    } else if have_port && let Some(id) = flow_step(p, key, vip, now, udp_idle, steps) {
        return Ok(forward(p, "flow", id));
    }
    if vip.flags & lb_common::VIP_F_NEW_FLOW_BUDGET != 0 {
        steps.push(budget_step(p, vip.id, now));
    }
    if vip.affinity_timeout_s > 0
        && let Some(id) = affinity_step(p, key, vip, now, steps)
    {
        return Ok(forward(p, "affinity", id));
    }
    let new_connection =
        opens_connection(key.proto, tcp_flags) || key.proto != lb_common::IPPROTO_TCP;
    let mut r = maglev_choice(p, key, vip, have_port, steps)?;
    if vip.flags & lb_common::VIP_F_LEAST_CONN != 0
        && new_connection
        && let (Some(hash), Some(first)) = (r["hash"].as_u64(), r["member_id"].as_u64())
        && r["by"] == "maglev"
    {
        let id = least_conn_choice(p, vip, hash as u32, first as u32, steps);
        if id != first as u32 {
            let (hash, slot) = (r["hash"].clone(), r["slot"].clone());
            r = forward(p, "least-connections", id);
            (r["hash"], r["slot"]) = (hash, slot);
        }
    }
    Ok(r)
}

/// The flow table's step: the member the flow is pinned to, if it follows its entry.
fn flow_step(
    p: &Pinned,
    key: &FlowKey,
    vip: &VipValue,
    now: u64,
    udp_idle: u64,
    steps: &mut Vec<String>,
) -> Option<u32> {
    let Some(f) = p.flow(key) else {
        steps.push("flow table: no entry (a new flow)".into());
        return None;
    };
    let m = p.member(f.member_id);
    match check_flow(&f, m.as_ref(), vip, key.proto, now, udp_idle) {
        FlowCheck::Follow | FlowCheck::FollowAndRefresh => {
            steps.push(format!(
                "flow table: this flow is pinned to backend {}",
                describe(p, f.member_id)
            ));
            return Some(f.member_id);
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
    None
}

/// The client affinity's step: the member the client is held on, if it is.
fn affinity_step(
    p: &Pinned,
    key: &FlowKey,
    vip: &VipValue,
    now: u64,
    steps: &mut Vec<String>,
) -> Option<u32> {
    let akey = AffinityKey {
        addr: key.src,
        vip_id: vip.id,
    };
    let Some(a) = p.affinity(&akey) else {
        steps.push("affinity: no entry for this client".into());
        return None;
    };
    match check_affinity(&a, p.member(a.member_id).as_ref(), vip, now) {
        AffinityCheck::Follow => {
            steps.push(format!(
                "affinity: client {} is held on backend {} (timeout {}s)",
                ip_of(&key.src, key.family),
                describe(p, a.member_id),
                vip.affinity_timeout_s
            ));
            return Some(a.member_id);
        }
        AffinityCheck::Expired => steps.push("affinity: the client's entry has expired".into()),
        AffinityCheck::Stale => steps.push(
            "affinity: the client's backend is gone or takes no new flows: chosen afresh".into(),
        ),
    }
    None
}

/// Least connections' pick among the sampled candidates (`lb_common::select::least_conn_pick`,
/// as the program makes it), from the counts and weights in `LB_MEMBER_CONNS` now.
fn least_conn_choice(
    p: &Pinned,
    vip: &VipValue,
    hash: u32,
    first: u32,
    steps: &mut Vec<String>,
) -> u32 {
    let load = |id: u32| p.member_conns(id).unwrap_or_default();
    let mut seen = vec![(first, load(first))];
    let best = lb_common::select::least_conn_pick(hash, (first, load(first)), |h| {
        let (_, index) = ring_index(h, vip, p.sizes.table_size);
        let id = p.ring_at(index);
        p.member(id)
            .filter(|m| ring_member_ok(m, vip) && !m.rejects())?;
        seen.push((id, load(id)));
        Some((id, load(id)))
    });
    let list: Vec<String> = seen
        .iter()
        .map(|(id, l)| {
            format!(
                "{} ({} open, weight {})",
                describe(p, *id),
                l.open(),
                l.weight_or_one()
            )
        })
        .collect();
    steps.push(format!(
        "least connections: candidates {} -> backend {}",
        list.join(", "),
        describe(p, best)
    ));
    best
}

/// What the VIP's new-flow budget does to a new flow, with the tokens each CPU has now.
fn budget_step(p: &Pinned, vip_id: u32, now: u64) -> String {
    let Some(buckets) = p.budget(vip_id) else {
        return "new-flow budget: flagged, but no budget written yet: the new flow passes".into();
    };
    let b = buckets[0];
    // The agent shares a budget out over the online CPUs; the others' buckets are never used.
    let online = aya::util::online_cpus().unwrap_or_else(|_| (0..buckets.len() as u32).collect());
    let cpus = online.len() as u64;
    // The tokens each online CPU would have now (the program refills when it next looks; a
    // bucket never used is full).
    let left: Vec<u64> = online
        .iter()
        .filter_map(|cpu| buckets.get(*cpu as usize))
        .map(|c| {
            if c.last_ns == 0 {
                return c.burst;
            }
            let earned = now.saturating_sub(c.last_ns) / c.ns_per_token.max(1);
            c.tokens.saturating_add(earned).min(c.burst)
        })
        .collect();
    let empty = left.iter().filter(|t| **t == 0).count();
    format!(
        "new-flow budget: each of {cpus} CPUs takes a new flow every {:?} and up to {} at once \
         (about {:.0}/s on the node); tokens now {} in all, {empty} CPU(s) empty: a new flow \
         takes one from the CPU it arrives on, and is dropped (drop_new_flow_budget) if that \
         CPU has none",
        Duration::from_nanos(b.ns_per_token),
        b.burst,
        cpus as f64 * 1e9 / b.ns_per_token.max(1) as f64,
        left.iter().sum::<u64>(),
    )
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
        return Err(ShowError::NeedsSourcePort);
    }
    let hash = maglev_hash(key, vip);
    let (slot, index) = ring_index(hash, vip, p.sizes.table_size);
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
                describe(p, n.member_id),
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
