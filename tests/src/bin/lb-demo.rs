//! `cargo xtask demo`: lb in a small data centre made of network namespaces on this machine.
//!
//! Builds the lab (client, router, load balancer, three backends), starts the real agent
//! (`LB_BIN`, default `target/debug/lb`) with the config below, opens a few thousand
//! connections, shows who served them, shows a client kept on one backend by session affinity,
//! prints `lb backends`, `lb status` and one screen of `lb top` taken while more connections come in, and
//! removes everything it made (also on Ctrl-C).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, Dirs},
    dc::{self, DEMO_CONFIG as CONFIG, Lab},
    netns,
};

static PINS: OnceLock<Mutex<Option<(PathBuf, PathBuf)>>> = OnceLock::new();

fn bars(title: &str, tally: &BTreeMap<String, usize>, expect: &[(&str, f64)]) {
    let total: usize = tally.values().sum();
    println!("\n{title} ({total} connections)");
    for (who, n) in tally {
        let share = *n as f64 / total.max(1) as f64;
        let want = expect
            .iter()
            .find(|(b, _)| b == who)
            .map(|(_, w)| format!("  (weight share {:.1}%)", w * 100.0))
            .unwrap_or_default();
        println!(
            "  {who:<4} {:>5.1}% {:<50} {n}{want}",
            share * 100.0,
            "█".repeat((share * 50.0).round() as usize)
        );
    }
}

/// `lb top --once` over two seconds in which web gets another thousand connections.
fn top_during_traffic(lab: &Lab, dirs: &Dirs, web: SocketAddr) {
    println!("\n$ lb top --once --interval 2    (while web gets 1000 more connections)");
    let top = std::process::Command::new(&dirs.bin)
        .arg("--pin-dir")
        .arg(&dirs.pins)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args(["top", "--once", "--interval", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting lb top");
    lab.tcp_tally(web, 1000, dc::CLIENTS);
    let out = top.wait_with_output().expect("lb top");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn main() {
    let bin = std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/debug/lb"));
    assert!(
        bin.exists(),
        "no lb binary at {} (cargo xtask demo builds it; or set LB_BIN)",
        bin.display()
    );
    PINS.set(Mutex::new(None)).unwrap();
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the lab");
        if let Some((pins, state)) = PINS
            .get()
            .and_then(|p| p.lock().ok())
            .and_then(|p| p.clone())
        {
            let _ = lb_userspace::agent::run::down(&pins, &state);
            let _ = std::fs::remove_dir_all(state);
        }
        netns::remove_all_of_this_process();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");

    println!(
        "Building the lab: a client (8 addresses), a router, the load balancer, backends b1 b2 b3."
    );
    let lab = Lab::new();
    let dirs = Dirs::new(&bin, "demo");
    *PINS.get().unwrap().lock().unwrap() = Some((dirs.pins.clone(), dirs.state.clone()));
    dirs.write_config(CONFIG);
    println!(
        "Starting the agent ({}) with this config:\n\n{CONFIG}",
        bin.display()
    );
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_running(&lab.lb, &dirs, Duration::from_secs(20));

    let web: SocketAddr = "192.0.2.10:80".parse().unwrap();
    let t = lab.tcp_tally(web, 3000, dc::CLIENTS);
    bars(
        "web 192.0.2.10:80, weights 200:100:100",
        &t,
        &[("b1", 0.5), ("b2", 0.25), ("b3", 0.25)],
    );

    let sticky: SocketAddr = "192.0.2.20:80".parse().unwrap();
    println!("\nsticky 192.0.2.20:80 (affinity 10m): 20 connections from each of three clients");
    for c in 0..3 {
        let client = dc::client_v4(c);
        let got: Vec<String> = (0..20)
            .map(|_| {
                lab.connect(client, sticky)
                    .unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect();
        let mut distinct: Vec<&String> = got.iter().collect();
        distinct.dedup();
        println!(
            "  client {client:<10} -> {} ({} connections, {})",
            got[0],
            got.len(),
            if distinct.len() == 1 {
                "always the same backend"
            } else {
                "SPREAD"
            }
        );
    }

    println!("\n$ lb backends");
    print!(
        "{}",
        String::from_utf8_lossy(&dirs.cli(&["backends"]).stdout)
    );
    println!("\n$ lb status");
    print!(
        "{}",
        String::from_utf8_lossy(&dirs.cli_in(&lab.lb, &["status"]).stdout)
    );
    top_during_traffic(&lab, &dirs, web);
    agent.stop();
    drop(dirs);
    drop(lab);
    println!("\nLab removed: no namespace, link or pin is left.");
}
