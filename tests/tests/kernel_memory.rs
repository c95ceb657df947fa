//! The kernel memory `lb check` and `lb run` work out for a node's sizes before making any map
//! (`lb_userspace::kernel::mapmem`), against the kernel's own count once the program is loaded with
//! those sizes: the `memlock` line in the fdinfo of every map it made.
//!
//! Tolerance: the estimate follows the kernel's own accounting formula for each map type; what
//! it takes as a constant is each map's struct (`struct bpf_array`, `struct bpf_htab`, ...), as
//! Linux 6.18 on x86-64 has them, which other kernel versions and builds make some tens or
//! hundreds of bytes larger or smaller, and never 1 KiB. So each map must be within 1 KiB of the
//! kernel's count, and the total within 1 KiB per map; a formula gone wrong (a value not rounded
//! up, the buckets or a CPU's share missed) is off by far more at each of these sizes.

use std::collections::BTreeMap;

use lb_tests::harness::{Lb, map_memory};
use lb_userspace::{kernel::mapmem, kernel::program::Sizes};

const PER_MAP_SLACK: u64 = 1024;

/// Loads the program with `sizes` and compares the estimate with the kernel's count, map by map.
fn estimate_matches_the_kernel(sizes: Sizes) {
    let lb = Lb::load(sizes.clone());
    let kernel = map_memory(&lb.ebpf);
    let cpus = lb_userspace::kernel::program::possible_cpus();
    let estimated: BTreeMap<String, u64> = mapmem::maps_for(&sizes)
        .expect("the object's maps")
        .into_iter()
        .map(|(name, def)| (name, def.bytes(cpus)))
        .collect();
    assert_eq!(
        kernel.keys().collect::<Vec<_>>(),
        estimated.keys().collect::<Vec<_>>(),
        "every map the kernel made is estimated, and only those"
    );
    let off: Vec<String> = kernel
        .iter()
        .filter(|(name, k)| estimated[*name].abs_diff(**k) > PER_MAP_SLACK)
        .map(|(name, k)| format!("{name}: kernel {k}, estimated {}", estimated[name]))
        .collect();
    assert!(
        off.is_empty(),
        "{sizes}: maps off by more than 1 KiB:\n{}",
        off.join("\n")
    );
    let (k, e): (u64, u64) = (kernel.values().sum(), estimated.values().sum());
    let need = mapmem::need(&sizes).expect("the need").total;
    assert_eq!(need, e, "the need is the sum of the maps");
    assert!(
        e.abs_diff(k) <= PER_MAP_SLACK * kernel.len() as u64,
        "{sizes}: kernel {k} bytes, estimated {e}"
    );
}

#[test]
fn the_estimate_matches_the_kernels_memlock_for_small_sizes() {
    estimate_matches_the_kernel(Sizes {
        table_size: 1009,
        max_vips: 8,
        max_backends: 256,
        flow_table_size: 65_536,
        affinity_table_size: 1024,
        nat_table_size: 4096,
    });
}

#[test]
fn the_estimate_matches_the_kernels_memlock_for_the_default_sizes() {
    estimate_matches_the_kernel(Sizes::default());
}

#[test]
fn the_estimate_matches_the_kernels_memlock_for_sizes_of_760_mib_that_are_no_powers_of_two() {
    // LRU buckets round up to a power of two; the Maglev ring and the flow buckets take pages.
    estimate_matches_the_kernel(Sizes {
        table_size: 65_537,
        max_vips: 256,
        max_backends: 20_000,
        flow_table_size: 3_000_000,
        affinity_table_size: 300_000,
        nat_table_size: 1_500_000,
    });
}
