//! The Maglev ring array (`BPF_F_MMAPABLE`) mapped into this process: reading or rewriting a
//! table is a run of memory accesses instead of one syscall per slot.
//!
//! The kernel stores array elements at 8-byte strides (`round_up(value_size, 8)`), so slot `i`
//! (a `u32`) is the first four bytes of the 8-byte element `i`.

use aya::maps::MapData;

use crate::mapping::Mapping;

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
        Ok(Self {
            mem: Mapping::new(map, len * STRIDE, writable)?,
            len,
            writable,
        })
    }

    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len, "slot {i} beyond the ring's {}", self.len);
        // SAFETY: in bounds; an aligned u32 load races benignly with the program's reads.
        unsafe { self.mem.ptr().add(i * STRIDE).cast::<u32>().read_volatile() }
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
