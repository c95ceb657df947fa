//! Each node's record of what its maps hold, so that the status writer can say on how many
//! nodes a Service or route is served.
//!
//! The record is a Lease of the node's own, next to the status writer's: `<lease-name>.<node>`
//! (a dot, since the chart names another class's status writer's Lease
//! `lb-status-writer-<class>`), labelled [`RECORD_LABEL`]` = <lease-name>`, as client-go's
//! components keep their identity Leases. Its [`RECORD_ANNOTATION`] is a JSON object
//! `namespace/name -> VIP labels` (`TCPRoute namespace/name` for a route). It is written only
//! when what the node serves changes, never on a resync, and it outlives a restart (the data
//! plane goes on serving while the agent restarts). The status writer alone lists the records,
//! every `--lease-duration` (a list carries every node's record: a count may lag by that much,
//! and the API server is spared; a watch would be the next step for clusters of hundreds of
//! nodes), and wakes the agent when one changed.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, PostParams},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::warn;

use super::{Leadership, LeaseFlags, programmed::NodeRecord};

/// The label that marks a node's record; its value is the status writer's Lease name.
pub const RECORD_LABEL: &str = "lb.dev/node-record";
/// The annotation that holds the record.
pub const RECORD_ANNOTATION: &str = "lb.dev/programmed";

/// This node's side of the records: what to write, and (on the status writer) the others'.
pub struct Records {
    want: watch::Sender<Option<NodeRecord>>,
    peers: watch::Receiver<BTreeMap<String, NodeRecord>>,
    task: JoinHandle<()>,
}

/// Where the records live and who this node is.
struct Place {
    api: Api<Lease>,
    name: String,
    /// The status writer's Lease: the records' label value.
    writer_lease: String,
    node: String,
}

impl Records {
    /// Starts keeping `node`'s record in `namespace`; `changed` gets a unit when the status
    /// writer sees another node's record change.
    pub fn start(
        client: Client,
        namespace: &str,
        flags: &LeaseFlags,
        node: &str,
        leader: Leadership,
        changed: mpsc::Sender<()>,
    ) -> Self {
        let place = Place {
            api: Api::namespaced(client, namespace),
            name: format!("{}.{node}", flags.lease_name),
            writer_lease: flags.lease_name.clone(),
            node: node.to_string(),
        };
        let (want, want_rx) = watch::channel(None);
        let (peers_tx, peers) = watch::channel(BTreeMap::new());
        let every = flags.lease_duration;
        let task = tokio::spawn(keep(place, want_rx, peers_tx, leader, every, changed));
        Self { want, peers, task }
    }

    /// What this node's maps hold now (written if it differs from the record).
    pub fn publish(&self, record: NodeRecord) {
        self.want.send_if_modified(|w| {
            let differs = w.as_ref() != Some(&record);
            *w = Some(record);
            differs
        });
    }

    /// The other nodes' records, by node, as last listed (empty unless this agent leads).
    pub fn peers(&self) -> BTreeMap<String, NodeRecord> {
        self.peers.borrow().clone()
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The task: writes this node's record when it changes (retrying every `every` after a
/// failure) and, while leading, lists the others' every `every`.
async fn keep(
    place: Place,
    mut want: watch::Receiver<Option<NodeRecord>>,
    peers: watch::Sender<BTreeMap<String, NodeRecord>>,
    leader: Leadership,
    every: std::time::Duration,
    changed: mpsc::Sender<()>,
) {
    let mut written: Option<NodeRecord> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = want.changed() => if r.is_err() { return },
        }
        let now = want.borrow().clone();
        if let Some(record) = now.filter(|r| written.as_ref() != Some(r)) {
            match write(&place, &record).await {
                Ok(()) => written = Some(record),
                Err(e) => {
                    warn!(lease = %place.name, "writing this node's record (retried): {}", crate::error_chain(&e))
                }
            }
        }
        if leader.is_leader() {
            match list(&place).await {
                Ok(now) if now != *peers.borrow() => {
                    peers.send_replace(now);
                    let _ = changed.try_send(());
                }
                Ok(_) => {}
                Err(e) => warn!("listing the nodes' records: {}", crate::error_chain(&e)),
            }
        }
    }
}

/// Creates or updates the record (the update conditional on the version read: a 409 is
/// retried at the next tick).
async fn write(place: &Place, record: &NodeRecord) -> Result<(), kube::Error> {
    let value = serde_json::to_string(record).unwrap_or_default();
    let spec = LeaseSpec {
        holder_identity: Some(place.node.clone()),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..Default::default()
    };
    match place.api.get_opt(&place.name).await? {
        Some(mut lease) => {
            lease
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(RECORD_ANNOTATION.into(), value);
            lease.spec = Some(spec);
            place
                .api
                .replace(&place.name, &PostParams::default(), &lease)
                .await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(place.name.clone()),
                    labels: Some(BTreeMap::from([(
                        RECORD_LABEL.into(),
                        place.writer_lease.clone(),
                    )])),
                    annotations: Some(BTreeMap::from([(RECORD_ANNOTATION.into(), value)])),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            place.api.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// The other nodes' records (a record that does not read counts as empty).
async fn list(place: &Place) -> Result<BTreeMap<String, NodeRecord>, kube::Error> {
    let leases = place
        .api
        .list(&ListParams::default().labels(&format!("{RECORD_LABEL}={}", place.writer_lease)))
        .await?;
    Ok(leases
        .items
        .into_iter()
        .filter_map(|l| {
            let node = l.spec.as_ref()?.holder_identity.clone()?;
            let record = l
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RECORD_ANNOTATION))
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default();
            Some((node, record))
        })
        .filter(|(node, _)| node != &place.node)
        .collect())
}
