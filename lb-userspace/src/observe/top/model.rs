//! What one screen of `lb top` says, worked out from readings ([`Sample`]s): rates over the
//! last interval, each backend's share of its VIP's new flows, and its share of the weights.
//! Pure, so that it is tested without a kernel.

use std::{collections::BTreeMap, time::Duration};

use lb_common::TrafficStats;

use super::sample::{Alloc, Health, MemberSample, PinnedFlows, Sample, VipSample};

/// One screen (`lb top --once -o json` prints it: times in seconds, shares as fractions).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Frame {
    /// Time between the last two readings (what the rates are over).
    #[serde(rename = "interval_s", serialize_with = "seconds")]
    pub interval: Duration,
    /// Time since the first reading (what the shares "since start" are over).
    #[serde(rename = "since_start_s", serialize_with = "seconds")]
    pub since_start: Duration,
    /// Drop verdicts per second, all VIPs and packets aimed at none.
    pub drops_per_s: f64,
    /// Half-open NAT translations taken over or expired per second: a SYN flood at a NAT VIP.
    pub half_open_per_s: f64,
    pub vips: Vec<VipRow>,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VipRow {
    pub label: String,
    pub name: Option<String>,
    pub packets_per_s: f64,
    pub new_flows_per_s: f64,
    /// Packets of this VIP per second that no backend took (no backend in their slot, no
    /// source address): the VIP's packets less its members'.
    pub drops_per_s: f64,
    /// Of those, new flows per second its new-flow budget refused (a SYN flood shows here).
    pub over_budget_per_s: f64,
    /// NAT replies per second translated back to clients (None: a DSR VIP).
    pub replies_per_s: Option<f64>,
    pub backends: Vec<BackendRow>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackendRow {
    pub label: String,
    pub weight: Option<u32>,
    /// `lb drain` or `lb weight` overrides the weight.
    pub overridden: bool,
    /// Its weight over the weights of the VIP's backends that take new flows (0 if it takes
    /// none): the share of new flows it should get. None without weights.
    pub weight_share: Option<f64>,
    /// Its share of the VIP's new flows since the first reading (None: no new flow yet).
    pub share_since_start: Option<f64>,
    /// Its share of the VIP's new flows over the last interval (None: none in it).
    pub share_now: Option<f64>,
    pub new_flows_per_s: f64,
    pub health: Health,
    /// Takes no new flows (weight 0, unhealthy, passive out): its flows drain.
    pub draining: bool,
    pub pinned_flows: Option<PinnedFlows>,
}

/// The screen for the readings `first` (when `lb top` started), `prev` and `cur`.
pub fn build(first: &Sample, prev: &Sample, cur: &Sample) -> Frame {
    let interval = cur.at.saturating_duration_since(prev.at);
    let secs = interval.as_secs_f64().max(1e-3);
    Frame {
        interval,
        since_start: cur.at.saturating_duration_since(first.at),
        drops_per_s: cur.drops.saturating_sub(prev.drops) as f64 / secs,
        half_open_per_s: cur.half_open.saturating_sub(prev.half_open) as f64 / secs,
        vips: cur
            .vips
            .iter()
            .map(|v| vip_row(v, find(first, v), find(prev, v), secs))
            .collect(),
    }
}

fn find<'a>(s: &'a Sample, v: &VipSample) -> Option<&'a VipSample> {
    s.vips.iter().find(|x| x.vip.label == v.vip.label)
}

/// Each member's counters in an earlier reading of its VIP. A member that was not there yet
/// started from zero (the agent clears an id's counters when it allocates it).
fn baseline(earlier: Option<&VipSample>) -> BTreeMap<Alloc, TrafficStats> {
    earlier
        .map(|v| v.members.iter().map(|m| (m.alloc, m.stats)).collect())
        .unwrap_or_default()
}

fn delta(now: &TrafficStats, then: Option<&TrafficStats>) -> TrafficStats {
    now.since(then.copied().unwrap_or_default())
}

fn vip_row(
    v: &VipSample,
    first: Option<&VipSample>,
    prev: Option<&VipSample>,
    secs: f64,
) -> VipRow {
    let (start, last) = (baseline(first), baseline(prev));
    let since: Vec<u64> = v
        .members
        .iter()
        .map(|m| delta(&m.stats, start.get(&m.alloc)).new_flows)
        .collect();
    let now: Vec<TrafficStats> = v
        .members
        .iter()
        .map(|m| delta(&m.stats, last.get(&m.alloc)))
        .collect();
    let vip_now = delta(&v.stats, prev.map(|p| &p.stats));
    let members_packets: u64 = now.iter().map(|d| d.packets).sum();
    let total_since: u64 = since.iter().sum();
    let total_now: u64 = now.iter().map(|d| d.new_flows).sum();
    let weights = weight_shares(&v.members);
    let share = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64);
    VipRow {
        label: v.vip.label.clone(),
        name: v.vip.name.clone(),
        packets_per_s: vip_now.packets as f64 / secs,
        new_flows_per_s: vip_now.new_flows as f64 / secs,
        drops_per_s: vip_now.packets.saturating_sub(members_packets) as f64 / secs,
        over_budget_per_s: v
            .over_budget
            .saturating_sub(prev.map_or(0, |p| p.over_budget)) as f64
            / secs,
        replies_per_s: v
            .replies
            .map(|r| r.saturating_sub(prev.and_then(|p| p.replies).unwrap_or(0)) as f64 / secs),
        backends: v
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| BackendRow {
                label: m.backend.label.clone(),
                weight: m.weight,
                overridden: m.overridden,
                weight_share: weights.as_ref().map(|w| w[i]),
                share_since_start: share(since[i], total_since),
                share_now: share(now[i].new_flows, total_now),
                new_flows_per_s: now[i].new_flows as f64 / secs,
                health: m.health,
                draining: !m.accepts,
                pinned_flows: m.pinned_flows,
            })
            .collect(),
    }
}

/// Each member's weight over the weights of the members that take new flows (a draining
/// member's share is 0). None if some weight is unknown.
fn weight_shares(members: &[MemberSample]) -> Option<Vec<f64>> {
    let effective: Vec<u32> = members
        .iter()
        .map(|m| m.weight.map(|w| if m.accepts { w } else { 0 }))
        .collect::<Option<_>>()?;
    let total: u32 = effective.iter().sum();
    Some(
        effective
            .iter()
            .map(|w| {
                if total == 0 {
                    0.0
                } else {
                    *w as f64 / total as f64
                }
            })
            .collect(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        model::view::{BackendRef, VipRef},
        observe::top::sample::MemberSample,
    };

    fn stats(packets: u64, new_flows: u64) -> TrafficStats {
        TrafficStats {
            packets,
            bytes: packets * 100,
            new_flows,
        }
    }

    /// Backend `i` (10.1.0.i:80) as member id `i`, with `weight`, its counters, and whether it
    /// takes new flows.
    fn member(i: u32, weight: u32, s: TrafficStats, accepts: bool) -> MemberSample {
        MemberSample {
            alloc: (i, 1),
            backend: BackendRef::at(format!("10.1.0.{i}:80").parse().unwrap()),
            stats: s,
            accepts,
            weight: Some(weight),
            overridden: false,
            health: if accepts {
                Health::Healthy
            } else {
                Health::Unhealthy
            },
            pinned_flows: (!accepts).then_some(PinnedFlows {
                total: 7,
                in_use: 2,
            }),
        }
    }

    fn sample(at: Instant, drops: u64, vip: TrafficStats, members: Vec<MemberSample>) -> Sample {
        // Over budget: a tenth of the VIP's packets so far.
        let over_budget = vip.packets / 10;
        let key = lb_common::VipKey {
            addr: crate::model::desired::addr16("192.0.2.10".parse().unwrap()).0,
            port: 80u16.to_be(),
            proto: 6,
            family: lb_common::FAMILY_V4,
        };
        Sample {
            at,
            drops,
            // As many as the drops: the screen's figure is checked against its own rate.
            half_open: drops,
            vips: vec![VipSample {
                vip: VipRef::of(&key).named(Some("web".into())),
                stats: vip,
                members,
                over_budget,
                // A NAT VIP, whose backends answer three packets for each one over budget.
                replies: Some(over_budget * 3),
            }],
        }
    }

    /// Three readings 2 s apart of a VIP with backends of weights 200:100:100, the third
    /// unhealthy (draining, 7 flows pinned) in the last reading.
    pub(crate) fn three_readings() -> (Sample, Sample, Sample) {
        let t0 = Instant::now();
        let s = |secs, drops, vip, m: [(u64, u64, bool); 3]| {
            let members = m
                .iter()
                .zip([(1, 200), (2, 100), (3, 100)])
                .map(|(&(p, n, ok), (i, w))| member(i, w, stats(p, n), ok))
                .collect();
            sample(t0 + Duration::from_secs(secs), drops, vip, members)
        };
        let first = s(
            0,
            5,
            stats(10, 3),
            [(5, 1, true), (3, 1, true), (2, 1, true)],
        );
        let prev = s(
            2,
            5,
            stats(110, 43),
            [(45, 21, true), (33, 11, true), (22, 11, true)],
        );
        // Over the last 2 s: 100 VIP packets, 90 of them to members (10 dropped), 20 new flows
        // (12 + 8 + 0).
        let cur = s(
            4,
            25,
            stats(210, 63),
            [(95, 33, true), (73, 19, true), (22, 11, false)],
        );
        (first, prev, cur)
    }

    #[test]
    fn shares_since_start_and_now_rates_and_weight_shares_of_the_backends_that_take_flows() {
        let (first, prev, cur) = three_readings();
        let f = build(&first, &prev, &cur);
        assert_eq!(f.interval, Duration::from_secs(2));
        assert_eq!(f.since_start, Duration::from_secs(4));
        assert_eq!(f.drops_per_s, 10.0);
        assert_eq!(f.half_open_per_s, 10.0);
        let v = &f.vips[0];
        assert_eq!(v.label, "192.0.2.10:80/tcp");
        assert_eq!(
            (v.packets_per_s, v.new_flows_per_s, v.drops_per_s),
            (50.0, 10.0, 5.0)
        );
        // Over budget: 21 then 11 (a tenth of 210 and 110 VIP packets): 10 in 2 s.
        assert_eq!(v.over_budget_per_s, 5.0);
        let b = &v.backends;
        // Since the first reading: 32, 18 and 10 new flows of 60.
        let since: Vec<_> = b.iter().map(|b| b.share_since_start.unwrap()).collect();
        assert_eq!(since, [32.0 / 60.0, 18.0 / 60.0, 10.0 / 60.0]);
        let now: Vec<_> = b.iter().map(|b| b.share_now.unwrap()).collect();
        assert_eq!(now, [12.0 / 20.0, 8.0 / 20.0, 0.0]);
        // The unhealthy backend's weight counts for nothing: 200:100 of 300.
        let w: Vec<_> = b.iter().map(|b| b.weight_share.unwrap()).collect();
        assert_eq!(w, [200.0 / 300.0, 100.0 / 300.0, 0.0]);
        assert_eq!(b[0].new_flows_per_s, 6.0);
        assert_eq!(
            b.iter()
                .map(|b| (b.draining, b.pinned_flows))
                .collect::<Vec<_>>(),
            [
                (false, None),
                (false, None),
                (
                    true,
                    Some(PinnedFlows {
                        total: 7,
                        in_use: 2
                    })
                )
            ]
        );
    }

    #[test]
    fn a_member_that_appears_between_readings_counts_from_zero_and_shares_stay_unset_without_flows()
    {
        let t0 = Instant::now();
        let first = sample(t0, 0, stats(0, 0), vec![member(1, 1, stats(0, 0), true)]);
        let cur = sample(
            t0 + Duration::from_secs(1),
            0,
            stats(4, 4),
            vec![
                member(1, 1, stats(0, 0), true),
                member(2, 1, stats(4, 4), true),
            ],
        );
        let f = build(&first, &first, &cur);
        let b = &f.vips[0].backends;
        assert_eq!(
            (b[0].share_since_start, b[1].share_since_start),
            (Some(0.0), Some(1.0))
        );
        let idle = build(&first, &first, &first);
        assert_eq!(idle.vips[0].backends[0].share_since_start, None);
        assert_eq!(idle.vips[0].backends[0].share_now, None);
    }
}
