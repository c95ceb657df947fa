//! What a reload changed, in words for the log: VIPs added and removed, and per VIP the backends
//! added, removed or given another weight, and settings changed (`web 192.0.2.10:80/tcp:
//! backend 10.1.0.3 added (weight 100)`).

use std::collections::BTreeMap;

use crate::{
    model::desired::BackendSpec,
    sources::config::{Config, VipConfig},
};

/// At most this many lines are logged for one reload; the rest are counted.
pub const MAX_LINES: usize = 20;

/// The changes from `old` to `new`, one line each, VIPs in label order.
pub fn between(old: &Config, new: &Config) -> Vec<String> {
    let (old, new) = (by_label(old), by_label(new));
    let mut out = Vec::new();
    for (label, v) in &new {
        let name = &v.spec.name;
        match old.get(label) {
            None => out.push(format!(
                "{name} {label}: VIP added ({} backends)",
                v.spec.backends.len()
            )),
            Some(o) => out.extend(
                vip(o, v)
                    .into_iter()
                    .map(|c| format!("{name} {label}: {c}")),
            ),
        }
    }
    for (label, v) in old.iter().filter(|(l, _)| !new.contains_key(*l)) {
        out.push(format!("{} {label}: VIP removed", v.spec.name));
    }
    out
}

fn by_label(c: &Config) -> BTreeMap<String, &VipConfig> {
    c.vips.iter().map(|v| (v.spec.label(), v)).collect()
}

/// The changes within one VIP.
fn vip(old: &VipConfig, new: &VipConfig) -> Vec<String> {
    if old == new {
        return Vec::new();
    }
    let key = |b: &BackendSpec| (b.address, b.port);
    let old_b: BTreeMap<_, &BackendSpec> = old.spec.backends.iter().map(|b| (key(b), b)).collect();
    let new_b: BTreeMap<_, &BackendSpec> = new.spec.backends.iter().map(|b| (key(b), b)).collect();
    let mut out = Vec::new();
    for (k, b) in &new_b {
        match old_b.get(k) {
            None => out.push(format!("backend {} added (weight {})", at(b), b.weight)),
            Some(o) if o.weight != b.weight => out.push(format!(
                "backend {} weight {} -> {}",
                at(b),
                o.weight,
                b.weight
            )),
            Some(_) => {}
        }
    }
    for (_, b) in old_b.iter().filter(|(k, _)| !new_b.contains_key(*k)) {
        out.push(format!("backend {} removed", at(b)));
    }
    let mut settings = old.clone();
    settings.spec.backends.clone_from(&new.spec.backends);
    if settings != *new {
        out.push("settings changed (mode, hash, affinity, checks, ranges or budget)".into());
    }
    out
}

/// `10.1.0.3`, or `10.1.0.3:8080` for a backend with a port of its own.
fn at(b: &BackendSpec) -> String {
    match b.port {
        0 => b.address.to_string(),
        p => std::net::SocketAddr::new(b.address, p).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
node:
  interfaces: [eth0]
  source_v4: 10.0.0.1
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - { address: 10.1.0.1, weight: 200 }
      - { address: 10.1.0.2 }
  - name: dns
    address: 192.0.2.10
    port: 53
    protocol: udp
    backends: [{ address: 10.1.0.1 }]
";

    fn parse(text: &str) -> Config {
        Config::parse(text, "test").expect("valid")
    }

    #[test]
    fn added_removed_and_reweighted_backends_and_vips_are_each_one_line() {
        let new = BASE
            .replace("weight: 200", "weight: 50")
            .replace(
                "      - { address: 10.1.0.2 }\n",
                "      - { address: 10.1.0.3 }\n",
            )
            .replace(
                "  - name: dns\n    address: 192.0.2.10\n    port: 53",
                "  - name: dns\n    address: 192.0.2.11\n    port: 53",
            );
        let lines = between(&parse(BASE), &parse(&new));
        assert_eq!(
            lines,
            [
                "web 192.0.2.10:80/tcp: backend 10.1.0.1 weight 200 -> 50",
                "web 192.0.2.10:80/tcp: backend 10.1.0.3 added (weight 100)",
                "web 192.0.2.10:80/tcp: backend 10.1.0.2 removed",
                "dns 192.0.2.11:53/udp: VIP added (1 backends)",
                "dns 192.0.2.10:53/udp: VIP removed",
            ]
        );
    }

    #[test]
    fn a_changed_setting_is_said_and_an_unchanged_config_says_nothing() {
        assert!(between(&parse(BASE), &parse(BASE)).is_empty());
        let sticky = BASE.replace(
            "    port: 80\n    protocol: tcp\n",
            "    port: 80\n    protocol: tcp\n    affinity_timeout: 60s\n",
        );
        assert_eq!(
            between(&parse(BASE), &parse(&sticky)),
            [
                "web 192.0.2.10:80/tcp: settings changed (mode, hash, affinity, checks, ranges or budget)"
            ]
        );
    }
}
