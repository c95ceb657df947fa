//! Active health checks: one task per (VIP, backend), probing on an interval and reporting only
//! transitions, after `healthy_threshold` consecutive successes or `unhealthy_threshold`
//! consecutive failures (Kong's active checks work the same way). A backend starts healthy.

use std::net::SocketAddr;

use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::mpsc, task::JoinHandle, time};

use crate::{
    agent::Target,
    config::{CheckKind, Config, HealthCheck},
};

/// A backend's health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub target: Target,
    pub healthy: bool,
    /// Why, for the log: the last probe's outcome.
    pub reason: String,
    /// The check task that saw it ([`Checks::is_current`]).
    pub check: u64,
}

/// One probe: Ok on success, Err(reason) otherwise.
pub async fn probe(
    check: &HealthCheck,
    addr: SocketAddr,
    client: &reqwest::Client,
) -> Result<(), String> {
    match &check.kind {
        CheckKind::Tcp => match time::timeout(check.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut s)) => {
                let _ = s.shutdown().await;
                Ok(())
            }
            Ok(Err(e)) => Err(format!("tcp connect to {addr}: {e}")),
            Err(_) => Err(format!(
                "tcp connect to {addr}: no answer within {:?}",
                check.timeout
            )),
        },
        CheckKind::Http { path, statuses } => {
            let url = format!("http://{addr}{path}");
            match client.get(&url).timeout(check.timeout).send().await {
                Ok(r) if statuses.contains(&r.status().as_u16()) => Ok(()),
                Ok(r) => Err(format!("GET {url}: status {}", r.status().as_u16())),
                Err(e) if e.is_timeout() => {
                    Err(format!("GET {url}: no answer within {:?}", check.timeout))
                }
                Err(e) => Err(format!("GET {url}: {}", crate::error_chain(&e))),
            }
        }
    }
}

/// Consecutive-result counting with thresholds.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub healthy: bool,
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Tracker {
    pub fn new(healthy: bool, check: &HealthCheck) -> Self {
        Self {
            healthy,
            streak: 0,
            healthy_threshold: check.healthy_threshold,
            unhealthy_threshold: check.unhealthy_threshold,
        }
    }

    /// Records a probe result; returns the new health if it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok {
            self.healthy_threshold
        } else {
            self.unhealthy_threshold
        };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// What one checking task probes.
type CheckKey = (Target, SocketAddr, HealthCheck);

/// The running checks, one task per (VIP, backend). A reload keeps the tasks whose check is
/// unchanged (their probe rhythm and streaks go on), stops the others and starts new ones: a
/// cluster whose endpoints change every few seconds still gets its backends judged. Each task
/// has an id of its own, carried by its transitions, so one from a task a reload stopped is
/// known as stale.
pub struct Checks {
    tasks: std::collections::HashMap<CheckKey, (u64, JoinHandle<()>)>,
    next_id: u64,
    client: reqwest::Client,
    tx: mpsc::Sender<Transition>,
}

impl Checks {
    pub fn new(tx: mpsc::Sender<Transition>) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("building the HTTP client");
        Self {
            tasks: Default::default(),
            next_id: 0,
            client,
            tx,
        }
    }

    /// Makes the running checks those of `config`; `healthy` gives each new target's current
    /// health (so a reload doesn't forget it).
    pub fn sync(&mut self, config: &Config, healthy: impl Fn(&Target) -> bool) {
        let mut wanted = std::collections::HashSet::new();
        for v in &config.vips {
            let Some(check) = &v.health_check else {
                continue;
            };
            // A rejecting share has no backend to probe.
            for b in v.spec.backends.iter().filter(|b| !b.reject) {
                let target: Target = (v.spec.key(), b.address);
                let addr = SocketAddr::new(b.address, check.port_for(&v.spec, b));
                wanted.insert((target, addr, check.clone()));
            }
        }
        self.tasks.retain(|k, (_, task)| {
            let keep = wanted.contains(k);
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            if !self.tasks.contains_key(&key) {
                self.next_id += 1;
                let id = self.next_id;
                let task = spawn_one(&key, id, healthy(&key.0), &self.client, &self.tx);
                self.tasks.insert(key, (id, task));
            }
        }
    }

    /// Whether `t` comes from a check still running. A transition queued before a reload
    /// replaced its check (changed or dropped it) is not: the new check started from the
    /// health the agent had then, and applying the old verdict now would part the two for
    /// good (the new check reports only changes from where it started).
    pub fn is_current(&self, t: &Transition) -> bool {
        self.tasks
            .iter()
            .any(|(k, (id, _))| *id == t.check && k.0 == t.target)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, t) in self.tasks.values() {
            t.abort();
        }
    }
}

fn spawn_one(
    key: &CheckKey,
    id: u64,
    healthy: bool,
    client: &reqwest::Client,
    tx: &mpsc::Sender<Transition>,
) -> JoinHandle<()> {
    let (target, addr, check) = key.clone();
    let mut tracker = Tracker::new(healthy, &check);
    let (client, tx) = (client.clone(), tx.clone());
    tokio::spawn(async move {
        let mut tick = time::interval(check.interval);
        tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = probe(&check, addr, &client).await;
            if let Some(h) = tracker.record(result.is_ok()) {
                let reason = result.err().unwrap_or_else(|| "probes succeed".into());
                let t = Transition {
                    target,
                    healthy: h,
                    reason,
                    check: id,
                };
                if tx.send(t).await.is_err() {
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check(h: u32, u: u32) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            port: 1,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: h,
            unhealthy_threshold: u,
        }
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut t = Tracker::new(true, &check(2, 3));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failure streak");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(false), None, "already unhealthy");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
    }

    #[tokio::test]
    async fn a_reload_keeps_unchanged_checks_running() {
        let text = |port: u16| {
            format!(
                "node: {{ interfaces: [eth0], source_v4: 10.0.0.1, table_size: 1009 }}
vips:
  - {{ address: 192.0.2.1, port: 80, protocol: tcp, backends: [{{ address: 10.1.0.1 }}, {{ address: 10.1.0.2 }}],
      health_check: {{ type: tcp, port: {port}, interval: 1h, timeout: 1s }} }}
"
            )
        };
        let (tx, _rx) = mpsc::channel(8);
        let mut checks = Checks::new(tx);
        let c = Config::parse(&text(81), "t").unwrap();
        checks.sync(&c, |_| true);
        assert_eq!(checks.len(), 2);
        let ids: Vec<_> = checks.tasks.values().map(|t| t.1.id()).collect();
        checks.sync(&c, |_| true);
        let again: Vec<_> = checks.tasks.values().map(|t| t.1.id()).collect();
        assert_eq!(
            ids.iter().collect::<std::collections::BTreeSet<_>>(),
            again.iter().collect(),
            "same checks, same tasks"
        );
        checks.sync(&Config::parse(&text(82), "t").unwrap(), |_| true);
        assert_eq!(checks.len(), 2);
        assert!(
            checks.tasks.values().all(|t| !ids.contains(&t.1.id())),
            "a changed check restarts"
        );
        checks.sync(
            &Config::parse("node: { interfaces: [eth0], table_size: 1009 }", "t").unwrap(),
            |_| true,
        );
        assert!(checks.is_empty());
    }

    #[tokio::test]
    async fn a_transition_from_a_check_a_reload_replaced_is_stale() {
        let text = |port: u16| {
            format!(
                "node: {{ interfaces: [eth0], source_v4: 10.0.0.1, table_size: 1009 }}
vips:
  - {{ address: 192.0.2.1, port: 80, protocol: tcp, backends: [{{ address: 10.1.0.1 }}],
      health_check: {{ type: tcp, port: {port}, interval: 1h, timeout: 1s }} }}
"
            )
        };
        let (tx, _rx) = mpsc::channel(8);
        let mut checks = Checks::new(tx);
        let c = Config::parse(&text(81), "t").unwrap();
        checks.sync(&c, |_| true);
        let seen_by = |checks: &Checks| Transition {
            target: (c.vips[0].spec.key(), "10.1.0.1".parse().unwrap()),
            healthy: false,
            reason: "refused".into(),
            check: checks.tasks.values().next().unwrap().0,
        };
        let old = seen_by(&checks);
        assert!(checks.is_current(&old));
        checks.sync(&Config::parse(&text(82), "t").unwrap(), |_| true);
        assert!(!checks.is_current(&old), "the replaced check's verdict");
        assert!(checks.is_current(&seen_by(&checks)));
        checks.sync(&Config::parse(&text(81), "t").unwrap(), |_| true);
        assert!(
            !checks.is_current(&old),
            "the same check again is a new task, with a new start"
        );
    }
}
