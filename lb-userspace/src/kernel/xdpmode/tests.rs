use super::*;

/// What the kernel reports of a NIC whose driver runs XDP and takes redirected frames (basic,
/// redirect, ndo-xmit: an i40e or mlx5 port, say).
const NIC: u64 = XDP_ACT_BASIC | 1 << 1 | XDP_ACT_NDO_XMIT;
/// What the kernel reports of a veth, whatever its peer (basic, redirect, rx-sg; ndo-xmit
/// depends on the peer, and is not what decides).
const VETH: u64 = XDP_ACT_BASIC | 1 << 1 | 1 << 5;

fn nic(name: &str, features: Option<u64>) -> LinkFacts {
    LinkFacts {
        name: name.into(),
        features,
        veth_peer: None,
    }
}

fn veth(name: &str, peer: &str, netns: Option<&str>, program: Result<bool, &str>) -> LinkFacts {
    LinkFacts {
        name: name.into(),
        features: Some(VETH),
        veth_peer: Some(Peer {
            name: peer.into(),
            netns: netns.map(str::to_string),
            native_program: program.map_err(str::to_string),
        }),
    }
}

fn modes(c: &[Choice]) -> Vec<(&str, Mode, bool)> {
    c.iter()
        .map(|c| (c.interface.as_str(), c.mode, c.redirect_target))
        .collect()
}

#[test]
fn unset_takes_generic_on_a_veth_whose_peer_has_no_program_and_says_which_peer() {
    let links = [veth("l0", "c0", Some("client"), Ok(false))];
    let c = decide(XdpMode::Auto, &links).unwrap();
    assert_eq!(modes(&c), [("l0", Mode::Generic, true)]);
    assert!(
        c[0].reason
            .starts_with("auto: veth peer c0 in netns client has no XDP program in native mode"),
        "{}",
        c[0].reason
    );
}

#[test]
fn unset_takes_native_on_a_veth_whose_peer_runs_a_native_program() {
    let links = [veth("l0", "c0", None, Ok(true))];
    let c = decide(XdpMode::Auto, &links).unwrap();
    assert_eq!(modes(&c), [("l0", Mode::Native, true)]);
    assert!(c[0].reason.contains("veth peer c0 runs an XDP program"));
}

#[test]
fn explicit_native_on_a_veth_whose_peer_has_no_program_is_refused_with_the_peer_and_the_fix() {
    let links = [
        veth("l0", "c0", Some("client"), Ok(true)),
        veth("l1", "b0", Some("backend"), Ok(false)),
    ];
    let problems = decide(XdpMode::Native, &links).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = &problems[0];
    assert_eq!(p.interface, "l1");
    assert!(
        p.reason
            .starts_with("veth peer b0 in netns backend has no XDP program in native mode"),
        "{}",
        p.reason
    );
    assert!(p.fix.contains("set it to generic"), "{}", p.fix);
    assert!(
        p.fix
            .contains("attach an XDP program in native mode to veth peer b0 in netns backend"),
        "{}",
        p.fix
    );
    let text = Refused(problems).to_string();
    assert!(
        text.starts_with("node.xdp_mode: native XDP cannot deliver on l1: veth peer b0"),
        "{text}"
    );
}

#[test]
fn a_driver_without_native_xdp_gets_generic_unset_and_is_refused_explicit() {
    // A bridge or a VLAN device: the kernel reports no XDP action at all.
    let links = [nic("br0", Some(0))];
    let c = decide(XdpMode::Auto, &links).unwrap();
    assert_eq!(modes(&c), [("br0", Mode::Generic, true)]);
    assert!(c[0].reason.contains("no native XDP"), "{}", c[0].reason);
    let problems = decide(XdpMode::Native, &links).unwrap_err();
    assert_eq!(problems[0].interface, "br0");
    assert!(problems[0].reason.contains("no native XDP"));
    assert!(!problems[0].fix.contains("peer"), "{}", problems[0].fix);
}

#[test]
fn a_nic_that_runs_xdp_and_takes_frames_is_native_unset_and_explicit() {
    let links = [nic("eth0", Some(NIC)), nic("eth1", Some(NIC))];
    for setting in [XdpMode::Auto, XdpMode::Native] {
        let c = decide(setting, &links).unwrap();
        assert_eq!(
            modes(&c),
            [("eth0", Mode::Native, true), ("eth1", Mode::Native, true)]
        );
    }
}

#[test]
fn an_interface_native_redirects_cannot_reach_is_left_out_of_the_devmap_while_another_is_native() {
    // l0's peer takes XDP frames, l1's does not: l0 native, l1 generic, and l0's program must
    // not redirect into l1 (the kernel forwards what goes out of l1).
    let links = [
        veth("l0", "c0", Some("client"), Ok(true)),
        veth("l1", "b0", Some("backend"), Ok(false)),
    ];
    let c = decide(XdpMode::Auto, &links).unwrap();
    assert_eq!(
        modes(&c),
        [("l0", Mode::Native, true), ("l1", Mode::Generic, false)]
    );
    assert!(c[1].reason.contains("not a redirect target"));
}

#[test]
fn a_native_nic_without_ndo_xmit_runs_native_but_is_no_redirect_target() {
    let links = [
        nic("eth0", Some(NIC)),
        nic("eth1", Some(XDP_ACT_BASIC | 1 << 1)),
    ];
    let c = decide(XdpMode::Native, &links).unwrap();
    assert_eq!(
        modes(&c),
        [("eth0", Mode::Native, true), ("eth1", Mode::Native, false)]
    );
    assert!(c[1].reason.contains("lack `ndo-xmit`"), "{}", c[1].reason);
}

#[test]
fn with_every_interface_generic_each_stays_a_redirect_target() {
    let links = [
        veth("l0", "c0", None, Ok(false)),
        veth("l1", "b0", None, Ok(false)),
    ];
    for setting in [XdpMode::Auto, XdpMode::Generic] {
        let c = decide(setting, &links).unwrap();
        assert_eq!(
            modes(&c),
            [("l0", Mode::Generic, true), ("l1", Mode::Generic, true)],
            "{setting}"
        );
    }
}

#[test]
fn explicit_generic_is_kept_even_where_native_would_deliver() {
    let c = decide(XdpMode::Generic, &[nic("eth0", Some(NIC))]).unwrap();
    assert_eq!(modes(&c), [("eth0", Mode::Generic, true)]);
    assert_eq!(c[0].reason, "node.xdp_mode: generic");
}

#[test]
fn a_peer_that_cannot_be_asked_gets_generic_unset_and_native_unchecked_explicit() {
    let links = [veth("l0", "index 7", Some("id 3"), Err("EPERM"))];
    let c = decide(XdpMode::Auto, &links).unwrap();
    assert_eq!(modes(&c), [("l0", Mode::Generic, true)]);
    assert!(c[0].reason.contains("could not tell"), "{}", c[0].reason);
    // The kernel does not count l0 as a redirect target (no `ndo-xmit`): out of the devmap.
    let c = decide(XdpMode::Native, &links).unwrap();
    assert_eq!(modes(&c), [("l0", Mode::Native, false)]);
    assert!(c[0].reason.contains("unchecked"), "{}", c[0].reason);
}

#[test]
fn a_kernel_without_xdp_features_keeps_native_on_a_nic() {
    // Before Linux 6.3 nothing says; attaching does (a driver without native XDP refuses).
    let c = decide(XdpMode::Auto, &[nic("eth0", None)]).unwrap();
    assert_eq!(modes(&c), [("eth0", Mode::Native, true)]);
    assert!(c[0].reason.contains("before 6.3"), "{}", c[0].reason);
}

#[test]
fn a_veth_whose_peer_has_only_gro_is_generic_but_stays_a_redirect_target() {
    // GRO on the peer: the kernel reports `ndo-xmit`, and delivers redirects but not XDP_TX.
    let mut l1 = veth("l1", "b0", Some("backend"), Ok(false));
    l1.features = Some(VETH | XDP_ACT_NDO_XMIT);
    let links = [veth("l0", "c0", Some("client"), Ok(true)), l1];
    let c = decide(XdpMode::Auto, &links).unwrap();
    assert_eq!(
        modes(&c),
        [("l0", Mode::Native, true), ("l1", Mode::Generic, true)]
    );
    assert!(
        c[1].reason.contains("(XDP_TX) in native mode is lost"),
        "{}",
        c[1].reason
    );
    let problems = decide(XdpMode::Native, &links).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].fix.contains("GRO on the peer is not enough"));
}
