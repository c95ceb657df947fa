//! A `BPF_F_MMAPABLE` map's memory mapped into this process, shared with the kernel: the one
//! place that maps, rounds to pages and unmaps. [`crate::kernel::ring::Ring`] (the Maglev ring) and
//! [`crate::kernel::flowmap::FlowMap`] (the IPv4 flow table) are typed views over it.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

const PAGE: usize = 4096;

pub struct Mapping {
    /// Where the pages mapped start.
    base: NonNull<u8>,
    /// Bytes mapped, whole pages.
    bytes: usize,
    /// Bytes from `base` to the first byte asked for.
    skip: usize,
}

// SAFETY: the mapping is plain shared memory; its views decide how it is read and written.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `bytes` of `map` (rounded up to whole pages), read-only unless `writable`.
    pub fn new(map: &MapData, bytes: usize, writable: bool) -> std::io::Result<Self> {
        Self::at(map, 0, bytes, writable)
    }

    /// Maps `bytes` of `map` from byte `offset` on (the pages that hold them), read-only unless
    /// `writable`: a part of a large map costs the process only the pages of that part.
    pub fn at(map: &MapData, offset: usize, bytes: usize, writable: bool) -> std::io::Result<Self> {
        let skip = offset % PAGE;
        let first = offset - skip;
        let bytes = (skip + bytes).div_ceil(PAGE) * PAGE;
        let prot = match writable {
            true => libc::PROT_READ | libc::PROT_WRITE,
            false => libc::PROT_READ,
        };
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE map of at least `bytes`, shared with the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                fd,
                first as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap returned null"),
            bytes,
            skip,
        })
    }

    /// The first byte asked for.
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: `skip` is within the first page mapped.
        unsafe { self.base.as_ptr().add(self.skip) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
