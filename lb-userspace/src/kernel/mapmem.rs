//! The kernel memory the program's maps take for a node's sizes, worked out before any map is
//! made: `lb check` shows it, and `lb check` and `lb run` refuse sizes that need more than
//! `node.kernel_memory_limit` (the kernel zeroes and links every preallocated entry when it
//! creates a map: maps of 9 GiB took it over half a minute, and may leave the host short).
//!
//! Every map of the embedded object is counted as the kernel counts it in the `memlock` line of
//! `/proc/<pid>/fdinfo/<map fd>` (each map type's `map_mem_usage`, kernel/bpf/arraymap.c,
//! hashtab.c, devmap.c, ringbuf.c, lpm_trie.c), at the size the agent gives it
//! ([`crate::kernel::migrate::schema`]):
//! - an array: entries x the value rounded up to 8 bytes (whole pages when mmapable);
//! - a per-CPU array: entries x (the value rounded up to 8 x possible CPUs + a pointer);
//! - a hash map (lb's are preallocated): entries x (a 48-byte element header + key + value, each
//!   rounded up to 8), a 16-byte bucket for each of entries rounded up to a power of two, and
//!   for a plain hash (not LRU) one spare element and a pointer per CPU;
//! - the ring buffer: its pages, three of bookkeeping, and a pointer per page mapped;
//! - maps that allocate as they fill (the source-range trie; the devmap's entries): what they
//!   hold when made, next to nothing (the trie grows to about 2 MiB with 16,384 ranges);
//! - and each map's own struct (`struct bpf_array`, `struct bpf_htab`, ...), as Linux 6.18 on
//!   x86-64 counts it (other builds differ by some tens of bytes).

use std::sync::OnceLock;

use crate::kernel::program::{self, Sizes};

/// A kernel page (x86-64; arm64 with 4 KiB pages).
const PAGE: u64 = 4096;
/// `struct bpf_array`: arrays, per-CPU arrays, the tail-call table.
const ARRAY_HEADER: u64 = 312;
/// `struct bpf_htab` (and its lock words).
const HTAB_HEADER: u64 = 896;
/// `struct bpf_ringbuf_map`.
const RINGBUF_HEADER: u64 = 304;
/// `struct bpf_dtab`.
const DEVMAP_HEADER: u64 = 344;
/// `struct htab_elem` before its key (hash linkage, LRU node, hash).
const HTAB_ELEM: u64 = 48;
/// `struct bucket`: a list head and its lock.
const BUCKET: u64 = 16;
const POINTER: u64 = 8;
/// The ring buffer's pages before its data: the header and the producer and consumer positions.
const RINGBUF_META_PAGES: u64 = 3;
/// `BPF_F_MMAPABLE`.
const MMAPABLE: u32 = 1 << 10;

/// The shape of one map, as the kernel is asked to make it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

fn round8(n: u32) -> u64 {
    u64::from(n).div_ceil(8) * 8
}

fn page_align(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

impl MapDef {
    /// The bytes the kernel counts for this map when it makes it, with `cpus` possible CPUs.
    pub fn bytes(&self, cpus: u32) -> u64 {
        use aya_obj::generated::bpf_map_type as t;
        let (entries, cpus) = (u64::from(self.max_entries), u64::from(cpus));
        let value = round8(self.value_size);
        let hash = |lru: bool| {
            let elem = HTAB_ELEM + round8(self.key_size) + value;
            let buckets = entries.next_power_of_two() * BUCKET;
            let spare = if lru { 0 } else { cpus * (elem + POINTER) };
            buckets + entries * elem + spare
        };
        match self.map_type {
            x if x == t::BPF_MAP_TYPE_ARRAY as u32 || x == t::BPF_MAP_TYPE_PROG_ARRAY as u32 => {
                match self.flags & MMAPABLE {
                    0 => ARRAY_HEADER + entries * value,
                    // The header on a page of its own, and the values on whole pages.
                    _ => page_align(ARRAY_HEADER) + page_align(entries * value),
                }
            }
            x if x == t::BPF_MAP_TYPE_PERCPU_ARRAY as u32 => {
                ARRAY_HEADER + entries * (value * cpus + POINTER)
            }
            x if x == t::BPF_MAP_TYPE_HASH as u32 => HTAB_HEADER + hash(false),
            x if x == t::BPF_MAP_TYPE_LRU_HASH as u32 => HTAB_HEADER + hash(true),
            x if x == t::BPF_MAP_TYPE_DEVMAP_HASH as u32 => {
                DEVMAP_HEADER + entries.next_power_of_two() * POINTER
            }
            x if x == t::BPF_MAP_TYPE_RINGBUF as u32 => {
                let data = entries.div_ceil(PAGE);
                RINGBUF_HEADER
                    + (RINGBUF_META_PAGES + data) * PAGE
                    + (RINGBUF_META_PAGES + 2 * data) * POINTER
            }
            // The source-range trie: nothing until ranges are added.
            _ => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading the maps of the lb XDP object: {0}")]
pub struct ObjectError(String);

/// Every map of the embedded object, by name, at the object's own sizes.
fn object_maps() -> Result<&'static [(String, MapDef)], ObjectError> {
    static MAPS: OnceLock<Result<Vec<(String, MapDef)>, String>> = OnceLock::new();
    let maps = MAPS.get_or_init(|| {
        let object = program::object().map_err(|e| e.to_string())?;
        let obj = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
        let mut maps: Vec<(String, MapDef)> = obj
            .maps
            .iter()
            .map(|(name, m)| {
                let def = MapDef {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                    flags: m.map_flags(),
                };
                (name.clone(), def)
            })
            .collect();
        maps.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(maps)
    });
    maps.as_deref().map_err(|e| ObjectError(e.clone()))
}

/// Every map the program is loaded with for `sizes`: the object's, each lb map at the size the
/// agent gives it.
pub fn maps_for(sizes: &Sizes) -> Result<Vec<(String, MapDef)>, ObjectError> {
    Ok(object_maps()?
        .iter()
        .map(|(name, def)| {
            let mut def = *def;
            if let Some(s) = crate::kernel::migrate::schema::of(name) {
                def.max_entries = (s.entries)(sizes);
            }
            (name.clone(), def)
        })
        .collect())
}

/// What the maps of some sizes need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// Bytes in all.
    pub total: u64,
    /// The possible CPUs counted (per-CPU maps have a value for each).
    pub cpus: u32,
    /// Bytes by the config keys whose sizes the maps take (`node.nat_table_size`, or
    /// `node.table_size and node.max_vips` for the Maglev tables; `fixed` for maps of fixed
    /// size), largest first.
    pub by_key: Vec<(String, u64)>,
}

impl Need {
    /// The config keys that take a tenth or more of the need (at least the largest), as a
    /// message lists them: `node.nat_table_size (5.61 GiB), node.flow_table_size (3.17 GiB)`.
    pub fn largest(&self) -> Vec<String> {
        self.by_key
            .iter()
            .filter(|(k, _)| k != "fixed")
            .enumerate()
            .filter(|(i, (_, b))| *i == 0 || *b * 10 >= self.total)
            .map(|(_, (k, b))| format!("{k} ({})", human(*b)))
            .collect()
    }
}

/// What the maps of `sizes` need on this host (its possible CPUs).
pub fn need(sizes: &Sizes) -> Result<Need, ObjectError> {
    need_with(sizes, program::possible_cpus())
}

/// What the maps of `sizes` need with `cpus` possible CPUs.
pub fn need_with(sizes: &Sizes, cpus: u32) -> Result<Need, ObjectError> {
    let mut by_key: Vec<(String, u64)> = Vec::new();
    for (name, def) in maps_for(sizes)? {
        let key = keys_of(&name, sizes);
        let bytes = def.bytes(cpus);
        match by_key.iter_mut().find(|(k, _)| *k == key) {
            Some((_, b)) => *b += bytes,
            None => by_key.push((key, bytes)),
        }
    }
    by_key.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(Need {
        total: by_key.iter().map(|(_, b)| b).sum(),
        cpus,
        by_key,
    })
}

/// The config keys whose sizes decide the entries of map `name` (found by changing each size
/// and seeing whether the map's entries change), or `fixed`.
fn keys_of(name: &str, sizes: &Sizes) -> String {
    let Some(schema) = crate::kernel::migrate::schema::of(name) else {
        return "fixed".into();
    };
    let entries = (schema.entries)(sizes);
    let keys: Vec<&str> = (0..Sizes::KEYS)
        .filter_map(|i| {
            let mut other = sizes.clone();
            let (key, n) = other.key_mut(i);
            *n = if *n > 1 { *n / 2 } else { 2 };
            ((schema.entries)(&other) != entries).then_some(key)
        })
        .collect();
    match keys.is_empty() {
        true => "fixed".into(),
        false => keys.join(" and "),
    }
}

/// Bytes as people read them: `9.31 GiB`, `4 GiB`, `12.5 GiB`, `612 MiB`, `48 KiB` (two
/// decimals below 10 GiB, so that 4.04 GiB over a limit of 4 GiB does not read as 4.0).
pub fn human(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b >= 10 * GIB => format!("{:.1} GiB", b as f64 / GIB as f64),
        b if b >= GIB => format!("{:.2} GiB", b as f64 / GIB as f64),
        b if b >= MIB => format!("{} MiB", b.div_ceil(MIB)),
        b => format!("{} KiB", b.div_ceil(KIB)),
    }
}

/// A size as the config writes it: bytes (`4294967296`), or a whole number of KiB, MiB, GiB or
/// TiB (`4GiB`, `512 MiB`; `Gi` as Kubernetes writes it). None if it is none of these.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "Ki" => 10,
        "MiB" | "Mi" => 20,
        "GiB" | "Gi" => 30,
        "TiB" | "Ti" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::generated::bpf_map_type as t;

    fn def(map_type: t, key: u32, value: u32, entries: u32, flags: u32) -> MapDef {
        MapDef {
            map_type: map_type as u32,
            key_size: key,
            value_size: value,
            max_entries: entries,
            flags,
        }
    }

    #[test]
    fn an_array_counts_its_values_rounded_up_to_8_bytes() {
        // 1000 values of 12 bytes take 16 each.
        let a = def(t::BPF_MAP_TYPE_ARRAY, 4, 12, 1000, 0);
        assert_eq!(a.bytes(2), ARRAY_HEADER + 16_000);
    }

    #[test]
    fn an_mmapable_array_takes_whole_pages_and_its_header_a_page() {
        // 1025 u32 slots take 8 bytes each (the kernel rounds every value up to 8): 8200
        // bytes, three pages, and the header's page.
        let a = def(t::BPF_MAP_TYPE_ARRAY, 4, 4, 1025, MMAPABLE);
        assert_eq!(a.bytes(2), 4 * 4096);
    }

    #[test]
    fn a_per_cpu_array_counts_a_value_per_possible_cpu() {
        // 10 entries of 32 bytes on 4 CPUs, and a pointer per entry.
        let a = def(t::BPF_MAP_TYPE_PERCPU_ARRAY, 4, 32, 10, 0);
        assert_eq!(a.bytes(4), ARRAY_HEADER + 10 * (32 * 4 + 8));
    }

    #[test]
    fn an_lru_hash_counts_elements_and_power_of_two_buckets() {
        // Keys of 37 bytes take 40, values of 20 take 24: elements of 48 + 40 + 24 = 112 bytes;
        // 1000 entries hash into 1024 buckets of 16 bytes.
        let h = def(t::BPF_MAP_TYPE_LRU_HASH, 37, 20, 1000, 0);
        assert_eq!(h.bytes(2), HTAB_HEADER + 1000 * 112 + 1024 * 16);
    }

    #[test]
    fn a_plain_hash_has_a_spare_element_and_a_pointer_per_cpu() {
        let lru = def(t::BPF_MAP_TYPE_LRU_HASH, 8, 8, 1024, 0).bytes(3);
        let plain = def(t::BPF_MAP_TYPE_HASH, 8, 8, 1024, 0).bytes(3);
        assert_eq!(plain - lru, 3 * ((48 + 8 + 8) + 8));
    }

    #[test]
    fn every_map_of_the_object_is_counted_and_the_lb_maps_at_the_configured_sizes() {
        crate::kernel::program::require_object();
        let sizes = Sizes {
            nat_table_size: 1 << 20,
            ..Sizes::default()
        };
        let maps = maps_for(&sizes).unwrap();
        for s in crate::kernel::migrate::schema::current() {
            assert!(
                maps.iter().any(|(n, _)| n == s.map),
                "{} not counted",
                s.map
            );
        }
        let nat = maps
            .iter()
            .find(|(n, _)| n == lb_common::maps::NAT)
            .unwrap();
        assert_eq!(nat.1.max_entries, 1 << 20);
        assert!(
            maps.iter().any(|(n, _)| n == "LB_EVENTS"),
            "an unpinned map"
        );
    }

    #[test]
    fn the_need_is_shared_out_by_the_config_keys_that_size_the_maps() {
        crate::kernel::program::require_object();
        let sizes = Sizes {
            nat_table_size: 1 << 24,
            ..Sizes::default()
        };
        let need = need_with(&sizes, 2).unwrap();
        assert_eq!(need.by_key[0].0, "node.nat_table_size", "{:?}", need.by_key);
        assert!(
            need.by_key
                .iter()
                .any(|(k, _)| k == "node.table_size and node.max_vips"),
            "the Maglev tables: {:?}",
            need.by_key
        );
        assert_eq!(need.total, need.by_key.iter().map(|(_, b)| b).sum::<u64>());
        // Two NAT tables of 2^24 entries, each element at least 48 bytes of header.
        assert!(need.by_key[0].1 > 2 * (1 << 24) * 48, "{:?}", need.by_key);
    }

    #[test]
    fn a_message_names_the_keys_that_take_a_tenth_or_more() {
        let need = Need {
            total: 100,
            cpus: 2,
            by_key: vec![
                ("node.nat_table_size".into(), 60),
                ("node.flow_table_size".into(), 30),
                ("fixed".into(), 5),
                ("node.affinity_table_size".into(), 5),
            ],
        };
        assert_eq!(
            need.largest(),
            [
                "node.nat_table_size (1 KiB)",
                "node.flow_table_size (1 KiB)"
            ]
        );
    }

    #[test]
    fn per_cpu_maps_grow_with_the_cpus() {
        crate::kernel::program::require_object();
        let s = Sizes::default();
        let (two, four) = (need_with(&s, 2).unwrap(), need_with(&s, 4).unwrap());
        assert!(four.total > two.total);
    }

    #[test]
    fn sizes_read_as_bytes_or_binary_units() {
        assert_eq!(parse_bytes("4GiB"), Some(4 << 30));
        assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("2Gi"), Some(2 << 30));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("4GB"), None, "decimal units are ambiguous");
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("1.5GiB"), None);
    }

    #[test]
    fn bytes_are_shown_in_the_largest_unit() {
        assert_eq!(human(4 << 30), "4 GiB");
        assert_eq!(human((9 << 30) + (1 << 29)), "9.50 GiB");
        assert_eq!(human((12 << 30) + (1 << 29)), "12.5 GiB");
        assert_eq!(human(612 << 20), "612 MiB");
        assert_eq!(human(48 << 10), "48 KiB");
    }
}
