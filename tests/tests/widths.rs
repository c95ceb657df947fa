//! Every inspecting command's default output fits in 100 columns (`-o wide` has the rest), and
//! its `-o json` parses: on the demo's state (its lab, its config, traffic through both VIPs, a
//! backend drained), with the real binary against the real agent.

use std::{net::SocketAddr, path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{self, DEMO_CONFIG, Lab},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const COLUMNS: usize = 100;

#[test]
fn every_inspecting_commands_default_output_fits_100_columns_and_its_json_parses() {
    let lab = Lab::new();
    let dirs = Dirs::new(Path::new(BIN), "widths");
    dirs.write_config(DEMO_CONFIG);
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, Duration::from_secs(20));
    let web: SocketAddr = "192.0.2.10:80".parse().unwrap();
    let sticky: SocketAddr = "192.0.2.20:80".parse().unwrap();
    lab.tcp_tally(web, 200, dc::CLIENTS);
    lab.tcp_tally(sticky, 50, dc::CLIENTS);
    let drained = dirs.cli(&["drain", "web", "10.20.0.13"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );

    let config = dirs.config_path().display().to_string();
    let client = format!("{}:40000", dc::client_v4(0));
    let commands: [&[&str]; 8] = [
        &["status"],
        &["stats"],
        &["backends"],
        &["nexthops"],
        &["flows"],
        &["explain", &client, "192.0.2.10:80", "tcp"],
        &["top", "--once", "--interval", "0.3"],
        &["check", "--config", &config],
    ];
    let mut wide = Vec::new();
    for args in commands {
        let text = run(&lab, &dirs, args);
        let widest = text.lines().max_by_key(|l| l.chars().count()).unwrap_or("");
        if widest.chars().count() > COLUMNS {
            wide.push(format!(
                "lb {} ({} columns):\n{widest}",
                args.join(" "),
                widest.chars().count()
            ));
        }
        let json: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
        let out = run(&lab, &dirs, &json);
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&out) {
            panic!("lb {}: not JSON ({e}):\n{out}", json.join(" "));
        }
    }
    assert!(
        wide.is_empty(),
        "wider than {COLUMNS} columns:\n{}",
        wide.join("\n")
    );
    agent.stop();
}

/// `lb ARGS` in the load balancer's namespace: its stdout; panics naming stderr unless it exits 0.
fn run(lab: &Lab, dirs: &Dirs, args: &[&str]) -> String {
    let out = dirs.cli_in(&lab.lb, args);
    assert!(
        out.status.success(),
        "lb {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}
