//! The XDP mode the agent takes in a lab of veths ([`lb_tests::veth_lab`]): native only where
//! the peers take XDP frames, generic elsewhere, and an explicit `native` that cannot deliver
//! refused, never a silent black hole (see `lb_userspace::kernel::xdpmode`).

use std::{path::Path, time::Duration};

use lb_tests::{
    agent::{Agent, Dirs, xdp_attachment},
    veth_lab::{ONE_ARMED, VIA_L1, VethLab},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const XDP_ATTACHED_DRV: u64 = 1;
const XDP_ATTACHED_SKB: u64 = 2;
const CONNECTIONS: usize = 20;

/// Starts the agent in the lab's load-balancer namespace with `config`, and waits until it
/// serves with a mode chosen for both interfaces. Returns the agent and `lb status -o json`.
fn start(lab: &VethLab, dirs: &Dirs, config: &str) -> (Agent, Value) {
    dirs.write_config(config);
    let mut agent = Agent::start(&lab.lb, dirs);
    let status = agent.wait_status(&lab.lb, dirs, T, |v| {
        v["agent"]["running"] == true
            && v["interfaces"]
                .as_array()
                .is_some_and(|i| i.len() == 2 && i.iter().all(|i| i["xdp_mode_reason"].is_string()))
    });
    (agent, status)
}

/// The status row of interface `name`.
fn interface<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status:#}"))
}

/// Every one of `CONNECTIONS` to each VIP is answered by its backend.
fn assert_both_vips_answer(lab: &VethLab) {
    for (vip, backend) in [(VIA_L1, "b1"), (ONE_ARMED, "c1")] {
        let (ok, errors) = lab.connect(vip, CONNECTIONS, backend);
        assert_eq!(ok, CONNECTIONS, "{vip}: {errors:?}");
    }
}

#[test]
fn unset_xdp_mode_without_peer_programs_takes_generic_says_why_and_connections_succeed() {
    let lab = VethLab::new();
    let dirs = Dirs::new(Path::new(BIN), "xm-unset");
    let (mut agent, status) = start(&lab, &dirs, &VethLab::config(""));
    assert_eq!(status["agent"]["xdp_mode"], "auto", "{status:#}");
    for (dev, peer, ns) in [("l0", "c0", &lab.client), ("l1", "b0", &lab.backend)] {
        let i = interface(&status, dev);
        assert_eq!(i["xdp_mode"], "generic", "{status:#}");
        assert_eq!(i["attached_mode"], "generic", "{status:#}");
        assert_eq!(i["redirect_target"], true, "{status:#}");
        let why = i["xdp_mode_reason"].as_str().unwrap();
        let named = format!("veth peer {peer} in netns {} has no XDP program", ns.name);
        assert!(why.contains(&named), "{dev}: {why}");
        assert_eq!(
            xdp_attachment(&lab.lb, dev).map(|a| a.0),
            Some(XDP_ATTACHED_SKB)
        );
    }
    assert_both_vips_answer(&lab);
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn explicit_native_without_peer_programs_is_refused_naming_each_peer_and_nothing_is_attached() {
    let lab = VethLab::new();
    let dirs = Dirs::new(Path::new(BIN), "xm-native");
    dirs.write_config(&VethLab::config("  xdp_mode: native\n"));

    let out = dirs.cli_in(
        &lab.lb,
        &[
            "check",
            "--config",
            dirs.config_path().to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "lb check should fail");
    let report: Value = serde_json::from_slice(&out.stdout).expect("lb check -o json");
    let problems = report["xdp_problems"].as_array().expect("xdp_problems");
    assert_eq!(problems.len(), 2, "{report:#}");
    for (p, (dev, peer, ns)) in problems
        .iter()
        .zip([("l0", "c0", &lab.client), ("l1", "b0", &lab.backend)])
    {
        assert_eq!(p["interface"], dev, "{report:#}");
        let named = format!("veth peer {peer} in netns {}", ns.name);
        let reason = p["reason"].as_str().unwrap();
        assert!(
            reason.starts_with(&format!("{named} has no XDP program")),
            "{reason}"
        );
        let fix = p["fix"].as_str().unwrap();
        assert!(fix.contains("set it to generic"), "{fix}");
        assert!(
            fix.contains(&format!("XDP program in native mode to {named}")),
            "{fix}"
        );
    }
    assert_eq!(report["errors"].as_array().unwrap().len(), 2, "{report:#}");

    let mut agent = Agent::start(&lab.lb, &dirs);
    let said = agent.refusal(T);
    assert!(
        said.contains("node.xdp_mode: native XDP cannot deliver on l0: veth peer c0"),
        "{said}"
    );
    assert_eq!(
        dirs.pin_names(),
        Vec::<String>::new(),
        "a refused start pinned"
    );
    assert_eq!(xdp_attachment(&lab.lb, "l0"), None);
    assert_eq!(xdp_attachment(&lab.lb, "l1"), None);
}

#[test]
fn unset_xdp_mode_with_programs_on_the_peers_keeps_native_and_connections_succeed() {
    let mut lab = VethLab::new();
    lab.pass_on(true, true);
    let dirs = Dirs::new(Path::new(BIN), "xm-peers");
    let (mut agent, status) = start(&lab, &dirs, &VethLab::config(""));
    for (dev, peer) in [("l0", "c0"), ("l1", "b0")] {
        let i = interface(&status, dev);
        assert_eq!(i["xdp_mode"], "native", "{status:#}");
        assert_eq!(i["attached_mode"], "native", "{status:#}");
        assert_eq!(i["redirect_target"], true, "{status:#}");
        let why = i["xdp_mode_reason"].as_str().unwrap();
        assert!(
            why.contains(&format!("veth peer {peer} in netns"))
                && why.contains("runs an XDP program"),
            "{dev}: {why}"
        );
        assert_eq!(
            xdp_attachment(&lab.lb, dev).map(|a| a.0),
            Some(XDP_ATTACHED_DRV)
        );
    }
    assert_both_vips_answer(&lab);
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_peer_with_only_gro_gets_generic_yet_native_redirects_into_it_deliver() {
    // c0 runs a program (l0 native); b0 has GRO on only: the kernel delivers redirects into l1
    // but not XDP_TX out of it, so l1 is generic and stays a redirect target of l0.
    let mut lab = VethLab::new();
    lab.pass_on(true, false);
    lab.gro_on_b0();
    let dirs = Dirs::new(Path::new(BIN), "xm-gro");
    let (mut agent, status) = start(&lab, &dirs, &VethLab::config(""));
    let (l0, l1) = (interface(&status, "l0"), interface(&status, "l1"));
    assert_eq!(
        (&l0["xdp_mode"], &l1["xdp_mode"]),
        (&"native".into(), &"generic".into())
    );
    assert_eq!(l1["redirect_target"], true, "{status:#}");
    let before = dirs.json(&["stats"])["global"]["redirect"]
        .as_u64()
        .unwrap();
    assert_both_vips_answer(&lab);
    let after = dirs.json(&["stats"])["global"]["redirect"]
        .as_u64()
        .unwrap();
    assert!(
        after >= before + CONNECTIONS as u64,
        "each connection's first packet is redirected from l0 to l1: {before} -> {after}"
    );
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn an_interface_native_redirects_cannot_reach_is_out_of_the_devmap_and_the_kernel_forwards() {
    // c0 runs a program (l0 native); b0 has nothing: l1 is generic, and l0's program must not
    // redirect into it: what goes out of l1 is passed to the kernel, which forwards it.
    let mut lab = VethLab::new();
    lab.pass_on(true, false);
    let dirs = Dirs::new(Path::new(BIN), "xm-mixed");
    let (mut agent, status) = start(&lab, &dirs, &VethLab::config(""));
    let (l0, l1) = (interface(&status, "l0"), interface(&status, "l1"));
    assert_eq!(
        (&l0["xdp_mode"], &l1["xdp_mode"]),
        (&"native".into(), &"generic".into())
    );
    assert_eq!(
        (&l0["redirect_target"], &l1["redirect_target"]),
        (&true.into(), &false.into())
    );
    let passed = |d: &Dirs| {
        d.json(&["stats"])["global"]["pass_no_tx_port"]
            .as_u64()
            .unwrap()
    };
    let before = passed(&dirs);
    assert_both_vips_answer(&lab);
    assert!(
        passed(&dirs) >= before + CONNECTIONS as u64,
        "l0's packets to l1 go through the kernel: {before} -> {}",
        passed(&dirs)
    );
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn a_reload_after_the_peers_gain_programs_moves_the_interfaces_to_native() {
    let mut lab = VethLab::new();
    let dirs = Dirs::new(Path::new(BIN), "xm-reload");
    let (mut agent, status) = start(&lab, &dirs, &VethLab::config(""));
    assert_eq!(
        interface(&status, "l0")["xdp_mode"],
        "generic",
        "{status:#}"
    );

    // The config is unchanged: what the kernel says of the peers is what moved.
    lab.pass_on(true, true);
    agent.hup();
    let status = agent.wait_status(&lab.lb, &dirs, T, |v| {
        v["agent"]["reloads_applied"] == 1
            && ["l0", "l1"]
                .iter()
                .all(|d| interface(v, d)["xdp_mode"] == "native")
    });
    for dev in ["l0", "l1"] {
        assert_eq!(
            interface(&status, dev)["attached_mode"],
            "native",
            "{status:#}"
        );
    }
    assert_both_vips_answer(&lab);
    assert_eq!(agent.stop().code(), Some(0));
}
