//! The commands' side: find the VIP and backend in the running agent's status file, write the
//! override, signal the agent (SIGUSR1) and wait until its status file shows it in force. A change
//! the agent rejects, or does not apply in time, is taken back: the command fails and changes
//! nothing.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::sources::overrides::{Kind, Override};
use crate::{
    observe::show::flows::{Endpoint, VipArg},
    status::file::{BackendStatus, Status, VipStatus, read_status},
};

/// What a command asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Drain,
    Weight(u32),
    /// Back to the configured weight.
    Undo,
}

/// A VIP as a command names it: its name, or ADDRESS:PORT (with /tcp or /udp), as lb prints it.
#[derive(Clone, Debug)]
pub enum VipQuery {
    Addr(VipArg),
    Name(String),
}

impl std::str::FromStr for VipQuery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<VipArg>() {
            Ok(a) => Self::Addr(a),
            Err(_) => Self::Name(s.to_string()),
        })
    }
}

impl VipQuery {
    fn matches(&self, v: &VipStatus) -> bool {
        match self {
            Self::Name(n) => &v.name == n,
            Self::Addr(a) => v
                .vip
                .parse::<VipArg>()
                .is_ok_and(|l| l.addr == a.addr && a.proto.is_none_or(|p| Some(p) == l.proto)),
        }
    }
}

/// Why `lb drain`, `lb undrain` or `lb weight` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no agent status in {} (is `lb run` running with this --state-dir?)", .0.display())]
    NoStatus(PathBuf),
    #[error(
        "the agent that wrote {} (pid {pid}) is not running: overrides are applied by a running agent",
        path.display()
    )]
    NotRunning { path: PathBuf, pid: u32 },
    #[error("the status file in {} names no agent", .0.display())]
    NoAgent(PathBuf),
    #[error("no VIP {vip} (the agent serves: {serves})")]
    NoSuchVip { vip: String, serves: String },
    #[error("{vip} names several VIPs ({found}): give ADDRESS:PORT/PROTOCOL")]
    SeveralVips { vip: String, found: String },
    #[error("{vip} has no backend {addr} (its backends: {backends})")]
    NoSuchBackend {
        vip: String,
        addr: IpAddr,
        backends: String,
    },
    #[error("the status file's backend address {0:?} does not read")]
    BadAddress(String),
    #[error("signalling the agent (pid {pid})")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent rejected the change: {0}")]
    Rejected(String),
    #[error("the agent did not apply the change within {0:?} (its log says why); nothing changed")]
    Timeout(Duration),
    #[error(transparent)]
    Overrides(#[from] crate::sources::overrides::OverridesError),
}

type Result<T, E = CommandError> = std::result::Result<T, E>;

/// Runs `change` for `backend` of `vip` on the agent whose state dir is `state_dir`; returns
/// what to print.
pub fn run(
    state_dir: &Path,
    vip: &VipQuery,
    backend: Endpoint,
    change: Change,
    patience: Duration,
) -> Result<String> {
    let status = running(state_dir)?;
    let agent = status.agent.as_ref().expect("checked by running");
    let v = find_vip(&status, vip)?;
    let b = find_backend(v, backend)?;
    let addr: IpAddr = b
        .address
        .parse()
        .map_err(|_| CommandError::BadAddress(b.address.clone()))?;
    let wanted = match change {
        Change::Drain => Some(Override::new(v.vip.clone(), addr, None)),
        Change::Weight(w) => Some(Override::new(v.vip.clone(), addr, Some(w))),
        Change::Undo => None,
    };
    let before = crate::sources::overrides::update(state_dir, |o| match &wanted {
        Some(w) => o.set(w.clone()),
        None => o.remove(&v.vip, addr),
    })?;
    if wanted.is_none() && before.is_none() {
        return Ok(format!(
            "{} {}: no override (weight {} as configured)",
            v.vip, b.address, b.weight
        ));
    }
    let rejected_before = agent.reloads_rejected;
    // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
    if unsafe { libc::kill(agent.pid as i32, libc::SIGUSR1) } != 0 {
        let e = std::io::Error::last_os_error();
        take_back(state_dir, &v.vip, addr, before)?;
        return Err(CommandError::Signal {
            pid: agent.pid,
            source: e,
        });
    }
    match wait(
        state_dir,
        &v.vip,
        addr,
        wanted.as_ref(),
        rejected_before,
        patience,
    ) {
        Ok(b) => Ok(done(&v.vip, &b)),
        Err(e) => {
            take_back(state_dir, &v.vip, addr, before)?;
            Err(e)
        }
    }
}

/// The status of a running agent, or why there is none.
fn running(state_dir: &Path) -> Result<Status> {
    let status =
        read_status(state_dir).ok_or_else(|| CommandError::NoStatus(state_dir.to_path_buf()))?;
    match &status.agent {
        Some(a) if a.is_running() => Ok(status),
        Some(a) => Err(CommandError::NotRunning {
            path: crate::status::file::status_path(state_dir),
            pid: a.pid,
        }),
        None => Err(CommandError::NoAgent(state_dir.to_path_buf())),
    }
}

fn find_vip<'a>(status: &'a Status, vip: &VipQuery) -> Result<&'a VipStatus> {
    let found: Vec<&VipStatus> = status.vips.iter().filter(|v| vip.matches(v)).collect();
    match found[..] {
        [v] => Ok(v),
        [] => Err(CommandError::NoSuchVip {
            vip: show(vip),
            serves: names(status.vips.iter().map(|v| format!("{} {}", v.name, v.vip))),
        }),
        _ => Err(CommandError::SeveralVips {
            vip: show(vip),
            found: names(found.iter().map(|v| v.vip.clone())),
        }),
    }
}

fn find_backend(v: &VipStatus, e: Endpoint) -> Result<&BackendStatus> {
    let vip_port = v.vip.parse::<VipArg>().map_or(0, |a| a.addr.port());
    v.backends
        .iter()
        .find(|b| {
            let port = if b.port == 0 { vip_port } else { b.port };
            b.address.parse() == Ok(e.addr) && e.port.is_none_or(|p| p == port)
        })
        .ok_or_else(|| CommandError::NoSuchBackend {
            vip: v.vip.clone(),
            addr: e.addr,
            backends: names(v.backends.iter().map(|b| b.address.clone())),
        })
}

fn show(vip: &VipQuery) -> String {
    match vip {
        VipQuery::Name(n) => format!("named {n:?}"),
        VipQuery::Addr(a) => a.addr.to_string(),
    }
}

fn names(it: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Polls the status file until the backend shows `wanted`; fails if the agent rejects the
/// reload (`rejected_before` is its count of rejections before the signal) or takes too long.
fn wait(
    state_dir: &Path,
    vip: &str,
    addr: IpAddr,
    wanted: Option<&Override>,
    rejected_before: u64,
    patience: Duration,
) -> Result<BackendStatus> {
    let deadline = Instant::now() + patience;
    loop {
        let status = read_status(state_dir);
        let agent = status.as_ref().and_then(|s| s.agent.as_ref());
        if let Some(a) = agent.filter(|a| a.reloads_rejected > rejected_before) {
            let why = a.last_reload.as_ref().and_then(|r| r.error.clone());
            return Err(CommandError::Rejected(why.unwrap_or_default()));
        }
        let b = status.and_then(|s| {
            let v = s.vips.into_iter().find(|v| v.vip == vip)?;
            v.backends
                .into_iter()
                .find(|b| b.address.parse() == Ok(addr))
        });
        if let Some(b) = b.filter(|b| in_force(b, wanted)) {
            return Ok(b);
        }
        if Instant::now() > deadline {
            return Err(CommandError::Timeout(patience));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn in_force(b: &BackendStatus, wanted: Option<&Override>) -> bool {
    match (&b.overridden, wanted) {
        (None, None) => true,
        (Some(o), Some(w)) => (o.kind, o.weight, &o.since) == (w.kind, w.weight, &w.since),
        _ => false,
    }
}

/// Puts back the override the command replaced (or removes the one it added).
fn take_back(state_dir: &Path, vip: &str, addr: IpAddr, before: Option<Override>) -> Result<()> {
    crate::sources::overrides::update(state_dir, |o| {
        o.remove(vip, addr);
        o.overrides.extend(before);
    })?;
    Ok(())
}

fn done(vip: &str, b: &BackendStatus) -> String {
    match &b.overridden {
        Some(o) if o.kind == Kind::Drain => format!(
            "{vip} {}: drained (weight 0, configured {}); its established flows stay, new flows go to the other backends",
            b.address,
            configured(o)
        ),
        Some(o) => format!(
            "{vip} {}: weight {} (configured {})",
            b.address,
            o.weight,
            configured(o)
        ),
        None => format!("{vip} {}: weight {} as configured", b.address, b.weight),
    }
}

fn configured(o: &Override) -> String {
    o.configured.map_or("-".into(), |w| w.to_string())
}
