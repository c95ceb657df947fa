//! `lb run`: the agent's event loop on a bare host.
//!
//! Starts from the config (a config with problems at startup is an error: there is no last good
//! state to keep), adopts or creates the pinned maps, attaches the program to the configured
//! interfaces (re-using pinned links, see [`crate::kernel::links`]), reconciles, then reacts to health
//! transitions, SIGHUP and changes of the config file. A start or reload that fails changes
//! nothing: a start that fails removes what it pinned and detaches what it attached; a new
//! config with problems is logged and refused, and the previous one keeps serving. One agent at a
//! time holds the pin dir ([`crate::kernel::pindir`]). On SIGTERM or Ctrl-C the agent exits and leaves the
//! program attached and the maps pinned: traffic keeps flowing, and the next agent adopts them.
//! `lb down` removes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use notify::Watcher as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    agent::health,
    agent::reconcile::{Agent, Remembered, Target},
    kernel::announce,
    kernel::dataplane::kernel::KernelDataplane,
    kernel::links,
    kernel::migrate,
    kernel::nexthop,
    kernel::pindir::{self, PinLock},
    model::plan::Plan,
    observe::metrics::{self, AgentMetrics},
    sources::config::{Config, VipConfig},
    sources::k8s::{Kube, KubeOptions, rollout::OwnDaemonSet, translate::Settings},
    sources::overrides,
    status::file::{BackendStatus, Status, VipStatus, read_status, status_path},
    status::life::{AgentStatus, Life, StartStatus},
};

/// What stopped `lb run` (at start) or `lb down`, or made a reload fail.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config or the command line asks for what cannot be (the message says what to change).
    #[error("{0}")]
    Refused(String),
    /// A step that failed: `doing` says which, `source` why.
    #[error("{doing}")]
    Step {
        doing: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Agent(#[from] crate::agent::reconcile::AgentError),
    #[error(transparent)]
    Config(#[from] crate::sources::config::ConfigError),
    #[error(transparent)]
    Dataplane(#[from] crate::kernel::dataplane::DataplaneError),
    #[error(transparent)]
    Inspect(#[from] crate::kernel::inspect::InspectError),
    #[error(transparent)]
    Kube(#[from] crate::sources::k8s::source::KubeError),
    #[error(transparent)]
    Migrate(#[from] crate::kernel::migrate::MigrateError),
    #[error(transparent)]
    Overrides(#[from] crate::sources::overrides::OverridesError),
    #[error(transparent)]
    PinDir(#[from] crate::kernel::pindir::PinDirError),
    #[error(transparent)]
    Mode(#[from] crate::kernel::xdpmode::Refused),
    #[error(transparent)]
    Uplink(#[from] crate::sources::uplink::UplinkError),
    #[error(transparent)]
    Link(#[from] crate::kernel::links::LinkError),
    #[error(transparent)]
    Watch(#[from] notify::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = RunError> = std::result::Result<T, E>;

/// Names the step an error failed, as [`RunError::Step`].
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Doing<T> for std::result::Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| RunError::Step {
            doing: what(),
            source: Box::new(e),
        })
    }
}

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
    if let Some(up) = crate::sources::uplink::fill(&mut c.node)? {
        info!(
            interface = %up.name,
            "node.interfaces not set: attaching to {}, the interface of the {} default route",
            up.name,
            up.family
        );
    }
    for a in &opts.sources {
        match a {
            std::net::IpAddr::V4(a) => c.node.spec.source_v4 = Some(*a),
            std::net::IpAddr::V6(a) => c.node.spec.source_v6 = Some(*a),
        }
    }
    if opts.kubernetes.is_some() && !c.vips.is_empty() {
        return Err(RunError::Refused(format!(
            "{} lists {} VIP(s), but with --kubernetes VIPs come from Services: keep only `node:` in it",
            opts.config.display(),
            c.vips.len()
        )));
    }
    Ok(c)
}

/// What woke the loop up.
enum Reload {
    No,
    File,
    Kube,
    /// `lb drain`, `lb weight`... changed the overrides (SIGUSR1).
    Overrides,
}

impl Reload {
    /// What the log calls a reload of this kind, and the status file's source of it.
    fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Reload::Kube => ("cluster change", "cluster"),
            Reload::Overrides => ("overrides", "overrides"),
            _ => ("config", "config"),
        }
    }
}

/// A backend's passive health: its members' counters added up, and the longest failure streak
/// among them (the program keeps them per member, that is per VIP).
fn backend_passive(
    agent: &Agent<KernelDataplane>,
    ids: &[u32],
) -> Result<lb_common::PassiveHealth, crate::kernel::dataplane::DataplaneError> {
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

/// Least connections: the weights of the members of least-connections VIPs in
/// `LB_MEMBER_CONNS`, and their counts corrected from a recount of the live entries
/// ([`crate::leastconn`]), every [`crate::kernel::leastconn::RECOUNT_INTERVAL`] and after each reload.
/// Nothing is read while no VIP balances by least connections.
#[derive(Default)]
struct LeastConn {
    /// The weights written, by member id.
    written: BTreeMap<u32, u32>,
}

impl LeastConn {
    fn round(&mut self, agent: &Agent<KernelDataplane>, pin_dir: &std::path::Path) {
        let vips = crate::kernel::leastconn::vip_ids(agent.state());
        if vips.is_empty() {
            self.written.clear();
            return;
        }
        let weights = crate::kernel::leastconn::weights(
            agent.config().vips.iter().map(|v| &v.spec),
            agent.state(),
        );
        let max = agent.config().node.sizes.max_backends;
        let started = std::time::Instant::now();
        let result = crate::kernel::leastconn::ConnsMap::open(pin_dir, max)
            .map_err(|e| crate::error_chain(&e))
            .and_then(|conns| {
                let pinned = crate::kernel::inspect::Pinned::open(pin_dir)
                    .map_err(|e| crate::error_chain(&e))?;
                crate::kernel::leastconn::round(&conns, &pinned, &weights, &vips, &mut self.written)
                    .map_err(|e| crate::error_chain(&e))
            });
        match result {
            Ok(c) => debug!(
                corrected = c.members,
                drift = c.drift,
                took_us = started.elapsed().as_micros() as u64,
                "least connections: recounted the live entries"
            ),
            Err(e) => warn!("least connections: recount: {e}"),
        }
    }
}

/// Passive health checking: watches each checked backend's failure streak in the maps, takes
/// it out at the threshold, and probes it back in.
#[derive(Default)]
struct Passive {
    /// Targets out, and when to probe them next.
    next_probe: BTreeMap<Target, tokio::time::Instant>,
    probing: BTreeSet<Target>,
    /// The thresholds written to `LB_MEMBER_HOLD`, by member id (None: none written yet).
    holds: Option<BTreeMap<u32, u32>>,
}

impl Passive {
    /// Writes each member's failure threshold (0 for members without passive health) where it
    /// differs from what was written; every member's the first time (a previous agent's may be
    /// there).
    fn sync_holds(&mut self, agent: &mut Agent<KernelDataplane>) {
        let want: BTreeMap<u32, u32> = agent
            .passive_targets()
            .iter()
            .flat_map(|pt| pt.ids.iter().map(|id| (*id, pt.check.failures)))
            .collect();
        let had = self.holds.take();
        let ids: BTreeSet<u32> = match &had {
            None => (0..agent.config().node.sizes.max_backends).collect(),
            Some(h) => h.keys().chain(want.keys()).copied().collect(),
        };
        for id in ids {
            let w = want.get(&id).copied().unwrap_or(0);
            let written = had.as_ref().map(|h| h.get(&id).copied().unwrap_or(0));
            if written != Some(w)
                && let Err(e) = agent.dp.set_member_hold(id, w)
            {
                warn!("{}", crate::error_chain(&e));
            }
        }
        self.holds = Some(want);
    }

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
                let vip = crate::model::desired::vip_label(&t.0);
                let started = std::time::Instant::now();
                match agent.set_passive_out(t, true) {
                    Ok(plan) => {
                        m.map_writes
                            .fetch_add(plan.write_count() as u64, Ordering::Relaxed);
                        warn!(
                            %vip, backend = %t.1, refused = p.refused, unreachable = p.unreachable,
                            syn_timeouts = p.syn_timeouts, applied_in_ms = started.elapsed().as_millis(),
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
        let vip = crate::model::desired::vip_label(&t.0);
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

fn write_status(
    opts: &RunOptions,
    agent: &Agent<KernelDataplane>,
    m: &AgentMetrics,
    life: &Life,
) -> Result<()> {
    let c = agent.config();
    let overrides = m.overrides.lock().expect("overrides lock");
    let desired = agent.desired();
    let mut health_rows = Vec::new();
    let reloads = (
        m.reloads_ok.load(Ordering::Relaxed),
        m.reloads_rejected.load(Ordering::Relaxed),
    );
    let status = Status {
        agent: Some(AgentStatus {
            last_migration: m.migration.lock().expect("migration lock").clone(),
            ..life.status(&c.node, &agent.dp.xdp, opts.kubernetes.is_some(), reloads)
        }),
        nexthops: m.nexthops.lock().expect("nexthops lock").clone(),
        announce: m.announce.lock().expect("announce lock").clone(),
        config: opts.config.display().to_string(),
        vips: c
            .vips
            .iter()
            .zip(&desired.vips)
            .map(|(v, d)| VipStatus {
                name: v.spec.name.clone(),
                vip: v.spec.label(),
                mode: v.spec.mode,
                backends: v
                    .spec
                    .backends
                    .iter()
                    .zip(&d.backends)
                    .map(|(b, effective)| {
                        let healthy = v
                            .health_check
                            .as_ref()
                            .map(|_| agent.is_healthy(&(v.spec.key(), b.address)));
                        if let Some(h) = healthy {
                            let at = crate::model::view::endpoint(b.address, b.port, v.spec.port);
                            health_rows.push((v.spec.label(), at.to_string(), h));
                        }
                        BackendStatus {
                            address: b.address.to_string(),
                            port: b.port,
                            weight: b.weight,
                            effective_weight: effective.weight,
                            healthy,
                            health_reason: healthy
                                .and_then(|_| life.health_reason(v.spec.label(), b.address)),
                            passive_out: agent.is_passive_out(&(v.spec.key(), b.address)),
                            overridden: overrides.find(&v.spec.label(), b.address).cloned(),
                            backup: b.backup.clone(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    };
    *m.health.lock().expect("health lock") = health_rows;
    *m.vips.lock().expect("vips lock") = status.vips.clone();
    std::fs::create_dir_all(&opts.state_dir)
        .doing(|| format!("creating {}", opts.state_dir.display()))?;
    let path = status_path(&opts.state_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&status)?)?;
    std::fs::rename(&tmp, &path).doing(|| format!("writing {}", path.display()))?;
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
        .doing(|| format!("watching {}", dir.display()))?;
    Ok(w)
}

/// The config to serve now: `file`'s node settings with, under Kubernetes, the cluster's VIPs
/// translated for the node's addresses in `file` (which decide the families served).
fn compose_now(file: &Config, kube: Option<&mut Kube>) -> Config {
    let vips = kube.map(|k| {
        k.settings.source_v4 = file.node.spec.source_v4.is_some();
        k.settings.source_v6 = file.node.spec.source_v6.is_some();
        k.translate()
    });
    compose(file, vips.as_deref())
}

/// Logs what an applied reload changed (see [`crate::agent::changes`]), at most
/// [`crate::agent::changes::MAX_LINES`] lines.
fn log_changes(before: &Config, after: &Config) {
    let lines = crate::agent::changes::between(before, after);
    for l in lines.iter().take(crate::agent::changes::MAX_LINES) {
        info!("changed: {l}");
    }
    if lines.len() > crate::agent::changes::MAX_LINES {
        info!(
            "changed: {} more",
            lines.len() - crate::agent::changes::MAX_LINES
        );
    }
}

/// `c` with the overrides kept in the state dir laid over it (see [`overrides`]).
fn overridden(state_dir: &Path, mut c: Config) -> Result<(Config, overrides::Applied)> {
    let applied = overrides::load(state_dir)?.apply(&mut c);
    Ok((c, applied))
}

/// Once a config with `applied` is accepted: the file records it, the status shows it.
fn settle_overrides(state_dir: &Path, applied: overrides::Applied, m: &AgentMetrics) {
    for c in &applied.cleared {
        info!(vip = %c.was.vip, backend = %c.was.backend, "override cleared: {}", c.why);
    }
    if let Err(e) = overrides::settle(state_dir, &applied) {
        warn!("recording the overrides: {}", crate::error_chain(&e));
    }
    *m.overrides.lock().expect("overrides lock") = applied.kept;
}

/// Health as the previous agent left it in its status file, for the VIPs of `config`: so a
/// restart does not send new flows to a backend known to be down or taken out while its checks
/// warm up.
fn remembered(status: Option<Status>, config: &Config) -> Remembered {
    let mut r = Remembered::default();
    for v in status.iter().flat_map(|s| &s.vips) {
        let Some(c) = config.vips.iter().find(|c| c.spec.label() == v.vip) else {
            continue;
        };
        let key = c.spec.key();
        for b in &v.backends {
            let Ok(addr) = b.address.parse() else {
                continue;
            };
            if b.healthy == Some(false) {
                r.unhealthy.push((key, addr));
            }
            if b.passive_out {
                r.passive_out.push((key, addr));
            }
        }
    }
    r
}

/// Switches the agent to `c`, or refuses it and changes nothing. Other sizes are a migration
/// ([`resize`]). Otherwise, if the interfaces, `xdp_mode` or the mode it gives an interface
/// changed (see [`crate::kernel::xdpmode`]), the attachments change first (all or nothing, every name
/// resolved first), then the maps (and the attachments go back if the maps refuse). An unchanged
/// list whose names no longer resolve is not looked at: an interface gone from the host does
/// not block VIP changes.
fn apply(
    agent: &mut Agent<KernelDataplane>,
    pin_dir: &Path,
    c: Config,
    m: &AgentMetrics,
) -> Result<Plan> {
    if c.node.sizes != agent.config().node.sizes {
        return resize(agent, pin_dir, c, m);
    }
    let old = &agent.config().node;
    let relink = c.node.interfaces != old.interfaces
        || c.node.xdp_mode != old.xdp_mode
        || (links::resolve(&c.node.interfaces).is_ok()
            && links::modes_changed(&agent.dp, &c.node.interfaces, c.node.xdp_mode)?);
    let changes = match relink {
        true => Some(links::sync(
            &mut agent.dp,
            pin_dir,
            &c.node.interfaces,
            c.node.xdp_mode,
        )?),
        false => None,
    };
    agent.replace_config(c).map_err(|e| {
        if let Some(changes) = changes {
            changes.revert(&mut agent.dp, pin_dir);
        }
        e.into()
    })
}

/// A reload that changes sizes: the maps migrate into maps of the new sizes while the old
/// program serves (see [`migrate`]), `c` is applied to them, and the new program is swapped into
/// the links. A failure before the swap leaves the old program, its maps and the old config
/// serving; one during the swaps puts the old program back into the links.
fn resize(
    agent: &mut Agent<KernelDataplane>,
    pin_dir: &Path,
    c: Config,
    m: &AgentMetrics,
) -> Result<Plan> {
    let failed = || m.migrations_failed.fetch_add(1, Ordering::Relaxed);
    let old_config = agent.config().clone();
    let sizes = c.node.sizes.clone();
    let this = Some(env!("CARGO_PKG_VERSION").to_string());
    let loaded = migrate::load(&sizes, pin_dir, "reload", this).inspect_err(|_| {
        failed();
    })?;
    let dp = KernelDataplane::new(loaded.ebpf, sizes.clone())?;
    let old_dp = agent.replace_dataplane(dp, sizes)?;
    // The old maps and config again (the old maps never saw the new config: nothing to write).
    let back = |agent: &mut Agent<KernelDataplane>, old_dp| {
        failed();
        if let Err(e) = agent.replace_dataplane(old_dp, old_config.node.sizes.clone()) {
            error!("going back to the old maps: {}", crate::error_chain(&e));
        }
        if let Err(e) = agent.replace_config(old_config.clone()) {
            error!("going back to the old config: {}", crate::error_chain(&e));
        }
    };
    let plan = match agent.replace_config(c) {
        Ok(p) => p,
        Err(e) => {
            back(agent, old_dp);
            return Err(e).doing(|| "applying the config to the migrated maps".into());
        }
    };
    let node = agent.config().node.clone();
    let mut pending = loaded.pending;
    if let Some(p) = &mut pending
        && let Err(e) = p.catch_up(&mut agent.dp.ebpf)
    {
        back(agent, old_dp);
        return Err(e).doing(|| "copying what the old program wrote meanwhile".into());
    }
    if let Err(e) = links::sync(&mut agent.dp, pin_dir, &node.interfaces, node.xdp_mode) {
        if let Some(p) = &pending {
            p.release_hold(&mut agent.dp.ebpf);
        }
        back(agent, old_dp);
        if let Err(e) = links::sync(
            &mut agent.dp,
            pin_dir,
            &old_config.node.interfaces,
            old_config.node.xdp_mode,
        ) {
            error!("swapping the old program back: {}", crate::error_chain(&e));
        }
        return Err(e).doing(|| "swapping the migrated program in".into());
    }
    if let Some(pending) = pending {
        let report = pending
            .finish(&mut agent.dp.ebpf)
            .doing(|| "finishing the migration after the swap".into())?;
        m.migrated(report);
    }
    drop(old_dp);
    Ok(plan)
}

/// Applies a health transition, unless it is stale (its check was replaced since).
fn on_health(
    agent: &mut Agent<KernelDataplane>,
    checks: &health::Checks,
    t: health::Transition,
    m: &AgentMetrics,
) {
    let (key, addr) = t.target;
    let vip = crate::model::desired::vip_label(&key);
    if !checks.is_current(&t) {
        info!(%vip, backend = %addr, "ignoring a health change from a check replaced by a reload");
        return;
    }
    match agent.set_health(t.target, t.healthy) {
        Ok(p) => {
            m.map_writes
                .fetch_add(p.write_count() as u64, Ordering::Relaxed);
            if t.healthy {
                info!(%vip, backend = %addr, writes = p.write_count(), "backend healthy again: {}", t.reason);
            } else {
                warn!(%vip, backend = %addr, writes = p.write_count(), "backend unhealthy, weight 0 until it recovers: {}", t.reason);
            }
        }
        Err(e) => {
            error!(%vip, backend = %addr, "applying a health change failed: {}", crate::error_chain(&e))
        }
    }
}

/// The next-hop keeper and its netlink events; without a netlink socket (logged), nothing is
/// resolved and the program routes every packet with `bpf_fib_lookup`.
struct Nexthops {
    keeper: Option<nexthop::Keeper>,
    events: mpsc::Receiver<()>,
    _watch: Option<tokio::task::JoinHandle<()>>,
}

impl Nexthops {
    fn start() -> Self {
        let (tx, events) = mpsc::channel(1);
        let watch = nexthop::watch(tx)
            .map_err(|e| {
                warn!(
                    "watching routes and neighbours: {}; next hops are refreshed every {:?} only",
                    crate::error_chain(&e),
                    nexthop::REFRESH_INTERVAL
                )
            })
            .ok();
        let keeper = nexthop::Keeper::new()
            .map_err(|e| error!("the next-hop resolver cannot start, the program routes every packet itself: {}", crate::error_chain(&e)))
            .ok();
        Self {
            keeper,
            events,
            _watch: watch,
        }
    }

    async fn refresh(&mut self, agent: &mut Agent<KernelDataplane>, m: &AgentMetrics) {
        let Some(k) = &mut self.keeper else { return };
        let (members, node) = (agent.state().members.clone(), agent.state().node);
        k.refresh(&members, &node, &mut agent.dp).await;
        *m.nexthops.lock().expect("nexthops lock") = k.status.clone();
    }
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut life = Life::default();
    let file = load_file(&opts)?;
    for w in &file.warnings {
        warn!("{w}");
    }
    // A start that fails changes nothing. What can be checked is, before any pin is touched:
    // the config, the interfaces (and that an explicit native XDP delivers on each), the pin
    // dir's filesystem and, under Kubernetes, the first full list of every resource (the maps a previous agent left keep serving meanwhile, and an agent
    // stopped while it waits leaves nothing behind).
    let interfaces = links::resolve(&file.node.interfaces)?;
    crate::kernel::xdpmode::choose(file.node.xdp_mode, &interfaces)?;
    pindir::check_bpffs(&opts.pin_dir)?;
    std::fs::create_dir_all(&opts.state_dir)
        .doing(|| format!("creating {}", opts.state_dir.display()))?;
    let (ktx, krx) = mpsc::channel::<()>(1);
    // The first list may take long (an API server away): a second agent is refused before it.
    PinLock::free(&opts.pin_dir)?;
    let kube = match &opts.kubernetes {
        Some(k) => Some(first_list(k, &file, ktx).await?),
        None => None,
    };
    // From here on a SIGTERM waits for the loop, so that a start it interrupts still ends as
    // any stop does (announcements withdrawn, status written); before, nothing was changed.
    let signals = Signals::install(&opts.config)?;
    let lock = PinLock::take(&opts.pin_dir)?;
    let before = pindir::Before::record(&lock);
    let m = Arc::new(AgentMetrics::default());
    let Started {
        mut agent,
        kube,
        metrics_task,
        report,
    } = match start(&opts, &file, kube, &m).await {
        Ok(s) => s,
        Err(e) => {
            before.restore();
            return Err(e);
        }
    };
    life.start = Some(report);
    life.kubernetes_skipped = kube.as_ref().map_or(Vec::new(), |k| k.skipped().to_vec());
    let mut nexthops = Nexthops::start();
    nexthops.refresh(&mut agent, &m).await;
    if let Err(e) = write_status(&opts, &agent, &m, &life) {
        warn!("writing the status file: {}", crate::error_chain(&e));
    }
    expect_links(&m, &opts.pin_dir, &agent);
    m.ready.store(true, Ordering::Relaxed);
    let serve = Serve {
        opts: &opts,
        m: &m,
        agent,
        file,
        kube,
        nexthops,
        life,
    };
    let uninstalled = serve.serve(krx, signals).await?;
    if let Some(t) = metrics_task {
        t.abort();
    }
    if uninstalled {
        drop(lock);
        info!("the agent's DaemonSet is deleted (uninstalled): detaching and removing the pins");
        for d in down(&opts.pin_dir, &opts.state_dir)? {
            info!("{d}");
        }
        return Ok(());
    }
    info!(
        "exiting: the program stays attached and the maps pinned in {} (traffic keeps flowing); `lb down` removes them",
        opts.pin_dir.display()
    );
    drop(lock);
    Ok(())
}

/// Connects to Kubernetes and waits for the first full list of Services, EndpointSlices and
/// UpstreamPolicies: nothing is written before it.
async fn first_list(k: &KubeOptions, file: &Config, changed: mpsc::Sender<()>) -> Result<Kube> {
    let sizes = &file.node.sizes;
    let settings = Settings {
        class: k.class.clone(),
        node_name: k.node_name.clone(),
        zone: None,
        table_size: sizes.table_size,
        max_vips: sizes.max_vips,
        max_backends: sizes.max_backends,
        source_v4: file.node.spec.source_v4.is_some(),
        source_v6: file.node.spec.source_v6.is_some(),
    };
    let kube = Kube::start(k, settings, changed).await?;
    info!(class = %k.class, node = %k.node_name, "waiting for the first list of Services, EndpointSlices and UpstreamPolicies");
    kube.ready().await;
    Ok(kube)
}

/// A started agent: its maps hold the config, its program is attached.
struct Started {
    agent: Agent<KernelDataplane>,
    kube: Option<Kube>,
    metrics_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// What the start did with the maps, for the status file.
    report: StartStatus,
}

/// Everything a start changes, with the pin dir locked: loads (or adopts) the program and its
/// maps, serves metrics, attaches, applies the config. On error the caller removes new pins.
async fn start(
    opts: &RunOptions,
    file: &Config,
    mut kube: Option<Kube>,
    m: &Arc<AgentMetrics>,
) -> Result<Started> {
    let listener = match file.node.metrics_listen {
        Some(addr) => Some((
            addr,
            tokio::net::TcpListener::bind(addr)
                .await
                .doing(|| format!("node.metrics_listen: listening on {addr}"))?,
        )),
        None => None,
    };
    let sizes = file.node.sizes.clone();
    let previous = read_status(&opts.state_dir);
    let from = previous_release(previous.as_ref());
    let loaded = migrate::load(&sizes, &opts.pin_dir, "start", from).inspect_err(|e| {
        if matches!(
            e,
            migrate::MigrateError::Create(_) | migrate::MigrateError::Copy(_)
        ) {
            m.migrations_failed.fetch_add(1, Ordering::Relaxed);
        }
    })?;
    let adopted = loaded.report.is_some();
    let dp = KernelDataplane::new(loaded.ebpf, sizes.clone())?;
    let (config, applied) = overridden(&opts.state_dir, compose_now(file, kube.as_mut()))?;
    // What a previous agent announced stays in the status until this one decides.
    *m.announce.lock().expect("announce lock") = previous.as_ref().and_then(|s| s.announce.clone());
    let memory = remembered(previous, &config);
    let mut agent = Agent::adopt(dp, config, &memory).doing(|| "reading the maps".into())?;
    let (plan, report) = first_apply(&mut agent, &opts.pin_dir, loaded.pending, loaded.report)?;
    if let Some(r) = report {
        info!(
            from = r.from_release.as_deref().unwrap_or("unknown"),
            to = %r.to_release,
            duration_ms = r.duration_ms,
            "pins adopted: {}",
            r.summary()
        );
        m.migrated(r);
    }
    let metrics_task = match listener {
        Some((addr, listener)) => Some(serve_metrics(addr, listener, &opts.pin_dir, m)?),
        None => None,
    };
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
    m.applied();
    settle_overrides(&opts.state_dir, applied, m);
    Ok(Started {
        agent,
        kube,
        metrics_task,
        report: StartStatus {
            adopted,
            map_writes: plan.write_count() as u64,
        },
    })
}

/// Applies the config to the maps of a start, in the order that keeps traffic flowing: without
/// a migration (`pending` None), attaches first and then writes the maps; after one, gives the
/// migrated maps the config before the new program is swapped in. The plan applied, and the
/// start's report of the pins (`report`, or the finished migration's).
fn first_apply(
    agent: &mut Agent<KernelDataplane>,
    pin_dir: &Path,
    pending: Option<migrate::Pending>,
    report: Option<migrate::Migration>,
) -> Result<(Plan, Option<migrate::Migration>)> {
    let node = agent.config().node.clone();
    Ok(match pending {
        // Attach first, then write the maps: a program attached on maps a previous agent left
        // (or on empty ones) serves as before, and failing to attach (a driver without native
        // XDP, say) then leaves the maps untouched.
        None => {
            let changes = links::sync(&mut agent.dp, pin_dir, &node.interfaces, node.xdp_mode)?;
            match agent.reconcile() {
                Ok(p) => (p, report),
                Err(e) => {
                    changes.revert(&mut agent.dp, pin_dir);
                    return Err(e).doing(|| "applying the config".into());
                }
            }
        }
        // Entries moved into new maps: they get the config before they serve (nothing of the
        // old program's changed yet if this fails), then the new program is swapped in.
        Some(mut pending) => {
            let plan = agent
                .reconcile()
                .doing(|| "applying the config to the migrated maps".into())?;
            pending.catch_up(&mut agent.dp.ebpf)?;
            let changes = match links::sync(&mut agent.dp, pin_dir, &node.interfaces, node.xdp_mode)
            {
                Ok(c) => c,
                Err(e) => {
                    pending.release_hold(&mut agent.dp.ebpf);
                    return Err(e.into());
                }
            };
            // From the swap on the new maps are the state: what fails after it is said in the
            // report (and counted), and the agent serves on.
            let _ = changes;
            let report = pending.finish(&mut agent.dp.ebpf)?;
            (plan, Some(report))
        }
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` from now on.
fn serve_metrics(
    addr: std::net::SocketAddr,
    listener: tokio::net::TcpListener,
    pin_dir: &Path,
    m: &Arc<AgentMetrics>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let scraper = metrics::Scraper::open(pin_dir, m.clone())?;
    Ok(tokio::spawn(metrics::serve(listener, scraper, m.clone())))
}

/// The release of the agent that wrote `status`: its own word, or 0.1.0 for a status without
/// one (0.1.0 wrote none; the builds before it had other map layouts, which a load refuses).
fn previous_release(status: Option<&Status>) -> Option<String> {
    let agent = status?.agent.as_ref()?;
    Some(match agent.release.is_empty() {
        true => "0.1.0".to_string(),
        false => agent.release.clone(),
    })
}

/// Tells `/readyz` which interfaces must hold the program.
fn expect_links(m: &AgentMetrics, pin_dir: &Path, agent: &Agent<KernelDataplane>) {
    *m.links.lock().expect("links lock") = links::Expected {
        pin_dir: pin_dir.to_path_buf(),
        interfaces: agent.config().node.interfaces.clone(),
    };
}

/// Announces or withdraws VIPs for what the maps now hold (see [`crate::kernel::announce`]).
async fn announce_update(
    k: &mut announce::Keeper,
    agent: &Agent<KernelDataplane>,
    m: &AgentMetrics,
) {
    k.update(agent.config().node.announce.as_ref(), agent.state())
        .await;
    *m.announce.lock().expect("announce lock") = k.status();
}

/// What the event loop hears from outside: signals (SIGHUP reloads, SIGUSR1 applies changed
/// overrides, SIGTERM and SIGINT stop it), and saves of the config file. Installed
/// before the start, so that a config saved while the agent starts is reloaded once it serves,
/// and so that the status file it writes once it serves means the file is watched.
struct Signals {
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    config: mpsc::Receiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl Signals {
    fn install(config: &Path) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<()>(8);
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            config: rx,
            _watcher: watch(config, tx)?,
        })
    }
}

/// What the event loop starts from: the started agent and what [`run`] set up around it.
struct Serve<'a> {
    opts: &'a RunOptions,
    m: &'a AgentMetrics,
    agent: Agent<KernelDataplane>,
    /// The last accepted config file: the base of every cluster change.
    file: Config,
    kube: Option<Kube>,
    nexthops: Nexthops,
    life: Life,
}

/// What the event loop waits on, besides the agent's own next-hop events.
struct Inputs {
    signals: Signals,
    /// The cluster changed.
    krx: mpsc::Receiver<()>,
    /// Active health transitions.
    hrx: mpsc::Receiver<health::Transition>,
    /// Passive health probes' answers.
    prx: mpsc::Receiver<(Target, Result<(), String>)>,
    passive_tick: tokio::time::Interval,
    nexthop_tick: tokio::time::Interval,
    /// Least connections' recount.
    least_tick: tokio::time::Interval,
}

/// The event loop: [`Serve`] and what it keeps in step with the agent's config (the
/// announcements, the active and passive health checks).
struct Loop<'a> {
    s: Serve<'a>,
    announce: announce::Keeper,
    checks: health::Checks,
    passive: Passive,
    least: LeastConn,
    events: health::events::Events,
    ptx: mpsc::Sender<(Target, Result<(), String>)>,
}

/// What one wake-up of the loop asks for.
enum Wake {
    /// Nothing the rest of the round need see.
    Quiet,
    /// A round: a reload (or none), and whether the next hops are due for a refresh.
    Round { reload: Reload, refresh: bool },
    /// SIGTERM or SIGINT.
    Stop,
}

impl<'a> Serve<'a> {
    /// The event loop: health transitions, passive health, reloads, until SIGTERM or SIGINT.
    /// Returns whether the agent was uninstalled (`--down-when-deleted`: its DaemonSet is gone);
    /// when that DaemonSet now runs an older release (a rollback), leaves the pins as that
    /// release reads them first.
    async fn serve(self, krx: mpsc::Receiver<()>, signals: Signals) -> Result<bool> {
        let (mut lp, mut inputs) = self.begin(krx, signals).await;
        loop {
            let members = lp.s.agent.state().members.clone();
            let (reload, refresh) = match lp.wait(&mut inputs).await {
                Wake::Stop => break,
                Wake::Quiet => continue,
                Wake::Round { reload, refresh } => (reload, refresh),
            };
            lp.reload(reload);
            // After any applied plan that changed the members, and on netlink events and ticks.
            if refresh || lp.s.agent.state().members != members {
                lp.s.nexthops.refresh(&mut lp.s.agent, lp.s.m).await;
            }
            announce_update(&mut lp.announce, &lp.s.agent, lp.s.m).await;
            if let Some(k) = &lp.s.kube {
                lp.s.life.kubernetes_skipped = k.skipped().to_vec();
            }
            lp.s.write_status();
        }
        lp.finish().await
    }

    fn write_status(&self) {
        if let Err(e) = write_status(self.opts, &self.agent, self.m, &self.life) {
            warn!("writing the status file: {}", crate::error_chain(&e));
        }
    }

    /// Announces (once the maps hold the first desired state; withdrawn on the way out),
    /// starts the health checks and the ticks, and says the loop runs.
    async fn begin(mut self, krx: mpsc::Receiver<()>, signals: Signals) -> (Loop<'a>, Inputs) {
        let m = self.m;
        let mut announce = announce::Keeper::new(m.announce.lock().expect("announce lock").clone());
        announce_update(&mut announce, &self.agent, m).await;
        let (htx, hrx) = mpsc::channel::<health::Transition>(256);
        let mut checks = health::Checks::new(htx.clone());
        checks.sync(self.agent.config(), |t: &Target| self.agent.is_healthy(t));
        let (ptx, prx) = mpsc::channel::<(Target, Result<(), String>)>(64);
        let mut passive = Passive::default();
        passive.sync_holds(&mut self.agent);
        let events = health::events::Events::take(&mut self.agent.dp);
        let mut passive_tick = tokio::time::interval(Duration::from_millis(250));
        passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nexthop_tick = tokio::time::interval(nexthop::REFRESH_INTERVAL);
        nexthop_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        nexthop_tick.reset();
        let mut least = LeastConn::default();
        least.round(&self.agent, &self.opts.pin_dir);
        let mut least_tick = tokio::time::interval(crate::kernel::leastconn::RECOUNT_INTERVAL);
        least_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(
            "running; SIGHUP or saving {} reloads it",
            self.opts.config.display()
        );
        self.life.event_loop = true;
        self.write_status();
        let inputs = Inputs {
            signals,
            krx,
            hrx,
            prx,
            passive_tick,
            nexthop_tick,
            least_tick,
        };
        let lp = Loop {
            s: self,
            announce,
            checks,
            passive,
            least,
            events,
            ptx,
        };
        (lp, inputs)
    }
}

impl Loop<'_> {
    /// Waits for the next event and acts on those that need no reload.
    async fn wait(&mut self, inputs: &mut Inputs) -> Wake {
        let Inputs {
            signals,
            krx,
            hrx,
            prx,
            passive_tick,
            nexthop_tick,
            least_tick,
        } = inputs;
        let m = self.s.m;
        let s = &mut self.s;
        let round = |reload| Wake::Round {
            reload,
            refresh: false,
        };
        tokio::select! {
            Some(()) = s.nexthops.events.recv() => {
                // Gather the burst of messages one change makes (a route and its neighbour...).
                tokio::time::sleep(nexthop::DEBOUNCE).await;
                while s.nexthops.events.try_recv().is_ok() {}
                Wake::Round { reload: Reload::No, refresh: true }
            }
            _ = nexthop_tick.tick() => Wake::Round { reload: Reload::No, refresh: true },
            _ = least_tick.tick() => {
                self.least.round(&s.agent, &s.opts.pin_dir);
                Wake::Quiet
            }
            Some(t) = hrx.recv() => {
                if self.checks.is_current(&t) {
                    s.life.health_changed(crate::model::desired::vip_label(&t.target.0), t.target.1, &t.reason);
                }
                on_health(&mut s.agent, &self.checks, t, m);
                round(Reload::No)
            }
            _ = passive_tick.tick() => match self.passive.round(&mut s.agent, &self.ptx, m) {
                false => Wake::Quiet,
                true => round(Reload::No),
            },
            Some((target, result)) = prx.recv() => {
                self.passive.probed(&mut s.agent, target, result, m);
                round(Reload::No)
            }
            // A connection attempt failed: its streak may have reached the threshold.
            _ = self.events.next() => match self.passive.round(&mut s.agent, &self.ptx, m) {
                false => Wake::Quiet,
                true => round(Reload::No),
            },
            _ = signals.hup.recv() => { info!("SIGHUP: reloading"); round(Reload::File) }
            _ = signals.usr1.recv() => round(Reload::Overrides),
            Some(()) = signals.config.recv() => {
                // Coalesce the burst of events one save makes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while signals.config.try_recv().is_ok() {}
                info!("{} changed: reloading", s.opts.config.display());
                round(Reload::File)
            }
            Some(()) = krx.recv() => {
                // Coalesce a burst of watch events (a rollout changes many slices at once).
                tokio::time::sleep(Duration::from_millis(100)).await;
                while krx.try_recv().is_ok() {}
                round(Reload::Kube)
            }
            _ = signals.term.recv() => Wake::Stop,
            _ = signals.int.recv() => Wake::Stop,
        }
    }

    /// The config to switch to for `reload`, and the file it comes from when the file was read
    /// again: that file becomes the base of later cluster changes only once it is accepted.
    fn candidate(&mut self, reload: &Reload) -> Option<Result<Candidate>> {
        let s = &mut self.s;
        let candidate = match reload {
            Reload::No => None,
            Reload::File => {
                Some(load_file(s.opts).map(|f| (compose_now(&f, s.kube.as_mut()), Some(f))))
            }
            Reload::Kube => s
                .kube
                .as_mut()
                .map(|k| Ok((compose_now(&s.file, Some(k)), None))),
            Reload::Overrides => Some(Ok((compose_now(&s.file, s.kube.as_mut()), None))),
        };
        candidate.map(|c| c.and_then(|(c, f)| Ok((overridden(&s.opts.state_dir, c)?, f))))
    }

    /// Applies what `reload` asks for, if anything: accepted, the checks follow the new config;
    /// refused, the previous state keeps serving.
    fn reload(&mut self, reload: Reload) {
        let Some(candidate) = self.candidate(&reload) else {
            return;
        };
        let s = &mut self.s;
        let before = s.agent.config().clone();
        let result = candidate
            .and_then(|((c, o), f)| Ok((apply(&mut s.agent, &s.opts.pin_dir, c, s.m)?, f, o)));
        if let Some(k) = &mut s.kube {
            k.report(
                &result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| crate::error_chain(e)),
            );
        }
        let (what, source) = reload.labels();
        match result {
            Ok(done) => self.accepted(&before, done, &reload),
            Err(e) => {
                let m = s.m;
                s.life.reloaded(source, Err(crate::error_chain(&e)));
                m.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                error!(
                    "{what} rejected, the previous state keeps serving: {}",
                    crate::error_chain(&e)
                );
            }
        }
    }

    /// After an accepted reload: the file it came from is the new base, and the overrides,
    /// passive health, checks, expected links and metrics follow the config now applied.
    fn accepted(
        &mut self,
        before: &Config,
        (p, file, o): (Plan, Option<Config>, overrides::Applied),
        reload: &Reload,
    ) {
        let (what, source) = reload.labels();
        let from_kube = matches!(reload, Reload::Kube);
        let s = &mut self.s;
        let m = s.m;
        if let Some(f) = file {
            s.file = f;
        }
        settle_overrides(&s.opts.state_dir, o, m);
        log_changes(before, s.agent.config());
        self.events.renew(&mut s.agent.dp);
        self.passive.sync_holds(&mut s.agent);
        self.least.round(&s.agent, &s.opts.pin_dir);
        for w in &s.agent.config().warnings {
            warn!("{w}");
        }
        self.checks
            .sync(s.agent.config(), |t: &Target| s.agent.is_healthy(t));
        expect_links(m, &s.opts.pin_dir, &s.agent);
        s.life.reloaded(source, Ok(()));
        m.reloads_ok.fetch_add(1, Ordering::Relaxed);
        m.applied();
        m.map_writes
            .fetch_add(p.write_count() as u64, Ordering::Relaxed);
        if !from_kube || !p.is_empty() {
            info!(
                writes = p.write_count(),
                vips = s.agent.config().vips.len(),
                "{what} applied"
            );
        }
    }

    /// The loop is over: stops the checks, withdraws the announcements, gives up the lease and,
    /// on a rollback, leaves the pins as the older release reads them. Whether the agent was
    /// uninstalled.
    async fn finish(self) -> Result<bool> {
        let Loop {
            mut s,
            mut announce,
            checks,
            passive: _passive,
            least: _least,
            events: _events,
            ptx: _ptx,
        } = self;
        drop(checks);
        announce.shutdown().await;
        let mut own = OwnDaemonSet::Unknown;
        if let Some(k) = &mut s.kube {
            k.release_lease().await;
            let ds = s
                .opts
                .kubernetes
                .as_ref()
                .and_then(|o| o.down_when_deleted.as_deref());
            if let Some(ds) = ds {
                own = k.own_daemonset(ds).await;
            }
        }
        // No map is written any more, and the pin dir is still locked, so the older agent
        // cannot start on pins half converted.
        if let Some(to) = own.rollback_from(&running_release()) {
            info!("rolling back to {to}: the pins are left as {to} reads them");
            let done = crate::kernel::migrate::prepare_rollback(&s.opts.pin_dir, &to)
                .doing(|| format!("leaving the pins as {to} reads them (rolling back)"))?;
            info!("{done}");
            s.life.rolled_back_for = Some(to.to_string());
            s.write_status();
        }
        Ok(own == OwnDaemonSet::Gone)
    }
}

/// A reload's config with the overrides laid over it, and the file it was read from (when it was).
type Candidate = ((Config, overrides::Applied), Option<Config>);

/// This agent's release.
fn running_release() -> semver::Version {
    semver::Version::parse(env!("CARGO_PKG_VERSION")).expect("the crate's version is semver")
}

/// `lb down`, refused while an agent holds the pin dir (it would go on writing maps nobody
/// reads, and say it is ready); otherwise [`down`], holding the lock meanwhile so that no
/// agent starts on the pins half removed.
pub fn down_unless_running(pin_dir: &Path, state_dir: &Path) -> Result<Vec<String>> {
    if !pin_dir.exists() {
        return down(pin_dir, state_dir);
    }
    match PinLock::try_lock(pin_dir)? {
        Some(_lock) => down(pin_dir, state_dir),
        None => {
            let pid = pindir::holder(pin_dir);
            let (who, stop) = match pid {
                Some(p) => (format!("an lb agent (pid {p})"), format!("`kill {p}`")),
                None => ("an lb agent".to_string(), "SIGTERM".to_string()),
            };
            Err(RunError::Refused(format!(
                "{who} is running on {}: stop it first ({stop}; it exits leaving traffic flowing), \
                 then run `lb down` again; `lb down --force` removes the pins from under it",
                pin_dir.display()
            )))
        }
    }
}

/// `lb down --force`: detaches the program from every interface it was pinned to and removes
/// the pins, whether or not an agent holds them. The status file goes too, unless an agent still
/// runs: it is that agent's, and `lb status` shows it running with nothing attached.
pub fn down(pin_dir: &Path, state_dir: &Path) -> Result<Vec<String>> {
    let agent_runs = pin_dir.exists() && PinLock::try_lock(pin_dir)?.is_none();
    let mut done = Vec::new();
    // The routes first: the node stops being announced before it stops serving.
    if let Some(a) = read_status(state_dir).and_then(|s| s.announce) {
        for vip in announce::withdraw_blocking(a.table).doing(|| {
            format!(
                "withdrawing the VIPs announced in routing table {}",
                a.table
            )
        })? {
            done.push(format!("withdrew {vip} (routing table {})", a.table));
        }
    }
    // A swap's second pin of a link (`link-eth0@swap`), left by an agent killed between pinning
    // it and renaming it over the first: it would keep the program attached.
    for e in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with("@swap") {
            std::fs::remove_file(e.path()).doing(|| format!("removing {}", e.path().display()))?;
        }
    }
    for (ifname, _) in links::pinned_links(pin_dir) {
        links::detach(pin_dir, &ifname)?;
        done.push(format!("detached from {ifname}"));
    }
    // Every lb map's pin, whatever its schema (`LB_NAT`, `LB_NAT@v2`) or a migration's staged
    // one (`LB_NAT@next`).
    let mut pins: Vec<PathBuf> = std::fs::read_dir(pin_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("LB_"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    pins.sort();
    for p in pins {
        std::fs::remove_file(&p).doing(|| format!("removing {}", p.display()))?;
        done.push(format!("removed {}", p.display()));
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir).doing(|| {
            format!(
                "removing {} (something else is pinned there?)",
                pin_dir.display()
            )
        })?;
    }
    if !agent_runs {
        let _ = std::fs::remove_file(status_path(state_dir));
        if std::fs::remove_file(overrides::path(state_dir)).is_ok() {
            done.push("removed the overrides (lb drain, lb weight)".into());
        }
    }
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

    #[test]
    fn a_previous_agents_status_gives_its_unhealthy_and_passive_out_backends() {
        let config = Config::parse(
            "node: { interfaces: [eth0], source_v4: 10.0.0.1, table_size: 1009 }
vips:
  - { address: 192.0.2.1, port: 80, protocol: tcp, mode: nat, passive_health: {},
      backends: [{ address: 10.1.0.1 }, { address: 10.1.0.2 }, { address: 10.1.0.3 }],
      health_check: { type: tcp } }
",
            "t",
        )
        .unwrap();
        let row = |address: &str, healthy, passive_out| BackendStatus {
            overridden: None,
            address: address.into(),
            port: 0,
            weight: 1,
            effective_weight: 1,
            healthy: Some(healthy),
            health_reason: None,
            passive_out,
            backup: None,
        };
        let status = Status {
            agent: None,
            nexthops: Default::default(),
            announce: None,
            config: "t".into(),
            vips: vec![
                VipStatus {
                    mode: Default::default(),
                    name: "a".into(),
                    vip: config.vips[0].spec.label(),
                    backends: vec![
                        row("10.1.0.1", false, false),
                        row("10.1.0.2", true, true),
                        row("10.1.0.3", true, false),
                    ],
                },
                VipStatus {
                    mode: Default::default(),
                    name: "gone".into(),
                    vip: "192.0.2.99:80/tcp".into(),
                    backends: vec![row("10.1.0.1", false, true)],
                },
            ],
        };
        let key = config.vips[0].spec.key();
        let r = remembered(Some(status), &config);
        assert_eq!(r.unhealthy, [(key, "10.1.0.1".parse().unwrap())]);
        assert_eq!(r.passive_out, [(key, "10.1.0.2".parse().unwrap())]);
        assert_eq!(remembered(None, &config), Remembered::default());
    }
}
