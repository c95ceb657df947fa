//! `lb run`: the agent's event loop on a bare host.
//!
//! Starts from the config (a config with problems at startup is an error: there is no last good
//! state to keep), adopts or creates the pinned maps, reconciles, attaches the program to the
//! configured interfaces (re-using pinned links), then reacts to health transitions, SIGHUP and
//! changes of the config file. A new config with problems is logged and refused; the previous one
//! keeps serving. On SIGTERM or Ctrl-C the agent exits and leaves the program attached and the
//! maps pinned: traffic keeps flowing, and the next agent adopts them. `lb down` removes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use notify::Watcher as _;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    agent::{Agent, Target},
    config::{Config, NodeSettings, VipConfig, XdpMode as ModeSetting},
    dataplane::kernel::KernelDataplane,
    health,
    inspect::Pinned,
    k8s::{Kube, KubeOptions, translate::Settings},
    metrics::{self, AgentMetrics},
    program::{self, PROGRAM},
};

pub struct RunOptions {
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Take the VIPs from Kubernetes (the config file then holds node settings only).
    pub kubernetes: Option<KubeOptions>,
    /// This node's addresses (IPv4 and/or IPv6): the DSR outer source and NAT source, in place
    /// of the file's `source_v4` / `source_v6` (a DaemonSet gets them from `status.hostIPs`).
    pub sources: Vec<std::net::IpAddr>,
}

/// The config the agent serves: the file's node settings, with the file's VIPs or, under
/// Kubernetes, the cluster's.
fn compose(file: &Config, kube: Option<&[VipConfig]>) -> Config {
    match kube {
        None => file.clone(),
        Some(vips) => Config {
            node: file.node.clone(),
            vips: vips.to_vec(),
            warnings: file.warnings.clone(),
        },
    }
}

/// Loads the config file; under Kubernetes it must not list VIPs (they come from the cluster).
fn load_file(opts: &RunOptions) -> Result<Config> {
    let mut c = Config::load(&opts.config)?;
    for a in &opts.sources {
        match a {
            std::net::IpAddr::V4(a) => c.node.spec.source_v4 = Some(*a),
            std::net::IpAddr::V6(a) => c.node.spec.source_v6 = Some(*a),
        }
    }
    if opts.kubernetes.is_some() && !c.vips.is_empty() {
        bail!(
            "{} lists {} VIP(s), but with --kubernetes VIPs come from Services: keep only `node:` in it",
            opts.config.display(),
            c.vips.len()
        );
    }
    Ok(c)
}

/// What woke the loop up.
enum Reload {
    No,
    File,
    Kube,
}

fn link_pin(pin_dir: &Path, ifname: &str) -> PathBuf {
    pin_dir.join(format!("link-{ifname}"))
}

/// Interfaces with a pinned link in `pin_dir`.
pub fn pinned_links(pin_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(pin_dir) else {
        return vec![];
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("link-")
                .map(|i| (i.to_string(), e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Attaches the program to `ifname`: swaps it into the pinned link if there is one (atomically:
/// traffic never sees no program), or attaches afresh and pins the link.
fn attach(dp: &mut KernelDataplane, pin_dir: &Path, ifname: &str, mode: ModeSetting) -> Result<()> {
    let path = link_pin(pin_dir, ifname);
    let prog: &mut Xdp = dp
        .ebpf
        .program_mut(PROGRAM)
        .context("no lb program")?
        .try_into()?;
    let id = if path.exists() {
        // aya hands out a pinned link only by unpinning it; it is re-pinned right below, and the
        // kernel keeps it attached meanwhile through our descriptor.
        let fd: FdLink = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?
            .unpin()
            .with_context(|| format!("taking over {}", path.display()))?;
        let link = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
        prog.attach_to_link(link)
            .with_context(|| format!("replacing the program attached to {ifname}"))?
    } else {
        let mode = match mode {
            ModeSetting::Native => XdpMode::Driver,
            ModeSetting::Generic => XdpMode::Skb,
        };
        prog.attach(ifname, mode)
            .with_context(|| format!("attaching the XDP program to {ifname} (native mode needs driver support: try xdp_mode: generic)"))?
    };
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .context("the XDP link is not a bpf_link (kernel too old?)")?;
    link.pin(&path)
        .with_context(|| format!("pinning the link at {}", path.display()))?;
    Ok(())
}

fn detach(pin_dir: &Path, ifname: &str) -> Result<()> {
    let path = link_pin(pin_dir, ifname);
    let link =
        PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    drop(
        link.unpin()
            .with_context(|| format!("removing {}", path.display()))?,
    );
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface named {name}"),
        i => Ok(i),
    }
}

/// Makes the attached interfaces what `node` lists: attach new ones, detach dropped ones, keep
/// the devmap (redirect targets) in step. Also lets the kernel forward encapsulated packets
/// whose source is this node while a backend's neighbour is unknown (accept_local).
fn sync_interfaces(dp: &mut KernelDataplane, pin_dir: &Path, node: &NodeSettings) -> Result<()> {
    let wanted: BTreeSet<&str> = node.interfaces.iter().map(String::as_str).collect();
    for (ifname, _) in pinned_links(pin_dir) {
        if !wanted.contains(ifname.as_str()) {
            detach(pin_dir, &ifname)?;
            info!(interface = %ifname, "detached");
        }
    }
    for ifname in &node.interfaces {
        let index = ifindex(ifname)?;
        attach(dp, pin_dir, ifname, node.xdp_mode)?;
        let map = dp
            .ebpf
            .map_mut(lb_common::maps::TX_PORTS)
            .context("no devmap")?;
        let mut ports: aya::maps::DevMapHash<_> = aya::maps::DevMapHash::try_from(map)?;
        ports
            .insert(index, index, None, 0)
            .with_context(|| format!("adding {ifname} to the redirect devmap"))?;
        let sysctl = format!("/proc/sys/net/ipv4/conf/{ifname}/accept_local");
        if std::fs::read_to_string(&sysctl)
            .map(|v| v.trim() != "1")
            .unwrap_or(false)
        {
            match std::fs::write(&sysctl, "1") {
                Ok(()) => {
                    info!(interface = %ifname, "set accept_local=1 (packets to backends with no neighbour entry yet go through the kernel)")
                }
                Err(e) => {
                    warn!(interface = %ifname, "could not set accept_local=1 ({e}): packets to backends with no neighbour entry yet will be dropped until it is resolved")
                }
            }
        }
        info!(interface = %ifname, index, "attached");
    }
    Ok(())
}

/// A backend's passive health: its members' counters added up, and the longest failure streak
/// among them (the program keeps them per member, that is per VIP).
fn backend_passive(
    agent: &Agent<KernelDataplane>,
    ids: &[u32],
) -> Result<lb_common::PassiveHealth, crate::dataplane::DataplaneError> {
    let mut sum = lb_common::PassiveHealth::default();
    for id in ids {
        let p = agent.dp.passive(*id)?;
        sum.answered += p.answered;
        sum.refused += p.refused;
        sum.unreachable += p.unreachable;
        sum.syn_timeouts += p.syn_timeouts;
        sum.consecutive_failures = sum.consecutive_failures.max(p.consecutive_failures);
    }
    Ok(sum)
}

/// Passive health checking: watches each checked backend's failure streak in the maps, takes
/// it out at the threshold, and probes it back in.
#[derive(Default)]
struct Passive {
    /// Targets out, and when to probe them next.
    next_probe: BTreeMap<Target, tokio::time::Instant>,
    probing: BTreeSet<Target>,
}

impl Passive {
    /// One look at the counters; true if anything changed.
    fn round(
        &mut self,
        agent: &mut Agent<KernelDataplane>,
        tx: &mpsc::Sender<(Target, Result<(), String>)>,
        m: &AgentMetrics,
    ) -> bool {
        let now = tokio::time::Instant::now();
        let mut changed = false;
        let targets = agent.passive_targets();
        self.next_probe
            .retain(|t, _| targets.iter().any(|p| &p.target == t));
        for pt in targets {
            let t = pt.target;
            if agent.is_passive_out(&t) {
                let due = self.next_probe.get(&t).is_none_or(|at| *at <= now);
                if due && self.probing.insert(t) {
                    let (tx, addr, timeout) = (tx.clone(), pt.probe, pt.check.timeout);
                    tokio::spawn(async move {
                        let r = match tokio::time::timeout(
                            timeout,
                            tokio::net::TcpStream::connect(addr),
                        )
                        .await
                        {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(format!("tcp connect to {addr}: {e}")),
                            Err(_) => Err(format!(
                                "tcp connect to {addr}: no answer within {timeout:?}"
                            )),
                        };
                        let _ = tx.send((t, r)).await;
                    });
                }
                continue;
            }
            if pt.ids.is_empty() {
                continue;
            }
            let p = match backend_passive(agent, &pt.ids) {
                Ok(p) => p,
                Err(e) => {
                    warn!("reading passive health: {}", crate::error_chain(&e));
                    continue;
                }
            };
            if p.consecutive_failures >= pt.check.failures as u64 {
                let vip = crate::model::vip_label(&t.0);
                match agent.set_passive_out(t, true) {
                    Ok(plan) => {
                        m.map_writes
                            .fetch_add(plan.write_count() as u64, Ordering::Relaxed);
                        warn!(
                            %vip, backend = %t.1, refused = p.refused, unreachable = p.unreachable,
                            syn_timeouts = p.syn_timeouts,
                            "backend failed {} connection attempts in a row (passive health): weight 0, probing it every {:?}",
                            p.consecutive_failures, pt.check.recheck_interval
                        );
                        self.next_probe.insert(t, now + pt.check.recheck_interval);
                        changed = true;
                    }
                    Err(e) => {
                        error!(%vip, backend = %t.1, "taking a backend out failed: {}", crate::error_chain(&e))
                    }
                }
            }
        }
        changed
    }

    /// A recheck probe's result: back in on success, probe again later on failure.
    fn probed(
        &mut self,
        agent: &mut Agent<KernelDataplane>,
        t: Target,
        result: Result<(), String>,
        m: &AgentMetrics,
    ) {
        self.probing.remove(&t);
        let Some(pt) = agent.passive_targets().into_iter().find(|p| p.target == t) else {
            return;
        };
        let vip = crate::model::vip_label(&t.0);
        match result {
            Ok(()) => {
                for id in &pt.ids {
                    if let Err(e) = agent.dp.reset_passive_streak(*id) {
                        warn!(%vip, backend = %t.1, "resetting the failure streak: {}", crate::error_chain(&e));
                    }
                }
                match agent.set_passive_out(t, false) {
                    Ok(plan) => {
                        m.map_writes
                            .fetch_add(plan.write_count() as u64, Ordering::Relaxed);
                        info!(%vip, backend = %t.1, "backend answers again (passive health recheck): back in");
                    }
                    Err(e) => {
                        error!(%vip, backend = %t.1, "bringing a backend back failed: {}", crate::error_chain(&e))
                    }
                }
                self.next_probe.remove(&t);
            }
            Err(reason) => {
                info!(%vip, backend = %t.1, "still out: {reason}");
                self.next_probe
                    .insert(t, tokio::time::Instant::now() + pt.check.recheck_interval);
            }
        }
    }
}

/// What `lb backends` reads besides the maps: configured weights and health.
#[derive(Serialize, serde::Deserialize, Default, Debug)]
pub struct Status {
    pub config: String,
    pub vips: Vec<VipStatus>,
}

#[derive(Serialize, serde::Deserialize, Debug)]
pub struct VipStatus {
    pub name: String,
    pub vip: String,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize, serde::Deserialize, Debug)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// None: not health checked.
    pub healthy: Option<bool>,
    /// Taken out by passive health checking (NAT mode).
    #[serde(default)]
    pub passive_out: bool,
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

pub fn read_status(state_dir: &Path) -> Option<Status> {
    std::fs::read(status_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn write_status(opts: &RunOptions, agent: &Agent<KernelDataplane>, m: &AgentMetrics) -> Result<()> {
    let c = agent.config();
    let mut health_rows = Vec::new();
    let status = Status {
        config: opts.config.display().to_string(),
        vips: c
            .vips
            .iter()
            .map(|v| VipStatus {
                name: v.spec.name.clone(),
                vip: v.spec.label(),
                backends: v
                    .spec
                    .backends
                    .iter()
                    .map(|b| {
                        let healthy = v
                            .health_check
                            .as_ref()
                            .map(|_| agent.is_healthy(&(v.spec.key(), b.address)));
                        if let Some(h) = healthy {
                            health_rows.push((v.spec.label(), b.address.to_string(), h));
                        }
                        BackendStatus {
                            address: b.address.to_string(),
                            weight: b.weight,
                            healthy,
                            passive_out: agent.is_passive_out(&(v.spec.key(), b.address)),
                        }
                    })
                    .collect(),
            })
            .collect(),
    };
    *m.health.lock().expect("health lock") = health_rows;
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    let path = status_path(&opts.state_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&status)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The entry a Kubernetes ConfigMap volume swaps (a symlink to a fresh directory) when the
/// ConfigMap changes; the files themselves are links through it and never change.
const CONFIGMAP_SWAP: &str = "..data";

/// Watches the config file's directory (editors replace files rather than write them; a
/// ConfigMap volume swaps its `..data` link) and sends a unit whenever the file may have changed.
fn watch(path: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher> {
    let file = path.file_name().map(|f| f.to_owned());
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && ev.paths.iter().any(|p| {
                p.file_name() == file.as_deref()
                    || p.file_name() == Some(std::ffi::OsStr::new(CONFIGMAP_SWAP))
            })
            && !ev.kind.is_access()
        {
            let _ = tx.try_send(());
        }
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    w.watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(w)
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut file = load_file(&opts)?;
    for w in &file.warnings {
        warn!("{w}");
    }
    std::fs::create_dir_all(&opts.pin_dir).with_context(|| {
        format!(
            "creating {} (is bpffs mounted at /sys/fs/bpf? `mount -t bpf bpf /sys/fs/bpf`)",
            opts.pin_dir.display()
        )
    })?;
    let sizes = file.node.sizes.clone();
    let adopted = program::pinned_meta(&opts.pin_dir)?.is_some();
    let ebpf = program::load(&sizes, Some(&opts.pin_dir))?;
    let dp = KernelDataplane::new(ebpf, sizes.clone())?;
    let m = Arc::new(AgentMetrics::default());
    let metrics_task = match file.node.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for metrics on {addr}"))?;
            info!(%addr, "serving /metrics, /healthz and /readyz");
            let registry = metrics::registry(Pinned::open(&opts.pin_dir)?, m.clone());
            Some(tokio::spawn(metrics::serve(listener, registry, m.clone())))
        }
        None => None,
    };
    // Under Kubernetes, nothing is written before the first full list of every resource: the
    // maps a previous agent left keep serving meanwhile.
    let (ktx, mut krx) = mpsc::channel::<()>(1);
    let mut kube = match &opts.kubernetes {
        Some(k) => {
            let settings = Settings {
                class: k.class.clone(),
                node_name: k.node_name.clone(),
                table_size: sizes.maglev_m,
                max_vips: sizes.max_vips,
                max_backends: sizes.max_backends,
                source_v4: file.node.spec.source_v4.is_some(),
                source_v6: file.node.spec.source_v6.is_some(),
            };
            let kube = Kube::start(k, settings, ktx).await?;
            info!(class = %k.class, node = %k.node_name, "waiting for the first list of Services, EndpointSlices and UpstreamPolicies");
            kube.ready().await;
            Some(kube)
        }
        None => None,
    };
    let k8s_vips = kube.as_mut().map(|k| k.translate());
    let config = compose(&file, k8s_vips.as_deref());
    // Health as the previous agent left it, so a restart does not send new flows to a backend
    // known to be down while its checks warm up.
    let unhealthy: Vec<Target> = read_status(&opts.state_dir)
        .map(|s| {
            s.vips
                .iter()
                .filter_map(|v| {
                    config
                        .vips
                        .iter()
                        .find(|c| c.spec.label() == v.vip)
                        .map(|c| (c.spec.key(), v))
                })
                .flat_map(|(key, v)| {
                    v.backends
                        .iter()
                        .filter(|b| b.healthy == Some(false))
                        .filter_map(move |b| b.address.parse().ok().map(|a| (key, a)))
                })
                .collect()
        })
        .unwrap_or_default();
    let (mut agent, plan) = Agent::start(dp, config, &unhealthy).context("applying the config")?;
    info!(
        pins = %opts.pin_dir.display(),
        adopted,
        writes = plan.write_count(),
        vips = agent.config().vips.len(),
        "{} the maps and applied {}{}",
        if adopted { "adopted" } else { "created" },
        opts.config.display(),
        if kube.is_some() { " and the cluster's Services" } else { "" }
    );
    if let Some(k) = &mut kube {
        k.report(&Ok(()));
    }
    m.map_writes
        .fetch_add(plan.write_count() as u64, Ordering::Relaxed);
    let node = agent.config().node.clone();
    sync_interfaces(&mut agent.dp, &opts.pin_dir, &node)?;
    write_status(&opts, &agent, &m)?;
    m.ready.store(true, Ordering::Relaxed);

    let (htx, mut hrx) = mpsc::channel::<health::Transition>(256);
    let mut checks = health::Checks::new(htx.clone());
    checks.sync(agent.config(), |t: &Target| agent.is_healthy(t));
    let (ptx, mut prx) = mpsc::channel::<(Target, Result<(), String>)>(64);
    let mut passive = Passive::default();
    let mut passive_tick = tokio::time::interval(Duration::from_millis(250));
    passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (ftx, mut frx) = mpsc::channel::<()>(8);
    let _watcher = watch(&opts.config, ftx)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(
        "running; SIGHUP or saving {} reloads it",
        opts.config.display()
    );

    loop {
        let reload = tokio::select! {
            Some(t) = hrx.recv() => {
                let (key, addr) = t.target;
                let vip = crate::model::vip_label(&key);
                match agent.set_health(t.target, t.healthy) {
                    Ok(p) => {
                        m.map_writes.fetch_add(p.write_count() as u64, Ordering::Relaxed);
                        if t.healthy {
                            info!(%vip, backend = %addr, writes = p.write_count(), "backend healthy again: {}", t.reason);
                        } else {
                            warn!(%vip, backend = %addr, writes = p.write_count(), "backend unhealthy, weight 0 until it recovers: {}", t.reason);
                        }
                    }
                    Err(e) => error!(%vip, backend = %addr, "applying a health change failed: {}", crate::error_chain(&e)),
                }
                Reload::No
            }
            _ = passive_tick.tick() => {
                if !passive.round(&mut agent, &ptx, &m) {
                    continue;
                }
                Reload::No
            }
            Some((target, result)) = prx.recv() => {
                passive.probed(&mut agent, target, result, &m);
                Reload::No
            }
            _ = hup.recv() => { info!("SIGHUP: reloading"); Reload::File }
            Some(()) = frx.recv() => {
                // Coalesce the burst of events one save makes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while frx.try_recv().is_ok() {}
                info!("{} changed: reloading", opts.config.display());
                Reload::File
            }
            Some(()) = krx.recv() => {
                // Coalesce a burst of watch events (a rollout changes many slices at once).
                tokio::time::sleep(Duration::from_millis(100)).await;
                while krx.try_recv().is_ok() {}
                Reload::Kube
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let next = match reload {
            Reload::No => None,
            Reload::File => Some(load_file(&opts).map(|f| {
                if let Some(k) = &mut kube {
                    // The node's addresses decide which families are served: translate again.
                    k.settings.source_v4 = f.node.spec.source_v4.is_some();
                    k.settings.source_v6 = f.node.spec.source_v6.is_some();
                }
                let vips = kube.as_mut().map(|k| k.translate());
                let c = compose(&f, vips.as_deref());
                file = f;
                c
            })),
            Reload::Kube => kube.as_mut().map(|k| {
                let vips = k.translate();
                Ok(compose(&file, Some(&vips)))
            }),
        };
        if let Some(next) = next {
            let from_kube = matches!(reload, Reload::Kube);
            let result = next.and_then(|c| {
                let interfaces_changed = c.node.interfaces != agent.config().node.interfaces
                    || c.node.xdp_mode != agent.config().node.xdp_mode;
                let p = agent.replace_config(c)?;
                Ok((p, interfaces_changed))
            });
            if let Some(k) = &mut kube {
                k.report(&result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
            }
            match result {
                Ok((p, interfaces_changed)) => {
                    for w in &agent.config().warnings {
                        warn!("{w}");
                    }
                    if interfaces_changed {
                        let node = agent.config().node.clone();
                        if let Err(e) = sync_interfaces(&mut agent.dp, &opts.pin_dir, &node) {
                            error!("changing interfaces: {e:#}");
                        }
                    }
                    checks.sync(agent.config(), |t: &Target| agent.is_healthy(t));
                    m.reloads_ok.fetch_add(1, Ordering::Relaxed);
                    m.map_writes
                        .fetch_add(p.write_count() as u64, Ordering::Relaxed);
                    if !from_kube || !p.is_empty() {
                        info!(
                            writes = p.write_count(),
                            vips = agent.config().vips.len(),
                            "{} applied",
                            if from_kube {
                                "cluster change"
                            } else {
                                "config"
                            }
                        );
                    }
                }
                Err(e) => {
                    m.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                    error!(
                        "{} rejected, the previous state keeps serving: {e:#}",
                        if from_kube {
                            "cluster change"
                        } else {
                            "config"
                        }
                    );
                }
            }
        }
        if let Err(e) = write_status(&opts, &agent, &m) {
            warn!("writing the status file: {e:#}");
        }
    }
    drop(checks);
    if let Some(t) = metrics_task {
        t.abort();
    }
    info!(
        "exiting: the program stays attached and the maps pinned in {} (traffic keeps flowing); `lb down` removes them",
        opts.pin_dir.display()
    );
    Ok(())
}

/// `lb down`: detaches the program from every interface it was pinned to and removes the pins.
pub fn down(pin_dir: &Path, state_dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for (ifname, _) in pinned_links(pin_dir) {
        detach(pin_dir, &ifname)?;
        done.push(format!("detached from {ifname}"));
    }
    for name in lb_common::maps::ALL {
        let p = pin_dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            done.push(format!("removed {}", p.display()));
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir).with_context(|| {
            format!(
                "removing {} (something else is pinned there?)",
                pin_dir.display()
            )
        })?;
    }
    let _ = std::fs::remove_file(status_path(state_dir));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[tokio::test]
    async fn a_configmap_update_is_seen() {
        // What the kubelet does: node.yaml -> ..data/node.yaml, ..data -> ..v1; an update writes
        // ..v2 and renames a new link over ..data.
        let dir = std::env::temp_dir().join(format!("lb-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for v in ["..v1", "..v2"] {
            std::fs::create_dir_all(dir.join(v)).unwrap();
            std::fs::write(dir.join(v).join("node.yaml"), v).unwrap();
        }
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/node.yaml", dir.join("node.yaml")).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let _w = watch(&dir.join("node.yaml"), tx).unwrap();
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(seen, Ok(Some(()))), "the swap was not noticed");
    }
}
