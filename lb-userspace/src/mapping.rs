//! A `BPF_F_MMAPABLE` map's memory mapped into this process, shared with the kernel: the one
//! place that maps, rounds to pages and unmaps. [`crate::ring::Ring`] (the Maglev ring) and
//! [`crate::flowmap::FlowMap`] (the IPv4 flow table) are typed views over it.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

const PAGE: usize = 4096;

pub struct Mapping {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; its views decide how it is read and written.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `bytes` of `map` (rounded up to whole pages), read-only unless `writable`.
    pub fn new(map: &MapData, bytes: usize, writable: bool) -> std::io::Result<Self> {
        let bytes = bytes.div_ceil(PAGE) * PAGE;
        let prot = match writable {
            true => libc::PROT_READ | libc::PROT_WRITE,
            false => libc::PROT_READ,
        };
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE map of at least `bytes`, shared with the kernel.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            bytes,
        })
    }

    /// The start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
