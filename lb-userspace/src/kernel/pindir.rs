//! The pin directory as a place: it must be on bpffs, and one agent at a time owns it.
//!
//! Ownership is an advisory `flock` on the directory itself, held for the agent's life (bpffs
//! holds only directories and pinned objects, so there is no room for a lock file there, and a
//! lock file in the state dir would not stop two agents with different state dirs). The kernel
//! drops the lock when the process dies, even by SIGKILL, so a crashed agent never blocks the next.
//! `flock` does not tell who holds a lock; `/proc/locks` does, by device and inode.
//! [`Before`] remembers what the dir held when the lock was taken, so a start that fails can
//! take away what it added.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "{dir} is not on a bpffs (pinned maps and links live there only): mount one with \
         `mount -t bpf bpf /sys/fs/bpf`, or choose a {flag} under a bpffs mount"
    )]
    NotBpffs { dir: String, flag: &'static str },
    /// `ip netns exec` mounted a sysfs over /sys (see [`ip_netns_exec`]): the host has its bpffs,
    /// this process does not see it.
    #[error(
        "{dir} is not on a bpffs: `ip netns exec {netns}` remounts /sys, hiding the bpffs at \
         /sys/fs/bpf; run lb with `nsenter --net={} lb ...` instead (it keeps this host's \
         mounts), or mount a bpffs at /sys/fs/bpf inside (its pins then vanish with that mount \
         namespace when lb exits)",
        file.display()
    )]
    HiddenByIpNetnsExec {
        dir: String,
        /// The network namespace's name, and its file (`/run/netns/NAME`).
        netns: String,
        file: PathBuf,
    },
    #[error("{} holds the pins in {dir}: one agent per pin directory", holder_text(*pid))]
    Held { dir: String, pid: Option<u32> },
    #[error("{what} {dir}")]
    Io {
        what: &'static str,
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("another lb agent (pid {p})"),
        None => "another lb agent".to_string(),
    }
}

/// The exclusive lock on a pin directory; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct PinLock {
    _lock: Flock<File>,
    /// Whether [`PinLock::take`] made the directory (a failed start removes it again).
    pub created: bool,
    dir: PathBuf,
}

impl PinLock {
    /// Makes `dir` (and its parents) if missing, checks that it is on bpffs, and locks it;
    /// fails at once, naming the holder, if another process holds it.
    pub fn take(dir: &Path) -> Result<Self, PinDirError> {
        let created = !dir.exists();
        check_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|source| io("creating", dir, source))?;
        match Self::try_lock(dir) {
            Ok(Some(lock)) => Ok(Self { created, ..lock }),
            Ok(None) => Err(PinDirError::Held {
                dir: dir.display().to_string(),
                pid: holder(dir),
            }),
            Err(e) => Err(e),
        }
    }

    /// Locks `dir` if it exists and nobody holds it; Ok(None) if somebody does.
    pub fn try_lock(dir: &Path) -> Result<Option<Self>, PinDirError> {
        let file = File::open(dir).map_err(|source| io("opening", dir, source))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self {
                _lock: lock,
                created: false,
                dir: dir.to_path_buf(),
            })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io("locking", dir, e.into())),
        }
    }

    /// Fails, naming the holder, if an agent holds `dir` now (a missing dir is free). The lock
    /// is not kept: [`PinLock::take`] takes it for good.
    pub fn free(dir: &Path) -> Result<(), PinDirError> {
        if !dir.exists() || Self::try_lock(dir)?.is_some() {
            return Ok(());
        }
        Err(PinDirError::Held {
            dir: dir.display().to_string(),
            pid: holder(dir),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What a start found in the pin dir, so that a start that fails can take away what it added
/// (maps it pinned, and the directory if it made it); links it attached are undone by
/// [`crate::kernel::links::Changes::revert`] before.
pub struct Before {
    dir: PathBuf,
    created: bool,
    names: BTreeSet<OsString>,
}

impl Before {
    pub fn record(lock: &PinLock) -> Self {
        Self {
            dir: lock.dir().to_path_buf(),
            created: lock.created,
            names: pin_names(lock.dir()),
        }
    }

    pub fn restore(self) {
        for name in pin_names(&self.dir).difference(&self.names) {
            let p = self.dir.join(name);
            if let Err(e) = std::fs::remove_file(&p) {
                warn!("removing {} after the failed start: {e}", p.display());
            }
        }
        if self.created
            && let Err(e) = std::fs::remove_dir(&self.dir)
        {
            warn!(
                "removing {} after the failed start: {e}",
                self.dir.display()
            );
        }
    }
}

fn pin_names(dir: &Path) -> BTreeSet<OsString> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

fn io(what: &'static str, dir: &Path, source: std::io::Error) -> PinDirError {
    PinDirError::Io {
        what,
        dir: dir.display().to_string(),
        source,
    }
}

/// Checks that `dir`, or the nearest of its ancestors that exists, is on bpffs.
pub fn check_bpffs(dir: &Path) -> Result<(), PinDirError> {
    check_bpffs_as(dir, "--pin-dir")
}

/// [`check_bpffs`] for a directory that the option `flag` chooses (named in the error).
pub fn check_bpffs_as(dir: &Path, flag: &'static str) -> Result<(), PinDirError> {
    let Some(existing) = dir.ancestors().find(|a| a.exists()) else {
        return Ok(());
    };
    let fs =
        statfs(existing).map_err(|e| io("looking at the filesystem of", existing, e.into()))?;
    if fs.filesystem_type() != BPF_FS_MAGIC {
        let dir = dir.display().to_string();
        return Err(match ip_netns_exec() {
            Some((netns, file)) => PinDirError::HiddenByIpNetnsExec { dir, netns, file },
            None => PinDirError::NotBpffs { dir, flag },
        });
    }
    Ok(())
}

/// Checks that `lb run` could make its pins in `dir` without making anything: the directory,
/// or the nearest ancestor it would be made in, is writable by this process.
pub fn check_writable(dir: &Path) -> Result<(), PinDirError> {
    let Some(existing) = dir.ancestors().find(|a| a.exists()) else {
        return Ok(());
    };
    let what = if existing == dir {
        "writing to"
    } else {
        "creating"
    };
    nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| io(what, dir, e.into()))
}

/// The network namespace `ip netns exec NAME` runs this process in, if it does. That command
/// unshares the mount namespace and mounts a sysfs of the network namespace over /sys, with
/// the namespace's name as the mount's source (iproute2's `netns_switch`): the bpffs at
/// /sys/fs/bpf is gone from view. A sysfs on /sys named after a namespace in /run/netns is
/// that mark (no environment variable is; and `/proc/1/ns/mnt`, to compare mount namespaces,
/// is often unreadable, in containers and sandboxes).
///
/// The namespace's name and its file (`/run/netns/NAME`), for `nsenter --net=`.
pub fn ip_netns_exec() -> Option<(String, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let source = sysfs_source(&info).filter(|s| *s != "sysfs" && !s.contains('/'))?;
    ["/run/netns", "/var/run/netns"]
        .iter()
        .map(|d| Path::new(d).join(source))
        .find(|f| f.exists())
        .map(|f| (source.to_string(), f))
}

/// The source of the sysfs mounted on /sys last (the one in view) in the text of
/// `/proc/self/mountinfo`, whose lines read `56 53 0:41 / /sys rw,relatime - sysfs NAME rw`.
fn sysfs_source(mountinfo: &str) -> Option<&str> {
    mountinfo
        .lines()
        .rev()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let (fstype, source) = (r.next()?, r.next()?);
            (point == "/sys").then_some((fstype, source))
        })
        .next()
        .and_then(|(fstype, source)| (fstype == "sysfs").then_some(source))
}

/// The pid of the process holding a `flock` on `dir`, from `/proc/locks` (None if nobody does,
/// or it is in another pid namespace).
pub fn holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// The FLOCK holder of the inode `ino` on device `dev` in the text of `/proc/locks`, whose lines
/// read `1: FLOCK  ADVISORY  WRITE 26139 00:28:37294 0 EOF` (major and minor in hex).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == want => pid.parse().ok().filter(|p| *p > 0),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_found_by_device_and_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 500 00:28:37294 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 26139 00:2a:37294 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 777 00:28:37294 0 EOF\n";
        let dev = nix::sys::stat::makedev(0, 0x28);
        assert_eq!(holder_in(locks, dev, 37294), Some(777));
        assert_eq!(holder_in(locks, dev, 37295), None);
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("lb-pindir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinLock::try_lock(&dir).unwrap().expect("the first lock");
        assert!(PinLock::try_lock(&dir).unwrap().is_none(), "locked twice");
        assert_eq!(holder(&dir), Some(std::process::id()));
        drop(first);
        assert!(PinLock::try_lock(&dir).unwrap().is_some(), "not released");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn the_sysfs_in_view_on_sys_is_the_last_one_mounted_there() {
        let host = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n\
                    45 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw\n";
        assert_eq!(sysfs_source(host), Some("sysfs"));
        let netns = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n\
                     56 53 0:41 / /sys rw,relatime - sysfs lbt-1-0-probe rw\n";
        assert_eq!(sysfs_source(netns), Some("lbt-1-0-probe"));
        let none = "26 1 0:23 / /proc rw - proc proc rw\n";
        assert_eq!(sysfs_source(none), None);
    }

    #[test]
    fn a_directory_off_bpffs_is_refused_with_the_mount_command() {
        let e = check_bpffs(&std::env::temp_dir().join("lb-not-bpffs/pins")).unwrap_err();
        assert!(
            e.to_string().contains("mount -t bpf bpf /sys/fs/bpf"),
            "{e}"
        );
    }
}
