//! The agent's logs as a collector or a file gets them: no colour codes when stderr is not a
//! terminal, and one JSON object a line with `--log-format json`.

use std::{path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    config::{RawConfig, RawNode, RawVip, backend, lab_node, vip, yaml},
    netns::NetNs,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// A namespace with the interface the config names.
fn net(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    ns.script(
        "link add lb0 type veth peer name up0
         link set lb0 up
         link set up0 up",
    );
    ns
}

fn config(dirs: &Dirs) {
    let web = RawVip {
        name: None,
        ..vip("", "192.0.2.10", 80, "tcp", &[backend("10.1.0.1")])
    };
    dirs.write_config(&yaml(&RawConfig {
        node: RawNode {
            source_v6: None,
            max_vips: Some(4),
            max_backends: Some(8),
            flow_table_size: Some(4096),
            ..lab_node(&["lb0"])
        },
        vips: vec![web],
    }));
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let ns = net("log-plain");
    let dirs = Dirs::new(Path::new(BIN), "log-plain");
    config(&dirs);
    // The harness sets NO_COLOR for every agent; this one runs without it, as a service would.
    let mut agent = Agent::start_under(&ns, &dirs, &["env", "-u", "NO_COLOR"], &[], &[]);
    agent.wait_running(&ns, &dirs, T);
    let log = std::fs::read_to_string(agent.log_file()).expect("the agent's log");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log written to a file:\n{log:?}"
    );
}

#[test]
fn log_format_json_writes_one_object_a_line() {
    let ns = net("log-json");
    let dirs = Dirs::new(Path::new(BIN), "log-json");
    config(&dirs);
    let mut agent = Agent::start_under(&ns, &dirs, &[], &["--log-format", "json"], &[]);
    agent.wait_running(&ns, &dirs, T);
    let log = std::fs::read_to_string(agent.log_file()).expect("the agent's log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for v in &lines {
        assert!(
            v.is_object() && v["level"].is_string() && v["fields"]["message"].is_string(),
            "not a log object with a level and a message: {v}"
        );
    }
    assert!(
        lines.iter().any(|v| v["level"] == "INFO"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("running"))),
        "no INFO line saying the agent runs: {log}"
    );
}
