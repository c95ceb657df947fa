//! Active health checks: one task per (VIP, backend), probing on an interval (another one
//! while the backend is unhealthy, if set) and reporting only transitions, after
//! `healthy_threshold` consecutive successes or `unhealthy_threshold` consecutive failures
//! (Kong's active checks work the same way). A backend starts healthy. A VIP's check may limit
//! how many of its backends are probed at once (Kong's `concurrency`): its tasks share a
//! semaphore.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{Semaphore, mpsc},
    task::JoinHandle,
    time,
};

use crate::{
    agent::reconcile::Target,
    sources::config::{CheckKind, Config, HealthCheck},
};
use lb_common::VipKey;

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
        CheckKind::Http {
            path,
            statuses,
            headers,
            tls,
        } => {
            let url = match tls {
                None => format!("http://{addr}{path}"),
                Some(t) => match &t.sni {
                    // The client resolves this name to `addr` (see `client_for`).
                    Some(sni) => format!("https://{sni}:{}{path}", addr.port()),
                    None => format!("https://{addr}{path}"),
                },
            };
            let mut req = client.get(&url).timeout(check.timeout);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            match req.send().await {
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

/// A client builder for probes: no redirects (a redirect is an answer, judged by its status).
/// reqwest's rustls takes the process's crypto provider, installed here: ring, as kube's
/// client uses (installing it again is a no-op).
pub fn builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

/// The HTTP client for probes of `addr` under `check`: `shared` for plain HTTP and TCP; an
/// HTTPS check gets its own, with its certificate verification and, when it names a server
/// (SNI), that name resolved to `addr`.
pub fn client_for(
    check: &HealthCheck,
    addr: SocketAddr,
    shared: &reqwest::Client,
) -> Result<reqwest::Client, reqwest::Error> {
    let CheckKind::Http { tls: Some(tls), .. } = &check.kind else {
        return Ok(shared.clone());
    };
    let mut b = builder().tls_danger_accept_invalid_certs(!tls.verify);
    if let Some(sni) = &tls.sni {
        b = b.resolve(sni, addr);
    }
    b.build()
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
    /// Each VIP's probe limit (Kong's `concurrency`), shared by its tasks.
    limits: HashMap<(VipKey, u32), Arc<Semaphore>>,
    next_id: u64,
    client: reqwest::Client,
    tx: mpsc::Sender<Transition>,
}

impl Checks {
    pub fn new(tx: mpsc::Sender<Transition>) -> Self {
        let client = builder().build().expect("building the HTTP client");
        Self {
            tasks: Default::default(),
            limits: HashMap::new(),
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
        let limited: std::collections::HashSet<(VipKey, u32)> = wanted
            .iter()
            .filter(|k| k.2.concurrency > 0)
            .map(|k| (k.0.0, k.2.concurrency))
            .collect();
        self.limits.retain(|k, _| limited.contains(k));
        for key in wanted {
            if !self.tasks.contains_key(&key) {
                self.next_id += 1;
                let id = self.next_id;
                let limit = (key.2.concurrency > 0).then(|| {
                    let n = key.2.concurrency;
                    self.limits
                        .entry((key.0.0, n))
                        .or_insert_with(|| Arc::new(Semaphore::new(n as usize)))
                        .clone()
                });
                let client = match client_for(&key.2, key.1, &self.client) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(
                            "building the HTTPS client for checks of {}: {}",
                            key.1,
                            crate::error_chain(&e)
                        );
                        continue;
                    }
                };
                let task = spawn_one(&key, id, healthy(&key.0), client, limit, &self.tx);
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

/// How long after a probe the next one starts.
fn pause(check: &HealthCheck, healthy: bool) -> Duration {
    match (healthy, check.unhealthy_interval) {
        (false, Some(i)) => i,
        _ => check.interval,
    }
}

fn spawn_one(
    key: &CheckKey,
    id: u64,
    healthy: bool,
    client: reqwest::Client,
    limit: Option<Arc<Semaphore>>,
    tx: &mpsc::Sender<Transition>,
) -> JoinHandle<()> {
    let (target, addr, check) = key.clone();
    let mut tracker = Tracker::new(healthy, &check);
    let tx = tx.clone();
    tokio::spawn(async move {
        let mut next = time::Instant::now();
        loop {
            time::sleep_until(next).await;
            let result = {
                // Held for the probe only: at most `concurrency` of the VIP's probes at once.
                let _permit = match &limit {
                    Some(l) => Some(l.acquire().await.expect("the semaphore is never closed")),
                    None => None,
                };
                probe(&check, addr, &client).await
            };
            let changed = tracker.record(result.is_ok());
            // The next probe keeps the rhythm of the backend's health now.
            next = (next + pause(&check, tracker.healthy)).max(time::Instant::now());
            if let Some(h) = changed {
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
            unhealthy_interval: None,
            timeout: Duration::from_secs(1),
            healthy_threshold: h,
            unhealthy_threshold: u,
            concurrency: 0,
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

pub mod events;

#[cfg(test)]
mod probe_tests;
