//! Running the real `lb` binary as an agent in a test namespace, as a separate process (so it
//! can be killed with SIGKILL), with pins in a directory of its own that is removed afterwards.
//!
//! Tests wait on state, never on the agent's log: the status file (through `lb status -o json`,
//! [`Agent::wait_status`] and the waits built on it), `/metrics` ([`Agent::wait_metric`]), the
//! maps (`lb ... -o json`), or the exit status and error of a command that fails
//! ([`Agent::refusal`]). The log is there to print when a test fails ([`Agent::log_dump`]);
//! only the tests of the log format itself (`tests/tests/logs.rs`) read it
//! ([`Agent::log_file`]). `tests/tests/lints.rs` keeps it so.

use std::{
    fmt,
    fs::File,
    io::{Read as _, Write as _},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A pin directory on bpffs and a state directory, both removed on drop (after `lb down`).
pub struct Dirs {
    pub pins: PathBuf,
    pub state: PathBuf,
    pub bin: PathBuf,
}

impl Dirs {
    pub fn new(bin: &Path, tag: &str) -> Self {
        crate::require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pins = PathBuf::from(format!("/sys/fs/bpf/lbt-{}-{n}-{tag}", std::process::id()));
        let state = std::env::temp_dir().join(format!("lbt-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&state).unwrap();
        assert!(
            Path::new("/sys/fs/bpf").join(".").exists(),
            "bpffs is not mounted at /sys/fs/bpf (cargo xtask setup mounts it)"
        );
        Self {
            pins,
            state,
            bin: bin.to_path_buf(),
        }
    }

    /// Runs `lb <args>` against these directories (in the caller's namespace) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("running lb")
    }

    /// Runs `lb <args>` against these directories inside `ns` (as an operator on the agent's
    /// host would: interfaces are looked up there), and returns its output.
    pub fn cli_in(&self, ns: &NetNs, args: &[&str]) -> Output {
        let netns =
            File::open(format!("/var/run/netns/{}", ns.name)).expect("opening the namespace");
        let fd = netns.as_raw_fd();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--pin-dir")
            .arg(&self.pins)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args);
        // SAFETY: setns is async-signal-safe; only the network namespace changes.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output().expect("running lb")
    }

    /// `lb <args> -o json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "lb {}: {}",
            all.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lb {}: not JSON ({e}): {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The names in the pin dir (maps and links), sorted; empty if it does not exist.
    pub fn pin_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.pins)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The agent's status file (`status.json` in the state dir) as it is now, parsed; Null if
    /// there is none (yet).
    pub fn status_file(&self) -> serde_json::Value {
        std::fs::read(self.state.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn config_path(&self) -> PathBuf {
        self.state.join("lb.yaml")
    }

    pub fn write_config(&self, text: &str) {
        // Write then rename, as editors do, so the agent never reads half a file.
        let tmp = self.state.join("lb.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = lb_userspace::agent::run::down(&self.pins, &self.state);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// An `lb run` process inside a namespace. Killed (SIGKILL) on drop if still running.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

/// The agent's log as it is now, to print in a failing test's message. It only prints: a test
/// asserts state, not log text.
pub struct LogDump(String);

impl LogDump {
    fn read(path: &Path) -> Self {
        let mut s = String::new();
        let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut s));
        Self(s)
    }
}

impl fmt::Display for LogDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LogDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Agent {
    /// Starts `lb run` in `ns` with the config already written to `dirs`.
    pub fn start(ns: &NetNs, dirs: &Dirs) -> Self {
        Self::start_under(ns, dirs, &[], &[], &[])
    }

    /// [`Agent::start`] with more arguments to `lb run` and more environment, run by `wrapper`
    /// if not empty (a command and its arguments, to which the lb binary and its arguments are
    /// appended), e.g. capsh.
    pub fn start_under(
        ns: &NetNs,
        dirs: &Dirs,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = dirs.state.join(format!(
            "agent-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let out = File::create(&log).unwrap();
        let netns =
            File::open(format!("/var/run/netns/{}", ns.name)).expect("opening the namespace");
        let fd = netns.as_raw_fd();
        let mut cmd = match wrapper {
            [] => Command::new(&dirs.bin),
            [program, rest @ ..] => {
                let mut c = Command::new(program);
                c.args(rest).arg(&dirs.bin);
                c
            }
        };
        cmd.arg("--pin-dir")
            .arg(&dirs.pins)
            .arg("--state-dir")
            .arg(&dirs.state)
            .arg("run")
            .arg("--config")
            .arg(dirs.config_path())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(out);
        // SAFETY: setns is async-signal-safe; only the network namespace changes (not the mount
        // namespace, so /sys/fs/bpf stays the host's).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting lb run");
        drop(netns);
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log (stderr) so far, for a failing test's message.
    pub fn log_dump(&self) -> LogDump {
        LogDump::read(&self.log)
    }

    /// [`Agent::log_dump`] to call later, without borrowing the agent.
    pub fn log_dumper(&self) -> impl Fn() -> LogDump + use<> {
        let path = self.log.clone();
        move || LogDump::read(&path)
    }

    /// The file the agent logs to: for the tests of the log format (`tests/tests/logs.rs`)
    /// only; other tests wait on and assert state.
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// Waits (within `timeout`) for the agent to exit by itself, which it must do with a
    /// failure, and returns what it answered: the `lb: ...` lines that `lb` prints on stderr
    /// as it fails (its error and the hint after it). That is the command's output, like the
    /// stderr of `lb down`; the lines it logs while it runs (a timestamp first) are not in it.
    pub fn refusal(&mut self, timeout: Duration) -> String {
        let status = self
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("the agent runs on after {timeout:?}:\n{}", self.log_dump()));
        assert!(
            !status.success(),
            "the agent exited 0, not with an error:\n{}",
            self.log_dump()
        );
        let text = self.log_dump().0;
        let said: Vec<&str> = text.lines().filter(|l| l.starts_with("lb: ")).collect();
        assert!(
            !said.is_empty(),
            "the agent failed ({status}) without saying why:\n{text}"
        );
        said.join("\n")
    }

    /// Polls `lb status -o json` in `ns` (run with `dirs`' binary) until this agent serves:
    /// the status file is this process's, the program is attached to every configured
    /// interface and the maps are pinned (the command exits 0), and `also` holds of the status.
    /// Returns that status; panics with it and the log if it does not come within `timeout` or
    /// the agent exits.
    pub fn wait_status(
        &mut self,
        ns: &NetNs,
        dirs: &Dirs,
        timeout: Duration,
        also: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let out = dirs.cli_in(ns, &["status", "-o", "json"]);
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if out.status.success() && v["agent"]["pid"] == self.pid() && also(&v) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}); lb status: {v:#}\n{}",
                    self.log_dump()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "the agent does not serve as awaited within {timeout:?}; lb status: {v:#}\n{}",
                    self.log_dump()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Agent::wait_status`] with nothing more: the agent has started and serves.
    pub fn wait_serving(
        &mut self,
        ns: &NetNs,
        dirs: &Dirs,
        timeout: Duration,
    ) -> serde_json::Value {
        self.wait_status(ns, dirs, timeout, |_| true)
    }

    /// [`Agent::wait_serving`], and its event loop runs (`agent.event_loop`): health checks,
    /// announcements and reloads are under way.
    pub fn wait_running(
        &mut self,
        ns: &NetNs,
        dirs: &Dirs,
        timeout: Duration,
    ) -> serde_json::Value {
        self.wait_status(ns, dirs, timeout, |v| v["agent"]["event_loop"] == true)
    }

    /// Waits until the agent has applied `n` reloads since it started (`agent.reloads_applied`:
    /// of its config file, of the cluster, of overrides); returns the status.
    pub fn wait_applied(
        &mut self,
        ns: &NetNs,
        dirs: &Dirs,
        n: u64,
        timeout: Duration,
    ) -> serde_json::Value {
        self.wait_status(ns, dirs, timeout, |v| {
            v["agent"]["reloads_applied"].as_u64() >= Some(n)
        })
    }

    /// Waits until the agent has rejected `n` reloads since it started
    /// (`agent.reloads_rejected`); returns the status, whose `agent.last_reload.error` says why
    /// the last one was.
    pub fn wait_rejected(
        &mut self,
        ns: &NetNs,
        dirs: &Dirs,
        n: u64,
        timeout: Duration,
    ) -> serde_json::Value {
        self.wait_status(ns, dirs, timeout, |v| {
            v["agent"]["reloads_rejected"].as_u64() >= Some(n)
        })
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    pub fn hup(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    /// Waits until the counter `name` (no labels) that the agent serves at `addr` in `ns` is at
    /// least `at_least`; panics with the log if it isn't within `timeout` or the agent exits.
    pub fn wait_metric(
        &mut self,
        ns: &NetNs,
        addr: &str,
        name: &str,
        at_least: u64,
        timeout: Duration,
    ) {
        let start = Instant::now();
        loop {
            let v = metric(ns, addr, name);
            if v.is_some_and(|v| v >= at_least) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) before {name} reached {at_least}:\n{}",
                    self.log_dump()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{name} is {v:?}, not {at_least} or more, after {timeout:?}:\n{}",
                    self.log_dump()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `GET path` from the agent serving at `addr` in `ns` answers `code`; panics with
    /// the log if it doesn't within `timeout` or the agent exits.
    pub fn wait_http(&mut self, ns: &NetNs, addr: &str, path: &str, code: u16, timeout: Duration) {
        let start = Instant::now();
        loop {
            let got = http_status(ns, addr, path);
            if got == Some(code) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) before {path} answered {code}:\n{}",
                    self.log_dump()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{path} answers {got:?}, not {code}, after {timeout:?}:\n{}",
                    self.log_dump()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How the process exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit by itself (within `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The whole response of `/metrics` served at `addr` in `ns` (headers included); None if
/// nothing answers there.
pub fn metrics_text(ns: &NetNs, addr: &str) -> Option<String> {
    ns.run(|| {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

/// The value of the metric `name` (no labels) served at `addr` (`/metrics`) in `ns`; None if
/// nothing answers there or the metric is not listed.
pub fn metric(ns: &NetNs, addr: &str, name: &str) -> Option<u64> {
    metrics_text(ns, addr)?.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix("{}").unwrap_or(rest);
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The HTTP status of `GET path` from the agent serving at `addr` in `ns`; None if nothing
/// answers.
pub fn http_status(ns: &NetNs, addr: &str, path: &str) -> Option<u16> {
    let text = ns.run(|| {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// How XDP is attached to `dev` in `ns`, as iproute2 reports it: (mode, program id), the mode
/// being the kernel's `XDP_ATTACHED_*` (1 native, 2 generic); None if nothing is attached.
pub fn xdp_attachment(ns: &NetNs, dev: &str) -> Option<(u64, u64)> {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-j", "-d", "link", "show", "dev", dev])
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip link show {dev}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    let xdp = &v[0]["xdp"];
    Some((xdp["mode"].as_u64()?, xdp["prog"]["id"].as_u64()?))
}

/// The id of the BPF link pinned for `ifname` in `pins` (lb pins one per interface): the same id
/// means the same attachment, never detached, whatever program it now runs.
pub fn pinned_link_id(pins: &Path, ifname: &str) -> u32 {
    let path = pins.join(format!("link-{ifname}"));
    let link = aya::programs::links::PinnedLink::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    aya::programs::links::FdLink::from(link)
        .info()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .id()
}

/// The kernel's id of the map pinned as `name` in `pins`: the same id means the same map (its
/// entries kept), not one created anew.
pub fn pinned_map_id(pins: &Path, name: &str) -> u32 {
    let path = pins.join(name);
    aya::maps::MapInfo::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .id()
}

/// A wrapper for `lb` (see [`Agent::start_under`]): `capsh` dropping from the bounding set every
/// capability but `keep` (capsh's names: `cap_bpf`, `cap_net_admin`), so that root runs `lb`
/// with exactly those.
pub fn capsh_keeping<S: AsRef<str>>(keep: &[S]) -> Vec<String> {
    let print = std::process::Command::new("capsh")
        .arg("--print")
        .output()
        .expect("capsh (cargo xtask setup installs libcap2-bin)");
    let text = String::from_utf8_lossy(&print.stdout);
    let bounding = text
        .lines()
        .find_map(|l| l.strip_prefix("Bounding set ="))
        .expect("capsh --print shows the bounding set");
    let drop: Vec<&str> = bounding
        .split(',')
        .filter(|c| !keep.iter().any(|k| k.as_ref() == *c))
        .collect();
    vec![
        "capsh".into(),
        format!("--drop={}", drop.join(",")),
        "--".into(),
        "-c".into(),
        "exec \"$@\"".into(),
        "lb".into(),
    ]
}
