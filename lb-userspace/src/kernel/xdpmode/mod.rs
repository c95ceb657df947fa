//! Which XDP mode each interface is attached in, and why: native XDP only where what the
//! program sends is delivered.
//!
//! In native mode the program's `XDP_TX` and redirects hand frames to a device's XDP transmit
//! path, which not every device takes. A veth is the common trap: it queues XDP frames for its
//! peer, which takes them only while it runs NAPI. Measured on Linux 6.18 with the agent in a
//! lab of veths (client, load balancer, backend; `lb stats` counted every packet as `redirect`
//! or `tx` while no connection worked):
//!
//! - a peer with an XDP program attached in native mode takes everything (the program may just
//!   pass);
//! - a peer with GRO on (`ethtool -K peer gro on`; veths start with it off) takes redirects, but
//!   not `XDP_TX`: the kernel queues those frames and never schedules the peer to take them
//!   (it flushes them only to a peer with a program), so a one-armed VIP answers nothing;
//! - a peer with neither, or with a program in generic mode, takes nothing;
//! - generic mode sends through the ordinary transmit path, which delivers on any device.
//!
//! Other drivers say what they do in their `xdp-features` (Linux 6.3+): `basic` (native XDP at
//! all) and `ndo-xmit` (takes redirected frames); their `XDP_TX` goes out on their own rings.
//!
//! [`decide`] is pure: the facts the kernel reports of each interface ([`LinkFacts`], gathered
//! by [`kernel`]) and `node.xdp_mode` in, a [`Choice`] per interface out, or the reasons an
//! explicit `native` cannot deliver. `auto` (the default) takes native where it delivers and
//! generic elsewhere. The program also redirects from one attached interface to another (the
//! egress the route lookup gives, when it is in the redirect devmap), so an interface that
//! cannot take native redirects is left out of the devmap while any interface runs native:
//! what is routed out of it goes through the kernel's forwarding instead (slower, delivered).
//! Egress interfaces lb is not attached to are never in the devmap: the kernel forwards there.

pub mod kernel;

use serde::{Deserialize, Serialize};

/// How the program is attached (`node.xdp_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Unset (or `auto`): native on each interface where native XDP delivers, generic on the
    /// others (see [`decide`]).
    Auto,
    /// In the driver: the fast path. Refused where it cannot deliver.
    Native,
    /// In the kernel's generic hook: works on any interface, slower.
    Generic,
}

impl std::fmt::Display for XdpMode {
    /// As the config spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// How a program is attached to one interface (the agent's, per interface; `lb decap`'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In the driver.
    Native,
    /// In the kernel's generic hook: any interface, slower.
    Generic,
}

impl Mode {
    /// The attach flags for this mode.
    pub fn flags(self) -> aya::programs::XdpMode {
        match self {
            Self::Native => aya::programs::XdpMode::Driver,
            Self::Generic => aya::programs::XdpMode::Skb,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// `NETDEV_XDP_ACT_BASIC`: the driver runs XDP programs (native mode).
pub const XDP_ACT_BASIC: u64 = 1 << 0;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes XDP frames sent to it (`ndo_xdp_xmit`).
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

/// What the kernel says of one interface, as far as delivering XDP frames goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub name: String,
    /// The device's `xdp-features` (`NETDEV_XDP_ACT_*`, from the netdev netlink family, Linux
    /// 6.3 and later); None where the kernel does not say.
    pub features: Option<u64>,
    /// Set for a veth: its peer.
    pub veth_peer: Option<Peer>,
}

/// The other end of a veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its name (`index N` if it could not be asked).
    pub name: String,
    /// The network namespace it is in: None for this one; else its name under /run/netns, or
    /// `id N` (the id this namespace knows it by).
    pub netns: Option<String>,
    /// Whether an XDP program is attached to it in native mode; Err: why that is unknown.
    pub native_program: Result<bool, String>,
}

impl Peer {
    /// "veth peer c0 in netns client".
    fn label(&self) -> String {
        match &self.netns {
            Some(ns) => format!("veth peer {} in netns {ns}", self.name),
            None => format!("veth peer {}", self.name),
        }
    }
}

/// What the agent does with one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub interface: String,
    pub mode: Mode,
    /// Why this mode, in words (for `lb status` and the log).
    pub reason: String,
    /// In the redirect devmap: the program may redirect frames from another interface to it.
    pub redirect_target: bool,
}

/// Why native is assumed where the kernel has no xdp-features to tell.
const UNREPORTED: &str =
    "the kernel does not report xdp-features (Linux before 6.3): native XDP assumed";

/// Whether something holds, with why when it does not, or why it is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Can {
    Yes(String),
    No(String),
    Unknown(String),
}

impl LinkFacts {
    /// The driver runs XDP in native mode.
    fn native_xdp(&self) -> Can {
        match self.features {
            Some(f) if f & XDP_ACT_BASIC == 0 => Can::No(
                "its driver has no native XDP (the kernel's xdp-features for it lack `basic`)"
                    .to_string(),
            ),
            Some(_) => Can::Yes("its driver runs XDP".to_string()),
            // Before Linux 6.3: attaching tells (a driver without native XDP refuses).
            None => Can::Yes(UNREPORTED.to_string()),
        }
    }

    /// The kernel counts it as a redirect target (`ndo-xmit`): for a veth, its peer runs an
    /// XDP program in native mode or has GRO on.
    fn ndo_xmit(&self) -> Option<bool> {
        self.features.map(|f| f & XDP_ACT_NDO_XMIT != 0)
    }

    /// Frames redirected to it by a program in native mode are delivered.
    fn takes_redirects(&self) -> Can {
        match (&self.veth_peer, self.ndo_xmit()) {
            (Some(p), _) if p.native_program == Ok(true) => {
                Can::Yes(format!("{} runs an XDP program in native mode", p.label()))
            }
            (Some(p), Some(true)) => Can::Yes(format!("{} has GRO on", p.label())),
            (Some(p), Some(false) | None) => Can::No(format!(
                "{} has neither an XDP program in native mode nor GRO on: what the program \
                 redirects to {} in native mode is dropped",
                p.label(),
                self.name
            )),
            (None, Some(false)) => Can::No(format!(
                "its driver does not take XDP frames redirected to it (the kernel's xdp-features \
                 for {} lack `ndo-xmit`)",
                self.name
            )),
            (None, Some(true)) => Can::Yes("its driver takes redirected XDP frames".to_string()),
            (None, None) => Can::Yes(UNREPORTED.to_string()),
        }
    }

    /// `XDP_TX` out of a veth in native mode is delivered: only if its peer runs an XDP program
    /// in native mode. With GRO on instead, the kernel takes the frames into the peer's queue but
    /// never schedules the peer to take them out (redirects are flushed; `XDP_TX` is flushed
    /// only to a peer with a program): measured on Linux 6.18, a one-armed VIP answered nothing.
    fn veth_xdp_tx(&self, p: &Peer) -> Can {
        match &p.native_program {
            Ok(true) => Can::Yes(format!(
                "{} runs an XDP program in native mode, so what the program sends out of {} is \
                 delivered",
                p.label(),
                self.name
            )),
            Ok(false) if self.ndo_xmit() == Some(true) => Can::No(format!(
                "{} has no XDP program in native mode: what the program sends back out of {} \
                 (XDP_TX) in native mode is lost (GRO on the peer carries redirects, but the \
                 kernel never flushes XDP_TX frames to a peer without an XDP program)",
                p.label(),
                self.name
            )),
            Ok(false) => Can::No(format!(
                "{} has no XDP program in native mode (nor GRO on): what the program sends out of \
                 {} in native mode (XDP_TX, and redirects to it) is dropped",
                p.label(),
                self.name
            )),
            Err(e) => Can::Unknown(format!(
                "could not tell whether {} runs an XDP program ({e})",
                p.label()
            )),
        }
    }

    /// What native mode needs of the interface itself: the driver runs XDP, and a veth's
    /// `XDP_TX` is delivered. (Another driver transmits `XDP_TX` on its own rings.)
    fn native_delivers(&self) -> Can {
        match (self.native_xdp(), &self.veth_peer) {
            (Can::No(why), _) => Can::No(why),
            (_, Some(p)) => self.veth_xdp_tx(p),
            (can, None) => can,
        }
    }
}

/// Why native mode cannot deliver on one interface, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub interface: String,
    pub reason: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}; fix: {}", self.interface, self.reason, self.fix)
    }
}

fn fix(l: &LinkFacts) -> String {
    let modes = "leave node.xdp_mode unset (lb then attaches in generic mode where native \
                 cannot deliver) or set it to generic";
    match &l.veth_peer {
        Some(p) => format!(
            "{modes}, or attach an XDP program in native mode to {} (one that passes every \
             frame will do; GRO on the peer is not enough: it carries redirects, not XDP_TX)",
            p.label()
        ),
        None => modes.to_string(),
    }
}

/// Each interface's mode for `setting`, or, for an explicit `native`, every interface where
/// native mode cannot deliver. `links` in the order of `node.interfaces`.
pub fn decide(setting: XdpMode, links: &[LinkFacts]) -> Result<Vec<Choice>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut choices: Vec<Choice> = links
        .iter()
        .map(|l| {
            let (mode, reason) = match (setting, l.native_delivers()) {
                (XdpMode::Generic, _) => (Mode::Generic, "node.xdp_mode: generic".to_string()),
                (XdpMode::Native, Can::No(why)) => {
                    problems.push(Problem {
                        interface: l.name.clone(),
                        reason: why.clone(),
                        fix: fix(l),
                    });
                    (Mode::Native, why)
                }
                (XdpMode::Native, Can::Yes(why)) => {
                    (Mode::Native, format!("node.xdp_mode: native; {why}"))
                }
                (XdpMode::Native, Can::Unknown(why)) => (
                    Mode::Native,
                    format!("node.xdp_mode: native, unchecked: {why}"),
                ),
                (XdpMode::Auto, Can::Yes(why)) => (Mode::Native, format!("auto: {why}")),
                (XdpMode::Auto, Can::No(why)) => (Mode::Generic, format!("auto: {why}")),
                (XdpMode::Auto, Can::Unknown(why)) => (
                    Mode::Generic,
                    format!("auto: {why}; generic mode delivers on any interface"),
                ),
            };
            Choice {
                interface: l.name.clone(),
                mode,
                reason,
                redirect_target: true,
            }
        })
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    if choices.iter().any(|c| c.mode == Mode::Native) {
        for (c, l) in choices.iter_mut().zip(links) {
            if let Can::No(why) = l.takes_redirects() {
                c.redirect_target = false;
                if c.mode == Mode::Native {
                    c.reason
                        .push_str(&format!("; not a redirect target: {why}"));
                } else {
                    c.reason.push_str(
                        "; not a redirect target of the native interfaces (what is routed out \
                         of it is forwarded by the kernel)",
                    );
                }
            }
        }
    }
    Ok(choices)
}

/// An explicit `node.xdp_mode: native` that cannot deliver.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|p| format!("node.xdp_mode: native XDP cannot deliver on {p}")).collect::<Vec<_>>().join("\n"))]
pub struct Refused(pub Vec<Problem>);

/// The mode of each interface of `links` (name, index; in this network namespace) for
/// `setting`, from what the kernel says of them now.
pub fn choose(setting: XdpMode, links: &[(String, u32)]) -> Result<Vec<Choice>, Refused> {
    let facts = match setting {
        // Generic delivers anywhere: nothing to ask.
        XdpMode::Generic => links
            .iter()
            .map(|(name, _)| LinkFacts {
                name: name.clone(),
                features: None,
                veth_peer: None,
            })
            .collect(),
        _ => kernel::facts(links),
    };
    decide(setting, &facts).map_err(Refused)
}

#[cfg(test)]
mod tests;
