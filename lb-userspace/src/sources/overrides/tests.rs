use super::*;

const CONFIG: &str = "
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
";
const WEB: &str = "192.0.2.10:80/tcp";

fn config(text: &str) -> Config {
    Config::parse(text, "test").expect("valid config")
}

fn weights(c: &Config) -> Vec<u32> {
    c.vips[0].spec.backends.iter().map(|b| b.weight).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_drain_and_a_weight_replace_the_configured_weights_and_record_them() {
    let mut o = Overrides::default();
    o.set(Override::new(WEB.into(), ip("10.1.0.1"), None));
    o.set(Override::new(WEB.into(), ip("10.1.0.2"), Some(7)));
    let mut c = config(CONFIG);
    let applied = o.apply(&mut c);
    assert_eq!(weights(&c), [0, 7]);
    assert!(applied.cleared.is_empty(), "{applied:?}");
    let configured: Vec<_> = applied
        .kept
        .overrides
        .iter()
        .map(|k| k.configured)
        .collect();
    assert_eq!(configured, [Some(200), Some(100)]);
}

#[test]
fn a_config_that_changes_the_backends_weight_clears_its_override() {
    let mut o = Overrides::default();
    o.set(Override::new(WEB.into(), ip("10.1.0.1"), None));
    let first = o.apply(&mut config(CONFIG)).kept;
    let edited = CONFIG.replace("weight: 200", "weight: 150");
    let mut c = config(&edited);
    let applied = first.apply(&mut c);
    assert_eq!(weights(&c), [150, 100], "the config's weights serve");
    assert_eq!(applied.cleared.len(), 1, "{applied:?}");
    assert_eq!(
        applied.cleared[0].why,
        "the config changed its weight from 200 to 150"
    );
    assert!(applied.kept.overrides.is_empty());
}

#[test]
fn an_override_of_a_backend_or_vip_no_longer_configured_is_cleared() {
    let mut o = Overrides::default();
    o.set(Override::new(WEB.into(), ip("10.1.0.9"), None));
    o.set(Override::new(
        "192.0.2.99:80/tcp".into(),
        ip("10.1.0.1"),
        None,
    ));
    let mut c = config(CONFIG);
    let applied = o.apply(&mut c);
    assert_eq!(weights(&c), [200, 100]);
    let why: Vec<_> = applied.cleared.iter().map(|c| c.why.as_str()).collect();
    assert_eq!(
        why,
        [
            "the backend is no longer configured",
            "the VIP is no longer configured"
        ]
    );
}

#[test]
fn setting_an_override_replaces_the_backends_previous_one() {
    let mut o = Overrides::default();
    o.set(Override::new(WEB.into(), ip("10.1.0.1"), None));
    let old = o.set(Override::new(WEB.into(), ip("10.1.0.1"), Some(5)));
    assert_eq!(old.map(|o| o.kind), Some(Kind::Drain));
    assert_eq!(o.overrides.len(), 1);
    assert_eq!(o.find(WEB, ip("10.1.0.1")).map(|o| o.weight), Some(5));
}

#[test]
fn settling_records_the_configured_weight_and_removes_the_cleared_ones() {
    let dir = tempfile::tempdir().unwrap();
    update(dir.path(), |o| {
        o.set(Override::new(WEB.into(), ip("10.1.0.1"), None));
        o.set(Override::new(WEB.into(), ip("10.1.0.9"), None));
    })
    .unwrap();
    let applied = load(dir.path()).unwrap().apply(&mut config(CONFIG));
    settle(dir.path(), &applied).unwrap();
    let file = load(dir.path()).unwrap();
    assert_eq!(file.overrides.len(), 1, "{file:?}");
    assert_eq!(file.overrides[0].configured, Some(200));
    update(dir.path(), |o| o.remove(WEB, ip("10.1.0.1"))).unwrap();
    assert!(!path(dir.path()).exists(), "no file once none is left");
}

#[test]
fn settling_leaves_an_override_a_command_changed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Overrides::default();
    o.set(Override::new(WEB.into(), ip("10.1.0.9"), None));
    let applied = o.apply(&mut config(CONFIG));
    // A command sets the same backend anew before the agent settles.
    let mut again = Override::new(WEB.into(), ip("10.1.0.9"), Some(3));
    again.since = "later".into();
    update(dir.path(), |f| f.set(again.clone())).unwrap();
    settle(dir.path(), &applied).unwrap();
    assert_eq!(load(dir.path()).unwrap().overrides, [again]);
}

#[test]
fn a_damaged_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(path(dir.path()), "{ not json").unwrap();
    let e = format!("{:#}", load(dir.path()).unwrap_err());
    assert!(e.contains("overrides.json: not an overrides file"), "{e}");
}
