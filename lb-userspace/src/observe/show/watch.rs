//! `lb stats --watch SECONDS`: every interval, the rates over it (global counters, per VIP, per
//! backend of each VIP), stamped with the time (RFC 3339, UTC). With `-o json` each interval is
//! one JSON object on one line, flushed at once, for `jq` or a collector.

use std::{
    collections::BTreeMap,
    io::Write as _,
    time::{Duration, Instant, SystemTime},
};

use super::Result;
use lb_common::{Counter, TrafficStats};
use serde::Serialize;

use super::{Format, VipNames, member_rows, vip_refs};
use crate::{
    kernel::inspect::Pinned,
    model::view::{BackendRef, VipRef},
};

/// The counters at one moment.
struct Snapshot {
    at: Instant,
    global: Vec<(Counter, u64)>,
    vips: BTreeMap<u32, (VipRef, TrafficStats)>,
    /// By (member id, generation): a member id given to another backend starts afresh.
    members: BTreeMap<(u32, u32), (VipRef, BackendRef, TrafficStats)>,
}

impl Snapshot {
    fn take(p: &Pinned, names: &VipNames) -> Result<Self> {
        let global = p.counters()?;
        let mut vips = BTreeMap::new();
        for (id, (_, vip)) in vip_refs(p, names)? {
            vips.insert(id, (vip, p.vip_stats(id)?));
        }
        let members = member_rows(p, names)?
            .into_iter()
            .map(|r| ((r.id, r.member.generation), (r.vip, r.backend, r.stats)))
            .collect();
        Ok(Self {
            at: Instant::now(),
            global,
            vips,
            members,
        })
    }
}

/// Counts over an interval and their rates.
#[derive(Serialize, Debug, Default)]
pub struct Rates {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub new_flows_per_s: f64,
}

impl Rates {
    fn between(old: Option<&TrafficStats>, new: &TrafficStats, secs: f64) -> Self {
        let TrafficStats {
            packets,
            bytes,
            new_flows,
        } = new.since(old.copied().unwrap_or_default());
        Self {
            packets,
            bytes,
            new_flows,
            packets_per_s: packets as f64 / secs,
            bytes_per_s: bytes as f64 / secs,
            new_flows_per_s: new_flows as f64 / secs,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct VipRates {
    pub vip: VipRef,
    #[serde(flatten)]
    pub rates: Rates,
}

#[derive(Serialize, Debug)]
pub struct BackendRates {
    pub vip: VipRef,
    pub backend: BackendRef,
    pub member_id: u32,
    #[serde(flatten)]
    pub rates: Rates,
}

/// One interval: what `--watch` prints.
#[derive(Serialize, Debug)]
pub struct Interval {
    /// When it ended (RFC 3339, UTC).
    pub at: String,
    pub interval_s: f64,
    /// Each global counter's increase over the interval.
    pub global: BTreeMap<&'static str, u64>,
    /// The same per second.
    pub global_per_s: BTreeMap<&'static str, f64>,
    pub vips: Vec<VipRates>,
    pub backends: Vec<BackendRates>,
}

fn interval(old: &Snapshot, new: &Snapshot, at: SystemTime) -> Interval {
    let secs = new.at.duration_since(old.at).as_secs_f64().max(1e-6);
    let global: BTreeMap<_, _> = new
        .global
        .iter()
        .zip(&old.global)
        .map(|((c, a), (_, b))| (c.name(), a.saturating_sub(*b)))
        .collect();
    let global_per_s = global.iter().map(|(c, d)| (*c, *d as f64 / secs)).collect();
    let vips = new
        .vips
        .iter()
        .map(|(id, (vip, s))| VipRates {
            vip: vip.clone(),
            rates: Rates::between(old.vips.get(id).map(|(_, s)| s), s, secs),
        })
        .collect();
    let backends = new
        .members
        .iter()
        .map(|(key, (vip, backend, s))| BackendRates {
            vip: vip.clone(),
            backend: backend.clone(),
            member_id: key.0,
            rates: Rates::between(old.members.get(key).map(|(_, _, s)| s), s, secs),
        })
        .collect();
    Interval {
        at: humantime::format_rfc3339_millis(at).to_string(),
        interval_s: secs,
        global,
        global_per_s,
        vips,
        backends,
    }
}

pub fn watch(p: &Pinned, names: &VipNames, every: Duration, format: Format) -> Result<()> {
    let mut last = Snapshot::take(p, names)?;
    loop {
        std::thread::sleep(every);
        let now = Snapshot::take(p, names)?;
        let i = interval(&last, &now, SystemTime::now());
        let mut out = std::io::stdout().lock();
        match format {
            Format::Json => writeln!(out, "{}", serde_json::to_string(&i)?)?,
            _ => print_block(&mut out, &i, format == Format::Wide)?,
        }
        out.flush()?;
        last = now;
    }
}

fn print_block(out: &mut impl std::io::Write, i: &Interval, wide: bool) -> std::io::Result<()> {
    let busy: Vec<String> = i
        .global_per_s
        .iter()
        .filter(|(_, r)| **r > 0.0)
        .map(|(c, r)| format!("{c}={r:.0}/s"))
        .collect();
    writeln!(out, "{}  (over {:.2}s)", i.at, i.interval_s)?;
    writeln!(
        out,
        "  global: {}",
        if busy.is_empty() {
            "idle".to_string()
        } else {
            busy.join("  ")
        }
    )?;
    let line = |out: &mut dyn std::io::Write, name: &str, r: &Rates| {
        writeln!(
            out,
            "  {name:<56} {:>12.0} {:>14.0} {:>12.0}",
            r.packets_per_s, r.bytes_per_s, r.new_flows_per_s
        )
    };
    writeln!(
        out,
        "  {:<56} {:>12} {:>14} {:>12}",
        "VIP", "PACKETS/S", "BYTES/S", "NEW FLOWS/S"
    )?;
    // Each VIP, then its backends (a backend of a VIP no longer listed comes last, with its
    // VIP named).
    let backend = |out: &mut dyn std::io::Write, b: &BackendRates, named: bool| {
        let id = if wide {
            format!(" (member {})", b.member_id)
        } else {
            String::new()
        };
        let vip = if named || wide {
            format!("  [{}]", b.vip.label)
        } else {
            String::new()
        };
        line(out, &format!("  -> {}{id}{vip}", b.backend.label), &b.rates)
    };
    for v in &i.vips {
        line(out, &v.vip.label, &v.rates)?;
        for b in i.backends.iter().filter(|b| b.vip.label == v.vip.label) {
            backend(out, b, false)?;
        }
    }
    for b in &i.backends {
        if !i.vips.iter().any(|v| v.vip.label == b.vip.label) {
            backend(out, b, true)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(addr: &str) -> VipRef {
        VipRef {
            label: format!("{addr}:80/tcp"),
            name: None,
            address: addr.parse().unwrap(),
            port: 80,
            protocol: "tcp".into(),
        }
    }

    fn backend(vip_addr: &str, addr: &str, member_id: u32) -> BackendRates {
        BackendRates {
            vip: vip(vip_addr),
            backend: BackendRef {
                label: format!("{addr}:80"),
                address: addr.parse().unwrap(),
                port: 80,
            },
            member_id,
            rates: Rates::default(),
        }
    }

    #[test]
    fn each_vip_is_followed_by_its_own_backends() {
        let (a, b) = ("192.0.2.10", "192.0.2.11");
        let i = Interval {
            at: "t".into(),
            interval_s: 1.0,
            global: BTreeMap::new(),
            global_per_s: BTreeMap::new(),
            vips: [a, b]
                .map(|v| VipRates {
                    vip: vip(v),
                    rates: Rates::default(),
                })
                .into(),
            // Member ids interleave the two VIPs' backends, as the maps may.
            backends: vec![
                backend(a, "10.1.0.1", 0),
                backend(b, "10.2.0.1", 1),
                backend(a, "10.1.0.2", 2),
                backend(b, "10.2.0.2", 3),
            ],
        };
        let mut out = Vec::new();
        print_block(&mut out, &i, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        let order: Vec<&str> = text
            .lines()
            .skip(3)
            .map(|l| l.split_whitespace().find(|w| w.contains(':')).unwrap())
            .collect();
        assert_eq!(
            order,
            [
                "192.0.2.10:80/tcp",
                "10.1.0.1:80",
                "10.1.0.2:80",
                "192.0.2.11:80/tcp",
                "10.2.0.1:80",
                "10.2.0.2:80"
            ],
            "{text}"
        );
    }
}
