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

/// Starts a checking task for every backend of every VIP with a health check. `healthy` gives
/// each target's current health (so a reload doesn't forget it). Abort the handles to stop.
pub fn spawn(
    config: &Config,
    healthy: impl Fn(&Target) -> bool,
    tx: mpsc::Sender<Transition>,
) -> Vec<JoinHandle<()>> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("building the HTTP client");
    let mut tasks = Vec::new();
    for v in &config.vips {
        let Some(check) = &v.health_check else {
            continue;
        };
        for b in &v.spec.backends {
            let target: Target = (v.spec.key(), b.address);
            let addr = SocketAddr::new(b.address, check.port_for(&v.spec, b));
            let mut tracker = Tracker::new(healthy(&target), check);
            let (check, client, tx) = (check.clone(), client.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = time::interval(check.interval);
                tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = probe(&check, addr, &client).await;
                    if let Some(h) = tracker.record(result.is_ok()) {
                        let reason = result.err().unwrap_or_else(|| "probes succeed".into());
                        if tx
                            .send(Transition {
                                target,
                                healthy: h,
                                reason,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }));
        }
    }
    tasks
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
}
