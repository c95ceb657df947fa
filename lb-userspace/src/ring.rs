//! The Maglev ring array (`BPF_F_MMAPABLE`) mapped into this process: reading or rewriting a
//! table is a run of memory accesses instead of one syscall per slot.
//!
//! The kernel stores array elements at 8-byte strides (`round_up(value_size, 8)`), so slot `i`
//! (a `u32`) is the first four bytes of the 8-byte element `i`.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::MapData;

/// Bytes between consecutive elements of a BPF array, whatever the value size (up to 8).
const STRIDE: usize = 8;

pub struct Ring {
    ptr: NonNull<u8>,
    len: usize,
    bytes: usize,
    writable: bool,
}

// SAFETY: the mapping is only touched through &self / &mut self of its owner.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Maps the first `len` slots of `map` (read-only unless `writable`).
    pub fn map(map: &MapData, len: usize, writable: bool) -> std::io::Result<Self> {
        let page = 4096usize;
        let bytes = (len * STRIDE).div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of at least `len` u32 values, shared with the kernel.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
            bytes,
            writable,
        })
    }

    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len, "slot {i} beyond the ring's {}", self.len);
        // SAFETY: in bounds; an aligned u32 load races benignly with the program's reads.
        unsafe {
            self.ptr
                .as_ptr()
                .add(i * STRIDE)
                .cast::<u32>()
                .read_volatile()
        }
    }

    pub fn set(&mut self, i: usize, v: u32) {
        assert!(self.writable, "ring mapped read-only");
        assert!(i < self.len, "slot {i} beyond the ring's {}", self.len);
        // SAFETY: in bounds; an aligned 4-byte store is atomic: the program sees old or new.
        unsafe {
            self.ptr
                .as_ptr()
                .add(i * STRIDE)
                .cast::<u32>()
                .write_volatile(v)
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
