//! A memory cgroup of the test's own, with a limit, for running a command under it: cgroup v2
//! where the memory controller is there (/sys/fs/cgroup), else the v1 memory hierarchy (below
//! this process's own group). Removed on drop, even when the test fails.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

pub struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    /// A new group `lbt-<pid>-<tag>` limited to `bytes` (swap included where v1 allows it).
    pub fn new(tag: &str, bytes: u64) -> Self {
        let name = format!("lbt-{}-{tag}", std::process::id());
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let dir = if v2 {
            Path::new("/sys/fs/cgroup").join(&name)
        } else {
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .unwrap()
                .lines()
                .find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
                    ctl.split(',')
                        .any(|c| c == "memory")
                        .then(|| path.to_string())
                })
                .expect("no memory cgroup (v2 controller or v1 hierarchy) on this machine");
            Path::new("/sys/fs/cgroup/memory")
                .join(own.trim_start_matches('/'))
                .join(&name)
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let g = Self { dir, v2 };
        let limit = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        g.write(limit, &bytes.to_string());
        if v2 {
            g.write("memory.swap.max", "0");
        }
        g
    }

    fn write(&self, file: &str, value: &str) {
        let p = self.dir.join(file);
        std::fs::write(&p, value)
            .unwrap_or_else(|e| panic!("writing {value} to {}: {e}", p.display()));
    }

    /// Runs `cmd` inside the group (it joins before exec) and waits for it.
    pub fn run(&self, cmd: &mut Command) -> Output {
        let procs = self.dir.join("cgroup.procs");
        // SAFETY: between fork and exec only async-signal-safe work: an open and a write of a
        // pre-built path, no allocation.
        let procs_c = std::ffi::CString::new(procs.to_str().unwrap()).unwrap();
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                match ok {
                    true => Ok(()),
                    false => Err(std::io::Error::last_os_error()),
                }
            })
        };
        cmd.output()
            .expect("running a command in the memory cgroup")
    }

    /// The group's `cgroup.procs`: a process that writes "0" (or its pid) there joins it, e.g. a
    /// shell wrapper that then execs the command to measure.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Moves the running process `pid` into the group: what it allocates from now on (kernel
    /// memory such as BPF maps included) counts against the limit; what it holds stays where it
    /// was charged.
    pub fn add(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
    }

    /// The group's peak usage so far (bytes), as the kernel counts it.
    pub fn peak(&self) -> Option<u64> {
        let f = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The commands run in it have exited: the group is empty and can go.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
