//! The benchmark at a small scale, so `cargo xtask bench` cannot rot: every key the issue names
//! is present, every case took the path it is named for (checked inside), resyncs write nothing.

#[test]
fn bench_smoke() {
    lb_tests::require_root();
    let v = lb_tests::bench::run(&lb_tests::bench::Options::smoke());
    // The migration section: every entry copied, the late writes merged (asserted inside).
    let m = &v["migration"];
    assert_eq!(m["entries_copied"].as_u64(), Some(3 * 2_000), "{m}");
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
        "v4_tcp_new_flow_full_table",
    ] {
        let c = &f[case];
        assert!(
            c["ns"].as_u64().is_some() && c["ratio_to_floor"].as_f64().is_some(),
            "{case}: {c}"
        );
        // Every case the issue sets a target for says whether it met it.
        assert!(
            c["target_x_floor"].as_f64().is_some() && c["met"].is_boolean(),
            "{case}: {c}"
        );
    }
    for case in [
        "breakdown_vip_no_backend",
        "breakdown_established_no_encap",
        "breakdown_established_encap_fib_fails",
    ] {
        assert!(f[case]["ns"].as_u64().is_some(), "{case}: {}", f[case]);
    }
    // New flows are timed on a table of their own: emptied before each round, or full.
    assert_eq!(f["v4_tcp_new_flow"]["instance"], "EmptyTable");
    assert_eq!(f["v4_tcp_new_flow_full_table"]["instance"], "FullTable");
    let per_entry = f["flow_table"]["bytes_per_entry"].as_f64().unwrap();
    assert!(per_entry > 0.0, "{}", f["flow_table"]);
    let fw = &v["forwarding_rate"];
    match fw["unavailable"].as_str() {
        // The kernel refuses live frames here (the reason is the kernel's, printed): every other
        // section still runs and is checked.
        Some(why) => {
            eprintln!("bench_smoke: forwarding section not run: {why}");
            assert!(why.contains("BPF_F_TEST_XDP_LIVE_FRAMES"), "{why}");
        }
        None => {
            for k in ["lb_established_v4", "floor", "lb_established_v4_2cores"] {
                assert!(fw[k]["pps"].as_u64().unwrap() > 0, "{fw}");
            }
            assert!(fw["ratio_2cores_to_1core"].as_f64().unwrap() > 0.0, "{fw}");
            // Each round accounts for every frame: none lost to a full ring, lb ran on the
            // generators' CPUs only (checked inside; recorded here).
            let rounds = fw["rounds"].as_array().unwrap();
            assert_eq!(rounds.len(), 3 * 5, "{fw}");
            for r in rounds {
                assert_eq!(r["ring_full"], 0, "{r}");
                assert_eq!(r["refused"], 0, "{r}");
            }
        }
    }
    // The NAT peer: lb's and kube-proxy-style nftables NAT's rates on one core, each round's
    // frames checked whole (samples) and accounted for (asserted inside), the target marked.
    let np = &v["nat_peer"];
    for k in ["lb_pps", "nftables_pps"] {
        assert!(np[k]["median"].as_u64().unwrap() > 0, "{np}");
        assert!(np["loop"][k]["median"].as_u64().unwrap() > 0, "{np}");
    }
    assert!(
        np["ratio"].as_f64().unwrap() > 0.0 && np["met"].is_boolean(),
        "{np}"
    );
    assert_eq!(np["rounds"].as_array().unwrap().len(), 2 * 5, "{np}");
    for p in ["lb", "lb_floor"] {
        let info = &v["programs"][p];
        assert!(
            info["translated_insns"].as_u64().unwrap() > 0
                && info["jited_bytes"].as_u64().unwrap() > 0
                && info["verified_insns"].as_u64().unwrap() > 0,
            "{p}: {info}"
        );
    }
    assert!(
        v["memory"]["flow_table_bytes_per_entry"].as_f64().unwrap() > 0.0,
        "{}",
        v["memory"]
    );
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
        v["memory"]["kernel_map_bytes"]["LB_FLOWS4"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        v["memory"]
    );
    eprintln!("{}", lb_tests::bench::table(&v));
}
