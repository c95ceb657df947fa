//! `lb nexthops`: each live member's next hop as `LB_NEXTHOPS` holds it, and the keeper's
//! figures from the agent's status file.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{NH_FORWARD, NH_LOCAL, NH_NO_NEIGH, NH_UNREACHABLE, NH_UNRESOLVED, NextHop, maps};
use serde_json::{Value, json};

use crate::{
    inspect::{Pinned, backend_label},
    run,
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
fn row(id: u32, vip: &str, backend: &str, member_gen: u32, nh: &NextHop) -> Value {
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

pub fn nexthops(p: &Pinned, pin_dir: &Path, state_dir: &Path, as_json: bool) -> Result<()> {
    let path = pin_dir.join(maps::NEXTHOPS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let table: Array<_, NextHop> = Array::try_from(Map::Array(data))?;
    let vips = crate::show::vip_labels(p)?;
    let mut rows = Vec::new();
    for (id, m) in p.members()? {
        let nh = table.get(&id, 0).context("reading LB_NEXTHOPS")?;
        let vip = vips.get(&m.vip_id).map_or("", String::as_str);
        rows.push(row(id, vip, &backend_label(&m), m.generation, &nh));
    }
    let keeper = run::read_status(state_dir).map(|s| s.nexthops);
    if as_json {
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
    for r in &rows {
        println!(
            "member {:>4} {:<24} {:<40} {:<12}{} if {} {} -> {} mtu {}",
            r["member"],
            r["vip"].as_str().unwrap_or(""),
            r["backend"].as_str().unwrap_or(""),
            r["action"].as_str().unwrap_or(""),
            if r["current"] == true { "" } else { " (stale)" },
            r["ifindex"],
            r["smac"].as_str().unwrap_or(""),
            r["dmac"].as_str().unwrap_or(""),
            r["mtu"],
        );
    }
    Ok(())
}
