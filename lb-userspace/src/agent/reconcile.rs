//! The agent's core: holds the config, the health of every checked backend and what the maps
//! hold, and reconciles the maps whenever one of them changes. Generic over [`Dataplane`], so
//! it runs the same against the kernel and against memory.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::VipKey;

use crate::{
    kernel::dataplane::{Dataplane, DataplaneError},
    kernel::program::Sizes,
    model::desired::{BackendSpec, Desired, ip_of},
    model::plan::{Plan, PlanError, State},
    model::planner::Planner,
    sources::config::{Config, PassiveCheck},
};

/// A backend of a VIP, as health checking tracks it.
pub type Target = (VipKey, IpAddr);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the new config changes sizes fixed at load time ({}); they apply only to a fresh start \
         (`lb down`, then `lb run`), so the config was not applied",
        old.changes_to(new)
    )]
    SizesChanged { old: Sizes, new: Sizes },
    #[error("planning the map writes")]
    Plan(#[from] PlanError),
    #[error("writing the maps")]
    Dataplane(#[from] DataplaneError),
}

pub struct Agent<D> {
    pub dp: D,
    config: Config,
    /// Backends found unhealthy by their checks (absent: healthy or unchecked).
    unhealthy: BTreeMap<Target, ()>,
    /// Backends taken out by passive health checking (NAT mode).
    passive_out: BTreeSet<Target>,
    /// What the maps hold, and what each VIP was planned from.
    planner: Planner,
}

impl<D: Dataplane> Agent<D> {
    /// Adopts what the maps hold now (a restart keeps flows, counters and ids) and applies
    /// `config`, with the backends `remembered` out (as a previous agent left them) at weight 0
    /// until their checks say otherwise.
    pub fn start(
        dp: D,
        config: Config,
        remembered: &Remembered,
    ) -> Result<(Self, Plan), AgentError> {
        let mut agent = Self::adopt(dp, config, remembered)?;
        let plan = agent.reconcile()?;
        Ok((agent, plan))
    }

    /// [`Agent::start`] without the writes: reads what the maps hold, and [`Agent::reconcile`]
    /// applies `config` (a config the planner refuses writes nothing; maps that refuse a write
    /// part way keep what landed, every prefix of a plan being safe).
    pub fn adopt(dp: D, config: Config, remembered: &Remembered) -> Result<Self, AgentError> {
        let planner = Planner::new(dp.read()?);
        let mut agent = Self {
            dp,
            config,
            unhealthy: BTreeMap::new(),
            passive_out: BTreeSet::new(),
            planner,
        };
        let checked = agent.checked_targets();
        agent.unhealthy = remembered
            .unhealthy
            .iter()
            .filter(|t| checked.contains(t))
            .map(|t| (*t, ()))
            .collect();
        let passive = agent.passive_set();
        agent.passive_out = remembered
            .passive_out
            .iter()
            .filter(|t| passive.contains(t))
            .copied()
            .collect();
        Ok(agent)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> &State {
        self.planner.state()
    }

    pub fn is_healthy(&self, t: &Target) -> bool {
        !self.unhealthy.contains_key(t)
    }

    /// Whether passive health checking took `t` out.
    pub fn is_passive_out(&self, t: &Target) -> bool {
        self.passive_out.contains(t)
    }

    /// The desired state: configured weights, 0 for unhealthy backends, unless what is left
    /// is below the VIP's health threshold (then health is ignored: see
    /// [`VipConfig::health_threshold`](crate::sources::config::VipConfig::health_threshold)).
    pub fn desired(&self) -> Desired {
        let mut d = self.config.desired();
        for (v, vc) in d.vips.iter_mut().zip(&self.config.vips) {
            let key = v.key();
            if self.any_out(&key) {
                let out = |a| {
                    self.unhealthy.contains_key(&(key, a)) || self.passive_out.contains(&(key, a))
                };
                let total: u64 = v.backends.iter().map(|b| u64::from(b.weight)).sum();
                let left: u64 = v
                    .backends
                    .iter()
                    .filter(|b| !out(b.address))
                    .map(|b| u64::from(b.weight))
                    .sum();
                if !below_threshold(left, total, vc.health_threshold) {
                    for b in &mut v.backends {
                        if out(b.address) {
                            b.weight = 0;
                        }
                    }
                }
            }
            // Backups stand by whatever the health: a drained backend is no health event.
            stand_by(&mut v.backends);
        }
        d
    }

    /// Whether any backend of the VIP at `key` is out (unhealthy or taken out by passive
    /// health): a look into each set's range of that VIP, not a walk of its backends.
    fn any_out(&self, key: &VipKey) -> bool {
        let first = (*key, IpAddr::from([0u8; 4]));
        let of_key = |k: &Target| k.0 == *key;
        self.unhealthy
            .range(first..)
            .next()
            .is_some_and(|(t, _)| of_key(t))
            || self.passive_out.range(first..).next().is_some_and(of_key)
    }

    /// Whether `t` is a backend of a VIP with a health check.
    fn is_checked(&self, t: &Target) -> bool {
        self.config.vips.iter().any(|v| {
            v.health_check.is_some()
                && v.spec.key() == t.0
                && v.spec.backends.iter().any(|b| b.address == t.1)
        })
    }

    /// Plans and applies whatever differs between the maps and the desired state.
    pub fn reconcile(&mut self) -> Result<Plan, AgentError> {
        let (plan, pending) = self.planner.plan(&self.desired(), self.dp.limits())?;
        if let Err(e) = self.dp.apply(&plan) {
            // Some writes may have landed (every prefix of a plan is safe): learn what did.
            let read = self.dp.read().unwrap_or_else(|_| self.state().clone());
            self.planner.reset(read);
            return Err(e.into());
        }
        self.planner.commit(pending);
        Ok(plan)
    }

    /// Puts `dp` in place of the dataplane (the same state in maps of other sizes: a
    /// migration) and takes `sizes` as the config's; returns the old dataplane. The state is
    /// read from `dp` (on error nothing changed).
    pub fn replace_dataplane(&mut self, dp: D, sizes: Sizes) -> Result<D, AgentError> {
        self.planner.reset(dp.read()?);
        self.config.node.sizes = sizes;
        Ok(std::mem::replace(&mut self.dp, dp))
    }

    /// Refuses a config whose sizes differ from the loaded program's (checked before anything
    /// else changes: a reload that would be refused here touches nothing).
    pub fn check_sizes(&self, new: &Config) -> Result<(), AgentError> {
        if new.node.sizes != self.config.node.sizes {
            return Err(AgentError::SizesChanged {
                old: self.config.node.sizes.clone(),
                new: new.node.sizes.clone(),
            });
        }
        Ok(())
    }

    /// Switches to a new config, or refuses it and keeps the old one serving: on error the
    /// config and health are the old ones, and so are the maps (writes that landed before a
    /// failing one are undone, as far as the maps let us).
    pub fn replace_config(&mut self, new: Config) -> Result<Plan, AgentError> {
        self.check_sizes(&new)?;
        let old = std::mem::replace(&mut self.config, new);
        let health = (self.unhealthy.clone(), self.passive_out.clone());
        // Forget the health of backends that are gone or no longer checked.
        let checked = self.checked_targets();
        let passive = self.passive_set();
        self.unhealthy.retain(|t, _| checked.contains(t));
        self.passive_out.retain(|t| passive.contains(t));
        match self.reconcile() {
            Ok(p) => Ok(p),
            Err(e) => {
                self.config = old;
                (self.unhealthy, self.passive_out) = health;
                if matches!(e, AgentError::Dataplane(_)) {
                    // Best effort: the maps refused a write, they may refuse these too.
                    let _ = self.reconcile();
                }
                Err(e)
            }
        }
    }

    /// Every (VIP, backend) that has a health check.
    pub fn checked_targets(&self) -> Vec<Target> {
        self.config
            .vips
            .iter()
            .filter(|v| v.health_check.is_some())
            .flat_map(|v| {
                v.spec
                    .backends
                    .iter()
                    .map(move |b| (v.spec.key(), b.address))
            })
            .collect()
    }

    /// Every (VIP, backend) under passive health checking, with the member ids its backend
    /// address and port have now (passive health is the backend's, whichever VIP saw it).
    pub fn passive_targets(&self) -> Vec<PassiveTarget> {
        let mut out = Vec::new();
        let mut ids: Option<BTreeMap<(IpAddr, u16), Vec<u32>>> = None;
        for v in &self.config.vips {
            let Some(check) = &v.passive_health else {
                continue;
            };
            let ids = ids.get_or_insert_with(|| self.member_ids_by_backend());
            let key = v.spec.key();
            // A rejecting share has no backend to judge.
            for b in v.spec.backends.iter().filter(|b| !b.reject) {
                let port = if b.port == 0 { v.spec.port } else { b.port };
                out.push(PassiveTarget {
                    target: (key, b.address),
                    ids: ids.get(&(b.address, port)).cloned().unwrap_or_default(),
                    probe: SocketAddr::new(b.address, port),
                    check: check.clone(),
                });
            }
        }
        out
    }

    /// Member ids of NAT VIPs by the backend address and port they translate to.
    fn member_ids_by_backend(&self) -> BTreeMap<(IpAddr, u16), Vec<u32>> {
        let vip_ports: BTreeMap<u32, u16> = self
            .state()
            .vips
            .iter()
            .map(|(k, v)| (v.id, u16::from_be(k.port)))
            .collect();
        let mut out: BTreeMap<(IpAddr, u16), Vec<u32>> = BTreeMap::new();
        for (id, m) in &self.state().members {
            let Some(vip_port) = vip_ports.get(&m.vip_id) else {
                continue;
            };
            let port = match u16::from_be(m.port) {
                0 => *vip_port,
                p => p,
            };
            out.entry((ip_of(&m.addr, m.family), port))
                .or_default()
                .push(*id);
        }
        out
    }

    fn passive_set(&self) -> BTreeSet<Target> {
        self.passive_targets()
            .into_iter()
            .map(|p| p.target)
            .collect()
    }

    /// Takes a backend out (weight 0) or brings it back, for passive health checking.
    pub fn set_passive_out(&mut self, target: Target, out: bool) -> Result<Plan, AgentError> {
        let changed = if out {
            self.passive_out.insert(target)
        } else {
            self.passive_out.remove(&target)
        };
        if changed {
            self.reconcile()
        } else {
            Ok(Plan::default())
        }
    }

    /// Records a health transition and reconciles if it changes anything. A transition for a
    /// backend that is no longer checked (queued before a reload dropped its check) is ignored:
    /// nothing would ever bring it back.
    pub fn set_health(&mut self, target: Target, healthy: bool) -> Result<Plan, AgentError> {
        if !self.is_checked(&target) {
            return Ok(Plan::default());
        }
        let changed = if healthy {
            self.unhealthy.remove(&target).is_some()
        } else {
            self.unhealthy.insert(target, ()).is_none()
        };
        if changed {
            self.reconcile()
        } else {
            Ok(Plan::default())
        }
    }
}

/// Health a previous agent left (read back from its status file): backends its active checks
/// found unhealthy and backends passive health checking took out. Entries for backends the
/// new config does not check (the same way) are dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Remembered {
    pub unhealthy: Vec<Target>,
    pub passive_out: Vec<Target>,
}

/// A backend of a VIP with passive health checking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveTarget {
    pub target: Target,
    /// The member ids of its backend address and port, in every VIP (empty before start).
    pub ids: Vec<u32>,
    /// Where the recheck probe connects: the backend's address and port.
    pub probe: SocketAddr,
    pub check: PassiveCheck,
}

/// Backups (see [`BackendSpec::backup`]) get no new flows while another backend takes them:
/// their weight goes to 0 if any other backend still has one (after health).
fn stand_by(backends: &mut [BackendSpec]) {
    let others_up = backends
        .iter()
        .any(|b| b.backup.is_none() && !b.reject && b.weight > 0);
    if others_up {
        for b in backends.iter_mut().filter(|b| b.backup.is_some()) {
            b.weight = 0;
        }
    }
}

/// Whether `left` of `total` weight is less than `threshold` percent (Kong's
/// `healthchecks.threshold`; 0: never).
pub fn below_threshold(left: u64, total: u64, threshold: u8) -> bool {
    threshold > 0 && total > 0 && left * 100 < total * u64::from(threshold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::dataplane::memory::MemoryDataplane,
        model::plan::{Limits, Write},
        sources::config::Config,
    };

    const CONFIG: &str = r#"
node:
  interfaces: [eth0]
  source_v4: 10.0.0.1
  table_size: 1009
  max_vips: 4
  max_backends: 8
vips:
  - address: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - { address: 10.1.0.1, weight: 1 }
      - { address: 10.1.0.2, weight: 1 }
"#;

    fn agent() -> Agent<MemoryDataplane> {
        let c = Config::parse(CONFIG, "t").unwrap();
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        Agent::start(dp, c, &Remembered::default()).unwrap().0
    }

    const CHECK: &str = "    health_check: { type: tcp }\n";
    const PASSIVE: &str = "    mode: nat\n    passive_health: { failures: 3 }\n";

    /// [`CONFIG`] with `extra` added to its VIP (and `more` backends).
    fn config_with(extra: &str, more: &str) -> Config {
        let last = "      - { address: 10.1.0.2, weight: 1 }\n";
        Config::parse(&CONFIG.replace(last, &format!("{last}{more}{extra}")), "t").unwrap()
    }

    fn target(a: &Agent<impl Dataplane>, addr: &str) -> Target {
        (a.config().vips[0].spec.key(), addr.parse().unwrap())
    }

    fn slots_of<D: Dataplane>(a: &Agent<D>, last_octet: u8) -> usize {
        let id = a
            .state()
            .members
            .iter()
            .find(|(_, b)| b.addr[3] == last_octet)
            .map(|(i, _)| *i);
        a.state().rings[&0]
            .iter()
            .filter(|&b| Some(b) == id)
            .count()
    }

    #[test]
    fn below_the_health_threshold_the_vip_balances_over_all_its_backends() {
        // Three backends of weight 1; threshold 50 %: one out leaves 2/3 (kept out), two out
        // leave 1/3 (< 50 %: health is ignored, all three share the table again).
        let more = "      - { address: 10.1.0.3, weight: 1 }\n";
        let mut c = config_with(CHECK, more);
        c.vips[0].health_threshold = 50;
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let (mut a, _) = Agent::start(dp, c, &Remembered::default()).unwrap();
        let key = a.config().vips[0].spec.key();
        a.set_health((key, "10.1.0.1".parse().unwrap()), false)
            .unwrap();
        assert_eq!(slots_of(&a, 1), 0, "2/3 left is above the threshold");
        assert!(slots_of(&a, 2) > 0 && slots_of(&a, 3) > 0);
        a.set_health((key, "10.1.0.2".parse().unwrap()), false)
            .unwrap();
        for b in 1..=3 {
            assert!(
                slots_of(&a, b) > 250,
                "below the threshold every backend balances: 10.1.0.{b} has {}",
                slots_of(&a, b)
            );
        }
        a.set_health((key, "10.1.0.2".parse().unwrap()), true)
            .unwrap();
        assert_eq!(slots_of(&a, 1), 0, "back above it: health counts again");
    }

    #[test]
    fn the_threshold_compares_weights_as_percentages() {
        assert!(!below_threshold(1, 3, 0), "0: no threshold");
        assert!(below_threshold(1, 3, 34));
        assert!(!below_threshold(1, 3, 33));
        assert!(
            !below_threshold(1, 2, 50),
            "exactly the threshold is enough"
        );
        assert!(
            !below_threshold(0, 0, 50),
            "no weight at all: nothing to ignore"
        );
    }

    #[test]
    fn a_backup_takes_new_flows_only_while_every_other_backend_is_unhealthy() {
        let more = "      - { address: 10.1.0.3, weight: 1, backup: true }\n";
        let c = config_with(CHECK, more);
        assert_eq!(
            c.vips[0].spec.backends[2].backup.as_deref(),
            Some(crate::sources::config::BACKUP_IN_CONFIG)
        );
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let (mut a, _) = Agent::start(dp, c, &Remembered::default()).unwrap();
        let (one, two) = (target(&a, "10.1.0.1"), target(&a, "10.1.0.2"));
        assert_eq!(slots_of(&a, 3), 0, "the backup while both others are up");
        a.set_health(one, false).unwrap();
        assert_eq!(
            (slots_of(&a, 2), slots_of(&a, 3)),
            (1009, 0),
            "one other still up"
        );
        a.set_health(two, false).unwrap();
        assert_eq!(slots_of(&a, 3), 1009, "no other up: the backup takes all");
        a.set_health(one, true).unwrap();
        assert_eq!(
            (slots_of(&a, 1), slots_of(&a, 3)),
            (1009, 0),
            "one back: the backup stands by again"
        );
    }

    #[test]
    fn backups_share_the_table_by_weight_when_every_other_backend_is_drained() {
        let more = "      - { address: 10.1.0.3, weight: 3, backup: true }\n      - { address: 10.1.0.4, weight: 1, backup: true }\n";
        let c = config_with("", more);
        let mut c = c;
        for b in &mut c.vips[0].spec.backends[..2] {
            b.weight = 0;
        }
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let (a, _) = Agent::start(dp, c, &Remembered::default()).unwrap();
        let (three, four) = (slots_of(&a, 3), slots_of(&a, 4));
        assert_eq!(three + four, 1009);
        // Maglev gives weights within a few slots of their share: 3/4 of 1009 is 757.
        assert!(
            (740..=775).contains(&three),
            "3:1 backups: {three} and {four}"
        );
    }

    #[test]
    fn unhealthy_backend_gets_weight_zero_until_healthy_again() {
        let c = config_with(CHECK, "");
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let (mut a, _) = Agent::start(dp, c, &Remembered::default()).unwrap();
        let key = a.config().vips[0].spec.key();
        assert!(slots_of(&a, 1) > 400);
        let p = a
            .set_health((key, "10.1.0.1".parse().unwrap()), false)
            .unwrap();
        assert!(!p.is_empty());
        assert_eq!(slots_of(&a, 1), 0, "unhealthy backend still holds slots");
        assert_eq!(slots_of(&a, 2), 1009);
        assert!(
            a.set_health((key, "10.1.0.1".parse().unwrap()), false)
                .unwrap()
                .is_empty(),
            "no change, no writes"
        );
        a.set_health((key, "10.1.0.1".parse().unwrap()), true)
            .unwrap();
        assert!(slots_of(&a, 1) > 400);
    }

    #[test]
    fn dropping_a_health_check_restores_the_weights() {
        let c = Config::parse(
            &CONFIG.replace(
                "      - { address: 10.1.0.2, weight: 1 }\n",
                "      - { address: 10.1.0.2, weight: 1 }\n    health_check: { type: tcp }\n",
            ),
            "t",
        )
        .unwrap();
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let key = c.vips[0].spec.key();
        let dead = (key, "10.1.0.1".parse().unwrap());
        let (mut a, _) = Agent::start(
            dp,
            c,
            &Remembered {
                unhealthy: vec![dead],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            slots_of(&a, 1),
            0,
            "health carried over from a previous agent"
        );
        a.replace_config(Config::parse(CONFIG, "t").unwrap())
            .unwrap();
        assert!(
            slots_of(&a, 1) > 400,
            "an unchecked backend stayed at weight 0"
        );
    }

    #[test]
    fn restart_adopts_the_maps_and_writes_nothing() {
        let a = agent();
        let c = a.config().clone();
        let dp = a.dp; // the maps survive the agent
        let (b, plan) = Agent::start(dp, c, &Remembered::default()).unwrap();
        assert!(
            plan.is_empty(),
            "a restart with the same config wrote {:?}",
            plan.writes
        );
        assert_eq!(
            b.dp.log
                .iter()
                .filter(|w| matches!(w, Write::Slots { .. } | Write::Table { .. }))
                .count(),
            1,
            "only the first start wrote tables"
        );
    }

    #[test]
    fn a_config_that_cannot_be_planned_or_resized_changes_nothing() {
        let mut a = agent();
        let before = a.state().clone();
        let writes = a.dp.log.len();
        let bigger =
            Config::parse(&CONFIG.replace("table_size: 1009", "table_size: 1013"), "t").unwrap();
        assert!(matches!(
            a.replace_config(bigger),
            Err(AgentError::SizesChanged { .. })
        ));
        let too_many = CONFIG.replace("max_backends: 8", "max_backends: 1");
        assert!(
            Config::parse(&too_many, "t").is_err(),
            "validation catches it first"
        );
        assert_eq!(a.state(), &before);
        assert_eq!(a.dp.log.len(), writes);
        assert_eq!(a.config().node.sizes.table_size, 1009);
    }

    #[test]
    fn a_transition_for_a_backend_no_longer_checked_changes_nothing() {
        let c = config_with(CHECK, "");
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let (mut a, _) = Agent::start(dp, c, &Remembered::default()).unwrap();
        let t = target(&a, "10.1.0.1");
        a.replace_config(Config::parse(CONFIG, "t").unwrap())
            .unwrap();
        let writes = a.dp.log.len();
        // The dropped check's last transition, queued before the reload, arrives after it.
        let p = a.set_health(t, false).unwrap();
        assert!(p.is_empty(), "wrote {:?}", p.writes);
        assert_eq!(a.dp.log.len(), writes);
        assert!(
            a.is_healthy(&t),
            "an unchecked backend was marked unhealthy"
        );
        assert!(slots_of(&a, 1) > 400, "an unchecked backend lost its slots");
    }

    #[test]
    fn a_re_added_check_starts_healthy_after_a_stale_transition() {
        let checked = config_with(CHECK, "");
        let dp = MemoryDataplane::new(checked.node.sizes.limits());
        let (mut a, _) = Agent::start(dp, checked.clone(), &Remembered::default()).unwrap();
        let t = target(&a, "10.1.0.1");
        a.set_health(t, false).unwrap();
        a.replace_config(Config::parse(CONFIG, "t").unwrap())
            .unwrap();
        a.set_health(t, false).unwrap(); // stale: from the check just dropped
        a.replace_config(checked).unwrap();
        assert!(
            a.is_healthy(&t),
            "the re-added check starts from a dropped check's verdict"
        );
        assert!(slots_of(&a, 1) > 400);
    }

    #[test]
    fn backends_a_previous_agent_had_passive_out_start_out() {
        let c = config_with(PASSIVE, "");
        let dp = MemoryDataplane::new(c.node.sizes.limits());
        let key = c.vips[0].spec.key();
        let out = (key, "10.1.0.1".parse().unwrap());
        let gone = (key, "10.1.0.9".parse().unwrap());
        let remembered = Remembered {
            passive_out: vec![out, gone],
            ..Default::default()
        };
        let (a, _) = Agent::start(dp, c, &remembered).unwrap();
        assert!(a.is_passive_out(&out));
        assert!(!a.is_passive_out(&gone), "a backend not configured is kept");
        assert_eq!(slots_of(&a, 1), 0, "the passive-out backend holds slots");
        assert_eq!(slots_of(&a, 2), 1009);
    }

    /// The in-memory maps, refusing one write: the `refuse_at`-th from now (0: the next).
    struct Refusing {
        maps: MemoryDataplane,
        refuse_at: Option<usize>,
    }

    impl Dataplane for Refusing {
        fn limits(&self) -> Limits {
            self.maps.limits()
        }

        fn read(&self) -> Result<State, DataplaneError> {
            self.maps.read()
        }

        fn write(&mut self, w: &Write) -> Result<(), DataplaneError> {
            match self.refuse_at {
                Some(0) => {
                    self.refuse_at = None;
                    Err(DataplaneError::Write {
                        what: "a test map".into(),
                        source: std::io::Error::other("refused"),
                    })
                }
                Some(n) => {
                    self.refuse_at = Some(n - 1);
                    self.maps.write(w)
                }
                None => self.maps.write(w),
            }
        }
    }

    #[test]
    fn a_reload_the_maps_refuse_part_way_leaves_config_health_and_maps_as_they_were() {
        let c = config_with(CHECK, "");
        let maps = MemoryDataplane::new(c.node.sizes.limits());
        let dp = Refusing {
            maps,
            refuse_at: None,
        };
        let (mut a, _) = Agent::start(dp, c.clone(), &Remembered::default()).unwrap();
        let t = target(&a, "10.1.0.1");
        a.set_health(t, false).unwrap();
        let before = a.dp.maps.state.clone();
        // A third backend (a backend write, then ring slots) and no check (health forgotten):
        // the backend lands, the slots are refused.
        a.dp.refuse_at = Some(1);
        let next = config_with("", "      - { address: 10.1.0.3, weight: 1 }\n");
        assert!(matches!(
            a.replace_config(next),
            Err(AgentError::Dataplane(_))
        ));
        assert_eq!(a.config(), &c, "the refused config was kept");
        assert!(!a.is_healthy(&t), "the old config's health was forgotten");
        assert_eq!(a.dp.maps.state, before, "what landed was not undone");
        assert_eq!(a.state(), &before);
    }
}
