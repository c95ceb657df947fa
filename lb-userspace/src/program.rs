//! The embedded XDP object, and loading it with this node's sizes.

use std::path::PathBuf;

use aya::{Ebpf, EbpfLoader, programs::Xdp};
use lb_common::maps;

/// The XDP program object, built by `build.rs` from `lb-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "lb";

/// Sizes fixed when the program is loaded. Changing any of them means loading afresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Maglev table size M (prime).
    pub maglev_m: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_entries: u32,
    pub affinity_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            maglev_m: maps::DEFAULT_MAGLEV_M,
            max_vips: maps::DEFAULT_MAX_VIPS,
            max_backends: maps::DEFAULT_MAX_BACKENDS,
            flow_entries: maps::DEFAULT_FLOW_ENTRIES,
            affinity_entries: maps::DEFAULT_AFFINITY_ENTRIES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "{max_vips} VIPs x a table of {maglev_m} slots does not fit one BPF array (at most {} slots)",
        u32::MAX
    )]
    RingTooLarge { max_vips: u32, maglev_m: u32 },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("loading the lb XDP object")]
    Object(#[source] aya::EbpfError),
    #[error("the lb XDP object has no program named {PROGRAM}")]
    NoProgram,
    #[error("the program in the lb XDP object is not an XDP program")]
    NotXdp(#[source] aya::programs::ProgramError),
    #[error("verifying and loading the lb XDP program")]
    Verify(#[source] aya::programs::ProgramError),
}

impl Sizes {
    fn check(&self) -> Result<u32, LoadError> {
        for (what, n) in [
            ("maglev_m", self.maglev_m),
            ("max_vips", self.max_vips),
            ("max_backends", self.max_backends),
            ("flow_entries", self.flow_entries),
            ("affinity_entries", self.affinity_entries),
        ] {
            if n == 0 {
                return Err(LoadError::Zero { what });
            }
        }
        self.max_vips
            .checked_mul(self.maglev_m)
            .ok_or(LoadError::RingTooLarge {
                max_vips: self.max_vips,
                maglev_m: self.maglev_m,
            })
    }
}

/// Loads the object with `sizes` and verifies the XDP program (it is not attached).
/// With `pin_dir`, maps are pinned there by name, or re-used if already pinned.
pub fn load(sizes: &Sizes, pin_dir: Option<PathBuf>) -> Result<Ebpf, LoadError> {
    let ring = sizes.check()?;
    let mut loader = EbpfLoader::new();
    loader
        .override_global(maps::GLOBAL_MAGLEV_M, &sizes.maglev_m, true)
        .map_max_entries(maps::RING, ring)
        .map_max_entries(maps::VIP_STATS, sizes.max_vips)
        .map_max_entries(maps::BACKENDS, sizes.max_backends)
        .map_max_entries(maps::BACKEND_STATS, sizes.max_backends)
        .map_max_entries(maps::FLOWS, sizes.flow_entries)
        .map_max_entries(maps::AFFINITY, sizes.affinity_entries);
    if let Some(dir) = pin_dir {
        loader.default_map_pin_directory(dir);
    }
    let mut ebpf = loader.load(OBJECT).map_err(LoadError::Object)?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(LoadError::NoProgram)?
        .try_into()
        .map_err(LoadError::NotXdp)?;
    prog.load().map_err(LoadError::Verify)?;
    Ok(ebpf)
}
