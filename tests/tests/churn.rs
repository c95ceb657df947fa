//! Churn: backend changes planned one at a time (each re-planning its own VIP only) leave the
//! kernel's maps as a fresh full sync of the final state writes them, slot by slot.
//!
//! Member ids depend on the order of history (a fresh sync numbers them anew), so a slot is
//! compared by the backend it sends to; the maps are read with aya, not through the agent's
//! dataplane code.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{Array, HashMap};
use lb_common::{Member, NO_BACKEND, VipKey, VipValue, maps};
use lb_userspace::{
    kernel::dataplane::{Dataplane, kernel::KernelDataplane},
    kernel::program::{self, Sizes},
    model::desired::{BackendSpec, Desired, HashOn, Mode, NodeSpec, Protocol, VipSpec},
    model::plan::State,
    model::planner::Planner,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const VIPS: usize = 12;
const BACKENDS: usize = 10;
const CHANGES: usize = 300;

fn sizes() -> Sizes {
    Sizes {
        table_size: 1009,
        max_vips: VIPS as u32 + 4,
        // A VIP grows to BACKENDS + 2 backends at most (`change`).
        max_backends: (VIPS * (BACKENDS + 2)) as u32 + 16,
        flow_table_size: 1 << 12,
        affinity_table_size: 1 << 10,
        nat_table_size: 1 << 10,
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn vip(i: usize) -> VipSpec {
    VipSpec {
        name: format!("v{i}"),
        address: v4(192, 0, 2, i as u8),
        port: 80,
        protocol: Protocol::Tcp,
        mode: if i.is_multiple_of(2) {
            Mode::Dsr
        } else {
            Mode::Nat
        },
        hash: HashOn::FiveTuple,
        affinity_timeout_s: 0,
        table_size: None,
        source_ranges: None,
        new_flow_budget: None,
        port_range: None,
        algorithm: Default::default(),
        backends: (0..BACKENDS)
            .map(|b| BackendSpec::new(v4(10, 1, i as u8, b as u8), 0, 1))
            .collect(),
    }
}

/// One random change: a weight (0 drains), a backend replaced, added or removed, and now and
/// then a VIP removed or added back.
fn change(rng: &mut StdRng, d: &mut Desired, next_octet: &mut u8) {
    if rng.random_bool(0.03) && d.vips.len() > 1 {
        let i = rng.random_range(0..d.vips.len());
        d.vips.remove(i);
        return;
    }
    let missing = (0..VIPS).find(|i| !d.vips.iter().any(|v| v.name == format!("v{i}")));
    if let Some(i) = missing.filter(|_| rng.random_bool(0.03)) {
        d.vips.push(vip(i));
        return;
    }
    let v = rng.random_range(0..d.vips.len());
    let backends = &mut d.vips[v].backends;
    let b = rng.random_range(0..backends.len());
    match rng.random_range(0..4) {
        0 => backends[b].weight = rng.random_range(0..4),
        1 if backends.len() > 1 => drop(backends.remove(b)),
        _ if backends.len() < BACKENDS + 2 => {
            *next_octet = next_octet.wrapping_add(1);
            let octet = *next_octet;
            let fresh = v4(10, 2, rng.random_range(0..VIPS as u8), octet);
            if !backends.iter().any(|x| x.address == fresh) {
                backends.push(BackendSpec::new(fresh, 0, rng.random_range(1..3)));
            }
        }
        _ => backends[b].weight = 1,
    }
}

fn dataplane() -> KernelDataplane {
    let ebpf = program::load(&sizes(), None).expect("loading the program");
    KernelDataplane::new(ebpf, sizes()).expect("the dataplane")
}

fn sync(planner: &mut Planner, dp: &mut KernelDataplane, d: &Desired) {
    let (plan, pending) = planner.plan(d, dp.limits()).expect("planning");
    dp.apply(&plan).expect("writing the maps");
    planner.commit(pending);
}

/// A backend as a slot sees it: family, address and port (or none), and its flags.
type Backend = Option<(u8, [u8; 16], u16, u8)>;

/// Each VIP's value (its id cleared) and, slot by slot, the backend its table sends to, read
/// from the maps.
fn tables(dp: &KernelDataplane) -> BTreeMap<VipKey, (VipValue, Vec<Backend>)> {
    let m = sizes().table_size;
    let vips: HashMap<_, VipKey, VipValue> =
        HashMap::try_from(dp.ebpf.map(maps::VIPS).unwrap()).unwrap();
    let members: Array<_, Member> = Array::try_from(dp.ebpf.map(maps::MEMBERS).unwrap()).unwrap();
    let ring: Array<_, u32> = Array::try_from(dp.ebpf.map(maps::RING).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for kv in vips.iter() {
        let (k, v) = kv.unwrap();
        let slots = (0..v.table_size_of(m))
            .map(|s| {
                let id = ring.get(&(v.id * m + s), 0).unwrap();
                (id != NO_BACKEND).then(|| {
                    let b = members.get(&id, 0).unwrap();
                    assert_eq!(
                        b.vip_id, v.id,
                        "slot {s} of {k:?} names another VIP's member"
                    );
                    (b.family, b.addr, b.port, b.flags)
                })
            })
            .collect();
        out.insert(k, (VipValue { id: 0, ..v }, slots));
    }
    out
}

#[test]
fn the_maps_after_a_churn_run_equal_a_fresh_full_sync_slot_by_slot() {
    lb_tests::require_root();
    let mut d = Desired {
        node: NodeSpec {
            source_v4: Some(Ipv4Addr::new(10, 255, 0, 1)),
            ..Default::default()
        },
        vips: (0..VIPS).map(vip).collect(),
    };
    let mut churned = dataplane();
    let mut planner = Planner::new(State::default());
    sync(&mut planner, &mut churned, &d);
    let mut rng = StdRng::seed_from_u64(29);
    let mut octet = 0;
    for _ in 0..CHANGES {
        change(&mut rng, &mut d, &mut octet);
        sync(&mut planner, &mut churned, &d);
    }
    let mut fresh = dataplane();
    sync(&mut Planner::new(State::default()), &mut fresh, &d);

    let (a, b) = (tables(&churned), tables(&fresh));
    assert_eq!(a.len(), d.vips.len(), "one VIP in the maps per VIP desired");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same VIPs"
    );
    for (k, (value, slots)) in &a {
        let (fresh_value, fresh_slots) = &b[k];
        assert_eq!(value, fresh_value, "the value of {k:?}");
        let differ = slots
            .iter()
            .zip(fresh_slots)
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(
            differ, 0,
            "{differ} slots of {k:?} differ from a fresh sync"
        );
        assert_eq!(slots.len(), fresh_slots.len());
    }
}
