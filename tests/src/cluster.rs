//! The world of the Kubernetes and Gateway API tests (tests/tests/k8s.rs, tests/tests/gateway.rs):
//! a namespace, the fake API server ([`FakeApi`]), one agent under `lb run --kubernetes` as
//! node-a, and the program loaded on the agent's pinned maps to run packets through
//! (BPF_PROG_TEST_RUN). Waits poll state with a deadline ([`T`]): the fake server's objects,
//! `lb backends --json`, the status file.

use std::{
    net::{IpAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use lb_common::Counter;
use serde_json::Value;

use crate::{
    agent::{Agent, Dirs},
    config::{RawNode, lab_node, node_yaml},
    harness::{FibNet, Lb, XDP_TX, action_name},
    kubeapi::{FakeApi, State},
    packet::{Pkt, TCP_ACK, TCP_RST},
};

/// How long a wait lasts before the test fails.
pub const T: Duration = Duration::from_secs(30);

/// The node config of the cluster tests: on lb0, 16 VIPs, 4,096 NAT translations.
pub fn node() -> RawNode {
    RawNode {
        max_vips: Some(16),
        nat_table_size: Some(4096),
        ..lab_node(&["lb0"])
    }
}

/// The namespace `tag`, the agent's directories (for `bin`) with [`node`]'s config, and the fake
/// API server with its kubeconfig, before any object or agent.
pub fn setup(bin: &Path, tag: &str) -> (FibNet, FakeApi, Dirs) {
    let net = FibNet::new(tag);
    let dirs = Dirs::new(bin, tag);
    dirs.write_config(&node_yaml(node()));
    let api = FakeApi::new(net.ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    std::fs::write(dirs.state.join("kubeconfig"), api.kubeconfig()).unwrap();
    (net, api, dirs)
}

/// Starts `lb run --kubernetes` as node-a, under `wrapper` if not empty.
pub fn start_agent(net: &FibNet, dirs: &Dirs, wrapper: &[&str]) -> Agent {
    let kubeconfig = dirs.state.join("kubeconfig");
    Agent::start_under(
        &net.ns,
        dirs,
        wrapper,
        &["--kubernetes"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", "node-a"),
        ],
    )
}

/// Fields drop in order: the agent first, the namespace last.
pub struct World {
    pub agent: Agent,
    /// The program, loaded once on the agent's pinned maps.
    pub lb: Option<Lb>,
    pub api: FakeApi,
    pub dirs: Dirs,
    pub net: FibNet,
}

impl World {
    /// The world of an agent just started: waits until its event loop runs.
    pub fn new(net: FibNet, api: FakeApi, dirs: Dirs, mut agent: Agent) -> Self {
        agent.wait_running(&net.ns, &dirs, T);
        Self {
            agent,
            lb: None,
            api,
            dirs,
            net,
        }
    }

    /// Polls `what` until it gives Some, failing after [`T`] with the agent's log.
    pub fn until<R>(&self, what: &str, f: impl Fn(&Self) -> Option<R>) -> R {
        let start = Instant::now();
        loop {
            if let Some(r) = f(self) {
                return r;
            }
            assert!(
                start.elapsed() < T,
                "waiting for {what}; agent log:\n{}",
                self.agent.log_dump()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the fake API server's state satisfies `pred`.
    pub fn wait_api(&self, what: &str, pred: impl Fn(&State) -> bool) {
        self.until(what, |w| pred(&w.api.lock()).then_some(()));
    }

    /// The status of `kind` `ns/name` once `pred` holds for it.
    pub fn status(&self, kind: &str, ns: &str, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.until(&format!("the status of {kind} {ns}/{name}"), |w| {
            let s = w.api.get(kind, ns, name)?["status"].clone();
            pred(&s).then_some(s)
        })
    }

    /// `lb backends --json` once the agent's maps satisfy `pred`.
    pub fn maps(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let out = self.dirs.cli(&["backends", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if pred(&v) {
                return v;
            }
            assert!(
                start.elapsed() < T,
                "waiting for {what}: the maps still show\n{v:#}\nagent log:\n{}",
                self.agent.log_dump()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent's status says it skipped or kept the last good version of an
    /// object as `message` says (`agent.kubernetes_skipped`).
    pub fn wait_skipped(&mut self, message: &str) {
        self.agent.wait_status(&self.net.ns, &self.dirs, T, |v| {
            v["agent"]["kubernetes_skipped"]
                .as_array()
                .is_some_and(|a| a.iter().any(|m| m == message))
        });
    }

    /// Runs `f` in the namespace on the program loaded (once) on the agent's pinned maps.
    pub fn with_lb<R: Send>(&mut self, f: impl FnOnce(&mut Lb) -> R + Send) -> R {
        let (pins, slot) = (&self.dirs.pins, &mut self.lb);
        self.net
            .ns
            .run(|| f(slot.get_or_insert_with(|| Lb::adopt(pins))))
    }

    /// What the program does with `pkt`: its action and output frame.
    pub fn send(&mut self, pkt: &Pkt) -> (u32, Vec<u8>) {
        let lb0 = self.net.lb0;
        self.with_lb(|lb| {
            let run = lb.run(&pkt.frame(), lb0);
            (run.action, run.output)
        })
    }

    /// Where the program sends `pkt`: its action, and the destination when it sends it on.
    pub fn destination(&mut self, pkt: &Pkt) -> (u32, Option<(IpAddr, u16)>) {
        let (action, out) = self.send(pkt);
        (action, (action == XDP_TX).then(|| destination(&out)))
    }

    /// The pod (address, port) `pkt` is sent to; fails unless the program sends it on.
    pub fn pod_of(&mut self, pkt: &Pkt) -> (IpAddr, u16) {
        let (action, out) = self.send(pkt);
        assert_eq!(
            action_name(action),
            action_name(XDP_TX),
            "{pkt:?}; agent log:\n{}",
            self.agent.log_dump()
        );
        destination(&out)
    }

    /// Whether `pkt` (IPv4) is answered with a TCP reset back to its sender.
    pub fn is_reset(&mut self, pkt: &Pkt) -> bool {
        let IpAddr::V4(src) = pkt.src else {
            panic!("is_reset: {pkt:?} is not IPv4");
        };
        let (action, out) = self.send(pkt);
        action == XDP_TX
            && out[30..34] == src.octets()
            && out[47] & TCP_RST != 0
            && out[47] & TCP_ACK != 0
    }

    pub fn counter(&mut self, c: Counter) -> u64 {
        self.with_lb(|lb| lb.counters()[&c])
    }
}

/// The destination address and port of a translated IPv4 or IPv6 frame.
pub fn destination(out: &[u8]) -> (IpAddr, u16) {
    match u16::from_be_bytes([out[12], out[13]]) {
        0x0800 => (
            IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap()),
            u16::from_be_bytes([out[36], out[37]]),
        ),
        _ => (
            IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap()),
            u16::from_be_bytes([out[56], out[57]]),
        ),
    }
}
