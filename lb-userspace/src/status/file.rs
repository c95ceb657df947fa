//! The agent's status file (`status.json` in the state dir): what only the agent knows, for
//! the commands that read the maps from another process (`lb status`, `lb backends`, `lb top`,
//! `lb drain`...) and for the next agent (the health it remembers). The agent writes it
//! ([`crate::agent::run`]); everything else only reads it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::status::life::AgentStatus;

/// What `lb backends` reads besides the maps: configured weights and health.
#[derive(Serialize, serde::Deserialize, Default, Debug)]
pub struct Status {
    pub config: String,
    pub vips: Vec<VipStatus>,
    /// The next-hop keeper's figures as of its last refresh.
    #[serde(default)]
    pub nexthops: crate::kernel::nexthop::NexthopStatus,
    /// The agent itself, for `lb status`.
    #[serde(default)]
    pub agent: Option<AgentStatus>,
    /// The VIP addresses this node announces (None: `node.announce` is off).
    #[serde(default)]
    pub announce: Option<crate::kernel::announce::AnnounceStatus>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct VipStatus {
    pub name: String,
    pub vip: String,
    /// `dsr` or `nat` (files of releases before 0.3.0 do not say: read as `dsr`).
    #[serde(default)]
    pub mode: crate::model::desired::Mode,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct BackendStatus {
    pub address: String,
    /// Its own port (NAT's `port:`), 0 if it takes the VIP's.
    #[serde(default)]
    pub port: u16,
    pub weight: u32,
    /// The weight the Maglev table gives it: `weight`, or 0 while it is unhealthy or out
    /// (unless health is ignored for the VIP's health threshold).
    #[serde(default)]
    pub effective_weight: u32,
    /// None: not health checked.
    pub healthy: Option<bool>,
    /// Why it has the health it has: the outcome of the probe that last changed it (None: not
    /// checked, no change since the agent started, or a file of a release before 0.3.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Taken out by passive health checking (NAT mode).
    #[serde(default)]
    pub passive_out: bool,
    /// A runtime override of its weight (`lb drain`, `lb weight`): `weight` is the override's,
    /// the config's is in it.
    #[serde(default, rename = "override", skip_serializing_if = "Option::is_none")]
    pub overridden: Option<crate::sources::overrides::Override>,
    /// Why it is a backup (see [`crate::model::desired::BackendSpec::backup`]); None: not one. A backup
    /// stands in (`effective_weight` above 0) only while no other backend takes new flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

pub fn read_status(state_dir: &Path) -> Option<Status> {
    std::fs::read(status_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}
