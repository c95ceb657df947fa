//! The program's XDP attachments: one bpf_link per interface, pinned at `<pins>/link-<ifname>`,
//! so the program stays attached when the agent exits and the next agent takes the links over.
//!
//! [`sync`] makes the attachments what the node settings list, all or nothing: every name must
//! resolve before anything changes, and a step that fails undoes the steps before it. A change of
//! mode detaches and re-attaches (the kernel refuses native and generic XDP on one device at
//! once); meanwhile that interface's packets reach the kernel without the program. Each
//! interface's mode, and whether it is a redirect target, is [`xdpmode::choose`]'s, asked anew
//! at each sync.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use tracing::{error, info, warn};

use crate::{
    kernel::dataplane::kernel::KernelDataplane,
    kernel::program::PROGRAM,
    kernel::xdpmode::{self, Choice, Mode, XdpMode},
};

/// What attaching, swapping or detaching could not do.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("node.interfaces: no interface named {} on this host (nothing was changed)", .0.join(", "))]
    NoSuchInterface(Vec<String>),
    #[error("no lb program")]
    NoProgram,
    #[error("no devmap")]
    NoDevmap,
    /// A step the kernel (or aya) refused: `doing` says which, `source` why.
    #[error("{doing}")]
    Step {
        doing: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    XdpMap(#[from] aya::maps::xdp::XdpMapError),
    #[error(transparent)]
    Mode(#[from] xdpmode::Refused),
}

type Result<T, E = LinkError> = std::result::Result<T, E>;

/// Names the step an error of the kernel's (or aya's) failed, as [`LinkError::Step`].
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Doing<T> for std::result::Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| LinkError::Step {
            doing: what(),
            source: Box::new(e),
        })
    }
}

/// The pin of `ifname`'s link: `link-eth0`. bpffs refuses dots in names, so a VLAN's
/// `bond0.100` is pinned as `link-bond0:100` (a colon is never in an interface name).
pub fn link_pin(pin_dir: &Path, ifname: &str) -> PathBuf {
    pin_dir.join(link_pin_name(ifname))
}

fn link_pin_name(ifname: &str) -> String {
    format!("link-{}", ifname.replace('.', ":"))
}

/// The interface a link pin's name stands for (see [`link_pin`]).
fn ifname_of_pin(name: &str) -> Option<String> {
    name.strip_prefix("link-").map(|i| i.replace(':', "."))
}

/// Interfaces with a pinned link in `pin_dir`.
pub fn pinned_links(pin_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(pin_dir) else {
        return vec![];
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // `link-eth0@swap` is a swap's second pin of eth0's link, renamed over the first.
            ifname_of_pin(&name)
                .filter(|i| !i.ends_with("@swap"))
                .map(|i| (i, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The index of the interface `name` in this network namespace; None if there is none.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

/// Every interface of `names` with its index, or an error naming each one that does not exist.
pub fn resolve(names: &[String]) -> Result<Vec<(String, u32)>> {
    let found: Vec<(String, Option<u32>)> = names.iter().map(|n| (n.clone(), ifindex(n))).collect();
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, i)| i.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(LinkError::NoSuchInterface(
            missing.into_iter().map(str::to_string).collect(),
        ));
    }
    Ok(found
        .into_iter()
        .filter_map(|(n, i)| i.map(|i| (n, i)))
        .collect())
}

fn program(dp: &mut KernelDataplane) -> Result<&mut Xdp> {
    Ok(dp
        .ebpf
        .program_mut(PROGRAM)
        .ok_or(LinkError::NoProgram)?
        .try_into()?)
}

/// Attaches the program to `ifname` afresh, in `mode`, and pins the link.
fn attach_new(dp: &mut KernelDataplane, pin_dir: &Path, ifname: &str, mode: Mode) -> Result<()> {
    let prog = program(dp)?;
    let id = match prog.attach(ifname, mode.flags()) {
        Ok(id) => id,
        Err(e) if os_error(&e) == Some(libc::EBUSY) => {
            return Err(e).doing(|| busy(ifname));
        }
        Err(e) => {
            return Err(e).doing(|| {
                format!("attaching the XDP program to {ifname} (native mode needs driver support: try xdp_mode: generic)")
            });
        }
    };
    pin(prog, id, &link_pin(pin_dir, ifname))
}

/// The OS error at the root of `e`, if any.
pub(crate) fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(n) = c
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(n);
        }
        cur = c.source();
    }
    None
}

/// Why attaching to `ifname` is refused with EBUSY: another XDP program is attached there (not
/// by a link of ours: those are swapped). Names it if the kernel says which it is.
fn busy(ifname: &str) -> String {
    format!(
        "attaching the XDP program to {ifname}: another XDP program is attached there{}, and lb does not replace \
         what it did not attach: detach it (`ip link set dev {ifname} xdp off`) or take {ifname} out of node.interfaces",
        attached_program_text(ifname)
    )
}

/// The XDP program attached to `ifname`, for messages: ` (id 7, named lb)`, ` (id 7)`, or
/// nothing if the kernel does not say.
pub(crate) fn attached_program_text(ifname: &str) -> String {
    let prog = ifindex(ifname)
        .and_then(|i| xdp_state(i).ok())
        .and_then(|s| s.prog_ids.into_iter().find(|id| *id != 0));
    let Some(id) = prog else {
        return String::new();
    };
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .filter(|n| !n.is_empty());
    match name {
        Some(n) => format!(" (id {id}, named {n})"),
        None => format!(" (id {id})"),
    }
}

/// Swaps the program into the pinned link of `ifname` (atomically: traffic never sees no program).
/// The link stays pinned throughout: it is opened from its pin, updated, pinned again under a
/// second name and renamed over the first, so an agent killed at any point leaves it attached.
fn swap(dp: &mut KernelDataplane, pin_dir: &Path, ifname: &str) -> Result<()> {
    let path = link_pin(pin_dir, ifname);
    let fd: FdLink = PinnedLink::from_pin(&path)
        .doing(|| format!("opening the pinned link {}", path.display()))?
        .into();
    let link = XdpLink::try_from(fd).doing(|| "the pinned link is not an XDP link".into())?;
    let prog = program(dp)?;
    let id = prog
        .attach_to_link(link)
        .doing(|| format!("replacing the program attached to {ifname}"))?;
    let again = pin_dir.join(format!("{}@swap", link_pin_name(ifname)));
    let _ = std::fs::remove_file(&again);
    pin(prog, id, &again)?;
    std::fs::rename(&again, &path)
        .doing(|| format!("renaming {} over {}", again.display(), path.display()))
}

fn pin(prog: &mut Xdp, id: aya::programs::xdp::XdpLinkId, path: &Path) -> Result<()> {
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .doing(|| "the XDP link is not a bpf_link (kernel too old?)".into())?;
    link.pin(path)
        .doing(|| format!("pinning the link at {}", path.display()))?;
    Ok(())
}

/// Detaches the program from `ifname` (removing the pin drops the last reference to the link).
pub fn detach(pin_dir: &Path, ifname: &str) -> Result<()> {
    let path = link_pin(pin_dir, ifname);
    let link = PinnedLink::from_pin(&path).doing(|| format!("opening {}", path.display()))?;
    drop(
        link.unpin()
            .doing(|| format!("removing {}", path.display()))?,
    );
    Ok(())
}

/// What undoes one step of [`sync`].
enum Undo {
    Detach(String),
    /// Attach (again) in this mode, detaching first what is attached now.
    Attach(String, Mode),
    /// Remove this interface index from the redirect devmap.
    TxPort(u32),
    /// Put this interface index back into the redirect devmap.
    TxPortBack(u32),
    /// Set the interface's accept_local back to 0.
    AcceptLocal(String),
}

/// The steps a [`sync`] took, to undo them if what follows it fails.
#[must_use]
#[derive(Default)]
pub struct Changes {
    undo: Vec<Undo>,
    /// The modes chosen before the sync.
    before: Vec<Choice>,
}

impl Changes {
    /// Puts the attachments back as they were before the sync, as far as the kernel lets us
    /// (what cannot be undone is logged).
    pub fn revert(self, dp: &mut KernelDataplane, pin_dir: &Path) {
        dp.xdp = self.before;
        for u in self.undo.into_iter().rev() {
            let (ifname, r) = match &u {
                Undo::Detach(i) => (i, detach(pin_dir, i)),
                Undo::Attach(i, mode) => (i, reattach(dp, pin_dir, i, *mode)),
                Undo::TxPort(index) => {
                    let r = tx_ports(dp).and_then(|mut p| Ok(p.remove(*index)?));
                    if let Err(e) = r {
                        error!(
                            index,
                            "removing an interface from the redirect devmap: {}",
                            crate::error_chain(&e)
                        );
                    }
                    continue;
                }
                Undo::TxPortBack(index) => {
                    let r = tx_ports(dp).and_then(|mut p| Ok(p.insert(*index, *index, None, 0)?));
                    if let Err(e) = r {
                        error!(
                            index,
                            "putting an interface back into the redirect devmap: {}",
                            crate::error_chain(&e)
                        );
                    }
                    continue;
                }
                Undo::AcceptLocal(i) => {
                    if let Err(e) = std::fs::write(accept_local(i), "0") {
                        error!(interface = %i, "setting accept_local back to 0: {e}");
                    }
                    continue;
                }
            };
            match r {
                Ok(()) => info!(interface = %ifname, "attachment put back as it was"),
                Err(e) => error!(
                    interface = %ifname,
                    "putting the attachment back failed: {}",
                    crate::error_chain(&e)
                ),
            }
        }
    }
}

fn reattach(dp: &mut KernelDataplane, pin_dir: &Path, ifname: &str, mode: Mode) -> Result<()> {
    if link_pin(pin_dir, ifname).exists() {
        detach(pin_dir, ifname)?;
    }
    attach_new(dp, pin_dir, ifname, mode)
}

/// What attaching to one interface takes.
#[derive(Clone, Copy)]
enum Step {
    /// No link pinned: attach afresh (undone by detaching).
    Fresh,
    /// A link attached in this other mode: detach and attach again (undone by attaching our
    /// program in the old mode: the old program went with its link).
    Remode(Mode),
    /// Swap the program into the pinned link (atomic; not undone).
    Swap,
}

fn step(pin_dir: &Path, ifname: &str, index: u32, mode: Mode) -> Result<Step> {
    if !link_pin(pin_dir, ifname).exists() {
        return Ok(Step::Fresh);
    }
    Ok(match attached_mode(index)? {
        Some(was) if was != mode => Step::Remode(was),
        _ => Step::Swap,
    })
}

fn attach(
    dp: &mut KernelDataplane,
    pin_dir: &Path,
    ifname: &str,
    step: Step,
    mode: Mode,
    done: &mut Changes,
) -> Result<()> {
    match step {
        Step::Fresh => {
            attach_new(dp, pin_dir, ifname, mode)?;
            done.undo.push(Undo::Detach(ifname.to_string()));
        }
        Step::Remode(was) => {
            warn!(
                interface = %ifname, from = %was, to = %mode,
                "XDP mode changed: detaching and attaching again (native and generic XDP cannot be attached to one device at once); until then, packets arriving on {ifname} reach the kernel without load balancing"
            );
            detach(pin_dir, ifname)?;
            done.undo.push(Undo::Attach(ifname.to_string(), was));
            attach_new(dp, pin_dir, ifname, mode)?;
        }
        Step::Swap => swap(dp, pin_dir, ifname)?,
    }
    Ok(())
}

/// Adds `ifname` to the redirect devmap, or takes it out if it is no redirect target (see
/// [`xdpmode`]), and lets the kernel forward encapsulated packets whose source is this node
/// while a backend's neighbour is unknown (accept_local). What it changed goes into `done`, so
/// that a start or reload that fails later puts it back.
fn prepare(
    dp: &mut KernelDataplane,
    ifname: &str,
    index: u32,
    target: bool,
    done: &mut Changes,
) -> Result<()> {
    let mut ports = tx_ports(dp)?;
    let present = ports.get(index, 0).is_ok();
    if target && !present {
        ports
            .insert(index, index, None, 0)
            .doing(|| format!("adding {ifname} to the redirect devmap"))?;
        done.undo.push(Undo::TxPort(index));
    } else if !target && present {
        ports
            .remove(index)
            .doing(|| format!("taking {ifname} out of the redirect devmap"))?;
        done.undo.push(Undo::TxPortBack(index));
    }
    let sysctl = accept_local(ifname);
    if std::fs::read_to_string(&sysctl)
        .map(|v| v.trim() != "1")
        .unwrap_or(false)
    {
        match std::fs::write(&sysctl, "1") {
            Ok(()) => {
                done.undo.push(Undo::AcceptLocal(ifname.to_string()));
                info!(interface = %ifname, "set accept_local=1 (packets to backends with no neighbour entry yet go through the kernel)")
            }
            Err(e) => {
                warn!(interface = %ifname, "could not set accept_local=1 ({e}): packets to backends with no neighbour entry yet will be dropped until it is resolved")
            }
        }
    }
    Ok(())
}

fn tx_ports(dp: &mut KernelDataplane) -> Result<aya::maps::DevMapHash<&mut aya::maps::MapData>> {
    let map = dp
        .ebpf
        .map_mut(lb_common::maps::TX_PORTS)
        .ok_or(LinkError::NoDevmap)?;
    Ok(aya::maps::DevMapHash::try_from(map)?)
}

fn accept_local(ifname: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{ifname}/accept_local")
}

/// Makes the attached interfaces those of `interfaces` (`node.interfaces`), each in the mode
/// [`xdpmode::choose`] gives it for `xdp_mode` (`node.xdp_mode`; refused, changing nothing, where an explicit `native` cannot
/// deliver): attach new ones, detach dropped ones, keep the devmap (redirect targets) in step.
/// All or nothing: on error the attachments are as they were. The [`Changes`] undo it, should
/// what follows fail.
pub fn sync(
    dp: &mut KernelDataplane,
    pin_dir: &Path,
    interfaces: &[String],
    xdp_mode: XdpMode,
) -> Result<Changes> {
    let wanted = resolve(interfaces)?;
    let choices = xdpmode::choose(xdp_mode, &wanted)?;
    let mut done = Changes {
        undo: vec![],
        before: dp.xdp.clone(),
    };
    match steps(dp, pin_dir, &wanted, &choices, &mut done) {
        Ok(()) => {
            for c in &choices {
                info!(
                    interface = %c.interface, mode = %c.mode, redirect_target = c.redirect_target,
                    "XDP mode: {}", c.reason
                );
            }
            dp.xdp = choices;
            Ok(done)
        }
        Err(e) => {
            done.revert(dp, pin_dir);
            Err(e)
        }
    }
}

/// Whether [`sync`] would now attach `interfaces` otherwise than they are (another
/// mode, or another redirect target, than the last sync chose: a peer gained or lost its XDP
/// program since, say). An error where an explicit `native` cannot deliver any more.
pub fn modes_changed(
    dp: &KernelDataplane,
    interfaces: &[String],
    xdp_mode: XdpMode,
) -> Result<bool> {
    let wanted = resolve(interfaces)?;
    let choices = xdpmode::choose(xdp_mode, &wanted)?;
    let key = |c: &[Choice]| -> Vec<(String, Mode, bool)> {
        c.iter()
            .map(|c| (c.interface.clone(), c.mode, c.redirect_target))
            .collect()
    };
    Ok(key(&choices) != key(&dp.xdp))
}

/// The steps of [`sync`], those that can fail without disturbing traffic first (fresh
/// attachments), then those undone less exactly (mode changes, detaching dropped interfaces),
/// swaps last: a failure part way then leaves as little to undo as can be.
fn steps(
    dp: &mut KernelDataplane,
    pin_dir: &Path,
    wanted: &[(String, u32)],
    choices: &[Choice],
    done: &mut Changes,
) -> Result<()> {
    let mut todo = Vec::new();
    for ((ifname, index), c) in wanted.iter().zip(choices) {
        todo.push((ifname, *index, c, step(pin_dir, ifname, *index, c.mode)?));
    }
    let (swaps, changes): (Vec<_>, Vec<_>) =
        todo.into_iter().partition(|t| matches!(t.3, Step::Swap));
    let (fresh, remodes): (Vec<_>, Vec<_>) = changes
        .into_iter()
        .partition(|t| matches!(t.3, Step::Fresh));
    for (ifname, index, c, step) in fresh.into_iter().chain(remodes) {
        prepare(dp, ifname, index, c.redirect_target, done)?;
        attach(dp, pin_dir, ifname, step, c.mode, done)?;
        info!(interface = %ifname, index, mode = %c.mode, "attached");
    }
    let names: BTreeSet<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
    for (ifname, _) in pinned_links(pin_dir) {
        if names.contains(ifname.as_str()) {
            continue;
        }
        // What to attach again if a later step fails (nothing if the interface is gone).
        let was = match ifindex(&ifname) {
            Some(i) => attached_mode(i)?,
            None => None,
        };
        detach(pin_dir, &ifname)?;
        if let Some(was) = was {
            done.undo.push(Undo::Attach(ifname.clone(), was));
        }
        info!(interface = %ifname, "detached");
    }
    for (ifname, index, c, step) in swaps {
        prepare(dp, ifname, index, c.redirect_target, done)?;
        attach(dp, pin_dir, ifname, step, c.mode, done)?;
        info!(interface = %ifname, index, mode = %c.mode, "attached (program swapped into the pinned link)");
    }
    Ok(())
}

/// How XDP is attached to the interface `index` now, as the kernel reports it; None if no
/// program is, or not in a mode lb uses (offloaded).
fn attached_mode(index: u32) -> Result<Option<Mode>> {
    let state = xdp_state(index)
        .doing(|| format!("asking the kernel how XDP is attached to interface {index}"))?;
    Ok(match state.mode() {
        Some("native") => Some(Mode::Native),
        Some("generic") => Some(Mode::Generic),
        _ => None,
    })
}

/// `RTM_GETLINK` for one interface: the answer's `IFLA_XDP` nest holds `IFLA_XDP_ATTACHED`
/// and the attached programs' ids. (A bpf_link's own info names the interface but not the mode.)
fn xdp_state(index: u32) -> io::Result<XdpState> {
    /// nlmsghdr followed by ifinfomsg.
    #[repr(C)]
    struct Request {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
        family: u8,
        pad: u8,
        ifi_type: u16,
        index: i32,
        ifi_flags: u32,
        change: u32,
    }
    let req = Request {
        len: size_of::<Request>() as u32,
        kind: libc::RTM_GETLINK,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_UNSPEC as u8,
        pad: 0,
        ifi_type: 0,
        index: index as i32,
        ifi_flags: 0,
        change: 0,
    };
    // SAFETY: a socket call; the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: req is a plain repr(C) value of the length given.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&raw const req).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_xdp(&buf[..n as usize])
}

/// What the kernel says of XDP on one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct XdpState {
    /// `XDP_ATTACHED_*` (0: nothing attached).
    attached: u8,
    /// The attached programs' ids (one per mode; 0 where none).
    prog_ids: [u32; 4],
}

impl XdpState {
    /// How XDP is attached, from `XDP_ATTACHED_*`; None if nothing is.
    fn mode(&self) -> Option<&'static str> {
        match self.attached {
            0 => None,
            1 => Some("native"),
            2 => Some("generic"),
            3 => Some("offload"),
            _ => Some("several"),
        }
    }
}

/// `IFLA_XDP_ATTACHED` and the program ids (`IFLA_XDP_PROG_ID`, and per mode when several are
/// attached) from an `RTM_NEWLINK` answer (nothing attached if absent).
fn parse_xdp(msg: &[u8]) -> io::Result<XdpState> {
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    /// IFLA_XDP_PROG_ID, then IFLA_XDP_DRV_PROG_ID, _SKB_, _HW_.
    const IFLA_XDP_PROG_IDS: [u16; 4] = [4, 5, 6, 7];
    const NLMSG_HDR: usize = 16;
    const IFINFOMSG: usize = 16;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    if msg.len() < NLMSG_HDR + 4 {
        return Err(bad("short answer"));
    }
    let len = (u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize).min(msg.len());
    match u16_at(msg, 4) {
        k if k == libc::NLMSG_ERROR as u16 => {
            let errno = i32::from_ne_bytes(msg[16..20].try_into().unwrap());
            return Err(io::Error::from_raw_os_error(-errno));
        }
        libc::RTM_NEWLINK if len >= NLMSG_HDR + IFINFOMSG => {}
        _ => return Err(bad("not a link message")),
    }
    let mut state = XdpState::default();
    let xdp = attributes(&msg[NLMSG_HDR + IFINFOMSG..len]).find(|(k, _)| *k == IFLA_XDP);
    for (k, v) in xdp.into_iter().flat_map(|(_, nest)| attributes(nest)) {
        if k == IFLA_XDP_ATTACHED {
            state.attached = v.first().copied().unwrap_or(0);
        } else if let Some(i) = IFLA_XDP_PROG_IDS.iter().position(|id| *id == k)
            && let Ok(b) = <[u8; 4]>::try_from(v)
        {
            state.prog_ids[i] = u32::from_ne_bytes(b);
        }
    }
    Ok(state)
}

/// Whether lb's program is attached to one interface now, as the kernel says: the program
/// of the link pinned for it is the one attached to the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    /// None: no such interface (in this network namespace).
    pub ifindex: Option<u32>,
    /// How XDP is attached there: native, generic, offload, several; None if not at all.
    pub mode: Option<&'static str>,
    /// Programs attached to the device (one per mode).
    pub program_ids: Vec<u32>,
    /// The program of the link lb pinned for the interface; None if none is pinned.
    pub lb_program_id: Option<u32>,
}

impl Attachment {
    pub fn ours(&self) -> bool {
        self.lb_program_id
            .is_some_and(|id| id != 0 && self.program_ids.contains(&id))
    }
}

/// What is attached to `ifname` now, and whether it is the program of lb's pinned link.
pub fn attachment(pin_dir: &Path, ifname: &str) -> Attachment {
    let lb_program_id = PinnedLink::from_pin(link_pin(pin_dir, ifname))
        .ok()
        .and_then(|l| FdLink::from(l).info().ok())
        .map(|i| i.program_id());
    attachment_of(ifname, lb_program_id)
}

/// What is attached to `ifname` now, `lb_program_id` being the program of the link pinned for it.
pub fn attachment_of(ifname: &str, lb_program_id: Option<u32>) -> Attachment {
    let ifindex = ifindex(ifname);
    let state = ifindex.and_then(|i| xdp_state(i).ok()).unwrap_or_default();
    let mode = state.mode();
    let mut program_ids: Vec<u32> = state.prog_ids.into_iter().filter(|i| *i != 0).collect();
    program_ids.sort_unstable();
    program_ids.dedup();
    Attachment {
        ifindex,
        mode,
        program_ids,
        lb_program_id,
    }
}

/// The interface index the XDP link `link_id` is attached to, from the `ifindex:` line of the
/// fdinfo of a descriptor this process holds on it (`bpf_link_info`'s XDP part, which aya does
/// not expose): 0 once its interface is gone. None if this process holds no descriptor on it.
pub fn link_ifindex(link_id: u32) -> Option<u32> {
    let want = link_id.to_string();
    std::fs::read_dir("/proc/self/fdinfo")
        .ok()?
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .find_map(|info| {
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k).map(str::trim).map(str::to_string))
            };
            (field("link_id:")? == want).then(|| field("ifindex:")?.parse().ok())?
        })
}

/// The interfaces an agent keeps its program attached to (what `/readyz` checks).
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
}

impl Expected {
    /// The interfaces that do not hold lb's program now.
    pub fn missing(&self) -> Vec<String> {
        self.attached()
            .into_iter()
            .filter(|(_, ours)| !ours)
            .map(|(i, _)| i)
            .collect()
    }

    /// Each interface, and whether it holds lb's program now (as the kernel says).
    pub fn attached(&self) -> Vec<(String, bool)> {
        self.interfaces
            .iter()
            .map(|i| (i.clone(), attachment(&self.pin_dir, i).ours()))
            .collect()
    }
}

/// Netlink attributes (type without its flag bits, value), 4-byte aligned.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vlan_interface_is_pinned_without_a_dot_and_read_back() {
        assert_eq!(link_pin_name("eth0"), "link-eth0");
        assert_eq!(link_pin_name("bond0.100"), "link-bond0:100");
        assert_eq!(
            ifname_of_pin("link-bond0:100").as_deref(),
            Some("bond0.100")
        );
        assert_eq!(ifname_of_pin("LB_NAT"), None);
    }

    /// One netlink attribute, padded.
    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        v.extend(kind.to_ne_bytes());
        v.extend(value);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }

    fn link_message(attrs: &[u8]) -> Vec<u8> {
        let mut m = ((32 + attrs.len()) as u32).to_ne_bytes().to_vec();
        m.extend(libc::RTM_NEWLINK.to_ne_bytes());
        m.extend([0u8; 10]); // flags, seq, pid
        m.extend([0u8; 16]); // ifinfomsg
        m.extend(attrs);
        m
    }

    #[test]
    fn the_xdp_mode_is_read_from_the_nest_after_other_attributes() {
        let name = attr(3, b"lb0\0"); // IFLA_IFNAME, 4 bytes: no padding needed
        let mtu = attr(4, &1500u32.to_ne_bytes());
        let odd = attr(1, &[1, 2, 3, 4, 5]); // padded to 12
        let prog_id = attr(4, &77u32.to_ne_bytes()); // IFLA_XDP_PROG_ID
        let nest = [prog_id, attr(2, &[2])].concat();
        let msg = link_message(&[name, odd, mtu, attr(43 | 0x8000, &nest)].concat());
        let state = parse_xdp(&msg).unwrap();
        assert_eq!((state.attached, state.prog_ids), (2, [77, 0, 0, 0]));
        assert_eq!(
            parse_xdp(&link_message(&attr(4, &[0; 4]))).unwrap(),
            XdpState::default()
        );
    }

    #[test]
    fn a_netlink_error_is_returned_as_the_os_error() {
        let mut m = 36u32.to_ne_bytes().to_vec();
        m.extend((libc::NLMSG_ERROR as u16).to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend((-libc::ENODEV).to_ne_bytes());
        m.extend([0u8; 16]);
        let e = parse_xdp(&m).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    }
}
