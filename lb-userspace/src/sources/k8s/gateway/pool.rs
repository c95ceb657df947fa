//! A route's backendRefs as a VIP's members: each ready endpoint of a resolved backendRef with
//! its share (see [`super::weights`]), and one rejecting member holding the shares that have
//! nowhere to go; and the UpstreamPolicy that applies (the backend Services' one, unless they
//! name different ones).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use kube::ResourceExt as _;

use super::{
    GatewayCtx, MAX_WEIGHT, Output, key_of, refs,
    types::Route,
    weights::{Share, member_weights},
};
use crate::{
    model::desired::BackendSpec,
    sources::k8s::translate::{Effect, ObjectKey, endpoints, policy_of},
};

/// A Service's endpoints: (address, port) -> 1 if ready, 0 if draining.
type Endpoints = BTreeMap<(IpAddr, u16), u32>;
/// A backendRef's weight and its endpoints (None: it does not resolve, or none is ready).
type RefShare = (u32, Option<Endpoints>);

impl GatewayCtx<'_> {
    /// The members of route `r`'s VIP for one family, and the policy effect that applies.
    pub(super) fn backends(
        &self,
        r: &Route,
        resolved: &[refs::Resolved<'_>],
        v4: bool,
        out: &mut Output,
    ) -> (Vec<BackendSpec>, Effect) {
        let refs = r.spec.rules.iter().flat_map(|rule| &rule.backend_refs);
        // Per backendRef: its weight and its endpoints (None: rejected).
        let mut shares: Vec<RefShare> = Vec::new();
        let mut policies: BTreeSet<Option<ObjectKey>> = BTreeSet::new();
        let mut services = Vec::new();
        for (b, res) in refs.zip(resolved) {
            let weight = b.weight.unwrap_or(1).clamp(0, MAX_WEIGHT) as u32;
            let eps = match res {
                Ok((svc, sp)) => {
                    let key = key_of(svc.namespace(), svc.name_any());
                    policies.insert(policy_of(svc));
                    services.push(format!("{}/{}", key.0, key.1));
                    let slices = self.slices.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                    let eps = endpoints(slices, sp, v4, None, &key.0, &mut Vec::new());
                    Some(eps).filter(|e| e.values().any(|w| *w > 0))
                }
                Err(_) => None,
            };
            shares.push((weight, eps));
        }
        let effect = match policies.len() {
            0 => Effect::default(),
            1 => match policies.first().cloned().flatten() {
                Some(p) => {
                    let user = format!(
                        "{} {}/{}",
                        r.kind.name(),
                        r.meta.namespace.as_deref().unwrap_or(""),
                        r.meta.name.as_deref().unwrap_or("")
                    );
                    let users = out.policy_users.entry(p.clone()).or_default();
                    if !users.contains(&user) {
                        users.push(user);
                    }
                    self.effect_of(&p).unwrap_or_default()
                }
                None => Effect::default(),
            },
            _ => {
                let named: Vec<String> = policies
                    .iter()
                    .map(|p| p.as_ref().map_or("(none)".to_string(), |p| p.1.clone()))
                    .collect();
                for p in policies.iter().flatten() {
                    out.policy_conflicts.entry(p.clone()).or_default().push(format!(
                        "{} {}/{}: its backend Services ({}) name different policies ({}): none is applied to the route",
                        r.kind.name(),
                        r.meta.namespace.as_deref().unwrap_or(""),
                        r.meta.name.as_deref().unwrap_or(""),
                        services.join(", "),
                        named.join(", ")
                    ));
                }
                Effect::default()
            }
        };
        (members(&shares, v4), effect)
    }

    fn effect_of(&self, p: &ObjectKey) -> Option<Effect> {
        self.effects.get(p).cloned().flatten()
    }
}

/// The members of a VIP from its backendRefs' shares: each ready endpoint of a resolved ref, and
/// one rejecting member holding the shares that have nowhere to go.
fn members(shares: &[RefShare], v4: bool) -> Vec<BackendSpec> {
    let rejected: u32 = shares
        .iter()
        .filter(|(_, e)| e.is_none())
        .map(|(w, _)| *w)
        .fold(0u32, u32::saturating_add);
    let mut list: Vec<Share> = shares
        .iter()
        .filter_map(|(w, e)| {
            let e = e.as_ref()?;
            Some(Share {
                weight: *w,
                members: e.values().filter(|w| **w > 0).count() as u32,
            })
        })
        .collect();
    list.push(Share {
        weight: rejected,
        members: 1,
    });
    let per_member = member_weights(&list);
    // (address, port) -> weight; an endpoint named by two refs gets both shares.
    let mut by_endpoint: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
    for ((_, e), w) in shares.iter().filter(|(_, e)| e.is_some()).zip(&per_member) {
        for (ep, ready) in e.iter().flatten() {
            let add = if *ready > 0 { *w } else { 0 };
            let slot = by_endpoint.entry(*ep).or_insert(0);
            *slot = slot.saturating_add(add);
        }
    }
    let mut out: Vec<BackendSpec> = by_endpoint
        .into_iter()
        .map(|((a, p), w)| BackendSpec::new(a, p, w))
        .collect();
    let reject_weight = per_member.last().copied().unwrap_or(0);
    if reject_weight > 0 {
        out.push(BackendSpec::rejecting(v4, reject_weight));
    }
    out
}
