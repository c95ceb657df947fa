//! `cargo xtask demo`: the XDP program balancing real connections between namespaces on this
//! machine. Builds the small lab, sends TCP and UDP over IPv4 and IPv6, shows who answered and
//! what the program counted, and removes everything it made (also on Ctrl-C).

use std::collections::BTreeMap;

use lb_common::Counter;
use lb_tests::{
    lab::{self, MiniLab},
    netns,
};

fn bars(title: &str, tally: &BTreeMap<String, usize>) {
    let total: usize = tally.values().sum();
    println!("\n{title} ({total} requests)");
    for (who, n) in tally {
        let share = *n as f64 / total.max(1) as f64;
        println!(
            "  {who:<8} {:>5.1}% {:<40} {n}",
            share * 100.0,
            "█".repeat((share * 40.0).round() as usize)
        );
    }
}

fn main() {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the lab's namespaces");
        netns::remove_all_of_this_process();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");

    println!("Building the lab: client, load balancer (XDP on its uplink), backends b1 and b2.");
    println!(
        "b2 shares the client's segment (XDP_TX); b1 sits behind a second interface (XDP_REDIRECT)."
    );
    println!(
        "Backends decapsulate with lb's XDP decap program and answer the client directly (DSR)."
    );
    let mut lab = MiniLab::new();
    let n = 500;
    bars(
        &format!("TCP connections to {}:{}", lab::VIP4, lab::PORT),
        &lab.tcp_tally(lab::VIP4, n),
    );
    bars(
        &format!("UDP requests to {}:{}", lab::VIP4, lab::PORT),
        &lab.udp_tally(lab::VIP4, n),
    );
    bars(
        &format!("TCP connections to [{}]:{}", lab::VIP6, lab::PORT),
        &lab.tcp_tally(lab::VIP6, n),
    );
    bars(
        &format!("UDP requests to [{}]:{}", lab::VIP6, lab::PORT),
        &lab.udp_tally(lab::VIP6, n),
    );

    let c = lab.lb.counters();
    println!("\nWhat the XDP program counted (every packet ends in exactly one verdict):");
    for k in Counter::ALL.iter().filter(|k| c[k] > 0) {
        println!(
            "  {:<22} {:>8}{}",
            k.name(),
            c[k],
            if k.is_verdict() { "  (verdict)" } else { "" }
        );
    }
    drop(lab);
    println!("\nLab removed.");
}
