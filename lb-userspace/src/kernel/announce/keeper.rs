//! The agent's side of announcement: follows the config's `node.announce` (on, off, another
//! table) and the maps, and logs what it announces and withdraws. Failures are logged and kept
//! in the status: the data plane serves whatever the routing daemon makes of the table.

use std::collections::BTreeSet;

use tracing::{error, info};

use super::{AnnounceSettings, AnnounceStatus, Announcer, wanted};
use crate::model::plan::State;

#[derive(Default)]
pub struct Keeper {
    announcer: Option<Announcer>,
    /// The table a previous agent announced through, until the first update: withdrawn there
    /// if this agent's config no longer announces through it.
    leftover: Option<u32>,
    /// The settings `announcer` follows (or failed to start with).
    settings: Option<AnnounceSettings>,
    /// Why the announcer could not start, for the status.
    start_error: Option<String>,
}

impl Keeper {
    /// A keeper that takes over from the agent whose status said `previous`.
    pub fn new(previous: Option<AnnounceStatus>) -> Self {
        Self {
            leftover: previous.map(|p| p.table),
            ..Self::default()
        }
    }

    /// Brings the table in line with `settings` and the maps' `state`: called after every
    /// change the agent applies (announcing needs the maps to hold the VIP first).
    pub async fn update(&mut self, settings: Option<&AnnounceSettings>, state: &State) {
        if let Some(t) = self.leftover.take()
            && settings.is_none_or(|s| s.table != t)
        {
            match super::withdraw_table(t).await {
                Ok(gone) if !gone.is_empty() => info!(
                    table = t,
                    withdrawn = ?gone,
                    "VIPs a previous agent announced withdrawn (node.announce changed)"
                ),
                Ok(_) => {}
                Err(e) => error!(
                    "withdrawing what a previous agent announced in routing table {t}: {}",
                    crate::error_chain(&e)
                ),
            }
        }
        if settings != self.settings.as_ref() {
            self.shutdown().await;
            self.settings = settings.cloned();
            if let Some(s) = settings {
                match Announcer::start(s).await {
                    Ok(a) => {
                        info!(
                            table = s.table,
                            adopted = ?a.status().announced,
                            "announcing VIPs through routing table {}",
                            s.table
                        );
                        self.announcer = Some(a);
                    }
                    Err(e) => {
                        let msg = crate::error_chain(&e);
                        error!("VIP announcement cannot start, nothing is announced: {msg}");
                        self.start_error = Some(msg);
                    }
                }
            }
        }
        let Some(a) = &mut self.announcer else { return };
        let want = wanted(state);
        let before: BTreeSet<_> = a.status().announced.into_iter().collect();
        match a.sync(&want).await {
            Ok(false) => {}
            Ok(true) => log_change(&before, &want),
            Err(e) => error!(
                "changing the announced VIPs (wanted {want:?}): {}",
                crate::error_chain(&e)
            ),
        }
    }

    /// Withdraws everything announced (a clean exit, or announcement turned off).
    pub async fn shutdown(&mut self) {
        self.start_error = None;
        let Some(mut a) = self.announcer.take() else {
            return;
        };
        let before = a.status().announced;
        match a.withdraw_all().await {
            Ok(_) if !before.is_empty() => info!(withdrawn = ?before, "VIPs withdrawn"),
            Ok(_) => {}
            Err(e) => error!("withdrawing the VIPs: {}", crate::error_chain(&e)),
        }
    }

    /// What is announced, for the status file (None: announcement is off).
    pub fn status(&self) -> Option<AnnounceStatus> {
        let s = self.settings.as_ref()?;
        Some(match &self.announcer {
            Some(a) => a.status(),
            None => AnnounceStatus {
                table: s.table,
                announced: Vec::new(),
                error: self.start_error.clone(),
            },
        })
    }
}

fn log_change(before: &BTreeSet<std::net::IpAddr>, after: &BTreeSet<std::net::IpAddr>) {
    let added: Vec<_> = after.difference(before).collect();
    let removed: Vec<_> = before.difference(after).collect();
    if !added.is_empty() {
        info!(vips = ?added, "VIPs announced");
    }
    if !removed.is_empty() {
        info!(vips = ?removed, "VIPs withdrawn (no backend takes traffic)");
    }
}
