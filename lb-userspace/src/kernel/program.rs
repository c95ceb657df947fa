//! The embedded XDP object, loading it with this node's sizes, and its pinned maps.
//!
//! With a pin directory, every map is pinned there by name (`<dir>/LB_FLOWS`, ...) and re-used
//! if already pinned, so a restarted agent keeps the flow table, the counters and everything
//! else. Before re-using pins, their `LB_META` is checked: maps made by another layout version or
//! for other sizes are refused with an error saying how to start over.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, ProgramArray},
    programs::Xdp,
};
use lb_common::{LayoutMeta, maps};

/// The XDP program object, built by `build.rs` from `lb-ebpf`.
/// Empty when built with `AYA_BUILD_SKIP=1` (for unit tests and lints): use [`object`].
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The embedded object, or why there is none.
pub fn object() -> Result<&'static [u8], LoadError> {
    match OBJECT.is_empty() {
        true => Err(LoadError::NoObject),
        false => Ok(OBJECT),
    }
}

/// For the unit tests that read the real object: fails the test, saying why, in a build with the
/// stub (`AYA_BUILD_SKIP=1`), so that such a test never passes on it.
#[cfg(test)]
pub(crate) fn require_object() {
    assert!(
        !OBJECT.is_empty(),
        "this test reads the XDP object, and this build has the empty stub (AYA_BUILD_SKIP=1): \
         run it without AYA_BUILD_SKIP (docs/tests.md)"
    );
}

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "lb";

/// Where an agent pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// The CPUs online (read once): a VIP's new-flow budget is shared out over them (see
/// `lb_common::budget`). At least 1.
pub fn online_cpus() -> u32 {
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        aya::util::online_cpus()
            .map(|c| c.len() as u32)
            .unwrap_or(1)
            .max(1)
    })
}

/// The CPUs the kernel may ever bring online (read once): what a per-CPU map holds a value
/// for. At least [`online_cpus`].
pub fn possible_cpus() -> u32 {
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        aya::util::nr_cpus()
            .map(|n| n as u32)
            .unwrap_or(0)
            .max(online_cpus())
    })
}

/// Sizes fixed when the program is loaded, named as the config keys that set them
/// (`node.table_size`, ...). Changing any of them means loading afresh.
///
/// In the status file and `lb status -o json` (`sizes`) the table sizes keep the names they had
/// there since 0.1.0 (`flow_entries`, `affinity_entries`, `nat_entries`), beside the derived
/// `flow_entries_v6`; see the `Serialize` impl.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Sizes {
    /// Maglev table size M (prime).
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Entries of the IPv4 flow table.
    #[serde(rename = "flow_entries")]
    pub flow_table_size: u32,
    #[serde(rename = "affinity_entries")]
    pub affinity_table_size: u32,
    /// Size of each NAT table (forward and reverse).
    #[serde(rename = "nat_entries")]
    pub nat_table_size: u32,
}

/// The status file's `sizes`: the fields under their serialized names, and `flow_entries_v6`
/// ([`Sizes::flow_table_size_v6`]), which readers print beside them.
impl serde::Serialize for Sizes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("Sizes", 7)?;
        st.serialize_field("table_size", &self.table_size)?;
        st.serialize_field("max_vips", &self.max_vips)?;
        st.serialize_field("max_backends", &self.max_backends)?;
        st.serialize_field("flow_entries", &self.flow_table_size)?;
        st.serialize_field("flow_entries_v6", &self.flow_table_size_v6())?;
        st.serialize_field("affinity_entries", &self.affinity_table_size)?;
        st.serialize_field("nat_entries", &self.nat_table_size)?;
        st.end()
    }
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            table_size: maps::DEFAULT_TABLE_SIZE,
            max_vips: maps::DEFAULT_MAX_VIPS,
            max_backends: maps::DEFAULT_MAX_BACKENDS,
            flow_table_size: maps::DEFAULT_FLOW_TABLE_SIZE,
            affinity_table_size: maps::DEFAULT_AFFINITY_TABLE_SIZE,
            nat_table_size: maps::DEFAULT_NAT_TABLE_SIZE,
        }
    }
}

impl Sizes {
    pub fn meta(&self) -> LayoutMeta {
        LayoutMeta {
            version: crate::kernel::migrate::schema::record_version(),
            table_size: self.table_size,
            max_vips: self.max_vips,
            max_backends: self.max_backends,
            flow_table_size: self.flow_table_size,
            affinity_table_size: self.affinity_table_size,
            nat_table_size: self.nat_table_size,
            _pad: 0,
        }
    }

    pub fn from_meta(m: &LayoutMeta) -> Self {
        Self {
            table_size: m.table_size,
            max_vips: m.max_vips,
            max_backends: m.max_backends,
            flow_table_size: m.flow_table_size,
            affinity_table_size: m.affinity_table_size,
            nat_table_size: m.nat_table_size,
        }
    }

    /// Entries of the IPv6 flow table (an LRU hash; IPv4 flows have the bucket table of
    /// `flow_table_size`): a quarter of `flow_table_size`, at least 1,024.
    pub fn flow_table_size_v6(&self) -> u32 {
        (self.flow_table_size / 4).max(1024)
    }

    pub fn limits(&self) -> crate::model::plan::Limits {
        crate::model::plan::Limits {
            table_size: self.table_size,
            max_vips: self.max_vips,
            max_backends: self.max_backends,
            cpus: online_cpus(),
        }
    }

    /// Each size with the config key that sets it.
    fn keyed(&self) -> [(&'static str, u32); Self::KEYS] {
        let mut s = self.clone();
        std::array::from_fn(|i| {
            let (key, n) = s.key_mut(i);
            (key, *n)
        })
    }

    /// How many sizes [`Sizes::key_mut`] knows.
    pub const KEYS: usize = 6;

    /// Size `i` (0..[`Sizes::KEYS`]), with the config key that sets it, to change.
    pub fn key_mut(&mut self, i: usize) -> (&'static str, &mut u32) {
        match i {
            0 => ("node.table_size", &mut self.table_size),
            1 => ("node.max_vips", &mut self.max_vips),
            2 => ("node.max_backends", &mut self.max_backends),
            3 => ("node.flow_table_size", &mut self.flow_table_size),
            4 => ("node.affinity_table_size", &mut self.affinity_table_size),
            _ => ("node.nat_table_size", &mut self.nat_table_size),
        }
    }

    /// The sizes that differ in `new`, by config key: `node.table_size 1009 -> 1013`.
    pub fn changes_to(&self, new: &Sizes) -> String {
        self.keyed()
            .iter()
            .zip(new.keyed())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((k, a), (_, b))| format!("{k} {a} -> {b}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn check(&self) -> Result<u32, LoadError> {
        for (what, n) in self.keyed() {
            if n == 0 {
                return Err(LoadError::Zero { what });
            }
        }
        self.max_vips
            .checked_mul(self.table_size)
            .ok_or(LoadError::RingTooLarge {
                max_vips: self.max_vips,
                table_size: self.table_size,
            })
    }
}

/// The sizes by config key: `node.table_size 65537, node.max_vips 64, ...`.
impl std::fmt::Display for Sizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keyed = self.keyed();
        for (i, (k, n)) in keyed.iter().enumerate() {
            let sep = if i + 1 < keyed.len() { ", " } else { "" };
            write!(f, "{k} {n}{sep}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "node.max_vips {max_vips} x node.table_size {table_size} slots does not fit one BPF array (at most {} slots)",
        u32::MAX
    )]
    RingTooLarge { max_vips: u32, table_size: u32 },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error(
        "the maps pinned in {dir} cannot be used as they are: {found}; `lb run` migrates them \
         (keeping every connection)"
    )]
    Incompatible { dir: String, found: String },
    #[error("pinning the map {name} in {dir} (is it on a bpffs? `mount -t bpf bpf /sys/fs/bpf`)")]
    PinMap {
        name: String,
        dir: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("reading the pinned {path}")]
    Pin {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "this lb was built with AYA_BUILD_SKIP=1 and has no XDP program: build it again without it"
    )]
    NoObject,
    #[error("loading the lb XDP object")]
    Object(#[source] aya::EbpfError),
    #[error("the lb XDP object has no program named {PROGRAM}")]
    NoProgram,
    #[error("the program in the lb XDP object is not an XDP program")]
    NotXdp(#[source] aya::programs::ProgramError),
    #[error("verifying and loading the lb XDP program")]
    Verify(#[source] aya::programs::ProgramError),
    #[error("installing the NAT program")]
    Install(#[source] std::io::Error),
    #[error("writing {what}")]
    Write {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Opens a pinned map.
pub fn open_pinned(dir: &Path, name: &str) -> Result<Map, LoadError> {
    // Pinned under its schema's name (`LB_VIPS@v2`); an older release's agent pins the first
    // schema under the plain name (read as this release's where only a meaning was added).
    let path = crate::kernel::migrate::schema::of(name)
        .map(|s| dir.join(s.pin_name()))
        .filter(|p| p.exists())
        .unwrap_or_else(|| dir.join(name));
    let pin = |source| LoadError::Pin {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(pin)?;
    Map::from_map_data(data).map_err(pin)
}

/// The layout recorded in `dir`, if it holds lb pins at all.
pub fn pinned_meta(dir: &Path) -> Result<Option<LayoutMeta>, LoadError> {
    if !dir.join(maps::META).exists() {
        return Ok(None);
    }
    let map = open_pinned(dir, maps::META)?;
    let arr: Array<_, LayoutMeta> = Array::try_from(map).map_err(|source| LoadError::Pin {
        path: dir.join(maps::META).display().to_string(),
        source,
    })?;
    arr.get(&0, 0).map(Some).map_err(|source| LoadError::Pin {
        path: dir.join(maps::META).display().to_string(),
        source,
    })
}

/// Sets `sizes` on `loader`: the globals the verifier takes as constants and every sized map.
/// `flow_buckets` is [`lb_common::flowtab::buckets_for`] of the flow table's size (borrowed by
/// the loader, so the caller keeps it).
pub fn configure<'a>(loader: &mut EbpfLoader<'a>, sizes: &'a Sizes, flow_buckets: &'a u32) {
    loader
        .override_global(maps::GLOBAL_MAGLEV_M, &sizes.table_size, true)
        .override_global(maps::GLOBAL_FLOW_BUCKETS, flow_buckets, true);
    for s in crate::kernel::migrate::schema::current() {
        loader.map_max_entries(s.map, (s.entries)(sizes));
    }
}

/// Loads the object with `sizes` and verifies the XDP program (it is not attached).
/// With `pin_dir`, maps are pinned there by name, or re-used if already pinned with their
/// schema and size (a load that would have to migrate them is refused: the agent migrates, see
/// [`crate::kernel::migrate`]).
pub fn load(sizes: &Sizes, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    sizes.check()?;
    let flow_buckets = lb_common::flowtab::buckets_for(sizes.flow_table_size);
    let mut loader = EbpfLoader::new();
    configure(&mut loader, sizes, &flow_buckets);
    let paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => {
            let plan = crate::kernel::migrate::pins::plan(dir, sizes).map_err(|e| {
                LoadError::Incompatible {
                    dir: dir.display().to_string(),
                    found: crate::error_chain(&e),
                }
            })?;
            if plan.migrates() {
                return Err(LoadError::Incompatible {
                    dir: dir.display().to_string(),
                    found: format!("for other sizes or schemas ({})", plan.summary()),
                });
            }
            plan.maps
                .iter()
                .map(|m| (m.schema.map, m.pin(dir)))
                .collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(object()?)
        .map_err(|e| object_error(e, pin_dir))?;
    if pin_dir.is_some() {
        write_meta(&mut ebpf, sizes)?;
    }
    verify(&mut ebpf)?;
    Ok(ebpf)
}

/// The error of [`EbpfLoader::load`], naming the map a pin failed for.
pub fn object_error(e: aya::EbpfError, pin_dir: Option<&Path>) -> LoadError {
    match e {
        aya::EbpfError::MapError(aya::maps::MapError::PinError { name, error }) => {
            LoadError::PinMap {
                name: name.unwrap_or_default(),
                dir: pin_dir.map(|d| d.display().to_string()).unwrap_or_default(),
                source: error,
            }
        }
        e => LoadError::Object(e),
    }
}

/// Writes the layout record (`LB_META`) for `sizes`: what release 0.1.0 checks before it
/// adopts pins, kept true while every map is at a schema 0.1.0 reads.
pub fn write_meta(ebpf: &mut Ebpf, sizes: &Sizes) -> Result<(), LoadError> {
    let map = ebpf.map_mut(maps::META).ok_or(LoadError::NoProgram)?;
    let mut meta: Array<_, LayoutMeta> =
        Array::try_from(map).map_err(|source| LoadError::Write {
            what: "the layout record",
            source,
        })?;
    meta.set(0, sizes.meta(), 0)
        .map_err(|source| LoadError::Write {
            what: "the layout record",
            source,
        })
}

/// Verifies and loads the XDP programs of a loaded object, and fills its tail-call table.
pub fn verify(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(LoadError::NoProgram)?
        .try_into()
        .map_err(LoadError::NotXdp)?;
    prog.load().map_err(LoadError::Verify)?;
    install_tail_call(ebpf, maps::TOO_BIG_PROGRAM, maps::TOO_BIG_PROG_INDEX)?;
    install_tail_call(ebpf, maps::ICMP_PROGRAM, maps::ICMP_PROG_INDEX)?;
    Ok(())
}

/// Loads program `name` and puts it where `lb` tail-calls it, at `index` of the tail-call table.
fn install_tail_call(ebpf: &mut Ebpf, name: &str, index: u32) -> Result<(), LoadError> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoadError::NoProgram)?
        .try_into()
        .map_err(LoadError::NotXdp)?;
    prog.load().map_err(LoadError::Verify)?;
    let fd = prog
        .fd()
        .map_err(LoadError::Verify)?
        .try_clone()
        .map_err(LoadError::Install)?;
    let map = ebpf.map_mut(maps::PROGS).ok_or(LoadError::NoProgram)?;
    let mut progs = ProgramArray::try_from(map).map_err(|source| LoadError::Write {
        what: "the tail-call table",
        source,
    })?;
    progs.set(index, &fd, 0).map_err(|source| LoadError::Write {
        what: "the tail-call table",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status file's `sizes` keep the names of 0.1.0 (readers of older and newer files
    /// alike, `lb status -o json` users), and read back.
    #[test]
    fn sizes_serialize_under_the_status_files_names_and_read_back() {
        let sizes = Sizes {
            table_size: 1009,
            max_vips: 8,
            max_backends: 64,
            flow_table_size: 8192,
            affinity_table_size: 512,
            nat_table_size: 2048,
        };
        let v = serde_json::to_value(&sizes).unwrap();
        let want = serde_json::json!({
            "table_size": 1009, "max_vips": 8, "max_backends": 64, "flow_entries": 8192,
            "flow_entries_v6": 2048, "affinity_entries": 512, "nat_entries": 2048,
        });
        assert_eq!(v, want);
        assert_eq!(serde_json::from_value::<Sizes>(v).unwrap(), sizes);
    }
}
