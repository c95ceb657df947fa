//! Owning a pin dir and starting cleanly, with the real `lb` binary: one agent per pin dir,
//! `lb down` refused under a running agent (and `--force`), and starts that fail (a missing
//! interface, no cluster, no capabilities) leaving no pins and no attachment behind.

use std::{
    net::TcpListener,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    agent::{Agent, Dirs, xdp_attachment},
    config::{RawConfig, RawNode, lab_node, node_yaml, some, vip, weighted, yaml},
    harness::{FibNet, net::*},
    netns::NetNs,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);

/// Generic XDP on `interfaces`, VIP web weighted 2:1.
fn node(interfaces: &[&str]) -> RawNode {
    RawNode {
        xdp_mode: some("generic"),
        source_v6: None,
        ..lab_node(interfaces)
    }
}

fn config(interfaces: &[&str]) -> String {
    yaml(&RawConfig {
        node: node(interfaces),
        vips: vec![vip(
            "web",
            "192.0.2.10",
            80,
            "tcp",
            &[weighted(TX_V4, 2), weighted(TX_V4_B, 1)],
        )],
    })
}

fn attached(ns: &NetNs) -> [Option<(u64, u64)>; 2] {
    ["lb0", "lb1"].map(|d| xdp_attachment(ns, d))
}

#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused_naming_the_first() {
    let net = FibNet::new("second");
    let dirs = Dirs::new(Path::new(BIN), "second");
    dirs.write_config(&config(&["lb0"]));
    let mut first = Agent::start(&net.ns, &dirs);
    first.wait_running(&net.ns, &dirs, T);
    let (maps, links, files) = (
        dirs.json(&["backends"]),
        attached(&net.ns),
        dirs.pin_names(),
    );

    // The second one would attach lb1 too, and adopt the first one's maps.
    dirs.write_config(&config(&["lb0", "lb1"]));
    let mut second = Agent::start(&net.ns, &dirs);
    let said = second.refusal(T);
    assert!(
        said.contains(&format!(
            "another lb agent (pid {}) holds the pins",
            first.pid()
        )),
        "{said}"
    );
    assert_eq!(
        attached(&net.ns),
        links,
        "the second agent changed the attachments"
    );
    assert_eq!(dirs.pin_names(), files, "the second agent changed the pins");
    assert_eq!(
        dirs.json(&["backends"]),
        maps,
        "the second agent changed the maps"
    );
    assert_eq!(
        first.stop().code(),
        Some(0),
        "the first agent did not run on"
    );

    // Once the first has exited, the lock is free.
    let mut third = Agent::start(&net.ns, &dirs);
    third.wait_running(&net.ns, &dirs, T);
    assert!(
        attached(&net.ns)[1].is_some(),
        "lb1 not attached by the next agent"
    );
    assert_eq!(third.stop().code(), Some(0));
}

#[test]
fn lb_down_is_refused_under_a_running_agent_and_force_removes_everything() {
    let net = FibNet::new("downrun");
    let dirs = Dirs::new(Path::new(BIN), "downrun");
    dirs.write_config(&config(&["lb0"]));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_running(&net.ns, &dirs, T);
    let (links, files) = (attached(&net.ns), dirs.pin_names());
    assert!(links[0].is_some() && files.contains(&"LB_RING".to_string()));

    let out = dirs.cli(&["down"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("an lb agent (pid {}) is running", agent.pid()))
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(dirs.pin_names(), files, "a refused lb down removed pins");
    assert_eq!(attached(&net.ns), links, "a refused lb down detached");

    let out = dirs.cli(&["down", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dirs.pins.exists(),
        "lb down --force left {:?}",
        dirs.pin_names()
    );
    assert_eq!(
        attached(&net.ns)[0],
        None,
        "still attached after lb down --force"
    );
    agent.kill9();
}

#[test]
fn a_first_start_with_a_missing_interface_leaves_no_pins_and_no_attachment() {
    let net = FibNet::new("fresh-if");
    let dirs = Dirs::new(Path::new(BIN), "fresh-if");
    dirs.write_config(&config(&["lb0", "lb1", "nope0"]));
    let mut agent = Agent::start(&net.ns, &dirs);
    let said = agent.refusal(T);
    assert!(said.contains("no interface named nope0"), "{said}");
    assert!(
        !dirs.pins.exists(),
        "a failed start left {:?}",
        dirs.pin_names()
    );
    assert_eq!(attached(&net.ns), [None, None]);
}

/// Starts `lb run --kubernetes` as node-a with KUBECONFIG at `kubeconfig`.
fn start_kube(net: &FibNet, dirs: &Dirs, kubeconfig: &Path) -> Agent {
    // Node settings only: VIPs come from Services.
    dirs.write_config(&node_yaml(node(&["lb0"])));
    Agent::start_under(
        &net.ns,
        dirs,
        &[],
        &["--kubernetes"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    )
}

#[test]
fn a_kubernetes_start_without_a_cluster_leaves_no_pins() {
    let net = FibNet::new("nokube");
    let dirs = Dirs::new(Path::new(BIN), "nokube");
    let mut agent = start_kube(&net, &dirs, &dirs.state.join("no-such-kubeconfig"));
    let said = agent.refusal(T);
    assert!(
        said.contains("connecting to Kubernetes"),
        "it failed for another reason: {said}"
    );
    assert!(
        !dirs.pins.exists(),
        "a failed start left {:?}",
        dirs.pin_names()
    );
    assert_eq!(attached(&net.ns), [None, None]);
}

/// A listener on the loopback of `ns` that accepts connections and closes them at once, for as
/// long as the test runs: its port, and the number of connections it took.
fn closing_server(ns: &NetNs) -> (u16, Arc<AtomicU64>) {
    let l = ns.run(|| TcpListener::bind("127.0.0.1:0").expect("binding a port"));
    let port = l.local_addr().unwrap().port();
    let tried = Arc::new(AtomicU64::new(0));
    let n = tried.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            n.fetch_add(1, Ordering::Relaxed);
            drop(c);
        }
    });
    (port, tried)
}

#[test]
fn a_kubernetes_agent_waiting_for_an_unreachable_api_server_has_pinned_nothing() {
    let net = FibNet::new("downkube");
    let dirs = Dirs::new(Path::new(BIN), "downkube");
    // An API server that closes every connection at once, counting them.
    let (port, tried) = closing_server(&net.ns);
    let kubeconfig = dirs.state.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1
kind: Config
clusters: [{{ name: c, cluster: {{ server: 'http://127.0.0.1:{port}' }} }}]
contexts: [{{ name: c, context: {{ cluster: c, user: u }} }}]
users: [{{ name: u, user: {{}} }}]
current-context: c
"
        ),
    )
    .unwrap();
    let mut agent = start_kube(&net, &dirs, &kubeconfig);
    // It has asked, been cut off, and asks again: it waits for its first list.
    let start = std::time::Instant::now();
    while tried.load(Ordering::Relaxed) < 2 {
        assert!(
            start.elapsed() < T,
            "the agent did not try the API server twice:\n{}",
            agent.log_dump()
        );
        assert!(
            agent.exited().is_none(),
            "the agent exited:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !dirs.pins.exists(),
        "pinned before the first list: {:?}",
        dirs.pin_names()
    );
    agent.kill9();
    assert!(!dirs.pins.exists(), "left {:?}", dirs.pin_names());
    assert_eq!(attached(&net.ns), [None, None]);
}

#[test]
fn without_capabilities_lb_run_says_what_it_needs_and_leaves_nothing() {
    let net = FibNet::new("nocaps");
    let dirs = Dirs::new(Path::new(BIN), "nocaps");
    dirs.write_config(&config(&["lb0"]));
    let mut agent = Agent::start_under(
        &net.ns,
        &dirs,
        &["setpriv", "--bounding-set=-all", "--inh-caps=-all"],
        &[],
        &[],
    );
    let said = agent.refusal(T);
    assert!(
        said.contains("lb needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN")
            && said.contains("this process lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "{said}"
    );
    assert!(
        !dirs.pins.exists(),
        "a failed start left {:?}",
        dirs.pin_names()
    );
    assert_eq!(attached(&net.ns), [None, None]);
}

#[test]
fn an_interface_running_another_xdp_program_is_refused_naming_that_program() {
    let net = FibNet::new("busy");
    let dirs = Dirs::new(Path::new(BIN), "busy");
    // Another XDP program on lb1, attached by this test: lb's own object, loaded apart (no pins).
    let sizes = lb_userspace::kernel::program::Sizes {
        table_size: 251,
        max_vips: 2,
        max_backends: 4,
        flow_table_size: 1024,
        affinity_table_size: 16,
        nat_table_size: 16,
    };
    let mut other =
        lb_userspace::kernel::program::load(&sizes, None).expect("loading a second program");
    let prog: &mut aya::programs::Xdp = other
        .program_mut(lb_userspace::kernel::program::PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let id = prog.info().expect("the program's info").id();
    net.ns.run(|| {
        prog.attach("lb1", aya::programs::XdpMode::Skb)
            .expect("attaching the other program")
    });
    let before = attached(&net.ns);
    assert_eq!(before[1].map(|a| a.1), Some(id as u64));

    dirs.write_config(&config(&["lb0", "lb1"]));
    let mut agent = Agent::start(&net.ns, &dirs);
    let said = agent.refusal(T);
    assert!(
        said.contains(&format!(
            "another XDP program is attached there (id {id}, named lb)"
        )) && said.contains("ip link set dev lb1 xdp off")
            && !said.contains("try xdp_mode: generic"),
        "{said}"
    );
    assert_eq!(
        attached(&net.ns),
        before,
        "the failed start changed the attachments"
    );
    assert!(
        !dirs.pins.exists(),
        "a failed start left {:?}",
        dirs.pin_names()
    );
    drop(other);
}

#[test]
fn a_pin_dir_off_bpffs_is_refused_with_the_mount_command_and_nothing_made() {
    lb_tests::require_root();
    let base = std::env::temp_dir().join(format!("lb-nobpffs-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let (pins, config) = (base.join("pins"), base.join("lb.yaml"));
    // lo exists in every namespace: only the pin dir is wrong, and it is checked before anything.
    std::fs::write(&config, self::config(&["lo"])).unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--state-dir")
        .arg(base.join("state"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .expect("running lb");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let made = pins.exists();
    std::fs::remove_dir_all(&base).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not on a bpffs") && err.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{err}"
    );
    assert!(!made, "the pin dir was made off bpffs");
}
