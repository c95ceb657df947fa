//! The agent's core: holds the config, the health of every checked backend and what the maps
//! hold, and reconciles the maps whenever one of them changes. Generic over [`Dataplane`], so
//! it runs the same against the kernel and against memory.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::VipKey;

use crate::{
    config::{Config, PassiveHealth},
    dataplane::{Dataplane, DataplaneError},
    model::{Desired, ip_of},
    plan::{Plan, PlanError, State, TableCache, plan_cached},
    program::Sizes,
};

/// A backend of a VIP, as health checking tracks it.
pub type Target = (VipKey, IpAddr);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the new config changes sizes fixed at load time ({old:?} -> {new:?}); they apply only to a fresh start \
         (`lb down`, then `lb run`), so the config was not applied"
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
    current: State,
    tables: TableCache,
}

impl<D: Dataplane> Agent<D> {
    /// Adopts what the maps hold now (a restart keeps flows, counters and ids) and applies
    /// `config`, with the backends in `unhealthy` (as a previous agent left them) at weight 0
    /// until their checks say otherwise.
    pub fn start(dp: D, config: Config, unhealthy: &[Target]) -> Result<(Self, Plan), AgentError> {
        let current = dp.read()?;
        let mut agent = Self {
            dp,
            config,
            unhealthy: BTreeMap::new(),
            passive_out: BTreeSet::new(),
            current,
            tables: TableCache::default(),
        };
        let checked = agent.checked_targets();
        agent.unhealthy = unhealthy
            .iter()
            .filter(|t| checked.contains(t))
            .map(|t| (*t, ()))
            .collect();
        let plan = agent.reconcile()?;
        Ok((agent, plan))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> &State {
        &self.current
    }

    pub fn is_healthy(&self, t: &Target) -> bool {
        !self.unhealthy.contains_key(t)
    }

    /// Whether passive health checking took `t` out.
    pub fn is_passive_out(&self, t: &Target) -> bool {
        self.passive_out.contains(t)
    }

    /// The desired state: configured weights, 0 for unhealthy backends.
    pub fn desired(&self) -> Desired {
        let mut d = self.config.desired();
        for v in &mut d.vips {
            let key = v.key();
            for b in &mut v.backends {
                let t = (key, b.address);
                if self.unhealthy.contains_key(&t) || self.passive_out.contains(&t) {
                    b.weight = 0;
                }
            }
        }
        d
    }

    /// Plans and applies whatever differs between the maps and the desired state.
    pub fn reconcile(&mut self) -> Result<Plan, AgentError> {
        let (plan, next) = plan_cached(
            &self.current,
            &self.desired(),
            self.dp.limits(),
            &mut self.tables,
        )?;
        if let Err(e) = self.dp.apply(&plan) {
            // Some writes may have landed (every prefix of a plan is safe): learn what did.
            self.current = self.dp.read().unwrap_or_else(|_| self.current.clone());
            return Err(e.into());
        }
        self.current = next;
        Ok(plan)
    }

    /// Switches to a new config, or refuses it and keeps the old one serving.
    pub fn replace_config(&mut self, new: Config) -> Result<Plan, AgentError> {
        if new.node.sizes != self.config.node.sizes {
            return Err(AgentError::SizesChanged {
                old: self.config.node.sizes.clone(),
                new: new.node.sizes.clone(),
            });
        }
        // Plan before committing to it: a config the planner rejects changes nothing.
        let old = std::mem::replace(&mut self.config, new);
        match self.reconcile() {
            Ok(p) => {
                // Forget the health of backends that are gone or no longer checked, and apply
                // what that changes.
                let checked = self.checked_targets();
                let passive: BTreeSet<Target> = self
                    .passive_targets()
                    .into_iter()
                    .map(|p| p.target)
                    .collect();
                let before = self.unhealthy.len() + self.passive_out.len();
                self.unhealthy.retain(|t, _| checked.contains(t));
                self.passive_out.retain(|t| passive.contains(t));
                if self.unhealthy.len() + self.passive_out.len() != before {
                    let more = self.reconcile()?;
                    return Ok(Plan {
                        writes: p.writes.into_iter().chain(more.writes).collect(),
                    });
                }
                Ok(p)
            }
            Err(e @ AgentError::Plan(_)) => {
                self.config = old;
                Err(e)
            }
            Err(e) => Err(e),
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
            for b in &v.spec.backends {
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
            .current
            .vips
            .iter()
            .map(|(k, v)| (v.id, u16::from_be(k.port)))
            .collect();
        let mut out: BTreeMap<(IpAddr, u16), Vec<u32>> = BTreeMap::new();
        for (id, m) in &self.current.members {
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

    /// Records a health transition and reconciles if it changes anything.
    pub fn set_health(&mut self, target: Target, healthy: bool) -> Result<Plan, AgentError> {
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

/// A backend of a VIP with passive health checking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveTarget {
    pub target: Target,
    /// The member ids of its backend address and port, in every VIP (empty before start).
    pub ids: Vec<u32>,
    /// Where the recheck probe connects: the backend's address and port.
    pub probe: SocketAddr,
    pub check: PassiveHealth,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, dataplane::memory::MemoryDataplane, plan::Write};

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
        Agent::start(dp, c, &[]).unwrap().0
    }

    fn slots_of(a: &Agent<MemoryDataplane>, last_octet: u8) -> usize {
        let id = a
            .state()
            .members
            .iter()
            .find(|(_, b)| b.addr[3] == last_octet)
            .map(|(i, _)| *i);
        a.state().rings[&0]
            .iter()
            .filter(|&&b| Some(b) == id)
            .count()
    }

    #[test]
    fn unhealthy_backend_gets_weight_zero_until_healthy_again() {
        let mut a = agent();
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
        let (mut a, _) = Agent::start(dp, c, &[dead]).unwrap();
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
        let (b, plan) = Agent::start(dp, c, &[]).unwrap();
        assert!(
            plan.is_empty(),
            "a restart with the same config wrote {:?}",
            plan.writes
        );
        assert_eq!(
            b.dp.log
                .iter()
                .filter(|w| matches!(w, Write::Slots { .. }))
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
        assert_eq!(a.config().node.sizes.maglev_m, 1009);
    }
}
