//! Config files for the agent tests, typed: lb-userspace's own config types ([`RawConfig`] and
//! the structs under it), with constructors for what the tests write again and again, written
//! out as YAML by [`yaml`] (unset keys left out). A key the agent does not know cannot be
//! written, and a key renamed in the agent is renamed here by the compiler.
//!
//! ```ignore
//! let config = RawConfig {
//!     node: RawNode { max_vips: Some(16), ..lab_node(&["lb0"]) },
//!     vips: vec![vip("web", "192.0.2.10", 80, "tcp", &[backend("10.1.0.1")])],
//! };
//! dirs.write_config(&yaml(&config));
//! ```

use serde_json::Value;

pub use lb_userspace::sources::config::{
    RawAnnounce, RawBackend, RawBudget, RawConfig, RawHealthCheck, RawNode, RawPassiveHealth,
    RawVip,
};

/// The node of most tests on the lab's namespace: attached to `interfaces`, DSR sources
/// 10.0.0.1 and fd00::1, a 1,009-slot table, 8 VIPs, 32 backends, 65,536 flows.
pub fn lab_node(interfaces: &[&str]) -> RawNode {
    RawNode {
        interfaces: strings(interfaces),
        source_v4: some("10.0.0.1"),
        source_v6: some("fd00::1"),
        table_size: Some(1009),
        max_vips: Some(8),
        max_backends: Some(32),
        flow_table_size: Some(65_536),
        ..RawNode::default()
    }
}

/// A VIP `name` at `address:port` over `protocol` (`tcp`, `udp`), DSR, with `backends`.
pub fn vip(
    name: &str,
    address: &str,
    port: u16,
    protocol: &str,
    backends: &[RawBackend],
) -> RawVip {
    RawVip {
        name: some(name),
        address: some(address),
        port: Some(port.into()),
        protocol: some(protocol),
        backends: backends.to_vec(),
        ..RawVip::default()
    }
}

/// A backend at `address`, the VIP's port and weight.
pub fn backend(address: &str) -> RawBackend {
    RawBackend {
        address: some(address),
        ..RawBackend::default()
    }
}

/// A backend at `address` with `weight`.
pub fn weighted(address: &str, weight: u32) -> RawBackend {
    RawBackend {
        weight: Some(weight.into()),
        ..backend(address)
    }
}

/// `Some` of a string.
pub fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

/// Owned strings.
pub fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `config` as a config file: YAML, with the keys left unset (`None`) left out.
pub fn yaml(config: &RawConfig) -> String {
    let mut v = serde_json::to_value(config).expect("a config serializes");
    drop_nulls(&mut v);
    serde_saphyr::to_string(&v).expect("a config writes as YAML")
}

/// `{"node": node}` as a config file: a node without VIPs.
pub fn node_yaml(node: RawNode) -> String {
    yaml(&RawConfig {
        node,
        vips: Vec::new(),
    })
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, x| !x.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the builder writes is what the agent reads: the same settings as the YAML written by
    /// hand, and nothing unset written.
    #[test]
    fn a_built_config_reads_as_the_hand_written_one() {
        let built = yaml(&RawConfig {
            node: RawNode {
                nat_table_size: Some(4096),
                announce: Some(RawAnnounce::default()),
                ..lab_node(&["lb0"])
            },
            vips: vec![vip(
                "web",
                "192.0.2.10",
                80,
                "tcp",
                &[backend("10.1.0.1"), weighted("10.1.0.2", 3)],
            )],
        });
        let by_hand = "node:
  interfaces: [lb0]
  source_v4: 10.0.0.1
  source_v6: fd00::1
  table_size: 1009
  max_vips: 8
  max_backends: 32
  flow_table_size: 65536
  nat_table_size: 4096
  announce: {}
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    backends: [{ address: 10.1.0.1 }, { address: 10.1.0.2, weight: 3 }]
";
        let read = |text: &str| serde_saphyr::from_str::<Value>(text).unwrap();
        assert_eq!(read(&built), read(by_hand), "{built}");
        assert!(!built.contains("null"), "{built}");
        lb_userspace::sources::config::Config::parse(&built, "built.yaml").unwrap();
    }
}
