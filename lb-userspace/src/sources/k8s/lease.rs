//! One status writer: leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every agent computes the same state from the same objects, but only the holder of the Lease
//! writes status (UpstreamPolicy conditions, Events on Services): agents whose views differ for
//! a moment would otherwise overwrite each other without end.
//!
//! The algorithm is client-go's: read the Lease; take it when it is free or when its record has
//! not changed for a whole `leaseDurationSeconds` *as this agent observed it* (local time only,
//! so clock skew between nodes does not matter); write it with the `resourceVersion` read, so
//! of two agents racing for it the API server lets exactly one through (409 Conflict for the
//! other). The holder renews every `retry`; if it cannot renew for two thirds of the duration
//! it stops writing before anyone else may take over.
//!
//! kube-lease-manager (0.13, built on kube 5) was the first choice; its exclusion rests on
//! Server-Side Apply field-ownership conflicts rather than on `resourceVersion`, which the fake
//! API server the tests run against would have to emulate (managedFields), so this module is
//! the small resourceVersion-conditional implementation instead.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

/// `lb run --kubernetes`'s Lease flags.
#[derive(clap::Args, Clone, Debug)]
pub struct LeaseFlags {
    /// The Lease whose holder writes status (with --kubernetes).
    #[arg(long, default_value = "lb-status-writer")]
    pub lease_name: String,
    /// The Lease's namespace (the DaemonSet sets POD_NAMESPACE from the downward API; default:
    /// the kubeconfig's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a Lease nobody renews stays held (leaseDurationSeconds; whole seconds).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How often the holder renews and the others look.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry: Duration,
}

impl Default for LeaseFlags {
    fn default() -> Self {
        Self {
            lease_name: "lb-status-writer".into(),
            lease_namespace: None,
            lease_duration: Duration::from_secs(15),
            lease_retry: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "--lease-duration must be whole seconds, at least 1s (leaseDurationSeconds), not {0:?}"
    )]
    Duration(Duration),
    #[error(
        "--lease-retry ({retry:?}) must be shorter than two thirds of --lease-duration ({duration:?}): the holder renews that often and gives up after two thirds"
    )]
    Retry { retry: Duration, duration: Duration },
    #[error("the Lease {0} has no spec")]
    NoSpec(String),
    #[error("Lease API request")]
    Api(#[source] kube::Error),
}

impl LeaseFlags {
    /// Refuses durations that could let two holders overlap.
    pub fn check(&self) -> Result<(), LeaseError> {
        if self.lease_duration.as_secs() < 1 || self.lease_duration.subsec_nanos() != 0 {
            return Err(LeaseError::Duration(self.lease_duration));
        }
        if self.lease_retry.is_zero() || self.lease_retry >= self.renew_deadline() {
            return Err(LeaseError::Retry {
                retry: self.lease_retry,
                duration: self.lease_duration,
            });
        }
        Ok(())
    }

    /// The Lease's namespace: `--lease-namespace`, else `default` (the kubeconfig's).
    pub fn namespace(&self, default: &str) -> String {
        self.lease_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default.to_string())
    }

    /// How long a holder goes on believing it holds the Lease without renewing it.
    fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }
}

/// Whether this agent writes status now. Cheap to clone; every status writer asks it.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// A handle that always (or never) leads: for tests and single-writer setups.
    pub fn fixed(leader: bool) -> Self {
        let (tx, rx) = watch::channel(leader);
        // The value never changes; keeping the sender alive is not needed to read it.
        drop(tx);
        Self { rx }
    }

    /// Resolves when leadership changes.
    pub async fn changed(&mut self) -> bool {
        let _ = self.rx.changed().await;
        self.is_leader()
    }
}

/// The Lease's record as last observed, and when (local time) it last changed.
struct Observed {
    version: Option<String>,
    holder: Option<String>,
    since: Instant,
}

/// Runs the election in the background as `identity`; `changed` gets a unit whenever
/// leadership changes (so the caller writes the current status at once on a takeover).
pub fn elect(
    client: Client,
    default_namespace: &str,
    flags: &LeaseFlags,
    identity: &str,
    changed: mpsc::Sender<()>,
) -> (Leadership, JoinHandle<()>) {
    let ns = flags.namespace(default_namespace);
    let api: Api<Lease> = Api::namespaced(client, &ns);
    let (tx, rx) = watch::channel(false);
    let (flags, identity) = (flags.clone(), identity.to_string());
    let task = tokio::spawn(async move {
        let mut observed: Option<Observed> = None;
        let mut renewed: Option<Instant> = None;
        let mut tick = tokio::time::interval(flags.lease_retry);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held = match try_hold(&api, &flags, &identity, &mut observed).await {
                Ok(held) => {
                    if held {
                        renewed = Some(Instant::now());
                    }
                    held
                }
                Err(e) => {
                    warn!(lease = %format!("{ns}/{}", flags.lease_name), "{}", crate::error_chain(&e));
                    // Go on leading only while the last renewal is recent enough that nobody
                    // else can have taken the Lease.
                    *tx.borrow() && renewed.is_some_and(|r| r.elapsed() < flags.renew_deadline())
                }
            };
            if held != *tx.borrow() {
                info!(lease = %format!("{ns}/{}", flags.lease_name), identity = %identity,
                    "{}", if held { "leading: this agent writes status" } else { "not leading: another agent writes status" });
                tx.send_replace(held);
                let _ = changed.try_send(());
            }
        }
    });
    (Leadership { rx }, task)
}

/// Gives the Lease up if `identity` holds it (on a clean exit): no holder, so another agent
/// takes it at its next look instead of after a whole duration. The caller has stopped the
/// election first. Conditional on the version read, so a Lease someone else took meanwhile is
/// left alone.
pub async fn release(
    client: Client,
    default_namespace: &str,
    flags: &LeaseFlags,
    identity: &str,
) -> Result<bool, LeaseError> {
    let ns = flags.namespace(default_namespace);
    let api: Api<Lease> = Api::namespaced(client, &ns);
    let Some(mut lease) = api
        .get_opt(&flags.lease_name)
        .await
        .map_err(LeaseError::Api)?
    else {
        return Ok(false);
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(false);
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    replace(&api, &flags.lease_name, &lease).await
}

/// One round: Ok(true) if this agent holds the Lease after it.
async fn try_hold(
    api: &Api<Lease>,
    flags: &LeaseFlags,
    identity: &str,
    observed: &mut Option<Observed>,
) -> Result<bool, LeaseError> {
    let now = MicroTime(Timestamp::now());
    let duration = i32::try_from(flags.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let ours = |acquired: MicroTime, transitions: i32| LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(duration),
        acquire_time: Some(acquired),
        renew_time: Some(now.clone()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api
        .get_opt(&flags.lease_name)
        .await
        .map_err(LeaseError::Api)?
    else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(flags.lease_name.clone()),
                ..Default::default()
            },
            spec: Some(ours(now.clone(), 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another agent created it first: it holds it.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(LeaseError::Api(e)),
        };
    };
    let spec = lease
        .spec
        .clone()
        .ok_or_else(|| LeaseError::NoSpec(flags.lease_name.clone()))?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let version = lease.metadata.resource_version.clone();
    if observed.as_ref().is_none_or(|o| o.version != version) {
        *observed = Some(Observed {
            version: version.clone(),
            holder: holder.clone(),
            since: Instant::now(),
        });
    }
    let o = observed.as_ref().expect("set above");
    let theirs = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(1) as u64);
    let mine = holder.as_deref() == Some(identity);
    if !mine && o.holder.is_some() && o.since.elapsed() < theirs {
        return Ok(false);
    }
    lease.spec = Some(match mine {
        true => ours(
            spec.acquire_time.unwrap_or(now.clone()),
            spec.lease_transitions.unwrap_or(0),
        ),
        false => ours(now.clone(), spec.lease_transitions.unwrap_or(0) + 1),
    });
    replace(api, &flags.lease_name, &lease).await
}

/// Writes `lease` back. The resourceVersion it was read with makes this conditional: Ok(false)
/// (409 Conflict) if anyone wrote it in between.
async fn replace(api: &Api<Lease>, name: &str, lease: &Lease) -> Result<bool, LeaseError> {
    match api.replace(name, &PostParams::default(), lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(LeaseError::Api(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_as_long_as_the_renew_deadline_is_refused() {
        let mut f = LeaseFlags::default();
        assert!(f.check().is_ok());
        f.lease_retry = Duration::from_secs(10);
        assert!(matches!(f.check(), Err(LeaseError::Retry { .. })));
        f.lease_duration = Duration::from_millis(500);
        assert!(matches!(f.check(), Err(LeaseError::Duration(_))));
        f.lease_duration = Duration::from_millis(1500);
        assert!(
            matches!(f.check(), Err(LeaseError::Duration(_))),
            "the Lease holds whole seconds: 1.5 s would let the holder outlive it"
        );
    }

    #[test]
    fn a_fixed_handle_answers_what_it_was_given() {
        assert!(Leadership::fixed(true).is_leader());
        assert!(!Leadership::fixed(false).is_leader());
    }
}
