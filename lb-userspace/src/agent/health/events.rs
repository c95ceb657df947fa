//! Wake-ups for passive health: the program writes the member id of every failed connection
//! attempt into `LB_EVENTS` (a ring buffer, see [`lb_common::maps::EVENTS`]), so the agent looks
//! at the failure streaks at once instead of at its next tick, and takes a backend out before
//! more clients are refused than the threshold allows.

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::kernel::dataplane::kernel::KernelDataplane;

/// The ring buffer of the program the agent loaded (each program has its own).
pub struct Events(Option<AsyncFd<RingBuf<MapData>>>);

impl Events {
    /// Takes `LB_EVENTS` of `dp`'s program; without one (an older program), never wakes.
    pub fn take(dp: &mut KernelDataplane) -> Self {
        let ring = dp
            .ebpf
            .take_map(lb_common::maps::EVENTS)
            .and_then(|m| RingBuf::try_from(m).ok())
            // SAFETY: the ring buffer owns its map's descriptor and keeps it open (and the
            // same) for as long as the AsyncFd holds it.
            .and_then(|r| unsafe { AsyncFd::register(r) }.ok());
        Self(ring)
    }

    /// After a migration loaded another program: its ring buffer replaces this one (the old
    /// program no longer runs). Keeps the current one if `dp`'s was taken already.
    pub fn renew(&mut self, dp: &mut KernelDataplane) {
        if let Some(new) = Self::take(dp).0 {
            self.0 = Some(new);
        }
    }

    /// Waits until some failure was recorded, and empties the ring: one wake-up for a burst.
    pub async fn next(&mut self) -> usize {
        let Some(fd) = &mut self.0 else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return std::future::pending().await;
            };
            let mut n = 0;
            while guard.get_inner_mut().next().is_some() {
                n += 1;
            }
            guard.clear_ready();
            if n > 0 {
                return n;
            }
        }
    }
}
