//! `lb decap`: makes a host a DSR backend by attaching `lb_decap`, the object's decapsulation
//! program (see `lb-ebpf/src/decap.rs`), to an interface with a pinned bpf_link, so that it stays
//! attached when the command exits, as the agent's program does.
//!
//! The links are pinned as `link-<ifname>` (the agent's naming, [`crate::kernel::links::link_pin`]) in a
//! directory of their own, `/sys/fs/bpf/lb-decap` by default, never in an agent's pin dir: the
//! agent detaches every link pinned there that its config does not list, and `lb down` removes
//! them all, and a backend usually runs no agent at all. Loading the object creates its maps (at
//! the smallest sizes: `lb_decap` uses none of them); none is pinned, so they go when the command
//! exits and only the program, held by its link, stays.
//!
//! bpffs is shared by every network namespace of a host while interfaces are not: a pin for
//! `eth0` may hold a link to the `eth0` of another namespace. A pinned link is therefore taken
//! for this namespace's interface only if the kernel shows its program attached there.

pub mod tunnels;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use serde::Serialize;

pub use crate::kernel::xdpmode::Mode;
use crate::{
    kernel::links,
    kernel::pindir::{self, PinDirError},
    kernel::privilege,
    kernel::program::{self, Sizes},
};

/// Where `lb decap` pins its links unless told otherwise (`--decap-dir`, `LB_DECAP_DIR`).
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/lb-decap";

/// The decapsulation program's name in the object.
pub const PROGRAM: &str = "lb_decap";

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("lb decap needs {}; this process lacks {}", privilege::ATTACH_NEEDED, .0.join(", "))]
    Privilege(Vec<&'static str>),
    #[error("no interface named {0} in this network namespace (`ip link` lists them)")]
    NoInterface(String),
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    #[error(
        "{dir} is an lb agent's pin dir: decap links must be pinned apart from its maps (the \
         agent detaches every link there that its config does not list); choose another --decap-dir"
    )]
    AgentDir { dir: String },
    #[error(
        "the link pinned at {pin} is attached to interface index {ifindex} of another network \
         namespace (or to an interface since renamed), not to {ifname} here: run `lb decap detach \
         {ifname}` where it is attached, give this namespace its own --decap-dir, or remove the \
         pin (`rm {pin}`), which detaches it"
    )]
    Elsewhere {
        pin: String,
        ifname: String,
        ifindex: u32,
    },
    #[error("{what} {path}")]
    Pin {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the link pinned at {path}")]
    OpenLink {
        path: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the link at {path}")]
    PinLink {
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("loading {PROGRAM} from the embedded object")]
    Load(#[source] Box<program::LoadError>),
    #[error("{what} {ifname}{hint}")]
    Attach {
        what: &'static str,
        ifname: String,
        hint: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "this kernel attached {PROGRAM} without a bpf_link, which cannot be pinned (Linux 5.9 or later has them)"
    )]
    NoBpfLink,
}

/// What `attach` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Attached afresh, and pinned.
    New,
    /// Already attached in this mode: this build's program was swapped into the same link
    /// (atomically: no packet went without it).
    Replaced,
    /// Attached in the other mode: detached, and attached again in the one asked for.
    Remoded { from: Mode },
    /// The pin held a link whose interface had gone: it was removed, and a new link pinned.
    Stale,
}

/// Where a pinned link is attached, as the kernel says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// To the interface of its name in this network namespace.
    Attached,
    /// To no interface: its interface was deleted (the pin is all that is left).
    Defunct,
    /// To an interface of another network namespace, or one since renamed.
    Elsewhere,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Defunct => "defunct",
            Self::Elsewhere => "elsewhere",
        }
    }
}

/// One pinned link, for `lb decap status`.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub interface: String,
    pub pin: PathBuf,
    pub state: State,
    /// How XDP is attached to the interface (native, generic), where [`State::Attached`].
    pub mode: Option<&'static str>,
    pub link_id: u32,
    pub program_id: u32,
    /// The interface index the link is attached to (0: none).
    pub link_ifindex: u32,
}

/// The pin of `ifname`'s link in `dir`.
pub fn pin_path(dir: &Path, ifname: &str) -> PathBuf {
    links::link_pin(dir, ifname)
}

/// Refuses, naming what is missing, unless this process may load and attach XDP programs.
pub fn check_privilege() -> Result<(), DecapError> {
    match privilege::missing_to_attach() {
        m if m.is_empty() => Ok(()),
        m => Err(DecapError::Privilege(m)),
    }
}

/// Refuses a `dir` off bpffs, or one that is an agent's pin dir: the default one, or one that
/// holds lb's maps (`LB_*`).
fn check_dir(dir: &Path) -> Result<(), DecapError> {
    pindir::check_bpffs_as(dir, "--decap-dir")?;
    let has_maps = std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("LB_"))
    });
    if has_maps || dir == Path::new(program::DEFAULT_PIN_DIR) {
        return Err(DecapError::AgentDir {
            dir: dir.display().to_string(),
        });
    }
    Ok(())
}

/// Attaches `lb_decap` to `ifname` in `mode` with a link pinned in `dir`; again on an interface
/// it is attached to, swaps this build's program into the same link (or, in another mode,
/// attaches it afresh).
pub fn attach(dir: &Path, ifname: &str, mode: Mode) -> Result<Attached, DecapError> {
    check_privilege()?;
    if links::ifindex(ifname).is_none() {
        return Err(DecapError::NoInterface(ifname.to_string()));
    }
    check_dir(dir)?;
    let pin = pin_path(dir, ifname);
    let found = entry(ifname, &pin);
    if let Some(e) = found.as_ref().filter(|e| e.state == State::Elsewhere) {
        return Err(elsewhere(e));
    }
    std::fs::create_dir_all(dir).map_err(|source| DecapError::Pin {
        what: "creating",
        path: dir.display().to_string(),
        source,
    })?;
    let mut ebpf = load()?;
    let prog = decap_program(&mut ebpf)?;
    let Some(found) = found else {
        attach_new(prog, ifname, mode, &pin)?;
        return Ok(Attached::New);
    };
    match (found.state, mode_of(found.mode)) {
        (State::Attached, Some(was)) if was != mode => {
            unpin(&pin)?;
            attach_new(prog, ifname, mode, &pin)?;
            Ok(Attached::Remoded { from: was })
        }
        (State::Attached, _) => {
            replace(prog, ifname, &pin)?;
            Ok(Attached::Replaced)
        }
        _ => {
            unpin(&pin)?;
            attach_new(prog, ifname, mode, &pin)?;
            Ok(Attached::Stale)
        }
    }
}

fn elsewhere(e: &Entry) -> DecapError {
    DecapError::Elsewhere {
        pin: e.pin.display().to_string(),
        ifname: e.interface.clone(),
        ifindex: e.link_ifindex,
    }
}

fn mode_of(mode: Option<&str>) -> Option<Mode> {
    match mode {
        Some("native") => Some(Mode::Native),
        Some("generic") => Some(Mode::Generic),
        _ => None,
    }
}

/// What `detach` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detached {
    /// The link was detached from the interface, and its pin removed.
    Detached,
    /// The pin's link was attached to nothing (its interface had gone); the pin was removed.
    Stale,
    /// Nothing was pinned for the interface.
    Nothing,
}

/// Detaches `lb_decap` from `ifname` by removing its pin (the last reference to the link), and
/// the directory if that leaves it empty. The interface need not exist any more.
pub fn detach(dir: &Path, ifname: &str) -> Result<Detached, DecapError> {
    check_privilege()?;
    let pin = pin_path(dir, ifname);
    let Some(entry) = entry(ifname, &pin) else {
        return Ok(Detached::Nothing);
    };
    if entry.state == State::Elsewhere {
        return Err(elsewhere(&entry));
    }
    unpin(&pin)?;
    if std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_none()) {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(match entry.state {
        State::Defunct => Detached::Stale,
        _ => Detached::Detached,
    })
}

/// Every link pinned in `dir`, with where the kernel says it is attached; a pin that cannot be
/// opened is an error (it names the pin).
pub fn status(dir: &Path) -> Result<Vec<Entry>, DecapError> {
    let mut out = Vec::new();
    for (ifname, pin) in links::pinned_links(dir) {
        let link = open(&pin)?;
        out.push(describe(&ifname, pin, &link));
    }
    Ok(out)
}

/// The link pinned for `ifname`, if any (a pin that cannot be opened counts as none: attaching
/// then fails to pin over it and says so).
fn entry(ifname: &str, pin: &Path) -> Option<Entry> {
    let link = open(pin).ok()?;
    Some(describe(ifname, pin.to_path_buf(), &link))
}

fn open(pin: &Path) -> Result<FdLink, DecapError> {
    PinnedLink::from_pin(pin)
        .map(FdLink::from)
        .map_err(|source| DecapError::OpenLink {
            path: pin.display().to_string(),
            source,
        })
}

fn describe(ifname: &str, pin: PathBuf, link: &FdLink) -> Entry {
    let (link_id, program_id) = link
        .info()
        .map(|i| (i.id(), i.program_id()))
        .unwrap_or_default();
    let link_ifindex = links::link_ifindex(link_id).unwrap_or(0);
    let here = links::attachment_of(ifname, Some(program_id));
    let state = if here.ours() {
        State::Attached
    } else if link_ifindex == 0 {
        State::Defunct
    } else {
        State::Elsewhere
    };
    Entry {
        interface: ifname.to_string(),
        pin,
        state,
        mode: here.mode.filter(|_| state == State::Attached),
        link_id,
        program_id,
        link_ifindex,
    }
}

fn unpin(pin: &Path) -> Result<(), DecapError> {
    std::fs::remove_file(pin).map_err(|source| DecapError::Pin {
        what: "removing",
        path: pin.display().to_string(),
        source,
    })
}

/// The sizes the object's maps are created with: the smallest there are (`lb_decap` uses none).
fn smallest() -> Sizes {
    Sizes {
        table_size: 13,
        max_vips: 1,
        max_backends: 1,
        flow_table_size: 1,
        affinity_table_size: 1,
        nat_table_size: 1,
    }
}

/// The object, loaded with [`smallest`] sizes and nothing pinned; only `lb_decap` is verified.
fn load() -> Result<Ebpf, DecapError> {
    let sizes = smallest();
    let buckets = lb_common::flowtab::buckets_for(sizes.flow_table_size);
    let mut loader = EbpfLoader::new();
    program::configure(&mut loader, &sizes, &buckets);
    let mut ebpf = loader
        .load(program::OBJECT)
        .map_err(|e| load_error(program::LoadError::Object(e)))?;
    decap_program(&mut ebpf)?
        .load()
        .map_err(|e| load_error(program::LoadError::Verify(e)))?;
    Ok(ebpf)
}

fn load_error(e: program::LoadError) -> DecapError {
    DecapError::Load(Box::new(e))
}

fn decap_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DecapError> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| load_error(program::LoadError::NoProgram))?
        .try_into()
        .map_err(|e| load_error(program::LoadError::NotXdp(e)))
}

/// Attaches `prog` to `ifname` afresh, and pins the link at `pin`.
fn attach_new(prog: &mut Xdp, ifname: &str, mode: Mode, pin: &Path) -> Result<(), DecapError> {
    let id = prog
        .attach(ifname, mode.flags())
        .map_err(|source| attach_error(ifname, mode, source))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(|source| attach_error(ifname, mode, source))?
        .try_into()
        .map_err(|_| DecapError::NoBpfLink)?;
    link.pin(pin).map_err(|source| DecapError::PinLink {
        path: pin.display().to_string(),
        source,
    })?;
    Ok(())
}

fn attach_error(ifname: &str, mode: Mode, source: aya::programs::ProgramError) -> DecapError {
    let hint = if links::os_error(&source) == Some(libc::EBUSY) {
        format!(
            ": another XDP program is attached there{}; detach it first (`ip link set dev \
             {ifname} xdp off`)",
            links::attached_program_text(ifname)
        )
    } else if mode == Mode::Native {
        " in native mode (a driver without native XDP refuses it: try --xdp-mode generic)".into()
    } else {
        String::new()
    };
    DecapError::Attach {
        what: "attaching lb_decap to",
        ifname: ifname.to_string(),
        hint,
        source: Box::new(source),
    }
}

/// Swaps `prog` into the link pinned at `pin` (the kernel's link update: atomic). The pin keeps
/// naming the same link.
fn replace(prog: &mut Xdp, ifname: &str, pin: &Path) -> Result<(), DecapError> {
    let link = XdpLink::try_from(open(pin)?).map_err(|e| DecapError::OpenLink {
        path: pin.display().to_string(),
        source: e,
    })?;
    prog.attach_to_link(link)
        .map_err(|source| DecapError::Attach {
            what: "replacing the program attached to",
            ifname: ifname.to_string(),
            hint: String::new(),
            source: Box::new(source),
        })?;
    Ok(())
}
