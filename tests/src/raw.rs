//! Frames sent as they are, out of an interface.

/// Sends frames out of `dev` in the calling thread's namespace, through one raw socket.
pub struct Raw {
    fd: i32,
    sa: libc::sockaddr_ll,
}

impl Raw {
    pub fn new(dev: &str) -> Self {
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: plain socket calls on values owned here.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert_ne!(ifindex, 0, "no interface {dev}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = ifindex as i32;
            sa.sll_halen = 6;
            Self { fd, sa }
        }
    }

    /// Sends `frame`; false if the kernel refused it (a full queue: `ENOBUFS`).
    pub fn try_send(&self, frame: &[u8]) -> bool {
        self.sendto(frame) == frame.len() as isize
    }

    /// `sendto(2)` of `frame` to the interface: the bytes sent, or -1.
    fn sendto(&self, frame: &[u8]) -> isize {
        // SAFETY: the frame and the address outlive the call.
        unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        }
    }

    pub fn send(&self, frame: &[u8]) {
        let n = self.sendto(frame);
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: the socket is ours.
        unsafe { libc::close(self.fd) };
    }
}
