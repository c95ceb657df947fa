//! The scale-out lab's traffic: long-lived TCP streams that check every echo, and waiting for
//! them to make progress (bounded in time).

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long a stream waits for an echo before it counts as broken: far longer than a node's
/// loss takes to notice and TCP's retransmissions to cross it.
pub const STALL: Duration = Duration::from_secs(15);
/// No stream outlives this, whatever the test does.
pub const STREAM_CAP: Duration = Duration::from_secs(240);

/// A long-lived connection that sends a numbered line every 100 ms and checks each echo.
pub struct Conn {
    pub local: SocketAddr,
    pub vip: SocketAddr,
    /// The backend that answered the connection.
    pub backend: String,
    exchanged: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Option<String>>>,
}

impl Conn {
    pub(super) fn start(s: std::net::TcpStream, vip: SocketAddr) -> Self {
        let local = s.local_addr().unwrap();
        s.set_read_timeout(Some(STALL)).unwrap();
        s.set_write_timeout(Some(STALL)).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut backend = String::new();
        reader
            .read_line(&mut backend)
            .unwrap_or_else(|e| panic!("{local}: reading the backend's name: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let exchanged = Arc::new(AtomicU64::new(0));
        let (st, ex, mut w) = (stop.clone(), exchanged.clone(), s);
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) && started.elapsed() < STREAM_CAP {
                let msg = format!("{n} {}\n", "y".repeat(64));
                if let Err(e) = w.write_all(msg.as_bytes()) {
                    return Some(format!("write after {n} exchanges: {e}"));
                }
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => return Some(format!("closed by the peer after {n} exchanges")),
                    Ok(_) if line == msg => {}
                    Ok(_) => return Some(format!("wrong echo after {n} exchanges")),
                    Err(e) => return Some(format!("read after {n} exchanges: {e}")),
                }
                n += 1;
                ex.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        });
        Self {
            local,
            vip,
            backend: backend.trim().to_string(),
            exchanged,
            stop,
            handle: Some(handle),
        }
    }

    pub fn exchanged(&self) -> u64 {
        self.exchanged.load(Ordering::Relaxed)
    }

    /// Whether the stream has ended (before [`Conn::finish`], only by breaking).
    pub fn ended(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// The key of this connection in the maps.
    pub fn flow_key(&self) -> lb_common::FlowKey {
        let (src, family) = lb_userspace::model::desired::addr16(self.local.ip());
        let (dst, _) = lb_userspace::model::desired::addr16(self.vip.ip());
        lb_common::FlowKey {
            src,
            dst,
            src_port: self.local.port().to_be(),
            dst_port: self.vip.port().to_be(),
            proto: libc::IPPROTO_TCP as u8,
            family,
            _pad: [0; 2],
        }
    }

    /// Stops the stream: `None` if it never broke, else what happened.
    pub fn finish(mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until every stream not in `skip` has made `more` exchanges beyond its count when the
/// wait began, or `timeout`; returns the indices of those that did not (ended or stalled).
pub fn wait_progress(
    conns: &[Conn],
    more: u64,
    skip: &BTreeSet<usize>,
    timeout: Duration,
) -> BTreeSet<usize> {
    let from: Vec<u64> = conns.iter().map(Conn::exchanged).collect();
    let start = Instant::now();
    loop {
        let behind: BTreeSet<usize> = conns
            .iter()
            .enumerate()
            .filter(|(i, c)| !skip.contains(i) && c.exchanged() < from[*i] + more)
            .map(|(i, _)| i)
            .collect();
        if behind.is_empty() || start.elapsed() > timeout {
            return behind;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
