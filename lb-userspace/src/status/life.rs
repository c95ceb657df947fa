//! What the agent says of itself in its status file (`status.json`'s `agent`): which process it
//! is, since when, with which config, interfaces and sizes, and how its last reload went. Only the
//! agent knows these; `lb status` adds what the kernel knows (attachments, see
//! [`crate::kernel::links::attachment`]) and tells a live agent from the file a dead one left
//! ([`AgentStatus::is_running`]).

use std::{collections::BTreeMap, net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{kernel::program::Sizes, sources::config::NodeSettings};

/// How the last reload (of the config file, or a change in the cluster) went.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// RFC 3339, UTC.
    pub at: String,
    /// `config` (the file) or `cluster` (Kubernetes).
    pub source: String,
    /// Applied (true) or rejected (false: the previous state kept serving).
    pub ok: bool,
    /// Why it was rejected.
    pub error: Option<String>,
}

/// What the agent's start did with the maps, the fact a test or an operator asks of a restart:
/// did it adopt a previous agent's maps, and did it have to write them?
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StartStatus {
    /// Whether it adopted the maps a previous agent pinned (false: it created them).
    pub adopted: bool,
    /// The map writes its first apply made (0: the maps already held its config).
    pub map_writes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AgentStatus {
    /// The agent's release (`lb --version`); empty in the status files of 0.1.0, which had none.
    #[serde(default)]
    pub release: String,
    /// The schema of each map the agent's program uses (see [`crate::kernel::migrate::schema`]).
    #[serde(default)]
    pub schemas: std::collections::BTreeMap<String, u32>,
    /// What the agent's start, or its last reload that changed sizes, did with the pins.
    #[serde(default)]
    pub last_migration: Option<crate::kernel::migrate::Migration>,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`), so that a pid
    /// the kernel gave to another process since is not taken for the agent.
    pub proc_start: u64,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// When the agent last wrote the file (RFC 3339, UTC).
    pub updated_at: String,
    pub interfaces: Vec<String>,
    /// `node.xdp_mode`: `auto`, `native` or `generic` (before 0.3.0 only the last two: `native`
    /// was the default).
    pub xdp_mode: String,
    /// The mode of each interface and why (see [`crate::kernel::xdpmode`]); empty in the files of
    /// releases before 0.3.0, whose interfaces all ran in `xdp_mode`.
    #[serde(default)]
    pub xdp: Vec<crate::kernel::xdpmode::Choice>,
    pub metrics_listen: Option<String>,
    pub kubernetes: bool,
    /// The sizes the agent loaded the program with.
    pub sizes: Sizes,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    pub last_reload: Option<ReloadStatus>,
    /// What its start did with the maps (None in the files of releases before 0.3.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartStatus>,
    /// Its event loop runs: health checks, announcements and reloads are under way (false in
    /// the file written as the maps are first applied, and in files before 0.3.0).
    #[serde(default)]
    pub event_loop: bool,
    /// What the cluster holds that its last translation could not take as it is: malformed
    /// objects (skipped, or served as their last good version), addresses that do not parse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kubernetes_skipped: Vec<String>,
    /// Set as the agent stopped for a rollback (its DaemonSet's pod template asked for an older
    /// release): that release, for which the pins were left as it reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_for: Option<String>,
}

impl AgentStatus {
    /// Whether the process that wrote this is still running.
    pub fn is_running(&self) -> bool {
        proc_start(self.pid) == Some(self.proc_start)
    }

    /// How long it has been running, if it still is.
    pub fn uptime(&self) -> Option<std::time::Duration> {
        let started = humantime::parse_rfc3339(&self.started_at).ok()?;
        self.is_running()
            .then(|| SystemTime::now().duration_since(started).ok())
            .flatten()
    }
}

/// The agent's life so far, kept by the event loop.
#[derive(Debug, Clone)]
pub struct Life {
    pub started_at: SystemTime,
    pub last_reload: Option<ReloadStatus>,
    /// The older release the pins were left for, as the agent stopped for a rollback.
    pub rolled_back_for: Option<String>,
    pub start: Option<StartStatus>,
    pub event_loop: bool,
    /// What the cluster's last translation skipped (see [`AgentStatus::kubernetes_skipped`]).
    pub kubernetes_skipped: Vec<String>,
    /// Why each checked backend (VIP label, address) has the health it has: the outcome of the
    /// probe that last changed it.
    pub health_reasons: BTreeMap<(String, IpAddr), String>,
}

impl Default for Life {
    fn default() -> Self {
        Self {
            started_at: SystemTime::now(),
            last_reload: None,
            rolled_back_for: None,
            start: None,
            event_loop: false,
            kubernetes_skipped: Vec::new(),
            health_reasons: Default::default(),
        }
    }
}

impl Life {
    pub fn reloaded(&mut self, source: &str, result: Result<(), String>) {
        self.last_reload = Some(ReloadStatus {
            at: now(),
            source: source.to_string(),
            ok: result.is_ok(),
            error: result.err(),
        });
    }

    /// Records why the health of `backend` of the VIP labelled `vip` changed (a transition of
    /// a current check).
    pub fn health_changed(&mut self, vip: String, backend: IpAddr, reason: &str) {
        self.health_reasons
            .insert((vip, backend), reason.to_string());
    }

    /// Why `backend` of the VIP labelled `vip` has the health it has, if a probe changed it
    /// since the agent started.
    pub fn health_reason(&self, vip: String, backend: IpAddr) -> Option<String> {
        self.health_reasons.get(&(vip, backend)).cloned()
    }

    /// The file's `agent` for this process, serving `node`, attached as `xdp` says.
    pub fn status(
        &self,
        node: &NodeSettings,
        xdp: &[crate::kernel::xdpmode::Choice],
        kubernetes: bool,
        reloads: (u64, u64),
    ) -> AgentStatus {
        let pid = std::process::id();
        AgentStatus {
            release: env!("CARGO_PKG_VERSION").to_string(),
            schemas: crate::kernel::migrate::schema::current()
                .iter()
                .map(|s| (s.map.to_string(), s.version))
                .collect(),
            last_migration: None,
            pid,
            proc_start: proc_start(pid).unwrap_or(0),
            started_at: humantime::format_rfc3339_seconds(self.started_at).to_string(),
            updated_at: now(),
            interfaces: node.interfaces.clone(),
            xdp_mode: node.xdp_mode.to_string(),
            xdp: xdp.to_vec(),
            metrics_listen: node.metrics_listen.map(|a| a.to_string()),
            kubernetes,
            sizes: node.sizes.clone(),
            reloads_applied: reloads.0,
            reloads_rejected: reloads.1,
            last_reload: self.last_reload.clone(),
            rolled_back_for: self.rolled_back_for.clone(),
            start: self.start.clone(),
            event_loop: self.event_loop,
            kubernetes_skipped: self.kubernetes_skipped.clone(),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Field 22 of `/proc/PID/stat` (start time, clock ticks after boot); None if no such process.
fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_running_and_a_recorded_start_of_another_is_not() {
        let life = Life::default();
        let node = crate::sources::config::Config::parse(
            "node: { interfaces: [eth0], source_v4: 10.0.0.1 }\nvips: []\n",
            "t",
        )
        .unwrap()
        .node;
        let mut s = life.status(&node, &[], false, (0, 0));
        assert!(s.proc_start > 0);
        assert!(s.is_running());
        assert!(s.uptime().is_some());
        s.proc_start += 1;
        assert!(!s.is_running(), "same pid, another start time");
        assert_eq!(s.uptime(), None);
    }

    #[test]
    fn the_fields_added_in_0_3_0_round_trip_and_a_file_without_them_reads() {
        let life = Life {
            start: Some(StartStatus {
                adopted: true,
                map_writes: 0,
            }),
            event_loop: true,
            kubernetes_skipped: vec!["Service a/b is malformed (x): skipped".into()],
            ..Life::default()
        };
        let node = crate::sources::config::Config::parse(
            "node: { interfaces: [eth0], source_v4: 10.0.0.1 }\nvips: []\n",
            "t",
        )
        .unwrap()
        .node;
        let s = life.status(&node, &[], true, (1, 0));
        let mut v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v["start"],
            serde_json::json!({ "adopted": true, "map_writes": 0 })
        );
        let back: AgentStatus = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, s);
        // As an agent before 0.3.0 wrote it.
        for k in ["start", "event_loop", "kubernetes_skipped"] {
            v.as_object_mut().unwrap().remove(k);
        }
        let old: AgentStatus = serde_json::from_value(v).unwrap();
        assert_eq!(
            (old.start, old.event_loop, old.kubernetes_skipped),
            (None, false, vec![])
        );
    }
}
