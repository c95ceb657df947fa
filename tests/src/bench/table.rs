//! The table `cargo xtask bench` prints from the JSON document.

use super::*;

/// The table printed by `cargo xtask bench` (the sections the document has).
pub fn table(v: &Value) -> String {
    let mut s = String::new();
    if let Some(f) = v.get("fastpath") {
        s += &match f.get("profile") {
            Some(p) => format!("profile of {p}: median {} ns per call\n", f["median_ns"]),
            None => fastpath_table(f),
        };
    }
    if let Some(fw) = v.get("forwarding_rate") {
        s += &forwarding_table(fw);
    }
    if let Some(p) = v.get("nat_peer") {
        s += &crate::bench_peer::table(p);
    }
    if let Some(p) = v.get("programs") {
        s += &programs_table(p);
    }
    if let Some(m) = v.get("maglev") {
        s += &maglev_table(m);
    }
    if let Some(cp) = v.get("control_plane") {
        s += &control_plane_table(cp);
    }
    if let Some(m) = v.get("migration") {
        s += &format!(
            "migration (flow and NAT tables doubled, {} IPv4 flows and {} translations each way, {} late writes): load and copy {:.0} ms (the old program serving), finish {:.0} ms (grace period, merge, renames); copying and merging the maps {:.0} ms in all\n",
            m["entries"],
            m["entries"],
            m["late_writes"],
            m["load_and_copy_ms"].as_f64().unwrap_or(0.0),
            m["finish_ms"].as_f64().unwrap_or(0.0),
            m["copy_and_merge_ms"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(m) = v.get("memory") {
        s += &format!(
            "memory: kernel maps for a {}-entry flow table: {} bytes ({} of them the IPv4 flow table, {:.1} bytes per entry; target <= {}: {}; IPv6 LRU: {} entries, {:.1} bytes each)\n",
            m["flow_entries"],
            m["kernel_map_bytes_total"],
            m["kernel_map_bytes"]["LB_FLOWS4"],
            m["flow_table_bytes_per_entry"].as_f64().unwrap_or(0.0),
            TARGET_FLOW_BYTES_PER_ENTRY,
            mark(
                m["flow_table_bytes_per_entry"].as_f64().unwrap_or(f64::MAX)
                    <= TARGET_FLOW_BYTES_PER_ENTRY
            ),
            m["v6_flow_entries"],
            m["v6_flow_table_bytes_per_entry"].as_f64().unwrap_or(0.0),
        );
    }
    s
}

fn fastpath_table(f: &Value) -> String {
    let mut s = format!(
        "fast path (BPF_PROG_TEST_RUN, one call per packet), floor {} ns\n",
        f["floor_ns"]
    );
    s += &format!(
        "  {:<38} {:>6} {:>6} {:>6} {:>8}   {}\n",
        "case", "ns", "min", "max", "x floor", "target"
    );
    let order: Vec<&str> = f["order"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for k in order {
        let c = &f[k];
        let Some(ns) = c.get("ns") else { continue };
        let n = |x: &Value| x.as_u64().unwrap_or(0);
        let ratio = c["ratio_to_floor"].as_f64().unwrap_or(0.0);
        let tail = match (
            c.get("target_x_floor").and_then(Value::as_f64),
            c.get("note").and_then(Value::as_str),
        ) {
            (Some(t), _) => format!("<= {t:<5} {}", mark(ratio <= t)),
            (None, Some(note)) => note.to_string(),
            _ => String::new(),
        };
        s += &format!(
            "  {:<38} {:>6} {:>6} {:>6} {:>8.2}   {}\n",
            k,
            n(ns),
            n(&c["min"]),
            n(&c["max"]),
            ratio,
            tail
        );
    }
    let t = &f["flow_table"];
    let per = t["bytes_per_entry"].as_f64().unwrap_or(0.0);
    s += &format!(
        "  flow table of the main instance: {} entries, {} bytes in the kernel, {per:.1} bytes per entry (target <= {TARGET_FLOW_BYTES_PER_ENTRY}: {})\n",
        t["entries"],
        t["kernel_bytes"],
        mark(per <= TARGET_FLOW_BYTES_PER_ENTRY)
    );
    s
}

fn forwarding_table(fw: &Value) -> String {
    if let Some(why) = fw["unavailable"].as_str() {
        return format!("forwarding rate (live frames): not measured: {why}\n");
    }
    let pps = |k: &str| fw[k]["pps"].as_u64().unwrap_or(0);
    let ratio = fw["lb_established_v4"]["ratio_to_floor"]
        .as_f64()
        .unwrap_or(0.0);
    let two = fw["ratio_2cores_to_1core"].as_f64().unwrap_or(0.0);
    format!(
        "forwarding rate (live frames), one core: lb {} pps, floor {} pps, ratio {ratio:.2} (target >= {TARGET_FORWARDING_RATIO}: {})\n\
         forwarding_rate_2cores: lb {} pps, x{two:.2} one core (target >= {TARGET_2CORES_RATIO}: {})\n",
        pps("lb_established_v4"),
        pps("floor"),
        mark(ratio >= TARGET_FORWARDING_RATIO),
        pps("lb_established_v4_2cores"),
        mark(two >= TARGET_2CORES_RATIO),
    )
}

fn programs_table(p: &Value) -> String {
    let mut s = format!(
        "programs (kernel's view after loading)\n  {:<12} {:>12} {:>10} {:>14}\n",
        "program", "translated", "JIT bytes", "verifier insns"
    );
    for (k, c) in p.as_object().into_iter().flatten() {
        let n = |x: &str| c[x].as_u64().unwrap_or(0);
        s += &format!(
            "  {:<12} {:>12} {:>10} {:>14}\n",
            k,
            n("translated_insns"),
            n("jited_bytes"),
            n("verified_insns")
        );
    }
    s
}

fn maglev_table(mg: &Value) -> String {
    let mut s = String::from("maglev, M = 65537\n");
    for n in ["n10", "n100", "n1000"] {
        let m = &mg[n];
        let f = |k: &str| m[k].as_f64().unwrap_or(0.0);
        s += &format!(
            "  N={:<5} build {:>7.3} ms  balance {:.4}  weighted error {:.2} %  remove {:.4} (ideal {:.4})  add {:.4} (ideal {:.4})\n",
            &n[1..],
            f("build_ms"),
            f("equal_weights_largest_over_mean"),
            f("weighted_worst_share_error") * 100.0,
            f("remove_one_moved"),
            f("remove_ideal"),
            f("add_one_moved"),
            f("add_ideal"),
        );
    }
    s
}

fn control_plane_table(cp: &Value) -> String {
    let mut s = format!(
        "control plane, {} VIPs x {} backends\n",
        cp["scale"]["vips"], cp["scale"]["backends_per_vip"]
    );
    for k in ["full_sync", "one_backend_change", "unchanged_resync"] {
        s += &format!(
            "  {:<20} {:>10} writes {:>10.1} ms (plan {:.1} ms, CPU {:.1} ms)\n",
            k,
            cp[k]["writes"].as_u64().unwrap_or(0),
            cp[k]["total_ms"].as_f64().unwrap_or(0.0),
            cp[k]["plan_ms"].as_f64().unwrap_or(0.0),
            cp[k]["cpu_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let c = &cp["churn"];
    let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
    s += &format!(
        "  churn, {} backend changes: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
        c["changes"],
        f("p50_ms"),
        f("p90_ms"),
        f("p99_ms"),
        f("max_ms")
    );
    let rss = &cp["agent_rss_kib"];
    s += &format!(
        "  agent RSS: {} KiB before load, {} KiB loaded, {} KiB after full sync, {} KiB after churn\n",
        rss["before_load"], rss["after_load"], rss["after_full_sync"], rss["after_churn"]
    );
    s += &format!(
        "  targets (one change <= 5 ms, p99 <= 10 ms, resync <= 1 ms, full sync <= 1 s, RSS <= 400 MiB): {}\n",
        if cp["targets"]["met"] == true {
            "met"
        } else {
            "NOT met"
        }
    );
    s
}
