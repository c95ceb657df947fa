//! Reading a map's entries into memory as bytes, and writing them into another map, whatever
//! the map's key and value types: the kernel side of a migration (the conversions in between
//! are in [`super::convert`]).

use std::collections::BTreeMap;

use aya::maps::{
    Array, DevMapHash, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
};
use lb_common::flowtab::FlowBucket;

use super::schema::{Schema, Shape};
use crate::kernel::mapping::Mapping;

/// A map's entries, as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snapshot {
    /// Hash maps: key -> value.
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    /// Arrays: the values one after another.
    Array(Vec<u8>),
    /// Per-CPU arrays: per CPU, the values one after another.
    PerCpu(Vec<Vec<u8>>),
    /// The IPv4 flow table.
    Buckets(Vec<FlowBucket>),
    /// The redirect devmap: ifindex -> target ifindex.
    Ports(BTreeMap<u32, u32>),
    /// Nothing copied (tail-call tables, per-CPU scratch).
    Nothing,
}

impl Snapshot {
    /// Entries it holds (array slots count whether or not they are in use).
    pub fn len(&self, value_size: usize) -> usize {
        match self {
            Self::Hash(h) => h.len(),
            Self::Array(a) => a.len() / value_size.max(1),
            Self::PerCpu(c) => c.first().map_or(0, |a| a.len() / value_size.max(1)),
            Self::Buckets(b) => super::convert::flows_of(b).len(),
            Self::Ports(p) => p.len(),
            Self::Nothing => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{map}: {what}")]
    Map {
        map: String,
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{map}: writing a redirect port")]
    Port {
        map: String,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("{map}: {what} many entries at a time")]
    Batch {
        map: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{map}: mapping its memory")]
    Mmap {
        map: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{map}: no copy for key size {key} and value size {value}")]
    Unsupported { map: String, key: u32, value: u32 },
}

fn map_err(map: &str, what: &'static str) -> impl FnOnce(MapError) -> CopyError + use<> {
    let map = map.to_string();
    move |source| CopyError::Map { map, what, source }
}

/// Calls `$f::<K, V>($args)` for the (key, value) sizes lb's hash maps have.
macro_rules! hash_sizes {
    ($s:expr, $f:ident($($a:expr),*)) => {
        match ($s.key_size, $s.value_size) {
            (20, 20) => $f::<20, 20>($($a),*),
            (20, 16) => $f::<20, 16>($($a),*),
            (20, 4) => $f::<20, 4>($($a),*),
            (40, 16) => $f::<40, 16>($($a),*),
            (40, 72) => $f::<40, 72>($($a),*),
            (key, value) => Err(CopyError::Unsupported { map: $s.map.to_string(), key, value }),
        }
    };
}

/// Calls `$f::<V>($args)` for the value sizes lb's (per-CPU) arrays have.
macro_rules! value_sizes {
    ($s:expr, $f:ident($($a:expr),*)) => {
        match $s.value_size {
            4 => $f::<4>($($a),*),
            8 => $f::<8>($($a),*),
            24 => $f::<24>($($a),*),
            28 => $f::<28>($($a),*),
            32 => $f::<32>($($a),*),
            40 => $f::<40>($($a),*),
            56 => $f::<56>($($a),*),
            64 => $f::<64>($($a),*),
            value => Err(CopyError::Unsupported { map: $s.map.to_string(), key: $s.key_size, value }),
        }
    };
}

/// Whether an array is mapped into memory rather than read entry by entry.
fn mmapable(s: &Schema) -> bool {
    matches!(s.map, lb_common::maps::RING | lb_common::maps::FLOWS4)
}

fn data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(d) => Some(d),
        _ => None,
    }
}

/// Reads every entry of `map` (of schema `s`, `entries` slots for arrays).
pub fn read(map: &Map, s: &Schema, entries: u32) -> Result<Snapshot, CopyError> {
    match s.shape {
        Shape::Hash | Shape::LruHash => read_hash(map, s),
        Shape::Array if mmapable(s) => read_mapped(map, s, entries).map(Snapshot::Array),
        Shape::Array => value_sizes!(s, read_array(map, s)),
        Shape::PerCpuArray => value_sizes!(s, read_percpu(map, s)),
        Shape::FlowBuckets => {
            let bytes = read_mapped(map, s, entries)?;
            Ok(Snapshot::Buckets(buckets_of(&bytes)))
        }
        Shape::DevMapHash => {
            let ports: DevMapHash<_> =
                DevMapHash::try_from(map).map_err(map_err(s.map, "opening"))?;
            let mut out = BTreeMap::new();
            for kv in ports.iter() {
                let (k, v) = kv.map_err(map_err(s.map, "reading"))?;
                out.insert(k, v.if_index);
            }
            Ok(Snapshot::Ports(out))
        }
        Shape::ProgArray => Ok(Snapshot::Nothing),
        Shape::LpmTrie => read_lpm(map, s),
    }
}

/// Writes every entry of `snap` into `map` (made for it: arrays of the snapshot's length).
/// Returns how many entries it wrote.
pub fn write(map: &mut Map, s: &Schema, snap: &Snapshot) -> Result<u64, CopyError> {
    match snap {
        Snapshot::Hash(h) => {
            let writes: Vec<_> = h
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect();
            write_hash_entries(map, s, &writes)
        }
        Snapshot::Array(bytes) if mmapable(s) => write_mapped(map, s, bytes),
        Snapshot::Array(bytes) => {
            let all: Vec<(u32, Vec<u8>)> = bytes
                .chunks(s.value_size as usize)
                .enumerate()
                .filter(|(_, v)| v.iter().any(|b| *b != 0))
                .map(|(i, v)| (i as u32, v.to_vec()))
                .collect();
            value_sizes!(s, write_array(map, s, &all))
        }
        Snapshot::PerCpu(cpus) => {
            let n = cpus.first().map_or(0, |c| c.len()) / s.value_size as usize;
            let all: Vec<u32> = (0..n as u32).collect();
            value_sizes!(s, write_percpu(map, s, cpus, &all))
        }
        // The flows, not the buckets: what the report calls entries copied.
        Snapshot::Buckets(b) => {
            write_mapped(map, s, bucket_bytes(b))?;
            Ok(super::convert::flows_of(b).len() as u64)
        }
        Snapshot::Ports(p) => {
            let mut ports: DevMapHash<_> =
                DevMapHash::try_from(map).map_err(map_err(s.map, "opening"))?;
            for (k, v) in p {
                ports.insert(*k, *v, None, 0).map_err(|e| CopyError::Port {
                    map: s.map.to_string(),
                    source: e,
                })?;
            }
            Ok(p.len() as u64)
        }
        Snapshot::Nothing => Ok(0),
    }
}

/// Applies merge writes (a value, or a removal) to a hash map.
pub fn write_hash_entries(
    map: &mut Map,
    s: &Schema,
    writes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Result<u64, CopyError> {
    match s.shape {
        Shape::LpmTrie => write_lpm(map, s, writes),
        _ => hash_sizes!(s, write_hash(map, s, writes)),
    }
}

/// An LPM trie's key as lb writes them: the prefix length, then 20 bytes of data
/// ([`lb_common::SrcRangeKey`] in `LB_SRC_RANGES`, [`lb_common::VipRangeKey`] in
/// `LB_VIP_RANGES`), copied as bytes.
type LpmKey = aya::maps::lpm_trie::Key<[u8; LPM_DATA]>;
const LPM_DATA: usize = 20;

fn lpm_key_bytes(k: &LpmKey) -> Vec<u8> {
    let mut out = k.prefix_len().to_ne_bytes().to_vec();
    out.extend_from_slice(&k.data());
    out
}

fn lpm_key_of(b: &[u8]) -> Option<LpmKey> {
    let prefix_len = u32::from_ne_bytes(b.get(..4)?.try_into().ok()?);
    Some(LpmKey::new(prefix_len, b.get(4..24)?.try_into().ok()?))
}

/// Runs `$f::<N>` for the trie's value size: 4 (`LB_SRC_RANGES`) or 20 (`LB_VIP_RANGES`).
macro_rules! lpm_sizes {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match ($s.key_size, $s.value_size) {
            (24, 4) => $f::<4>($($arg),*),
            (24, 20) => $f::<20>($($arg),*),
            (key, value) => Err(CopyError::Unsupported {
                map: $s.map.to_string(),
                key,
                value,
            }),
        }
    };
}

fn read_lpm(map: &Map, s: &Schema) -> Result<Snapshot, CopyError> {
    lpm_sizes!(s, read_lpm_of(map, s))
}

fn read_lpm_of<const V: usize>(map: &Map, s: &Schema) -> Result<Snapshot, CopyError> {
    let t: LpmTrie<_, [u8; LPM_DATA], [u8; V]> =
        LpmTrie::try_from(map).map_err(map_err(s.map, "opening"))?;
    let mut out = BTreeMap::new();
    for kv in t.iter() {
        let (k, v) = kv.map_err(map_err(s.map, "reading"))?;
        out.insert(lpm_key_bytes(&k), v.to_vec());
    }
    Ok(Snapshot::Hash(out))
}

fn write_lpm(
    map: &mut Map,
    s: &Schema,
    writes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Result<u64, CopyError> {
    lpm_sizes!(s, write_lpm_of(map, s, writes))
}

fn write_lpm_of<const V: usize>(
    map: &mut Map,
    s: &Schema,
    writes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Result<u64, CopyError> {
    let mut t: LpmTrie<_, [u8; LPM_DATA], [u8; V]> =
        LpmTrie::try_from(map).map_err(map_err(s.map, "opening"))?;
    for (k, v) in writes {
        let key = lpm_key_of(k).expect("key size checked");
        match v {
            Some(v) => {
                let value: [u8; V] = v[..V].try_into().expect("value size checked");
                t.insert(&key, value, 0)
                    .map_err(map_err(s.map, "writing"))?;
            }
            None => match t.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(s.map, "removing")(e)),
            },
        }
    }
    Ok(writes.len() as u64)
}

/// Writes `values` at their indices of an array.
pub fn write_array_entries(
    map: &mut Map,
    s: &Schema,
    values: &[(u32, Vec<u8>)],
) -> Result<u64, CopyError> {
    value_sizes!(s, write_array(map, s, values))
}

/// Writes the per-CPU values of `indices` of a per-CPU array.
pub fn write_percpu_entries(
    map: &mut Map,
    s: &Schema,
    cpus: &[Vec<u8>],
    indices: &[u32],
) -> Result<u64, CopyError> {
    value_sizes!(s, write_percpu(map, s, cpus, indices))
}

fn hash_fd<'a>(map: &'a Map, s: &Schema) -> Result<std::os::fd::BorrowedFd<'a>, CopyError> {
    use std::os::fd::AsFd as _;
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) => Ok(d.fd().as_fd()),
        _ => Err(CopyError::Unsupported {
            map: s.map.to_string(),
            key: s.key_size,
            value: s.value_size,
        }),
    }
}

fn batch_err(map: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> CopyError + use<> {
    let map = map.to_string();
    move |source| CopyError::Batch { map, what, source }
}

fn read_hash(map: &Map, s: &Schema) -> Result<Snapshot, CopyError> {
    let fd = hash_fd(map, s)?;
    let all = super::batch::lookup_all(fd, s.key_size as usize, s.value_size as usize)
        .map_err(batch_err(s.map, "reading"))?;
    Ok(Snapshot::Hash(all.into_iter().collect()))
}

fn write_hash<const K: usize, const V: usize>(
    map: &mut Map,
    s: &Schema,
    writes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Result<u64, CopyError> {
    let puts: Vec<(&[u8], &[u8])> = writes
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.as_slice(), v.as_slice())))
        .collect();
    super::batch::update_all(hash_fd(map, s)?, K, V, &puts).map_err(batch_err(s.map, "writing"))?;
    let mut h: HashMap<_, [u8; K], [u8; V]> =
        HashMap::try_from(map).map_err(map_err(s.map, "opening"))?;
    for (k, _) in writes.iter().filter(|(_, v)| v.is_none()) {
        let key: [u8; K] = k.as_slice().try_into().expect("key size checked");
        match h.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(s.map, "removing")(e)),
        }
    }
    Ok(writes.len() as u64)
}

/// A merge write: key, the value to write (None: remove the entry), and whether the new map
/// held the key when the merge looked.
pub type MergeWrite = (Vec<u8>, Option<Vec<u8>>, bool);

/// Applies merge writes to a hash map the new program may be writing: a value for a key the
/// map did not hold is inserted only if it still does not (`BPF_NOEXIST`), one for a key it
/// held replaces it only if it is still there (`BPF_EXIST`); a removal is made as asked.
/// Returns (entries written, entries the new program took first and kept).
pub fn write_hash_merge(
    map: &mut Map,
    s: &Schema,
    writes: &[MergeWrite],
) -> Result<(u64, u64), CopyError> {
    hash_sizes!(s, merge_hash(map, s, writes))
}

fn merge_hash<const K: usize, const V: usize>(
    map: &mut Map,
    s: &Schema,
    writes: &[MergeWrite],
) -> Result<(u64, u64), CopyError> {
    const BPF_NOEXIST: u64 = 1;
    const BPF_EXIST: u64 = 2;
    let mut h: HashMap<_, [u8; K], [u8; V]> =
        HashMap::try_from(map).map_err(map_err(s.map, "opening"))?;
    let (mut written, mut kept) = (0, 0);
    for (k, v, existed) in writes {
        let key: [u8; K] = k.as_slice().try_into().expect("key size checked");
        let r = match v {
            Some(v) => {
                let value: [u8; V] = v.as_slice().try_into().expect("value size checked");
                let flags = if *existed { BPF_EXIST } else { BPF_NOEXIST };
                h.insert(key, value, flags)
            }
            None => h.remove(&key),
        };
        match r {
            Ok(()) => written += 1,
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)) =>
            {
                kept += 1
            }
            Err(MapError::KeyNotFound) => kept += 1,
            Err(e) => return Err(map_err(s.map, "merging")(e)),
        }
    }
    Ok((written, kept))
}

/// The values `keys` have in a hash map now (None: no such entry).
pub fn hash_values(
    map: &Map,
    s: &Schema,
    keys: &[&[u8]],
) -> Result<Vec<Option<Vec<u8>>>, CopyError> {
    hash_sizes!(s, hash_get(map, s, keys))
}

fn hash_get<const K: usize, const V: usize>(
    map: &Map,
    s: &Schema,
    keys: &[&[u8]],
) -> Result<Vec<Option<Vec<u8>>>, CopyError> {
    let h: HashMap<_, [u8; K], [u8; V]> =
        HashMap::try_from(map).map_err(map_err(s.map, "opening"))?;
    keys.iter()
        .map(|k| {
            let key: [u8; K] = (*k).try_into().expect("key size checked");
            match h.get(&key, 0) {
                Ok(v) => Ok(Some(v.to_vec())),
                Err(MapError::KeyNotFound) => Ok(None),
                Err(e) => Err(map_err(s.map, "reading")(e)),
            }
        })
        .collect()
}

fn read_array<const V: usize>(map: &Map, s: &Schema) -> Result<Snapshot, CopyError> {
    let a: Array<_, [u8; V]> = Array::try_from(map).map_err(map_err(s.map, "opening"))?;
    let mut out = Vec::with_capacity(a.len() as usize * V);
    for v in a.iter() {
        out.extend_from_slice(&v.map_err(map_err(s.map, "reading"))?);
    }
    Ok(Snapshot::Array(out))
}

fn write_array<const V: usize>(
    map: &mut Map,
    s: &Schema,
    values: &[(u32, Vec<u8>)],
) -> Result<u64, CopyError> {
    let mut a: Array<_, [u8; V]> = Array::try_from(map).map_err(map_err(s.map, "opening"))?;
    for (i, v) in values {
        let value: [u8; V] = v.as_slice().try_into().expect("value size checked");
        a.set(*i, value, 0).map_err(map_err(s.map, "writing"))?;
    }
    Ok(values.len() as u64)
}

fn read_percpu<const V: usize>(map: &Map, s: &Schema) -> Result<Snapshot, CopyError> {
    let a: PerCpuArray<_, [u8; V]> =
        PerCpuArray::try_from(map).map_err(map_err(s.map, "opening"))?;
    let mut cpus: Vec<Vec<u8>> = Vec::new();
    for values in a.iter() {
        let values = values.map_err(map_err(s.map, "reading"))?;
        if cpus.is_empty() {
            cpus = vec![Vec::with_capacity(a.len() as usize * V); values.len()];
        }
        for (cpu, v) in values.iter().enumerate() {
            cpus[cpu].extend_from_slice(v);
        }
    }
    Ok(Snapshot::PerCpu(cpus))
}

fn write_percpu<const V: usize>(
    map: &mut Map,
    s: &Schema,
    cpus: &[Vec<u8>],
    indices: &[u32],
) -> Result<u64, CopyError> {
    let mut a: PerCpuArray<_, [u8; V]> =
        PerCpuArray::try_from(map).map_err(map_err(s.map, "opening"))?;
    let len = a.len();
    let mut written = 0;
    for &i in indices.iter().filter(|&&i| i < len) {
        let at = i as usize * V;
        let values: Vec<[u8; V]> = cpus
            .iter()
            .map(|c| {
                c.get(at..at + V)
                    .map_or([0; V], |v| v.try_into().expect("V bytes"))
            })
            .collect();
        let values = PerCpuValues::try_from(values).map_err(|e| CopyError::Map {
            map: s.map.to_string(),
            what: "one value per CPU",
            source: MapError::IoError(e),
        })?;
        a.set(i, values, 0).map_err(map_err(s.map, "writing"))?;
        written += 1;
    }
    Ok(written)
}

fn read_mapped(map: &Map, s: &Schema, entries: u32) -> Result<Vec<u8>, CopyError> {
    let d = data(map).ok_or(CopyError::Unsupported {
        map: s.map.to_string(),
        key: s.key_size,
        value: s.value_size,
    })?;
    let bytes = entries as usize * s.value_size as usize;
    let m = Mapping::new(d, bytes, false).map_err(|source| CopyError::Mmap {
        map: s.map.to_string(),
        source,
    })?;
    // SAFETY: the mapping covers at least `bytes` of the map's memory.
    Ok(unsafe { std::slice::from_raw_parts(m.ptr(), bytes) }.to_vec())
}

fn write_mapped(map: &Map, s: &Schema, bytes: &[u8]) -> Result<u64, CopyError> {
    let d = data(map).ok_or(CopyError::Unsupported {
        map: s.map.to_string(),
        key: s.key_size,
        value: s.value_size,
    })?;
    let max = d
        .info()
        .map_err(map_err(s.map, "reading its info"))?
        .max_entries() as usize
        * s.value_size as usize;
    let n = bytes.len().min(max);
    let m = Mapping::new(d, n, true).map_err(|source| CopyError::Mmap {
        map: s.map.to_string(),
        source,
    })?;
    // SAFETY: the mapping is writable and covers at least `n` bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), m.ptr(), n) };
    Ok((n / s.value_size as usize) as u64)
}

pub fn buckets_of(bytes: &[u8]) -> Vec<FlowBucket> {
    bytes
        .chunks_exact(size_of::<FlowBucket>())
        .map(|c| {
            // SAFETY: FlowBucket is plain integers (every bit pattern is valid); the read is
            // unaligned because `c` need not be 64-byte aligned.
            unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<FlowBucket>()) }
        })
        .collect()
}

/// The bytes of a flow table.
pub fn bucket_bytes(b: &[FlowBucket]) -> &[u8] {
    // SAFETY: FlowBucket is `repr(C)` plain integers with no padding (its size is asserted).
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<u8>(), std::mem::size_of_val(b)) }
}

/// Rewrites the flow table pinned in `map` (`buckets` buckets) with `conv` applied to each
/// bucket's bytes, in place, while a program may be writing it: only the 32-bit words `conv`
/// changes are stored, each with one atomic store, so the program's own writes to the other
/// words of a bucket are never undone. Returns how many buckets changed.
pub fn convert_buckets_in_place(
    map: &Map,
    s: &Schema,
    buckets: u32,
    conv: super::convert::ValueConversion,
) -> Result<u64, CopyError> {
    use std::sync::atomic::{AtomicU32, Ordering};

    let d = data(map).ok_or(CopyError::Unsupported {
        map: s.map.to_string(),
        key: s.key_size,
        value: s.value_size,
    })?;
    let size = size_of::<FlowBucket>();
    let m = Mapping::new(d, buckets as usize * size, true).map_err(|source| CopyError::Mmap {
        map: s.map.to_string(),
        source,
    })?;
    let mut changed = 0;
    for i in 0..buckets as usize {
        // SAFETY: bucket `i` lies inside the writable, page-aligned mapping; its 32-bit words
        // are naturally aligned.
        let words = |w: usize| unsafe { &*m.ptr().add(i * size + 4 * w).cast::<AtomicU32>() };
        let before: Vec<u8> = (0..size / 4)
            .flat_map(|w| words(w).load(Ordering::Relaxed).to_ne_bytes())
            .collect();
        let after = conv(&before);
        let mut any = false;
        for (w, (a, b)) in before.chunks(4).zip(after.chunks(4)).enumerate() {
            if a != b {
                words(w).store(
                    u32::from_ne_bytes(b.try_into().expect("4 bytes")),
                    Ordering::Relaxed,
                );
                any = true;
            }
        }
        changed += any as u64;
    }
    Ok(changed)
}

/// Applies merge writes to a flow table the new program is writing meanwhile, way by way with
/// the program's own protocol (a way is claimed by a compare-and-exchange of its key, to
/// [`flowtab::LOCKED`] for a write, and only a way still empty is taken): so a flow the new
/// program makes while the merge runs is never overwritten, as whole buckets written from an
/// earlier read would. A flow the new program made meanwhile keeps the new program's value.
/// Returns (ways written or emptied, flows that found no empty way).
pub fn merge_flows_live(
    map: &Map,
    s: &Schema,
    buckets: u32,
    writes: &[super::convert::Write<u64, (u64, u32)>],
) -> Result<(u64, u64), CopyError> {
    use lb_common::flowtab;

    let d = data(map).ok_or(CopyError::Unsupported {
        map: s.map.to_string(),
        key: s.key_size,
        value: s.value_size,
    })?;
    let m =
        Mapping::new(d, buckets as usize * size_of::<FlowBucket>(), true).map_err(|source| {
            CopyError::Mmap {
                map: s.map.to_string(),
                source,
            }
        })?;
    let live = LiveBuckets { m: &m };
    let (mut written, mut lost) = (0, 0);
    for (k, v) in writes {
        let [a, b] = flowtab::buckets_of(*k, buckets);
        match v {
            Some((value, seen)) => {
                if live.holds(a, *k) || live.holds(b, *k) {
                    continue;
                }
                match live.insert(*k, *value, *seen, a, b) {
                    true => written += 1,
                    false => lost += 1,
                }
            }
            None => written += live.remove(*k, a, b),
        }
    }
    Ok((written, lost))
}

/// The buckets of a flow table mapped writable while the new program writes it, way by way,
/// with the program's own protocol (see [`merge_flows_live`]).
struct LiveBuckets<'m> {
    m: &'m Mapping,
}

impl LiveBuckets<'_> {
    /// Way `w` of bucket `i`: its key, value and last-seen.
    fn way(
        &self,
        i: u32,
        w: usize,
    ) -> (
        &std::sync::atomic::AtomicU64,
        &std::sync::atomic::AtomicU64,
        &std::sync::atomic::AtomicU32,
    ) {
        use std::sync::atomic::{AtomicU32, AtomicU64};
        // SAFETY: bucket `i` (below `buckets`) lies inside the writable mapping, which is
        // page-aligned, so its fields are naturally aligned; the program writes them with single
        // stores and compare-and-exchanges, as the atomics here do.
        unsafe {
            let b = self.m.ptr().cast::<FlowBucket>().add(i as usize);
            (
                &*(&raw mut (*b).keys[w]).cast::<AtomicU64>(),
                &*(&raw mut (*b).values[w]).cast::<AtomicU64>(),
                &*(&raw mut (*b).seen[w]).cast::<AtomicU32>(),
            )
        }
    }

    /// Bucket `i`'s confirmed bits.
    fn confirmed(&self, i: u32) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: as in `way`.
        unsafe {
            let b = self.m.ptr().cast::<FlowBucket>().add(i as usize);
            &*(&raw mut (*b).confirmed).cast::<std::sync::atomic::AtomicU32>()
        }
    }

    /// Whether bucket `i` holds flow `k`.
    fn holds(&self, i: u32, k: u64) -> bool {
        use std::sync::atomic::Ordering;
        (0..lb_common::flowtab::FLOW_WAYS).any(|w| self.way(i, w).0.load(Ordering::Acquire) == k)
    }

    /// Bucket `i`'s empty ways.
    fn empties(&self, i: u32) -> usize {
        use std::sync::atomic::Ordering;
        (0..lb_common::flowtab::FLOW_WAYS)
            .filter(|&w| self.way(i, w).0.load(Ordering::Relaxed) == lb_common::flowtab::EMPTY)
            .count()
    }

    /// Writes flow `k` (`value`, `seen`) into an empty way of its bucket `a` or `b` (the one
    /// with more empty ways first, as the program chooses); false if neither has one.
    fn insert(&self, k: u64, value: u64, seen: u32, a: u32, b: u32) -> bool {
        use std::sync::atomic::Ordering;

        use lb_common::flowtab::{EMPTY, FLOW_WAYS, LOCKED};
        let order = if self.empties(a) >= self.empties(b) {
            [a, b]
        } else {
            [b, a]
        };
        let claimed = order.into_iter().find_map(|i| {
            (0..FLOW_WAYS).find_map(|w| {
                let (key, val, sn) = self.way(i, w);
                key.compare_exchange(EMPTY, LOCKED, Ordering::AcqRel, Ordering::Relaxed)
                    .ok()
                    .map(|_| (i, w, key, val, sn))
            })
        });
        let Some((i, w, key, val, sn)) = claimed else {
            return false;
        };
        val.store(value, Ordering::Relaxed);
        sn.store(seen, Ordering::Relaxed);
        // A merged flow is unconfirmed, as a flow the program records is (the way may keep the
        // bit of a flow that was removed from it).
        self.confirmed(i).fetch_and(!(1 << w), Ordering::Relaxed);
        key.store(k, Ordering::Release);
        true
    }

    /// Empties the ways of buckets `a` and `b` that hold flow `k`; how many it emptied.
    fn remove(&self, k: u64, a: u32, b: u32) -> u64 {
        use std::sync::atomic::Ordering;

        use lb_common::flowtab::{EMPTY, FLOW_WAYS};
        let mut emptied = 0;
        for i in [a, b] {
            for w in 0..FLOW_WAYS {
                let key = self.way(i, w).0;
                if key
                    .compare_exchange(k, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    emptied += 1;
                }
            }
        }
        emptied
    }
}
