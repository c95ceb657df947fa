//! `lb nexthops`: each live member's next hop as `LB_NEXTHOPS` holds it, and the keeper's
//! figures from the agent's status file.

use std::path::Path;

use crate::observe::show::{Result, ShowError};
use aya::maps::{Array, Map, MapData};
use lb_common::{NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNREACHABLE, NH_UNRESOLVED, NextHop, maps};
use serde_json::{Value, json};

use crate::{
    kernel::inspect::Pinned,
    model::view::{BackendRef, VipRef},
    observe::show::{Format, VipNames, member_rows},
};

/// The name `lb nexthops` gives an `NH_*` action.
pub fn action_name(a: u8) -> &'static str {
    match a {
        NH_UNRESOLVED => "unresolved",
        NH_FORWARD => "forward",
        NH_NO_NEIGH => "no_neighbour",
        NH_LOCAL => "local",
        NH_UNREACHABLE => "unreachable",
        _ => "unknown",
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One member's row.
fn row(id: u32, vip: &VipRef, backend: &BackendRef, member_gen: u32, nh: &NextHop) -> Value {
    json!({
        "member": id,
        "vip": vip,
        "backend": backend,
        // An entry of another generation is ignored by the program (not resolved yet).
        "current": nh.generation == member_gen,
        "action": action_name(nh.action),
        "ifindex": nh.ifindex,
        "dmac": mac(&nh.dmac),
        "smac": mac(&nh.smac),
        "mtu": nh.mtu,
    })
}

pub fn nexthops(p: &Pinned, pin_dir: &Path, state_dir: &Path, format: Format) -> Result<()> {
    let path = pin_dir.join(maps::NEXTHOPS);
    let data = MapData::from_pin(&path).map_err(|source| ShowError::Pin {
        path: path.clone(),
        source,
    })?;
    let table: Array<_, NextHop> =
        Array::try_from(Map::Array(data)).map_err(|source| ShowError::Map {
            what: maps::NEXTHOPS,
            source,
        })?;
    let mut rows = Vec::new();
    for r in member_rows(p, &VipNames::read(state_dir).with_ranges(p))? {
        let nh = table.get(&r.id, 0).map_err(|source| ShowError::Map {
            what: maps::NEXTHOPS,
            source,
        })?;
        rows.push(row(r.id, &r.vip, &r.backend, r.member.generation, &nh));
    }
    let keeper = crate::status::file::read_status(state_dir).map(|s| s.nexthops);
    if format == Format::Json {
        let out = json!({ "keeper": keeper, "members": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if let Some(k) = keeper {
        println!(
            "resolved {}, unresolved {}, refreshes {}, failures {}, last refresh {}",
            k.resolved,
            k.unresolved,
            k.refreshes,
            k.failures,
            k.last_refresh.as_deref().unwrap_or("never")
        );
    }
    let str_of = |v: &Value| v.as_str().unwrap_or("").to_string();
    let wide = format == Format::Wide;
    let mut head: Vec<String> = [
        "MEMBER",
        "VIP",
        "BACKEND",
        "ACTION",
        "IF",
        "NEXT HOP MAC",
        "MTU",
    ]
    .map(String::from)
    .into();
    if wide {
        head.push("SOURCE MAC".into());
    }
    let lines = rows.iter().map(|r| {
        let stale = if r["current"] == true { "" } else { " (stale)" };
        let mut line = vec![
            r["member"].to_string(),
            str_of(&r["vip"]["label"]),
            str_of(&r["backend"]["label"]),
            format!("{}{stale}", str_of(&r["action"])),
            r["ifindex"].to_string(),
            str_of(&r["dmac"]),
            r["mtu"].to_string(),
        ];
        if wide {
            line.push(str_of(&r["smac"]));
        }
        line
    });
    print!(
        "{}",
        crate::observe::show::table(std::iter::once(head).chain(lines))
    );
    Ok(())
}
