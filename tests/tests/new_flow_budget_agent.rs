//! New-flow budgets through the agent (`lb run` with a config file), checked on its pinned maps
//! with packets run through the program (`Lb::adopt`): a reload that gives a VIP a budget, and
//! one that takes it away, write only the VIP's flag and its buckets, so established flows keep
//! their entries and backends; the budget refuses new flows while it is there, and only then.
//! And the rollback to 0.2.0 (`lb migrate --to-release 0.2.0`) that clears the budget flag and
//! unpins the budget maps, and the upgrade back that writes them again.

use std::{path::Path, time::Duration};

use lb_common::{Counter, NewFlowBudget, VIP_F_NEW_FLOW_BUDGET, VipKey, VipValue, maps};
use lb_tests::{
    agent::{Agent, Dirs},
    config::{self, RawBudget, RawConfig, RawNode, RawVip, backend, lab_node, yaml},
    harness::{FibNet, Lb, XDP_DROP, XDP_TX, action_name, net::*, pin_to_cpu},
    packet::{L4, Pkt, TCP_ACK},
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// Two backends, so that a flow that kept its entry is told from one balanced afresh.
fn config(budget: Option<RawBudget>) -> String {
    let web = RawVip {
        new_flow_budget: budget,
        ..config::vip(
            "web",
            "192.0.2.10",
            80,
            "tcp",
            &[backend(TX_V4), backend(TX_V4_B)],
        )
    };
    yaml(&RawConfig {
        node: RawNode {
            source_v6: None,
            ..lab_node(&["lb0"])
        },
        vips: vec![web],
    })
}

/// One new flow a second on the node, one at once: each CPU gets a burst of 1 (the burst
/// rounded up) and a token every `cpus` seconds.
const BUDGET: RawBudget = RawBudget {
    rate: Some(1),
    burst: Some(1),
};

fn syn(src: &str) -> Pkt {
    Pkt::tcp(src, 40000, "192.0.2.10", 80, LB0_MAC)
}

/// A packet of the established flow of `src` (an ACK: it follows the flow entry).
fn ack(src: &str) -> Pkt {
    syn(src).with(|p| p.l4 = L4::Tcp { flags: TCP_ACK })
}

/// The one VIP the agent pinned.
fn vip(pins: &Path) -> VipValue {
    let data = aya::maps::MapData::from_pin(pins.join("LB_VIPS@v2")).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let h: aya::maps::HashMap<_, VipKey, VipValue> = aya::maps::HashMap::try_from(map).unwrap();
    let vips: Vec<VipValue> = h.iter().map(|kv| kv.unwrap().1).collect();
    assert_eq!(vips.len(), 1);
    vips[0]
}

/// Every CPU's bucket of VIP id `id` as pinned.
fn buckets(pins: &Path, id: u32) -> Vec<NewFlowBudget> {
    let data = aya::maps::MapData::from_pin(pins.join(maps::NEW_FLOW_BUDGET)).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let a: aya::maps::PerCpuArray<_, NewFlowBudget> =
        aya::maps::PerCpuArray::try_from(map).unwrap();
    a.get(&id, 0).unwrap().iter().copied().collect()
}

/// Runs `pkt` on the agent's pins: (action, outer destination if forwarded, change of `which`).
fn run(lb: &mut Lb, ingress: u32, pkt: &Pkt, which: Counter) -> (u32, Vec<u8>, u64) {
    let before = lb.counters()[&which];
    let r = lb.run(&pkt.frame(), ingress);
    let dst = if r.action == XDP_TX {
        r.output[30..34].to_vec() // the outer destination: the backend
    } else {
        vec![]
    };
    (r.action, dst, lb.counters()[&which] - before)
}

#[test]
fn a_reload_adding_then_removing_a_budget_keeps_every_established_flow_on_its_backend() {
    let net = FibNet::new("budreload");
    let ingress = net.lb0;
    let dirs = Dirs::new(Path::new(BIN), "budreload");
    dirs.write_config(&config(None));
    let mut agent = Agent::start(&net.ns, &dirs);
    // The config file is watched before the agent's status says it serves.
    agent.wait_serving(&net.ns, &dirs, T);
    let clients: Vec<String> = (1..=20).map(|i| format!("198.51.100.{i}")).collect();
    // Each established flow's backend, by an ACK that follows its entry (all of them hits).
    let backends = |lb: &mut Lb| -> Vec<Vec<u8>> {
        let hits = lb.counters()[&Counter::FlowHits];
        let out = clients
            .iter()
            .map(|c| {
                let (a, dst, over) = run(lb, ingress, &ack(c), Counter::DropNewFlowBudget);
                assert_eq!((action_name(a), over), (action_name(XDP_TX), 0), "{c}");
                dst
            })
            .collect();
        assert_eq!(
            lb.counters()[&Counter::FlowHits] - hits,
            clients.len() as u64,
            "every packet followed its flow entry"
        );
        out
    };
    let before = net.ns.run(|| {
        let mut lb = Lb::adopt(&dirs.pins);
        for c in &clients {
            let (a, _, _) = run(&mut lb, ingress, &syn(c), Counter::Tx);
            assert_eq!(action_name(a), action_name(XDP_TX), "{c}");
        }
        assert_eq!(lb.flow_count(), clients.len());
        backends(&mut lb)
    });
    assert_eq!(vip(&dirs.pins).flags & VIP_F_NEW_FLOW_BUDGET, 0);

    // A budget added: the flag and the buckets, nothing else.
    dirs.write_config(&config(Some(BUDGET)));
    agent.wait_status(&net.ns, &dirs, T, |v| {
        v["agent"]["reloads_applied"].as_u64() >= Some(1)
    });
    let v = vip(&dirs.pins);
    assert_eq!(v.flags, VIP_F_NEW_FLOW_BUDGET);
    let cpus = lb_userspace::kernel::program::online_cpus() as u64;
    let share = NewFlowBudget {
        tokens: 0,
        last_ns: 0,
        ns_per_token: cpus * 1_000_000_000,
        burst: 1,
    };
    let written = buckets(&dirs.pins, v.id);
    assert!(
        written.iter().all(|b| *b == share),
        "{written:?}, want {share:?} on every CPU"
    );
    net.ns.run(|| {
        pin_to_cpu(0);
        let mut lb = Lb::adopt(&dirs.pins);
        assert_eq!(lb.flow_count(), clients.len(), "the flows stay");
        assert_eq!(backends(&mut lb), before, "every flow keeps its backend");
        // CPU 0's one token goes to the first new client; the second is over budget.
        let (a, _, over) = run(
            &mut lb,
            ingress,
            &syn("203.0.113.1"),
            Counter::DropNewFlowBudget,
        );
        assert_eq!((action_name(a), over), (action_name(XDP_TX), 0));
        let (a, _, over) = run(
            &mut lb,
            ingress,
            &syn("203.0.113.2"),
            Counter::DropNewFlowBudget,
        );
        assert_eq!((action_name(a), over), (action_name(XDP_DROP), 1));
        assert_eq!(lb.vip_budget_drops(v.id), 1);
    });
    // What an operator sees: the drop globally and for the VIP, and explain names the budget.
    let stats = dirs.json(&["stats"]);
    assert_eq!(stats["global"]["drop_new_flow_budget"], 1, "{stats:#}");
    assert_eq!(stats["vips"][0]["drop_new_flow_budget"], 1, "{stats:#}");
    let e = dirs.json(&[
        "explain",
        "203.0.113.3:40000",
        "192.0.2.10:80",
        "tcp",
        "--syn",
    ]);
    let steps = e["steps"].to_string();
    assert!(
        steps.contains(&format!("new-flow budget: each of {cpus} CPUs")),
        "{e:#}"
    );

    // The budget taken away: the flag goes, then the buckets; new flows pass again.
    dirs.write_config(&config(None));
    agent.wait_status(&net.ns, &dirs, T, |v| {
        v["agent"]["reloads_applied"].as_u64() >= Some(2)
    });
    assert_eq!(vip(&dirs.pins).flags, 0);
    let cleared = buckets(&dirs.pins, v.id);
    assert!(
        cleared.iter().all(|b| b.burst == 0),
        "a bucket kept its settings: {cleared:?}"
    );
    net.ns.run(|| {
        pin_to_cpu(0);
        let mut lb = Lb::adopt(&dirs.pins);
        assert_eq!(backends(&mut lb), before, "every flow keeps its backend");
        for i in 2..=6 {
            let (a, _, over) = run(
                &mut lb,
                ingress,
                &syn(&format!("203.0.113.{i}")),
                Counter::DropNewFlowBudget,
            );
            assert_eq!(
                (action_name(a), over),
                (action_name(XDP_TX), 0),
                "client {i}"
            );
        }
    });
    assert_eq!(agent.stop().code(), Some(0));
}

fn has(dirs: &Dirs, name: &str) -> bool {
    dirs.pin_names().iter().any(|n| n == name)
}

/// The flags of the one VIP pinned under `pin`.
fn vip_flags(pins: &Path, pin: &str) -> u32 {
    let data = aya::maps::MapData::from_pin(pins.join(pin)).unwrap();
    let map = aya::maps::Map::from_map_data(data).unwrap();
    let h: aya::maps::HashMap<_, VipKey, VipValue> = aya::maps::HashMap::try_from(map).unwrap();
    let vips: Vec<VipValue> = h.iter().map(|kv| kv.unwrap().1).collect();
    assert_eq!(vips.len(), 1);
    vips[0].flags
}

#[test]
fn a_rollback_to_0_2_0_clears_the_budget_flag_and_unpins_the_budget_maps_and_an_upgrade_writes_them_again()
 {
    let net = FibNet::new("budmig");
    let ingress = net.lb0;
    let dirs = Dirs::new(Path::new(BIN), "budmig");
    dirs.write_config(&config(Some(BUDGET)));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(vip_flags(&dirs.pins, "LB_VIPS@v2"), VIP_F_NEW_FLOW_BUDGET);
    assert!(has(&dirs, maps::NEW_FLOW_BUDGET) && has(&dirs, maps::VIP_BUDGET_DROPS));

    // Down to what 0.2.0 reads: the flag it does not know cleared, the maps it does not know
    // unpinned.
    let out = dirs.cli(&["migrate", "--to-release", "0.2.0"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("removed LB_NEW_FLOW_BUDGET") && said.contains("removed LB_VIP_BUDGET_DROPS"),
        "{said}"
    );
    assert!(!has(&dirs, maps::NEW_FLOW_BUDGET) && !has(&dirs, maps::VIP_BUDGET_DROPS));
    assert_eq!(
        vip_flags(&dirs.pins, "LB_VIPS"),
        0,
        "the flag 0.2.0 does not know"
    );

    // Up again: this build's agent makes the budget maps, writes the buckets and sets the flag.
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    assert_eq!(agent.stop().code(), Some(0));
    let v = vip(&dirs.pins);
    assert_eq!(v.flags, VIP_F_NEW_FLOW_BUDGET);
    assert!(buckets(&dirs.pins, v.id).iter().all(|b| b.burst == 1));
    net.ns.run(|| {
        pin_to_cpu(0);
        let mut lb = Lb::adopt(&dirs.pins);
        let (a, _, over) = run(
            &mut lb,
            ingress,
            &syn("203.0.113.1"),
            Counter::DropNewFlowBudget,
        );
        assert_eq!((action_name(a), over), (action_name(XDP_TX), 0));
        let (a, _, over) = run(
            &mut lb,
            ingress,
            &syn("203.0.113.2"),
            Counter::DropNewFlowBudget,
        );
        assert_eq!((action_name(a), over), (action_name(XDP_DROP), 1));
    });
}
