//! `lb status`: the agent as it is now. What only the agent knows (pid, start, config, last
//! reload, the interfaces it was told to serve) comes from its status file, and is shown as a
//! dead agent's when that process is gone; what the kernel knows (whether lb's program is
//! attached to each interface, the pinned maps' sizes and contents) is read live.

use std::{collections::BTreeSet, path::Path};

use super::{Result, ShowError};
use serde::Serialize;

use super::Format;
use crate::{
    kernel::inspect::{Fill, InspectError, Pinned},
    kernel::links,
    kernel::program::Sizes,
    status::file::{read_status, status_path},
    status::life::ReloadStatus,
};

#[derive(Serialize, Debug)]
pub struct AgentView {
    /// The process that wrote the status file is alive.
    pub running: bool,
    pub pid: Option<u32>,
    pub started_at: Option<String>,
    /// Seconds; None unless running.
    pub uptime_s: Option<u64>,
    /// When the agent last wrote its status file.
    pub updated_at: Option<String>,
    pub config: Option<String>,
    /// `node.xdp_mode` as configured: `auto`, `native` or `generic`.
    pub xdp_mode: Option<String>,
    pub kubernetes: Option<bool>,
    pub metrics_listen: Option<String>,
    pub reloads_applied: Option<u64>,
    pub reloads_rejected: Option<u64>,
    pub last_reload: Option<ReloadStatus>,
    /// The agent's release ("0.1.0" for a status file without one: 0.1.0 wrote none).
    pub release: Option<String>,
    /// The schema of each map its program uses.
    pub schemas: std::collections::BTreeMap<String, u32>,
    /// What its start, or its last reload that changed sizes, did with the pins.
    pub last_migration: Option<crate::kernel::migrate::Migration>,
    /// What its start did with the maps: adopted or created, and how many writes it made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<crate::status::life::StartStatus>,
    /// Its event loop runs (health checks, announcements, reloads); false as it starts.
    pub event_loop: Option<bool>,
    /// What the cluster holds that it could not take as it is (malformed objects...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kubernetes_skipped: Vec<String>,
    /// The older release this (stopped) agent left the pins for: its DaemonSet rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back_for: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct InterfaceView {
    pub name: String,
    /// In the agent's config (false: a link is pinned for it, left from another config).
    pub configured: bool,
    /// The mode the agent attached it in (`native` or `generic`; for an agent before 0.3.0,
    /// the config's `xdp_mode`).
    pub xdp_mode: Option<String>,
    /// Why the agent chose that mode (None before 0.3.0).
    pub xdp_mode_reason: Option<String>,
    /// The program may redirect frames from another interface to it (None before 0.3.0).
    pub redirect_target: Option<bool>,
    /// None: no such interface in this network namespace.
    pub ifindex: Option<u32>,
    /// lb's program (the one its pinned link holds) is attached there now.
    pub attached: bool,
    /// How XDP is attached there now (whatever program): native, generic, ...
    pub attached_mode: Option<&'static str>,
    pub program_ids: Vec<u32>,
    pub lb_program_id: Option<u32>,
}

#[derive(Serialize, Debug)]
pub struct MapsView {
    pub pin_dir: String,
    pub sizes: Sizes,
    pub vips: usize,
    /// Live members: backends of VIPs, one per (VIP, backend).
    pub backends: usize,
    /// How full each of the program's tables is: `flows_ipv4`, `flows_ipv6`, `affinity`, `nat`,
    /// `nat_reverse`.
    pub tables: std::collections::BTreeMap<&'static str, Fill>,
    /// NAT source ports held, by the state of their translation (`half_open`: handshakes the
    /// client has yet to complete, what a SYN flood leaves).
    pub nat_ports: crate::kernel::inspect::NatPorts,
    /// The IPv4 flow table's flows by state (`new`: seen once, what a SYN flood leaves; a flood
    /// never evicts an `established` one while it is active).
    pub flows_ipv4: crate::kernel::inspect::FlowStates,
}

#[derive(Serialize, Debug)]
pub struct StatusView {
    pub agent: AgentView,
    pub interfaces: Vec<InterfaceView>,
    /// None: nothing is pinned.
    pub maps: Option<MapsView>,
    /// What the node announces through its routing daemon, as the agent last wrote it (None:
    /// `node.announce` is off, or no status file).
    pub announce: Option<crate::kernel::announce::AnnounceStatus>,
    /// Backends whose weight `lb drain` or `lb weight` overrides, as the agent applied them.
    pub overrides: Vec<crate::sources::overrides::Override>,
}

impl StatusView {
    /// What is wrong, if anything: the agent is not running, or not attached everywhere.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.agent.running {
            out.push("the agent is not running".to_string());
        }
        for i in self
            .interfaces
            .iter()
            .filter(|i| i.configured && !i.attached)
        {
            out.push(format!("lb's program is not attached to {}", i.name));
        }
        if self.maps.is_none() {
            out.push("no maps are pinned".to_string());
        }
        out
    }
}

pub fn read(pins: &Path, state_dir: &Path) -> Result<StatusView> {
    let status = read_status(state_dir);
    let a = status.as_ref().and_then(|s| s.agent.as_ref());
    let agent = AgentView {
        running: a.is_some_and(|a| a.is_running()),
        pid: a.map(|a| a.pid),
        started_at: a.map(|a| a.started_at.clone()),
        uptime_s: a.and_then(|a| a.uptime()).map(|d| d.as_secs()),
        updated_at: a.map(|a| a.updated_at.clone()),
        config: status.as_ref().map(|s| s.config.clone()),
        xdp_mode: a.map(|a| a.xdp_mode.clone()),
        kubernetes: a.map(|a| a.kubernetes),
        metrics_listen: a.and_then(|a| a.metrics_listen.clone()),
        reloads_applied: a.map(|a| a.reloads_applied),
        reloads_rejected: a.map(|a| a.reloads_rejected),
        last_reload: a.and_then(|a| a.last_reload.clone()),
        release: a.map(|a| match a.release.is_empty() {
            true => "0.1.0".to_string(),
            false => a.release.clone(),
        }),
        schemas: a.map(|a| a.schemas.clone()).unwrap_or_default(),
        last_migration: a.and_then(|a| a.last_migration.clone()),
        rolled_back_for: a.and_then(|a| a.rolled_back_for.clone()),
        start: a.and_then(|a| a.start.clone()),
        event_loop: a.map(|a| a.event_loop),
        kubernetes_skipped: a.map(|a| a.kubernetes_skipped.clone()).unwrap_or_default(),
    };
    let configured: Vec<String> = a.map(|a| a.interfaces.clone()).unwrap_or_default();
    let mut names: BTreeSet<String> = configured.iter().cloned().collect();
    names.extend(links::pinned_links(pins).into_iter().map(|(n, _)| n));
    let interfaces = names
        .into_iter()
        .map(|name| {
            let at = links::attachment(pins, &name);
            let chosen = a.and_then(|a| a.xdp.iter().find(|c| c.interface == name));
            InterfaceView {
                configured: configured.contains(&name),
                xdp_mode: chosen
                    .map(|c| c.mode.to_string())
                    .or_else(|| a.map(|a| a.xdp_mode.clone())),
                xdp_mode_reason: chosen.map(|c| c.reason.clone()),
                redirect_target: chosen.map(|c| c.redirect_target),
                ifindex: at.ifindex,
                attached: at.ours(),
                attached_mode: at.mode,
                program_ids: at.program_ids.clone(),
                lb_program_id: at.lb_program_id,
                name,
            }
        })
        .collect();
    let maps = match Pinned::open(pins) {
        Ok(p) => Some(maps(&p, pins)?),
        Err(InspectError::NotRunning(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let overrides = status.iter().flat_map(|s| &s.vips);
    let overrides = overrides.flat_map(|v| v.backends.iter().filter_map(|b| b.overridden.clone()));
    Ok(StatusView {
        agent,
        interfaces,
        maps,
        overrides: overrides.collect(),
        announce: status.and_then(|s| s.announce),
    })
}

fn maps(p: &Pinned, pins: &Path) -> Result<MapsView> {
    let t = p.tables()?;
    Ok(MapsView {
        pin_dir: pins.display().to_string(),
        sizes: p.sizes.clone(),
        vips: p.vips()?.len(),
        backends: p.members()?.len(),
        tables: t.fill.into_iter().collect(),
        nat_ports: t.nat_ports,
        flows_ipv4: t.flows_ipv4,
    })
}

/// Prints the status; an error (exit status 1) if the agent is not running or not attached
/// everywhere, so that scripts can test it.
pub fn status(pins: &Path, state_dir: &Path, format: Format) -> Result<()> {
    let v = read(pins, state_dir)?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print(&v, state_dir, format == Format::Wide);
    }
    let problems = v.problems();
    if !problems.is_empty() {
        return Err(ShowError::Problems(problems));
    }
    Ok(())
}

fn print(v: &StatusView, state_dir: &Path, wide: bool) {
    print_agent(v, state_dir);
    print_interfaces(v, wide);
    if let Some(a) = &v.announce {
        print_announce(a);
    }
    for (i, o) in v.overrides.iter().enumerate() {
        let head = if i == 0 { "overrides:" } else { "" };
        println!(
            "{head:<11} {} {}: {}",
            o.vip,
            o.backend,
            super::override_note(o)
        );
    }
    print_maps(v, wide);
}

/// The agent: running or not, its release, config, last migration and reloads.
fn print_agent(v: &StatusView, state_dir: &Path) {
    let a = &v.agent;
    let or = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    match (a.running, a.pid) {
        (true, Some(pid)) => println!(
            "agent:      running, pid {pid}, since {} (up {})",
            or(&a.started_at),
            humantime::format_duration(std::time::Duration::from_secs(a.uptime_s.unwrap_or(0)))
        ),
        (false, Some(pid)) => println!(
            "agent:      NOT RUNNING (pid {pid}, started {}, is gone; its status file was last written {})",
            or(&a.started_at),
            or(&a.updated_at)
        ),
        _ => println!(
            "agent:      NOT RUNNING (no agent status in {})",
            status_path(state_dir).display()
        ),
    }
    println!("release:    {}", or(&a.release));
    if let Some(to) = &a.rolled_back_for {
        println!(
            "rollback:   stopped for a rollback to {to}: the pins are left as {to} reads them"
        );
    }
    println!("config:     {}", or(&a.config));
    if let Some(m) = &a.last_migration {
        println!(
            "pins:       {} at {} (from {}): {} in {:.1} ms; {} entries copied, {} merged after the swap",
            m.trigger,
            m.at,
            m.from_release.as_deref().unwrap_or("a first start"),
            m.summary(),
            m.duration_ms,
            m.entries,
            m.merged
        );
        for e in &m.errors {
            println!("            AFTER THE SWAP: {e}");
        }
    }
    if let Some(r) = &a.last_reload {
        let how = if r.ok {
            "applied".to_string()
        } else {
            format!("REJECTED: {}", r.error.as_deref().unwrap_or("?"))
        };
        println!("reload:     last at {} ({}): {how}", r.at, r.source);
    }
    if let (Some(ok), Some(bad)) = (a.reloads_applied, a.reloads_rejected) {
        println!("reloads:    {ok} applied, {bad} rejected");
    }
    if let Some(m) = &a.metrics_listen {
        println!("metrics:    http://{m}/metrics");
    }
}

/// Each interface: attached or not, in which mode, and why that mode.
fn print_interfaces(v: &StatusView, wide: bool) {
    println!("interfaces:");
    for i in &v.interfaces {
        let state = match (i.attached, i.ifindex) {
            (true, _) => "attached".to_string(),
            (false, None) => "NOT ATTACHED (no such interface)".to_string(),
            (false, Some(_)) if i.program_ids.is_empty() => "NOT ATTACHED".to_string(),
            (false, Some(_)) => format!(
                "NOT ATTACHED (another program: id {})",
                i.program_ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let extra = if wide {
            let ids: Vec<String> = i.program_ids.iter().map(u32::to_string).collect();
            format!(
                "  ifindex {}, program id {}, lb's {}",
                i.ifindex.map_or("-".into(), |x| x.to_string()),
                if ids.is_empty() {
                    "-".into()
                } else {
                    ids.join(",")
                },
                i.lb_program_id.map_or("-".into(), |x| x.to_string())
            )
        } else {
            String::new()
        };
        println!(
            "  {:<16} {:<8} {}{}{extra}",
            i.name,
            i.attached_mode.unwrap_or("-"),
            state,
            if i.configured {
                ""
            } else {
                " (not configured)"
            }
        );
        if let Some(why) = &i.xdp_mode_reason {
            let indent = " ".repeat(19);
            let opts = textwrap::Options::new(100)
                .initial_indent(&indent)
                .subsequent_indent(&indent);
            println!("{}", textwrap::fill(why, opts));
        }
    }
}

/// The pinned maps: sizes, what they serve, how full the tables are.
fn print_maps(v: &StatusView, wide: bool) {
    let a = &v.agent;
    let Some(m) = &v.maps else {
        println!("maps:       none pinned");
        return;
    };
    let s = &m.sizes;
    println!("maps:       {}", m.pin_dir);
    println!(
        "sizes:      table {}, max VIPs {}, max backends {}",
        s.table_size, s.max_vips, s.max_backends,
    );
    println!(
        "            flows {} (IPv6 {}), affinity {}, NAT {}",
        s.flow_table_size,
        s.flow_table_size_v6(),
        s.affinity_table_size,
        s.nat_table_size
    );
    println!("serving:    {} VIPs, {} backends", m.vips, m.backends);
    if wide && !a.schemas.is_empty() {
        let list: Vec<String> = a.schemas.iter().map(|(m, v)| format!("{m} v{v}")).collect();
        println!("schemas:    {}", list.join(", "));
    }
    println!("tables:");
    for (name, f) in &m.tables {
        println!(
            "  {name:<14} {} of {} ({:.1}%)",
            f.entries,
            f.capacity,
            f.fill * 100.0
        );
    }
    println!(
        "IPv4 flows: {} established, {} new",
        m.flows_ipv4.established, m.flows_ipv4.new
    );
    let p = &m.nat_ports;
    println!(
        "NAT ports:  {} established, {} half-open, {} waiting, {} closing, {} closed",
        p.established, p.half_open, p.waiting, p.closing, p.closed
    );
}

fn print_announce(a: &crate::kernel::announce::AnnounceStatus) {
    let what = if a.announced.is_empty() {
        "nothing (no VIP has a backend)".to_string()
    } else {
        let list: Vec<String> = a.announced.iter().map(|ip| ip.to_string()).collect();
        list.join(", ")
    };
    println!("announce:   routing table {}: {what}", a.table);
    if let Some(e) = &a.error {
        println!("            FAILING: {e}");
    }
}
