//! The control plane: Maglev tables, a full sync and one change, the agent's memory, a migration.

use super::*;

pub fn maglev_figures() -> Value {
    let m = 65_537;
    let mut out = serde_json::Map::new();
    for n in [10usize, 100, 1000] {
        let keys: Vec<Vec<u8>> = (0..=n)
            .map(|i| format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256).into_bytes())
            .collect();
        let weights: Vec<u32> = (0..=n).map(|i| 50 + (i % 100) as u32).collect();
        let entries = |upto: usize, skip: Option<usize>| -> Vec<maglev::Entry> {
            (0..upto)
                .filter(|i| Some(*i) != skip)
                .map(|i| maglev::Entry {
                    key: &keys[i],
                    weight: weights[i],
                    value: i as u32,
                })
                .collect()
        };
        let mut times = Vec::new();
        let mut table = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            table = maglev::build(&entries(n, None), m, u32::MAX).unwrap();
            times.push(t.elapsed().as_nanos() as u64);
        }
        let shares = maglev::shares(&table);
        let total: u64 = weights[..n].iter().map(|&w| w as u64).sum();
        let worst = (0..n)
            .map(|i| {
                let want = weights[i] as f64 / total as f64 * m as f64;
                (*shares.get(&(i as u32)).unwrap_or(&0) as f64 / want - 1.0).abs()
            })
            .fold(0.0, f64::max);
        let equal: Vec<maglev::Entry> = (0..n)
            .map(|i| maglev::Entry {
                key: &keys[i],
                weight: 1,
                value: i as u32,
            })
            .collect();
        let eq_table = maglev::build(&equal, m, u32::MAX).unwrap();
        let eq_shares = maglev::shares(&eq_table);
        let balance = *eq_shares.values().max().unwrap() as f64 / (m as f64 / n as f64);
        let moved = |a: &[u32], b: &[u32]| {
            a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / m as f64
        };
        let removed = maglev::build(&entries(n, Some(n / 2)), m, u32::MAX).unwrap();
        let added = maglev::build(&entries(n + 1, None), m, u32::MAX).unwrap();
        out.insert(
            format!("n{n}"),
            json!({
                "build_ms": median(&mut times) as f64 / 1e6,
                "weighted_worst_share_error": worst,
                "equal_weights_largest_over_mean": balance,
                "remove_one_moved": moved(&table, &removed), "remove_ideal": 1.0 / n as f64,
                "add_one_moved": moved(&table, &added), "add_ideal": 1.0 / (n + 1) as f64,
            }),
        );
    }
    out.insert("table_size".into(), json!(m));
    Value::Object(out)
}

/// A `/proc/self/status` figure in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_kib("VmRSS")
}

/// The targets (issue 29): one change, its 99th percentile over the churn run, an
/// unchanged resync and a full sync, in ms; the agent's RSS after the full sync, in KiB.
const CHANGE_MS: f64 = 5.0;
const CHANGE_P99_MS: f64 = 10.0;
const RESYNC_MS: f64 = 1.0;
const FULL_SYNC_MS: f64 = 1000.0;
const RSS_KIB: u64 = 400 << 10;

/// Backend changes in the churn run.
const CHURN: usize = 1000;

/// VIP `i` of the control-plane scale: `backends` backends, each of weight `weight_of(i, b)`.
fn scale_vip(i: usize, backends: usize, weight_of: &dyn Fn(usize, usize) -> u32) -> VipSpec {
    let v4 = |base: [u8; 4], n: usize| {
        IpAddr::from(std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::from(base)) + n as u32,
        ))
    };
    VipSpec {
        name: format!("v{i}"),
        address: v4([192, 0, 0, 0], i),
        port: 80,
        protocol: Protocol::Tcp,
        mode: Mode::Dsr,
        hash: HashOn::FiveTuple,
        affinity_timeout_s: 0,
        table_size: None,
        source_ranges: None,
        new_flow_budget: None,
        port_range: None,
        algorithm: Default::default(),
        backends: (0..backends)
            .map(|b| BackendSpec::new(v4([10, 0, 0, 0], i * backends + b), 0, weight_of(i, b)))
            .collect(),
    }
}

/// What one planned and applied change cost.
struct Step {
    writes: usize,
    plan: Duration,
    total: Duration,
    /// CPU time of every thread of the process (the Maglev builds and table writes run on
    /// every CPU): on a machine shared with other work, the wall time an idle one would take
    /// is about this over the CPUs.
    cpu: Duration,
}

impl Step {
    fn json(&self) -> Value {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        json!({"writes": self.writes, "plan_ms": ms(self.plan), "total_ms": ms(self.total), "cpu_ms": ms(self.cpu)})
    }
}

/// User and system CPU time of the process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn step(planner: &mut Planner, d: &Desired, dp: &mut KernelDataplane) -> Step {
    let (t, cpu) = (Instant::now(), cpu_time());
    let (p, pending) = planner.plan(d, dp.limits()).expect("plan");
    let plan = t.elapsed();
    dp.apply(&p).expect("apply");
    planner.commit(pending);
    Step {
        writes: p.write_count(),
        plan,
        total: t.elapsed(),
        cpu: cpu_time() - cpu,
    }
}

/// [`CHURN`] random backend changes, one at a time: a weight changed (0 drains), or a backend
/// replaced by a new address. Returns each change's time in ns.
fn churn(planner: &mut Planner, d: &mut Desired, dp: &mut KernelDataplane) -> Vec<u64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let mut fresh = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
    (0..CHURN)
        .map(|_| {
            let v = rng.random_range(0..d.vips.len());
            let b = rng.random_range(0..d.vips[v].backends.len());
            let backend = &mut d.vips[v].backends[b];
            if rng.random_bool(0.5) {
                backend.weight = rng.random_range(0..4);
            } else {
                fresh += 1;
                backend.address = IpAddr::from(std::net::Ipv4Addr::from(fresh));
            }
            step(planner, d, dp).total.as_nanos() as u64
        })
        .collect()
}

fn percentiles_ms(mut ns: Vec<u64>) -> Value {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e6;
    json!({"changes": ns.len(), "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

pub fn control_plane(opts: &Options) -> Value {
    let rss_before = rss_kib();
    let sizes = Sizes {
        table_size: 65_537,
        max_vips: opts.vips as u32,
        max_backends: (opts.vips * opts.backends_per_vip) as u32,
        flow_table_size: 1 << 16,
        affinity_table_size: 1 << 10,
        nat_table_size: 1 << 10,
    };
    let ebpf = program::load(&sizes, None).expect("loading lb for the control-plane benchmark");
    let mut dp = KernelDataplane::new(ebpf, sizes.clone()).expect("kernel dataplane");
    let rss_loaded = rss_kib();
    let desired = |w: &dyn Fn(usize, usize) -> u32| Desired {
        node: NodeSpec {
            source_v4: Some("10.255.0.1".parse().unwrap()),
            source_v6: None,
            udp_idle_timeout: Duration::from_secs(30),
            ..Default::default()
        },
        vips: (0..opts.vips)
            .map(|i| scale_vip(i, opts.backends_per_vip, w))
            .collect(),
    };
    let all = desired(&|_, _| 1);
    let mut d = desired(&|i, b| if i == 0 && b == 0 { 0 } else { 1 });
    let mut planner = Planner::new(State::default());
    let full = step(&mut planner, &all, &mut dp);
    let rss = rss_kib();
    let one = step(&mut planner, &d, &mut dp);
    let same = step(&mut planner, &d, &mut dp);
    let churn = percentiles_ms(churn(&mut planner, &mut d, &mut dp));
    let rss_churned = rss_kib();
    assert!(
        dp.read().expect("reading the maps") == *planner.state(),
        "the maps after the churn run hold what the planner thinks"
    );
    let kernel = map_memory(&dp.ebpf);
    let ms = |s: &Step| s.total.as_secs_f64() * 1e3;
    json!({
        "scale": {"vips": opts.vips, "backends_per_vip": opts.backends_per_vip, "table_size": 65_537},
        "full_sync": full.json(),
        "one_backend_change": one.json(),
        "unchanged_resync": same.json(),
        "churn": churn,
        "agent_rss_kib": {"before_load": rss_before, "after_load": rss_loaded, "after_full_sync": rss, "after_churn": rss_churned,
            "anon_after_churn": status_kib("RssAnon"), "file_after_churn": status_kib("RssFile")},
        "targets": {
            "one_backend_change_ms": CHANGE_MS, "churn_p99_ms": CHANGE_P99_MS,
            "unchanged_resync_ms": RESYNC_MS, "full_sync_ms": FULL_SYNC_MS, "agent_rss_kib": RSS_KIB,
            "met": ms(&one) <= CHANGE_MS && churn["p99_ms"].as_f64().unwrap_or(f64::MAX) <= CHANGE_P99_MS
                && ms(&same) <= RESYNC_MS && ms(&full) <= FULL_SYNC_MS && rss <= RSS_KIB,
        },
        "kernel_map_bytes_at_this_scale": kernel,
    })
}

pub fn memory(opts: &Options) -> Value {
    let sizes = Sizes {
        flow_table_size: opts.memory_flows,
        ..Sizes::default()
    };
    let ebpf = program::load(&sizes, None).expect("loading lb for the memory figures");
    let maps = map_memory(&ebpf);
    let total: u64 = maps.values().sum();
    // IPv4 flows live in the bucket table (`flow_table_size` of them), IPv6 flows in the LRU hash.
    let per_entry = maps.get("LB_FLOWS4").copied().unwrap_or(0) as f64 / opts.memory_flows as f64;
    let v6_entries = sizes.flow_table_size_v6();
    let v6_per_entry = maps.get("LB_FLOWS").copied().unwrap_or(0) as f64 / v6_entries as f64;
    json!({"flow_entries": opts.memory_flows, "kernel_map_bytes": maps, "kernel_map_bytes_total": total, "flow_table_bytes_per_entry": per_entry, "v6_flow_entries": v6_entries, "v6_flow_table_bytes_per_entry": v6_per_entry, "sizes": format!("{sizes:?}")})
}

/// A migration that doubles the flow and NAT tables (see `lb_userspace::kernel::migrate`) holding
/// `opts.migration_entries` IPv4 flows and as many NAT translations (both directions), with 1 %
/// more written to the old maps between the copy and the swap (late writes to merge). Reports
/// the copy (while the old program would serve) and the finish (grace period, merge and pin
/// renames: the window in which the late entries are missing from the maps the new program uses).
pub fn migration(opts: &Options) -> Value {
    use aya::maps::{HashMap, MapData};
    use lb_common::{FlowKey, NatFlow, NatReverse, flowtab, maps};
    use lb_userspace::kernel::migrate;
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/lb-bench-migrate-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("making the pin dir");
    let n = opts.migration_entries;
    let sizes = Sizes {
        flow_table_size: n * 3,
        nat_table_size: n + n / 4,
        ..Sizes::default()
    };
    let key = |i: u32| {
        let mut k = FlowKey::default();
        k.src[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
        k.src_port = (1024 + (i % 60_000) as u16).to_be();
        k.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        k.dst_port = 80u16.to_be();
        k.proto = IPPROTO_TCP;
        k.family = lb_common::FAMILY_V4;
        k
    };
    let fill = |ebpf_nat: &mut HashMap<&mut MapData, FlowKey, NatFlow>, from: u32, to: u32| {
        for i in from..to {
            ebpf_nat
                .insert(key(i), NatFlow::default(), 0)
                .expect("NAT entry");
        }
    };
    let mut first = migrate::load(&sizes, &dir, "start", None).expect("loading on empty pins");
    {
        let mut nat: HashMap<_, FlowKey, NatFlow> =
            HashMap::try_from(first.ebpf.map_mut(maps::NAT).unwrap()).unwrap();
        fill(&mut nat, 0, n);
        let mut rev: HashMap<_, FlowKey, NatReverse> =
            HashMap::try_from(first.ebpf.map_mut(maps::NAT_REV).unwrap()).unwrap();
        for i in 0..n {
            rev.insert(key(i), NatReverse::default(), 0)
                .expect("reverse entry");
        }
        let mut dp = KernelDataplane::new(first.ebpf, sizes.clone()).expect("dataplane");
        let buckets = flowtab::buckets_for(sizes.flow_table_size);
        let map = dp.ebpf.map_mut(maps::FLOWS4).unwrap();
        let aya::maps::Map::Array(data) = map else {
            panic!("LB_FLOWS4 is an array")
        };
        let mem = lb_userspace::kernel::mapping::Mapping::new(
            data,
            buckets as usize * size_of::<flowtab::FlowBucket>(),
            true,
        )
        .expect("mapping the flow table");
        // SAFETY: the mapping covers `buckets` buckets, page-aligned.
        let table = unsafe {
            std::slice::from_raw_parts_mut(
                mem.ptr().cast::<flowtab::FlowBucket>(),
                buckets as usize,
            )
        };
        for i in 0..n {
            let k = flowtab::pack_key(&key(i), 0);
            assert!(migrate::convert::place(
                table,
                k,
                flowtab::pack_value(k, 1, 1),
                i
            ));
        }
        first.ebpf = dp.ebpf;
    }
    drop(first);
    let doubled = Sizes {
        flow_table_size: sizes.flow_table_size * 2,
        nat_table_size: sizes.nat_table_size * 2,
        ..sizes.clone()
    };
    let t = Instant::now();
    let mut second = migrate::load(&doubled, &dir, "reload", None).expect("migrating");
    let copy = t.elapsed();
    // Late writes of the old program: 1 % more translations in the old maps.
    let late = (n / 100).max(1);
    {
        let data = MapData::from_pin(dir.join(maps::NAT)).expect("the old NAT map");
        let mut old = aya::maps::Map::from_map_data(data).expect("a map");
        let mut nat: HashMap<_, FlowKey, NatFlow> = HashMap::try_from(&mut old).unwrap();
        fill(&mut nat, n, n + late);
    }
    let t = Instant::now();
    let report = second
        .pending
        .take()
        .expect("the tables moved")
        .finish(&mut second.ebpf)
        .expect("finishing");
    let finish = t.elapsed();
    drop(second);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let _ = std::fs::remove_dir(&dir);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let moved: Vec<Value> = report
        .maps
        .iter()
        .filter(|m| m.entries + m.merged > 0)
        .map(|m| json!({"map": m.map, "entries": m.entries, "merged": m.merged, "ms": m.ms}))
        .collect();
    assert_eq!(
        report.merged,
        u64::from(late),
        "the late writes were merged"
    );
    json!({
        "entries": n,
        "late_writes": late,
        "load_and_copy_ms": ms(copy),
        "finish_ms": ms(finish),
        "entries_copied": report.entries,
        "copy_and_merge_ms": report.maps.iter().map(|m| m.ms).sum::<f64>(),
        "maps": moved,
    })
}
