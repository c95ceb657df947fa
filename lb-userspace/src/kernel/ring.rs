//! The Maglev ring array (`BPF_F_MMAPABLE`) mapped into this process: reading or rewriting a
//! table is a run of memory accesses instead of one syscall per slot. The agent maps one VIP's
//! table at a time ([`Ring::window`]): the whole ring mapped would count all of its pages (8
//! bytes a slot, 524 MB at 1,000 VIPs of 65,537 slots) in the agent's resident memory.
//!
//! The kernel stores array elements at 8-byte strides (`round_up(value_size, 8)`), so slot `i`
//! (a `u32`) is the first four bytes of the 8-byte element `i`.

use aya::maps::MapData;

use crate::kernel::mapping::Mapping;

/// Bytes between consecutive elements of a BPF array, whatever the value size (up to 8).
const STRIDE: usize = 8;

pub struct Ring {
    mem: Mapping,
    len: usize,
    writable: bool,
}

impl Ring {
    /// Maps the first `len` slots of `map` (read-only unless `writable`).
    pub fn map(map: &MapData, len: usize, writable: bool) -> std::io::Result<Self> {
        Self::window(map, 0, len, writable)
    }

    /// Maps the `len` slots of `map` from slot `first` on; [`Ring::get`] and [`Ring::set`]
    /// count from `first`.
    pub fn window(
        map: &MapData,
        first: usize,
        len: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        Ok(Self {
            mem: Mapping::at(map, first * STRIDE, len * STRIDE, writable)?,
            len,
            writable,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len, "slot {i} beyond the ring's {}", self.len);
        // SAFETY: in bounds; an aligned u32 load races benignly with the program's reads.
        unsafe { self.mem.ptr().add(i * STRIDE).cast::<u32>().read_volatile() }
    }

    /// Writes `table` into the first `table.len()` slots.
    pub fn fill(&mut self, table: &crate::model::table::Table) {
        assert!(self.writable, "ring mapped read-only");
        assert!(
            table.len() <= self.len,
            "a table of {} slots beyond the ring's {}",
            table.len(),
            self.len
        );
        let base = self.mem.ptr();
        // SAFETY: every slot is in bounds (checked above); aligned 4-byte stores are atomic.
        table.for_each(|i, v| unsafe { base.add(i * STRIDE).cast::<u32>().write_volatile(v) });
    }

    pub fn set(&mut self, i: usize, v: u32) {
        assert!(self.writable, "ring mapped read-only");
        assert!(i < self.len, "slot {i} beyond the ring's {}", self.len);
        // SAFETY: in bounds; an aligned 4-byte store is atomic: the program sees old or new.
        unsafe {
            self.mem
                .ptr()
                .add(i * STRIDE)
                .cast::<u32>()
                .write_volatile(v)
        }
    }
}
