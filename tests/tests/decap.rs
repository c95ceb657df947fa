//! `lb decap`: DSR backends set up with the `lb` binary alone. In the lab, backends that have
//! only their addresses are made DSR backends by running the commands `lb decap recipe` prints
//! (VIPs on lo, sysctls, `lb decap attach eth0`), and serve real connections from the client
//! through the real agent; on a veth pair, what `attach`, `detach` and `status` do is checked
//! against the kernel (`ip -d link`'s XDP program, the pin on bpffs, the pinned link's ids).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    path::Path,
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_tests::{
    agent::{Agent, Dirs, pinned_link_id, xdp_attachment},
    dc::{BACKENDS, CLIENTS, Lab, client_v4, client_v6, lab_config, open, vip_yaml},
    netns::NetNs,
};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const VIP4: &str = "192.0.2.10";
const VIP6: &str = "2001:db8::10";
const PORT: u16 = 80;
/// `XDP_ATTACHED_DRV` and `XDP_ATTACHED_SKB`, as `ip -d link` reports the mode.
const NATIVE: u64 = 1;
const GENERIC: u64 = 2;

/// `lb decap --decap-dir <dirs.pins> <args>` in `ns`.
fn decap(dirs: &Dirs, ns: &NetNs, args: &[&str]) -> Output {
    let dir = dirs.pins.to_str().unwrap();
    let mut all = vec!["decap", "--decap-dir", dir];
    all.extend_from_slice(args);
    dirs.cli_in(ns, &all)
}

/// [`decap`], which must succeed; its stdout.
fn decap_ok(dirs: &Dirs, ns: &NetNs, args: &[&str]) -> String {
    let out = decap(dirs, ns, args);
    assert!(
        out.status.success(),
        "lb decap {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// [`decap`], which must fail; its stderr.
fn decap_refused(dirs: &Dirs, ns: &NetNs, args: &[&str]) -> String {
    let out = decap(dirs, ns, args);
    assert!(
        !out.status.success(),
        "lb decap {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// `lb decap status -o json` in `ns`.
fn status(dirs: &Dirs, ns: &NetNs) -> serde_json::Value {
    let out = decap_ok(dirs, ns, &["status", "-o", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Runs the commands of `lb decap recipe` in `ns`, up to the tunnel-device alternative: `ip`
/// and `sysctl` lines as they are, `lb decap attach` with the backend's own pin dir. Any other
/// command fails the test (the recipe would hold a step this test does not take).
fn run_recipe(dirs: &Dirs, ns: &NetNs, vips: &[&str]) {
    let mut args = vec!["recipe", "--interface", "eth0"];
    for v in vips {
        args.extend(["--vip", v]);
    }
    let recipe = decap_ok(dirs, ns, &args);
    let commands = recipe
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty());
    let mut attached = false;
    for line in commands {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ip", rest @ ..] => ns.ip(rest),
            ["sysctl", "-w", setting] => {
                let (k, v) = setting.split_once('=').expect("sysctl -w KEY=VALUE");
                ns.sysctl(k, v);
            }
            ["lb", "decap", rest @ ..] => {
                decap_ok(dirs, ns, rest);
                attached = true;
            }
            _ => panic!("a recipe step this test does not know: {line:?}\n{recipe}"),
        }
    }
    assert!(attached, "the recipe attaches nothing:\n{recipe}");
}

/// Servers on the backends, on `vip`:[`PORT`]: each connection is answered with the backend's
/// name and the client's address as the backend sees it (a line), then closed.
struct WhoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl WhoServers {
    fn start(lab: &Lab, vip: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (name, ns) in &lab.backends {
            let sa = SocketAddr::new(vip.parse().unwrap(), PORT);
            let l = ns.run(|| TcpListener::bind(sa).expect("bind on the VIP (on lo)"));
            l.set_nonblocking(true).unwrap();
            let (stop, name) = (stop.clone(), name.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            let _ = writeln!(s, "{name} {}", peer.ip());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for WhoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// `n` connections from the client to `vip`, round-robin over its addresses: per answer
/// (`"b1 saw the client"`, `"b1 saw 10.20.0.2"`, or `"error: ..."`), how many.
fn tally(lab: &Lab, vip: &str, n: usize) -> BTreeMap<String, usize> {
    let vip: IpAddr = vip.parse().unwrap();
    let mut t = BTreeMap::new();
    for i in 0..n {
        let c = if vip.is_ipv4() {
            client_v4(i % CLIENTS)
        } else {
            client_v6(i % CLIENTS)
        };
        let answer = lab.client.run(|| {
            let s = open(c, SocketAddr::new(vip, PORT)).map_err(|e| format!("connect: {e}"))?;
            let mut line = String::new();
            BufReader::new(&s)
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            // Who answered, and whether it saw this client's own address.
            let (who, seen) = line
                .trim()
                .split_once(' ')
                .ok_or_else(|| format!("answered {line:?}"))?;
            let seen = if seen == c.to_string() {
                "the client"
            } else {
                seen
            };
            Ok::<_, String>(format!("{who} saw {seen}"))
        });
        *t.entry(answer.unwrap_or_else(|e| format!("error: {e}")))
            .or_insert(0) += 1;
    }
    t
}

/// The lab's backends made DSR backends for `vip` by the recipe alone; the agent serving `vip`
/// over them in DSR mode; connections from the client. Every one is answered by a backend that
/// saw the client's own address, and each backend answers some.
fn serves_through_recipe_backends(vip: &str, v6: bool) {
    let lab = Lab::with_bare_backends();
    // Dropped (links detached, pins removed) before the lab's namespaces go, even on failure.
    let _backend_dirs: Vec<Dirs> = lab
        .backends
        .iter()
        .map(|(name, ns)| {
            let dirs = Dirs::new(Path::new(BIN), &format!("decap-{name}"));
            run_recipe(&dirs, ns, &[vip]);
            dirs
        })
        .collect();
    let _servers = WhoServers::start(&lab, vip);
    let dirs = Dirs::new(Path::new(BIN), "decap-lb");
    let all = [(0, 1), (1, 1), (2, 1)];
    dirs.write_config(&lab_config(
        "",
        &vip_yaml(vip, PORT, "tcp", "", &all, v6, None),
    ));
    let mut agent = Agent::start(&lab.lb, &dirs);
    agent.wait_serving(&lab.lb, &dirs, T);

    let t = tally(&lab, vip, 90);
    let expected: Vec<String> = BACKENDS
        .iter()
        .map(|(name, _, _)| format!("{name} saw the client"))
        .collect();
    let answered: Vec<&String> = t.keys().collect();
    assert_eq!(
        answered,
        expected.iter().collect::<Vec<_>>(),
        "every connection answered by a backend that saw the client's address, each backend \
         some (90 connections over 3 equal weights): {t:?}"
    );
}

#[test]
fn an_ipv4_vip_is_served_by_backends_set_up_with_the_recipe_and_lb_decap_attach() {
    serves_through_recipe_backends(VIP4, false);
}

#[test]
fn an_ipv6_vip_is_served_by_backends_set_up_with_the_recipe_and_lb_decap_attach() {
    serves_through_recipe_backends(VIP6, true);
}

/// A namespace with a veth pair v0 (lb_decap's) and v1, both up.
fn veth_ns(tag: &str) -> NetNs {
    let ns = NetNs::new(tag);
    ns.script(
        "link add v0 type veth peer name v1
         link set v0 up
         link set v1 up",
    );
    ns
}

/// The program of the link pinned for `ifname` in `dir`, as the kernel says.
fn pinned_program_id(dir: &Path, ifname: &str) -> u64 {
    let path = dir.join(format!("link-{ifname}"));
    let link = aya::programs::links::PinnedLink::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let info = aya::programs::links::FdLink::from(link).info().unwrap();
    u64::from(info.program_id())
}

#[test]
fn detach_takes_the_program_off_the_interface_and_removes_the_pin() {
    let ns = veth_ns("decap-detach");
    let dirs = Dirs::new(Path::new(BIN), "decap-detach");
    decap_ok(&dirs, &ns, &["attach", "v0"]);
    let pin = dirs.pins.join("link-v0");
    assert!(pin.exists(), "no pin at {}", pin.display());
    assert_eq!(
        xdp_attachment(&ns, "v0"),
        Some((NATIVE, pinned_program_id(&dirs.pins, "v0"))),
        "the pinned link's program is attached natively to v0"
    );

    decap_ok(&dirs, &ns, &["detach", "v0"]);
    assert_eq!(xdp_attachment(&ns, "v0"), None, "still attached to v0");
    assert!(!pin.exists(), "the pin is still there");
    assert!(!dirs.pins.exists(), "the emptied directory is still there");
}

#[test]
fn status_json_lists_the_attached_link_and_nothing_once_detached() {
    let ns = veth_ns("decap-status");
    let dirs = Dirs::new(Path::new(BIN), "decap-status");
    assert_eq!(status(&dirs, &ns)["links"], serde_json::json!([]));

    decap_ok(&dirs, &ns, &["attach", "v0", "--xdp-mode", "generic"]);
    let (mode, prog) = xdp_attachment(&ns, "v0").expect("attached to v0");
    assert_eq!(mode, GENERIC);
    let v = status(&dirs, &ns);
    let links = v["links"].as_array().unwrap();
    assert_eq!(links.len(), 1, "{v:#}");
    let l = &links[0];
    assert_eq!(
        (
            &l["interface"],
            &l["state"],
            &l["mode"],
            l["program_id"].as_u64()
        ),
        (
            &serde_json::json!("v0"),
            &serde_json::json!("attached"),
            &serde_json::json!("generic"),
            Some(prog)
        ),
        "{v:#}"
    );
    assert_eq!(
        l["link_id"].as_u64(),
        Some(u64::from(pinned_link_id(&dirs.pins, "v0")))
    );

    decap_ok(&dirs, &ns, &["detach", "v0"]);
    assert_eq!(status(&dirs, &ns)["links"], serde_json::json!([]));
}

#[test]
fn attaching_again_keeps_the_pinned_link_and_swaps_a_fresh_program_into_it() {
    let ns = veth_ns("decap-again");
    let dirs = Dirs::new(Path::new(BIN), "decap-again");
    decap_ok(&dirs, &ns, &["attach", "v0"]);
    let (link, (_, prog)) = (
        pinned_link_id(&dirs.pins, "v0"),
        xdp_attachment(&ns, "v0").unwrap(),
    );
    decap_ok(&dirs, &ns, &["attach", "v0"]);
    assert_eq!(pinned_link_id(&dirs.pins, "v0"), link, "another link");
    let (mode, again) = xdp_attachment(&ns, "v0").expect("detached");
    assert_eq!(mode, NATIVE);
    assert_ne!(again, prog, "the same program: nothing was swapped in");
    assert_eq!(again, pinned_program_id(&dirs.pins, "v0"));
}

#[test]
fn attaching_in_the_other_mode_attaches_afresh_in_that_mode() {
    let ns = veth_ns("decap-mode");
    let dirs = Dirs::new(Path::new(BIN), "decap-mode");
    decap_ok(&dirs, &ns, &["attach", "v0"]);
    assert_eq!(xdp_attachment(&ns, "v0").map(|a| a.0), Some(NATIVE));
    decap_ok(&dirs, &ns, &["attach", "v0", "--xdp-mode", "generic"]);
    assert_eq!(
        xdp_attachment(&ns, "v0"),
        Some((GENERIC, pinned_program_id(&dirs.pins, "v0")))
    );
}

#[test]
fn a_pin_holding_another_namespaces_interface_is_refused_and_left_attached() {
    let (a, b) = (veth_ns("decap-ns-a"), veth_ns("decap-ns-b"));
    let dirs = Dirs::new(Path::new(BIN), "decap-ns");
    decap_ok(&dirs, &a, &["attach", "v0"]);
    let before = xdp_attachment(&a, "v0");
    let err = decap_refused(&dirs, &b, &["attach", "v0"]);
    assert!(err.contains("another network namespace"), "{err}");
    let err = decap_refused(&dirs, &b, &["detach", "v0"]);
    assert!(err.contains("another network namespace"), "{err}");
    assert_eq!(xdp_attachment(&b, "v0"), None, "attached in b");
    assert_eq!(xdp_attachment(&a, "v0"), before, "a's attachment changed");
}

#[test]
fn attaching_to_a_missing_interface_is_refused_naming_it() {
    let ns = veth_ns("decap-missing");
    let dirs = Dirs::new(Path::new(BIN), "decap-missing");
    let err = decap_refused(&dirs, &ns, &["attach", "nope0"]);
    assert!(err.contains("no interface named nope0"), "{err}");
    assert!(!dirs.pins.exists(), "a pin dir was made");
}

#[test]
fn a_decap_dir_off_bpffs_is_refused_with_the_mount_command() {
    let ns = veth_ns("decap-fs");
    let dirs = Dirs::new(Path::new(BIN), "decap-fs");
    let off = dirs.state.join("pins");
    let out = dirs.cli_in(
        &ns,
        &[
            "decap",
            "--decap-dir",
            off.to_str().unwrap(),
            "attach",
            "v0",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached with pins off bpffs");
    assert!(
        err.contains("not on a bpffs") && err.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{err}"
    );
    assert_eq!(xdp_attachment(&ns, "v0"), None);
}

#[test]
fn the_agents_default_pin_dir_is_refused_as_decap_dir() {
    let ns = veth_ns("decap-agentdir");
    let dirs = Dirs::new(Path::new(BIN), "decap-agentdir");
    let out = dirs.cli_in(
        &ns,
        &["decap", "--decap-dir", "/sys/fs/bpf/lb", "attach", "v0"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "attached with pins among the agent's"
    );
    assert!(err.contains("is an lb agent's pin dir"), "{err}");
    assert_eq!(xdp_attachment(&ns, "v0"), None);
}

/// `lb decap --decap-dir <pins> attach v0` in `ns` with only the capabilities `keep`.
fn attach_keeping(dirs: &Dirs, ns: &NetNs, keep: &[&str]) -> Output {
    let mut args = lb_tests::agent::capsh_keeping(keep);
    args.push(dirs.bin.to_str().unwrap().into());
    args.extend(
        [
            "decap",
            "--decap-dir",
            dirs.pins.to_str().unwrap(),
            "attach",
            "v0",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nsenter = format!("--net=/run/netns/{}", ns.name);
    std::process::Command::new("nsenter")
        .arg(nsenter)
        .args(args)
        .output()
        .expect("running nsenter")
}

#[test]
fn cap_bpf_and_cap_net_admin_are_enough_to_attach() {
    let ns = veth_ns("decap-caps");
    let dirs = Dirs::new(Path::new(BIN), "decap-caps");
    let out = attach_keeping(&dirs, &ns, &["cap_bpf", "cap_net_admin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        xdp_attachment(&ns, "v0"),
        Some((NATIVE, pinned_program_id(&dirs.pins, "v0")))
    );
}

#[test]
fn attaching_without_cap_bpf_is_refused_naming_it() {
    let ns = veth_ns("decap-nocap");
    let dirs = Dirs::new(Path::new(BIN), "decap-nocap");
    let out = attach_keeping(&dirs, &ns, &["cap_net_admin"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached without CAP_BPF");
    assert!(err.contains("this process lacks CAP_BPF"), "{err}");
    assert_eq!(xdp_attachment(&ns, "v0"), None);
}
