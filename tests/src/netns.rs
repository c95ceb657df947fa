//! Network namespaces made by a test and removed when it ends, even if it panics.
//!
//! Only addresses inside these namespaces are used; nothing is sent anywhere else.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`, panicking with its output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Whether the process that made a resource named `lbt-<pid>-...` is gone.
fn owner_is_dead(name: &str) -> bool {
    name.strip_prefix("lbt-")
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<i32>().ok())
        .is_some_and(|pid| {
            pid != std::process::id() as i32
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
}

/// Removes namespaces and pins left by test processes that died without cleaning up (a killed
/// `cargo test`, whose destructors never ran). Runs once per process.
pub fn sweep_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(name) = line.split_whitespace().next().filter(|n| owner_is_dead(n)) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if owner_is_dead(&name) {
                    let _ = lb_userspace::agent::run::down(
                        &e.path(),
                        std::path::Path::new("/nonexistent"),
                    );
                }
            }
        }
    });
}

/// Deletes every namespace this process made (for a Ctrl-C handler, where destructors don't run).
pub fn remove_all_of_this_process() {
    let prefix = format!("lbt-{}-", std::process::id());
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&prefix))
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace named `lbt-<pid>-<n>-<tag>`, with loopback up.
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        sweep_leftovers();
        let name = format!(
            "lbt-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs a whitespace-separated list of `ip` commands, one per line, in this namespace.
    pub fn script(&self, lines: &str) {
        for line in lines
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let args: Vec<&str> = line.split_whitespace().collect();
            self.ip(&args);
        }
    }

    /// Runs a command inside the namespace, panicking with its output if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {} in {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    /// The index of interface `dev` in this namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        self.run(|| {
            let name = std::ffi::CString::new(dev).unwrap();
            let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(i, 0, "no interface {dev}");
            i
        })
    }

    /// The MAC address of interface `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        self.run(|| {
            // SAFETY: an ioctl on a socket of our own, into a zeroed ifreq we own.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let mut req: libc::ifreq = std::mem::zeroed();
                for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
                    *d = s as libc::c_char;
                }
                let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                assert_eq!(rc, 0, "SIOCGIFHWADDR {dev}: {err}");
                let a = req.ifr_ifru.ifru_hwaddr.sa_data;
                [a[0], a[1], a[2], a[3], a[4], a[5]].map(|b| b as u8)
            }
        })
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result (or resumes
    /// its panic). BPF objects are per process, so maps and programs loaded elsewhere work here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                enter(&self.name);
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }
}

/// Moves the calling thread into namespace `name` for good (for threads that live there).
pub fn enter(name: &str) {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {path}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
