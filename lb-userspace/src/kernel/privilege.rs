//! The capabilities lb needs, and which of them this process lacks, so that a refusal by the
//! kernel (EPERM, or EACCES from a verifier denied CAP_PERFMON's pointer arithmetic) can be
//! explained by what is missing instead of a bare "Operation not permitted".

/// A capability and what lb needs it for.
struct Cap {
    name: &'static str,
    bit: u32,
    /// CAP_SYS_ADMIN grants it too (kernels before 5.8 know only that).
    in_sys_admin: bool,
}

const CAP_SYS_ADMIN: u32 = 21;

const LOAD: [Cap; 2] = [
    Cap {
        name: "CAP_BPF",
        bit: 39,
        in_sys_admin: true,
    },
    Cap {
        name: "CAP_PERFMON",
        bit: 38,
        in_sys_admin: true,
    },
];
const ATTACH: Cap = Cap {
    name: "CAP_NET_ADMIN",
    bit: 12,
    in_sys_admin: false,
};

/// What `lb run` needs, for messages.
/// What loading the program needs, for messages.
pub const LOAD_NAMES: &str = "CAP_BPF and CAP_PERFMON";

pub const NEEDED: &str = "root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
                          (CAP_SYS_ADMIN in place of the first two on kernels before 5.8)";

/// What `lb decap` needs to load and attach `lb_decap`, for messages (the verifier takes that
/// small program without CAP_PERFMON).
pub const ATTACH_NEEDED: &str = "root, or the capabilities CAP_BPF and CAP_NET_ADMIN \
                                 (CAP_SYS_ADMIN in place of CAP_BPF on kernels before 5.8)";

/// This process's effective capabilities (from /proc/self/status); None if unreadable.
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn lacking<'a>(eff: u64, caps: impl IntoIterator<Item = &'a Cap>) -> Vec<&'static str> {
    let has = |bit: u32| eff & (1 << bit) != 0;
    caps.into_iter()
        .filter(|c| !(has(c.bit) || c.in_sys_admin && has(CAP_SYS_ADMIN)))
        .map(|c| c.name)
        .collect()
}

/// Capabilities missing to load the program (not to attach it); empty if none or unknown.
pub fn missing_to_load() -> Vec<&'static str> {
    effective().map_or_else(Vec::new, |eff| lacking(eff, &LOAD))
}

/// Capabilities missing to run the agent; empty if none or unknown.
pub fn missing_to_run() -> Vec<&'static str> {
    effective().map_or_else(Vec::new, |eff| lacking(eff, LOAD.iter().chain([&ATTACH])))
}

/// Capabilities missing to load and attach a program that needs no CAP_PERFMON (`lb decap`);
/// empty if none or unknown.
pub fn missing_to_attach() -> Vec<&'static str> {
    effective().map_or_else(Vec::new, |eff| lacking(eff, [&LOAD[0], &ATTACH]))
}

/// If `e` (or one of its sources) is the kernel refusing an operation and this process lacks
/// capabilities lb needs, a sentence saying what lb needs and what is missing.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    let mut refused = false;
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            refused = true;
        }
        cur = c.source();
    }
    let missing = missing_to_run();
    (refused && !missing.is_empty()).then(|| {
        format!(
            "lb needs {NEEDED}; this process lacks {}",
            missing.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_stands_for_bpf_and_perfmon_but_not_net_admin() {
        let bits = |b: &[u32]| b.iter().map(|b| 1u64 << b).sum::<u64>();
        let all = || LOAD.iter().chain([&ATTACH]);
        assert_eq!(lacking(bits(&[39, 38, 12]), all()), Vec::<&str>::new());
        assert_eq!(lacking(bits(&[21]), all()), ["CAP_NET_ADMIN"]);
        assert_eq!(lacking(bits(&[39, 12]), all()), ["CAP_PERFMON"]);
        assert_eq!(
            lacking(0, all()),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
    }
}
