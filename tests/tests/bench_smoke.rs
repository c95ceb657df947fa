//! The benchmark at a small scale, so `cargo xtask bench` cannot rot: every key the issue names
//! is present, every case took the path it is named for (checked inside), resyncs write nothing.

#[test]
fn bench_smoke() {
    lb_tests::require_root();
    let v = lb_tests::bench::run(&lb_tests::bench::Options::smoke());
    let f = &v["fastpath"];
    assert!(f["floor_ns"].as_u64().unwrap() > 0, "{f}");
    for case in [
        "pass_non_vip",
        "v4_tcp_new_flow",
        "v4_tcp_established_1flow",
        "v4_tcp_established_1m_flows",
        "v4_affinity_hit",
        "v6_tcp_established_1flow",
        "v4_nat_new_flow",
        "v4_nat_established_1flow",
        "v4_nat_reply",
    ] {
        let c = &f[case];
        assert!(
            c["ns"].as_u64().is_some() && c["ratio_to_floor"].as_f64().is_some(),
            "{case}: {c}"
        );
    }
    for k in ["lb_established_v4", "floor"] {
        assert!(
            v["forwarding_rate"][k]["pps"].as_u64().unwrap() > 0,
            "{}",
            v["forwarding_rate"]
        );
    }
    for n in ["n10", "n100", "n1000"] {
        assert!(
            v["maglev"][n]["build_ms"].as_f64().is_some(),
            "{}",
            v["maglev"]
        );
    }
    assert_eq!(
        v["control_plane"]["unchanged_resync"]["writes"], 0,
        "{}",
        v["control_plane"]
    );
    assert!(v["control_plane"]["full_sync"]["writes"].as_u64().unwrap() >= 20 * 65_537);
    assert!(
        v["memory"]["kernel_map_bytes"]["LB_FLOWS"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        v["memory"]
    );
    eprintln!("{}", lb_tests::bench::table(&v));
}
