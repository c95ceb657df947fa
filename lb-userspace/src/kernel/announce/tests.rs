use std::net::IpAddr;

use super::*;
use crate::{
    agent::reconcile::{Agent, Remembered},
    kernel::dataplane::memory::MemoryDataplane,
    sources::config::Config,
};

/// Two VIPs at 192.0.2.1 (ports 80 and 443), one at 192.0.2.2 and one at 2001:db8::1;
/// `weights` of the 192.0.2.2 VIP's two backends.
fn agent(weights: (u32, u32)) -> Agent<MemoryDataplane> {
    let (w1, w2) = weights;
    let c = Config::parse(
        &format!(
            "node: {{ interfaces: [eth0], source_v4: 10.0.0.1, source_v6: fd00::1, table_size: 101 }}
vips:
  - {{ address: 192.0.2.1, port: 80, protocol: tcp, backends: [{{ address: 10.1.0.1 }}] }}
  - {{ address: 192.0.2.1, port: 443, protocol: tcp, backends: [{{ address: 10.1.0.1 }}] }}
  - {{ address: 192.0.2.2, port: 80, protocol: tcp, health_check: {{ type: tcp }},
      backends: [{{ address: 10.1.0.1, weight: {w1} }}, {{ address: 10.1.0.2, weight: {w2} }}] }}
  - {{ address: 2001:db8::1, port: 80, protocol: tcp, backends: [{{ address: fd01::1 }}] }}
"
        ),
        "t",
    )
    .unwrap();
    let dp = MemoryDataplane::new(c.node.sizes.limits());
    Agent::start(dp, c, &Remembered::default()).unwrap().0
}

fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn every_vip_address_with_a_backend_in_its_table_is_wanted_once() {
    let a = agent((1, 1));
    assert_eq!(
        wanted(a.state()),
        addrs(&["192.0.2.1", "192.0.2.2", "2001:db8::1"])
    );
}

#[test]
fn a_vip_whose_backends_all_have_weight_zero_is_not_wanted() {
    let a = agent((0, 0));
    assert_eq!(wanted(a.state()), addrs(&["192.0.2.1", "2001:db8::1"]));
}

#[test]
fn a_vip_whose_backends_all_failed_their_checks_is_withdrawn_and_wanted_again_when_one_is_back() {
    let mut a = agent((1, 1));
    let key = a.config().vips[2].spec.key();
    a.set_health((key, "10.1.0.1".parse().unwrap()), false)
        .unwrap();
    assert!(wanted(a.state()).contains(&"192.0.2.2".parse().unwrap()));
    a.set_health((key, "10.1.0.2".parse().unwrap()), false)
        .unwrap();
    assert_eq!(wanted(a.state()), addrs(&["192.0.2.1", "2001:db8::1"]));
    a.set_health((key, "10.1.0.2".parse().unwrap()), true)
        .unwrap();
    assert!(wanted(a.state()).contains(&"192.0.2.2".parse().unwrap()));
}

fn announce_of(node_extra: &str) -> Result<Option<AnnounceSettings>, Vec<String>> {
    let text =
        format!("node:\n  interfaces: [eth0]\n  source_v4: 10.0.0.1\n{node_extra}vips: []\n");
    match Config::parse(&text, "t.yaml") {
        Ok(c) => Ok(c.node.announce),
        Err(crate::sources::config::ConfigError::Invalid { problems, .. }) => {
            Err(problems.iter().map(|p| p.to_string()).collect())
        }
        Err(e) => Err(vec![e.to_string()]),
    }
}

#[test]
fn node_announce_is_off_when_absent_and_defaults_to_table_100() {
    assert_eq!(announce_of(""), Ok(None));
    assert_eq!(
        announce_of("  announce: {}\n"),
        Ok(Some(AnnounceSettings { table: 100 }))
    );
    assert_eq!(
        announce_of("  announce: { table: 4242 }\n"),
        Ok(Some(AnnounceSettings { table: 4242 }))
    );
}

#[test]
fn node_announce_table_problems_name_the_key() {
    for (table, expected) in [
        ("254", "node.announce.table: 254 is the kernel's main table"),
        (
            "255",
            "node.announce.table: 255 is the kernel's local table",
        ),
        (
            "253",
            "node.announce.table: 253 is the kernel's default table",
        ),
        ("0", "node.announce.table: must be 1..=4294967295"),
    ] {
        let problems = announce_of(&format!("  announce: {{ table: {table} }}\n"))
            .expect_err("a reserved or out-of-range table is refused");
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "table {table}: {problems:?}"
        );
    }
    let unknown = announce_of("  announce: { tabel: 100 }\n").expect_err("unknown key");
    assert!(unknown[0].contains("tabel"), "{unknown:?}");
}
