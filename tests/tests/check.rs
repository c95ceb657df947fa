//! `lb check --config`, the real binary: every kind of broken config is refused with exit 1 and
//! its problem named by its path; a valid config passes (with its warnings shown); without the
//! capabilities to load BPF programs the host checks are skipped, and said to be.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");

/// Valid, and small enough that the kernel check loads the program quickly. Rows below edit it.
const GOOD: &str = "node:
  interfaces: [lo]
  source_v4: 10.0.0.1
  source_v6: fd00::1
  table_size: 1009
  max_vips: 8
  flow_table_size: 65536
  affinity_table_size: 1024
  nat_table_size: 4096
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - { address: 10.1.0.1, weight: 2 }
      - { address: 10.1.0.2, weight: 1 }
  - name: dns
    address: 192.0.2.11
    port: 53
    protocol: udp
    backends: [{ address: 10.1.0.3 }]
";

/// A config file of its own for each call, removed on drop.
struct File(PathBuf);

impl File {
    fn new(text: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-check-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `lb check --config` on `text`, run by `wrapper` (a command and its arguments) if not empty.
fn check_under(wrapper: &[&str], text: &str) -> Output {
    let file = File::new(text);
    let mut cmd = match wrapper {
        [] => Command::new(BIN),
        [program, rest @ ..] => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
    };
    cmd.args(["check", "--config"])
        .arg(&file.0)
        .env("NO_COLOR", "1")
        .output()
        .expect("running lb check")
}

fn check(text: &str) -> Output {
    check_under(&[], text)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// GOOD with the first `from` replaced by `to`.
fn edit(from: &str, to: &str) -> String {
    assert!(
        GOOD.contains(from),
        "the row edits text that is not there: {from:?}"
    );
    GOOD.replacen(from, to, 1)
}

#[test]
fn every_kind_of_broken_config_is_refused_naming_its_path() {
    lb_tests::require_root();
    // (what is broken, the config, the error line `lb check` must print)
    let rows: Vec<(&str, String, &str)> = vec![
        (
            "table size not prime",
            edit("table_size: 1009", "table_size: 4096"),
            "node.table_size: 4096 is not prime",
        ),
        (
            "an interface twice",
            edit("interfaces: [lo]", "interfaces: [lo, lo]"),
            "node.interfaces[1]: \"lo\" is listed twice",
        ),
        (
            "an interface this host does not have",
            edit("interfaces: [lo]", "interfaces: [lo, nope0]"),
            "node.interfaces: no interface named nope0 on this host",
        ),
        (
            "an unknown xdp mode",
            edit("  max_vips: 8", "  max_vips: 8\n  xdp_mode: fast"),
            "node.xdp_mode: must be one of auto, native, generic, not \"fast\"",
        ),
        (
            "source_v4 not IPv4",
            edit("source_v4: 10.0.0.1", "source_v4: fd00::9"),
            "node.source_v4: \"fd00::9\" is not an IPv4 address",
        ),
        (
            "an IPv4 backend without source_v4",
            edit("  source_v4: 10.0.0.1\n", ""),
            "vips[0].backends[0].address: an IPv4 backend needs node.source_v4",
        ),
        (
            "more VIPs than max_vips",
            edit("max_vips: 8", "max_vips: 1"),
            "vips: 2 VIPs, more than node.max_vips (1)",
        ),
        (
            "a zero-sized flow table",
            edit("flow_table_size: 65536", "flow_table_size: 0"),
            "node.flow_table_size: must be 1..=134217728",
        ),
        (
            "a metrics address without a port",
            edit(
                "  max_vips: 8",
                "  max_vips: 8\n  metrics_listen: localhost",
            ),
            "node.metrics_listen: \"localhost\" is not an address:port",
        ),
        (
            "a VIP address that is not an address",
            edit("address: 192.0.2.10", "address: 192.0.2.300"),
            "vips[0].address: \"192.0.2.300\" is not an IP address",
        ),
        (
            "a VIP port out of range",
            edit("port: 80", "port: 70000"),
            "vips[0].port: must be 0..=65535",
        ),
        (
            "an unknown protocol",
            edit("protocol: udp", "protocol: sctp"),
            "vips[1].protocol: must be one of tcp, udp, not \"sctp\"",
        ),
        (
            "two VIPs on one address, port and protocol",
            edit(
                "address: 192.0.2.11\n    port: 53\n    protocol: udp",
                "address: 192.0.2.10\n    port: 80\n    protocol: tcp",
            ),
            "vips[1]: same address, port and protocol as vips[0]",
        ),
        (
            "a weight out of range",
            edit("weight: 2", "weight: 70000"),
            "vips[0].backends[0].weight: must be 0..=65535",
        ),
        (
            "a backend listed twice",
            edit("address: 10.1.0.2", "address: 10.1.0.1"),
            "vips[0].backends[1].address: 10.1.0.1 is already backends[0]",
        ),
        (
            "a DSR VIP that is its own backend",
            edit("address: 10.1.0.2", "address: 192.0.2.10"),
            "vips[0].backends[1].address: 192.0.2.10 is the VIP's own address",
        ),
        (
            "a port on a DSR backend",
            edit(
                "{ address: 10.1.0.1, weight: 2 }",
                "{ address: 10.1.0.1, weight: 2, port: 8080 }",
            ),
            "vips[0].backends[0].port: only NAT mode maps ports",
        ),
        (
            "a NAT VIP with a backend of the other family",
            edit("    protocol: tcp\n", "    protocol: tcp\n    mode: nat\n")
                .replace("address: 10.1.0.2", "address: fd01::2"),
            "vips[0].backends[1].address: NAT mode does not translate between IPv4 and IPv6",
        ),
        (
            "passive health on a DSR VIP",
            edit(
                "    protocol: tcp\n",
                "    protocol: tcp\n    passive_health: {}\n",
            ),
            "vips[0].passive_health: needs mode: nat",
        ),
        (
            "a health check interval that is not a duration",
            edit(
                "    protocol: tcp\n",
                "    protocol: tcp\n    health_check: { type: tcp, interval: often }\n",
            ),
            "vips[0].health_check.interval: not a duration",
        ),
        (
            "an affinity timeout over a day",
            edit(
                "    protocol: udp\n",
                "    protocol: udp\n    hash: source-ip\n    affinity_timeout: 48h\n",
            ),
            "vips[1].affinity_timeout: at most 24h",
        ),
        (
            "a VIP table larger than the node's",
            edit(
                "    protocol: udp\n",
                "    protocol: udp\n    table_size: 2003\n",
            ),
            "vips[1].table_size: must be 1..=1009",
        ),
        (
            "the unspecified address as a VIP",
            edit("address: 192.0.2.10", "address: 0.0.0.0"),
            "vips[0].address: 0.0.0.0 is the unspecified address: a VIP is a unicast address clients send to",
        ),
        (
            "a loopback VIP",
            edit("address: 192.0.2.10", "address: 127.0.0.1"),
            "vips[0].address: 127.0.0.1 is a loopback address: a VIP is a unicast address clients send to",
        ),
        (
            "a multicast VIP",
            edit("address: 192.0.2.10", "address: 239.1.2.3"),
            "vips[0].address: 239.1.2.3 is a multicast address: a VIP is a unicast address clients send to",
        ),
        (
            "the broadcast address as a VIP",
            edit("address: 192.0.2.10", "address: 255.255.255.255"),
            "vips[0].address: 255.255.255.255 is the broadcast address: a VIP is a unicast address clients send to",
        ),
        (
            "the unspecified address as a backend",
            edit("address: 10.1.0.1", "address: 0.0.0.0"),
            "vips[0].backends[0].address: 0.0.0.0 is the unspecified address: a backend is another host's unicast address",
        ),
        (
            "a loopback backend",
            edit("address: 10.1.0.2", "address: 127.0.0.1"),
            "vips[0].backends[1].address: 127.0.0.1 is a loopback address: a backend is another host's unicast address",
        ),
        (
            "a multicast backend",
            edit("address: 10.1.0.3", "address: 224.0.0.1"),
            "vips[1].backends[0].address: 224.0.0.1 is a multicast address: a backend is another host's unicast address",
        ),
        (
            "the broadcast address as a backend",
            edit("address: 10.1.0.1", "address: 255.255.255.255"),
            "vips[0].backends[0].address: 255.255.255.255 is the broadcast address: a backend is another host's unicast address",
        ),
        (
            "a NAT VIP that is its own backend",
            edit("    protocol: tcp\n", "    protocol: tcp\n    mode: nat\n")
                .replace("address: 10.1.0.2", "address: 192.0.2.10"),
            "vips[0].backends[1].address: 192.0.2.10 is the VIP's own address: a NAT backend must be another host (the packet would loop back to the load balancer)",
        ),
    ];
    assert!(rows.len() >= 15);
    let mut failed = Vec::new();
    for (what, config, want) in &rows {
        let out = check(config);
        let text = stdout(&out);
        let line = format!("error: {want}");
        if out.status.code() != Some(1) || !text.lines().any(|l| l.starts_with(&line)) {
            failed.push(format!(
                "{what}: exit {:?}, no line starting {line:?} in:\n{text}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} row(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn unknown_keys_and_yaml_errors_are_refused() {
    for (what, config, want) in [
        (
            "an unknown key",
            edit("  max_vips: 8", "  max_vips: 8\n  colour: blue"),
            "error: node.colour: unknown key (the keys here are interfaces, xdp_mode, ",
        ),
        (
            "a typo in a VIP key",
            edit("    port: 80", "    prot: 80"),
            "error: vips[0].prot: unknown key (did you mean port?)",
        ),
        (
            "broken YAML",
            "node: [".to_string(),
            "error: line 1, column 7: not YAML: ",
        ),
    ] {
        let out = check(&config);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 1, "{what}: {text}");
        assert!(errors[0].starts_with(want), "{what}: {text}");
    }
}

#[test]
fn four_mistakes_in_the_shape_of_a_config_are_four_errors_each_with_its_path() {
    // A string where a number goes, an unknown key in a VIP, an unknown key in a backend, and a
    // repeated key.
    let config = edit("weight: 1 }", "weight: ten }")
        .replace(
            "    protocol: tcp\n",
            "    protocol: tcp\n    colour: blue\n",
        )
        .replace(
            "{ address: 10.1.0.1, weight: 2 }",
            "{ address: 10.1.0.1, wieght: 2 }",
        )
        .replace("    port: 53\n", "    port: 53\n    port: 54\n");
    let out = check(&config);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 4, "{text}");
    for want in [
        "error: vips[0].backends[1].weight: expected a number, found \"ten\"",
        "error: vips[0].colour: unknown key (the keys here are name, address, port, ",
        "error: vips[0].backends[0].wieght: unknown key (did you mean weight?)",
        "error: vips[1]: duplicate key port",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "no {want:?} in:\n{text}"
        );
    }
}

#[test]
fn two_vips_of_one_name_pass_with_a_warning_naming_both() {
    let out = check(&edit("name: dns", "name: web"));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.lines().any(|l| l
            == "warning: vips[1].name: \"web\" is also vips[0]'s: commands that take a VIP's name (lb drain) need its address"),
        "{text}"
    );
}

/// `lb check -o json` of `text`: its exit code and its JSON.
fn check_json(text: &str) -> (Option<i32>, serde_json::Value) {
    let file = File::new(text);
    let out = Command::new(BIN)
        .args(["check", "-o", "json", "--config"])
        .arg(&file.0)
        .output()
        .expect("running lb check");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    (out.status.code(), v)
}

#[test]
fn sizes_that_need_more_kernel_memory_than_the_default_limit_are_refused_naming_the_key() {
    // Two NAT tables of 2^25 entries: over 9 GiB (the kernel would take seconds to make them).
    let started = std::time::Instant::now();
    let (code, v) = check_json(&edit("nat_table_size: 4096", "nat_table_size: 33554432"));
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{v}");
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    let e = errors[0].as_str().unwrap();
    assert!(e.starts_with("node: the maps need about 9."), "{e}");
    assert!(
        e.contains("more than node.kernel_memory_limit (4 GiB); most goes to node.nat_table_size"),
        "{e}"
    );
    assert!(
        v["host"].as_array().unwrap().is_empty(),
        "nothing loaded: {v}"
    );
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_kernel_memory_limit_below_the_need_refuses_and_raising_it_passes() {
    let limited = |limit: &str| {
        edit(
            "  max_vips: 8",
            &format!("  max_vips: 8\n  kernel_memory_limit: {limit}"),
        )
    };
    let (code, v) = check_json(&limited("1MiB"));
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .contains("more than node.kernel_memory_limit (1 MiB)"),
        "{v}"
    );
    let (code, v) = check_json(&limited("64MiB"));
    assert_eq!(code, Some(0), "{v}");
    let need = v["host"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .find(|h| h.starts_with("the maps need about "))
        .unwrap_or_else(|| panic!("no kernel memory line: {v}"));
    assert!(
        need.ends_with("(limit 64 MiB, node.kernel_memory_limit)"),
        "{need}"
    );
}

#[test]
fn a_valid_config_passes_and_its_host_checks_are_shown() {
    lb_tests::require_root();
    let out = check(GOOD);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("error:") && !text.contains("warning:"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with(
            "ok: this kernel loads and verifies the program with node.table_size 1009"
        )),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok: node.interfaces: lo (index 1)")),
        "{text}"
    );
}

#[test]
fn a_config_with_warnings_passes_and_shows_them() {
    let config = edit("backends: [{ address: 10.1.0.3 }]", "backends: []")
        .replace("weight: 2", "weight: 0")
        .replace("weight: 1", "weight: 0");
    let out = check(&config);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(
        warnings[0].starts_with("warning: vips[0].backends: every weight is 0"),
        "{text}"
    );
    assert!(
        warnings[1].starts_with("warning: vips[1].backends: empty: the VIP drops its traffic"),
        "{text}"
    );
}

#[test]
fn a_broken_config_shows_its_warnings_with_its_errors() {
    let config = edit("backends: [{ address: 10.1.0.3 }]", "backends: []")
        .replace("weight: 2", "weight: 70000");
    let out = check(&config);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("error: vips[0].backends[0].weight: must be 0..=65535")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("warning: vips[1].backends: empty")),
        "{text}"
    );
}

#[test]
fn without_the_capabilities_the_load_is_skipped_and_said_to_be_but_interfaces_are_checked() {
    lb_tests::require_root();
    let unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"];
    let out = check_under(&unprivileged, GOOD);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: node.interfaces: lo"), "{text}");
    assert!(!text.contains("ok: this kernel loads"), "{text}");
    assert!(
        text.lines()
            .any(|l| l
                .starts_with("skipped: loading the program needs root or CAP_BPF and CAP_PERFMON")),
        "{text}"
    );
    // Looking an interface up needs no privilege: a missing one is found all the same.
    let out = check_under(
        &unprivileged,
        &edit("interfaces: [lo]", "interfaces: [lo, nope0]"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("nope0"), "{}", stdout(&out));
}

#[test]
fn check_json_names_each_problem_and_warning_with_its_path_and_keeps_the_exit_status() {
    let file = File::new(
        &edit("backends: [{ address: 10.1.0.3 }]", "backends: []")
            .replace("weight: 2", "weight: 70000"),
    );
    let out = Command::new(BIN)
        .args(["check", "-o", "json", "--config"])
        .arg(&file.0)
        .output()
        .expect("running lb check");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(v["config"], file.0.display().to_string(), "{v}");
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with("vips[0].backends[0].weight: must be 0..=65535"),
        "{v}"
    );
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("vips[1].backends: empty"),
        "{v}"
    );
}

#[test]
fn check_json_of_a_valid_config_says_valid_and_exits_0() {
    let good = File::new(GOOD);
    let out = Command::new(BIN)
        .args(["check", "-o", "json", "--config"])
        .arg(&good.0)
        .output()
        .expect("running lb check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["errors"].as_array().unwrap().len(), 0, "{v}");
}

/// `lb --pin-dir PIN_DIR ARGS...`, run by `wrapper` (a command and its arguments).
fn lb_under(wrapper: &[&str], pin_dir: &std::path::Path, args: &[&str]) -> Output {
    let (program, rest) = wrapper.split_first().expect("a wrapper");
    Command::new(program)
        .args(rest)
        .arg(BIN)
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running lb")
}

/// A pin dir of this test's own under /sys/fs/bpf (not made: `lb check` makes nothing).
fn own_pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/lbt-{}-{tag}", std::process::id()))
}

#[test]
fn under_ip_netns_exec_lb_check_says_the_bpffs_is_hidden_and_to_use_nsenter() {
    let ns = lb_tests::netns::NetNs::new("ipexec");
    let file = File::new(GOOD);
    let pins = own_pin_dir("ipexec");
    let config = file.0.to_str().unwrap();
    let out = lb_under(
        &["ip", "netns", "exec", &ns.name],
        &pins,
        &["check", "--config", config],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let want = format!(
        "error: {} is not on a bpffs: `ip netns exec {}` remounts /sys, hiding the bpffs at /sys/fs/bpf; run lb with `nsenter --net=/run/netns/{} lb ...` instead",
        pins.display(),
        ns.name,
        ns.name
    );
    assert!(
        text.lines().any(|l| l.starts_with(&want)),
        "no {want:?} in:\n{text}"
    );
    assert!(!pins.exists(), "lb check made {}", pins.display());
}

#[test]
fn under_ip_netns_exec_lb_run_refuses_naming_nsenter_and_makes_nothing() {
    let ns = lb_tests::netns::NetNs::new("iprun");
    let file = File::new(GOOD);
    let pins = own_pin_dir("iprun");
    let state = std::env::temp_dir().join(format!("lb-check-state-{}", std::process::id()));
    let out = lb_under(
        &["ip", "netns", "exec", &ns.name],
        &pins,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "run",
            "--config",
            file.0.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    let want = format!(
        "run lb with `nsenter --net=/run/netns/{} lb ...` instead",
        ns.name
    );
    assert!(err.contains(&want), "no {want:?} in:\n{err}");
    assert!(
        !pins.exists() && !state.exists(),
        "a start that fails makes nothing"
    );
}

#[test]
fn under_nsenter_net_the_pin_dir_is_on_the_hosts_bpffs_and_writable() {
    lb_tests::require_root();
    let ns = lb_tests::netns::NetNs::new("nsenter");
    let file = File::new(GOOD);
    let pins = own_pin_dir("nsenter");
    let net = format!("--net=/run/netns/{}", ns.name);
    let out = lb_under(
        &["nsenter", &net],
        &pins,
        &["check", "-o", "json", "--config", file.0.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    let want = format!("{} is on a bpffs and writable", pins.display());
    assert!(
        v["host"].as_array().unwrap().iter().any(|h| h == &want),
        "no {want:?} in {v}"
    );
}

/// A directory under /sys/fs/bpf that only root with CAP_DAC_OVERRIDE may write in, removed on
/// drop.
struct ReadOnlyBpfDir(PathBuf);

impl ReadOnlyBpfDir {
    fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = own_pin_dir(tag);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        Self(dir)
    }
}

impl Drop for ReadOnlyBpfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_pin_dir_this_process_may_not_write_is_skipped_unprivileged_and_passes_with_the_capabilities() {
    lb_tests::require_root();
    let parent = ReadOnlyBpfDir::new("ro");
    let pins = parent.0.join("pins");
    let file = File::new(GOOD);
    let config = file.0.to_str().unwrap();
    let unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"];
    let out = lb_under(
        &unprivileged,
        &pins,
        &["check", "-o", "json", "--config", config],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    let want = format!(
        "{} is on a bpffs, but this process may not write there (creating {}: ",
        pins.display(),
        pins.display()
    );
    assert!(
        v["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with(&want)),
        "no {want:?} in {v}"
    );
    // Root with its capabilities writes anywhere: the same dir passes.
    let out = lb_under(
        &["env"],
        &pins,
        &["check", "-o", "json", "--config", config],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}");
    let want = format!("{} is on a bpffs and writable", pins.display());
    assert!(
        v["host"].as_array().unwrap().iter().any(|h| h == &want),
        "no {want:?} in {v}"
    );
}

/// A directory of this test's own under /sys/fs/bpf, removed on drop.
struct BpfDir(PathBuf);

impl Drop for BpfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_pin_dir_an_agent_holds_passes_and_the_holder_is_named() {
    lb_tests::require_root();
    let dir = BpfDir(own_pin_dir("held"));
    std::fs::create_dir(&dir.0).unwrap();
    // What an agent holds for its life (this process stands in for it).
    let _lock = lb_userspace::kernel::pindir::PinLock::try_lock(&dir.0)
        .unwrap()
        .expect("the lock");
    let file = File::new(GOOD);
    let out = lb_under(
        &["env"],
        &dir.0,
        &["check", "-o", "json", "--config", file.0.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    let want = format!(
        "{} is on a bpffs and writable; an lb agent (pid {}) runs on it now",
        dir.0.display(),
        std::process::id()
    );
    assert!(
        v["host"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h.as_str().unwrap().starts_with(&want)),
        "no {want:?} in {v}"
    );
}
