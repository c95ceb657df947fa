//! VIP announcement: which VIP addresses this node offers to the network, kept as routes in a
//! kernel routing table of lb's own that a routing daemon (BIRD or FRR) exports over BGP.
//!
//! lb speaks no BGP. It decides *what* is announced and *when*; the daemon, configured once
//! by the operator, turns every route in the table into an announcement. A VIP address is
//! announced once the maps hold one of its VIPs with a Maglev table that sends traffic to a
//! backend ([`wanted`]), and withdrawn when no VIP at that address has a backend left, on a
//! clean exit (SIGTERM) and on `lb down`. A route in a table of its own changes nothing in the
//! node's forwarding (no rule looks the table up), and the kernel keeps it when the agent is
//! killed: the data plane keeps serving, so the node keeps being announced until the next agent
//! adopts the table, or until the daemon itself stops (and the router's BFD or hold timer
//! withdraws everything the node announced).

mod keeper;
mod routes;

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::NO_BACKEND;
use serde::{Deserialize, Serialize};

use crate::{model::desired::ip_of, model::plan::State};

pub use keeper::Keeper;
pub use routes::{RTPROT_LB, RouteError, Routes};

/// The routing table the config's `node.announce` leaves out.
pub const DEFAULT_TABLE: u32 = 100;

/// `node.announce`: announcement through a routing daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceSettings {
    /// The kernel routing table lb keeps one route per announced VIP address in (a blackhole
    /// /32 or /128 of protocol [`RTPROT_LB`]), which the daemon exports.
    pub table: u32,
}

/// What the node announces, as the status file and `lb status` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel routing table the routes are in.
    pub table: u32,
    /// The VIP addresses announced (routes present in the table), sorted.
    pub announced: Vec<IpAddr>,
    /// The last failure to change the table, if the last attempt failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// The VIP addresses to announce for what the maps hold: an address is wanted if at least one
/// VIP at it has a Maglev table with a slot on a backend (a table of a VIP whose backends all
/// have weight 0, or that has none, holds only `NO_BACKEND`).
pub fn wanted(state: &State) -> BTreeSet<IpAddr> {
    state
        .vips
        .iter()
        .filter(|(_, v)| {
            state
                .rings
                .get(&v.id)
                .is_some_and(|ring| ring.values().iter().any(|m| *m != NO_BACKEND))
        })
        .map(|(k, _)| ip_of(&k.addr, k.family))
        .collect()
}

/// Keeps the table's routes equal to the wanted set, touching only what differs.
pub struct Announcer {
    routes: Routes,
    table: u32,
    /// What the table holds, as of the last look or change.
    current: BTreeSet<IpAddr>,
    error: Option<String>,
}

impl Announcer {
    /// Opens a netlink socket (in the calling thread's namespace, on the current tokio runtime)
    /// and adopts the routes of lb's protocol that the table holds: a previous agent's, which
    /// stay announced until the first [`Announcer::sync`] decides.
    pub async fn start(settings: &AnnounceSettings) -> Result<Self, RouteError> {
        let routes = Routes::new()?;
        let current = routes.list(settings.table).await?;
        Ok(Self {
            routes,
            table: settings.table,
            current,
            error: None,
        })
    }

    /// Announces what is wanted and not announced, withdraws what is announced and not wanted.
    /// Returns whether anything changed. On a failure the rest is still tried, and the table is
    /// read again so that [`Announcer::status`] tells what it really holds.
    pub async fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<bool, RouteError> {
        if *wanted == self.current {
            return Ok(false);
        }
        let mut first_error = None;
        for a in self.current.difference(wanted) {
            if let Err(e) = self.routes.del(self.table, *a).await {
                first_error.get_or_insert(e);
            }
        }
        for a in wanted.difference(&self.current) {
            if let Err(e) = self.routes.add(self.table, *a).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => {
                self.current = wanted.clone();
                self.error = None;
                Ok(true)
            }
            Some(e) => {
                self.error = Some(crate::error_chain(&e));
                if let Ok(now) = self.routes.list(self.table).await {
                    self.current = now;
                }
                Err(e)
            }
        }
    }

    /// Withdraws everything (a clean exit).
    pub async fn withdraw_all(&mut self) -> Result<bool, RouteError> {
        self.sync(&BTreeSet::new()).await
    }

    pub fn status(&self) -> AnnounceStatus {
        AnnounceStatus {
            table: self.table,
            announced: self.current.iter().copied().collect(),
            error: self.error.clone(),
        }
    }
}

/// Removes every route of lb's protocol from `table` (in the calling thread's namespace, on
/// the current tokio runtime). Returns the addresses withdrawn.
pub async fn withdraw_table(table: u32) -> Result<Vec<IpAddr>, RouteError> {
    let routes = Routes::new()?;
    let there = routes.list(table).await?;
    for a in &there {
        routes.del(table, *a).await?;
    }
    Ok(there.into_iter().collect())
}

/// [`withdraw_table`] for `lb down` (not async).
pub fn withdraw_blocking(table: u32) -> Result<Vec<IpAddr>, RouteError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RouteError::Socket)?
        .block_on(withdraw_table(table))
}

#[cfg(test)]
mod tests;
