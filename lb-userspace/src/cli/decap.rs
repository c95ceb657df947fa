//! `lb decap attach|detach|status|recipe`: the arguments, and what each prints.

use std::{net::IpAddr, path::PathBuf};

use serde_json::json;

use crate::kernel::decap::{
    Attached, DEFAULT_DIR, DecapError, Detached, Entry, Mode, attach, detach, pin_path, status,
    tunnels::{Tunnels, recipe},
};
use crate::observe::show::Format;

#[derive(clap::Args)]
pub struct DecapArgs {
    /// Where the decapsulation links are pinned (on bpffs): a directory of their own, never an
    /// agent's --pin-dir (whose links the agent manages).
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_DIR, env = "LB_DECAP_DIR")]
    decap_dir: PathBuf,
    #[command(subcommand)]
    command: Option<DecapCommand>,
}

#[derive(clap::Subcommand)]
enum DecapCommand {
    /// Attach lb_decap to an interface, with a pinned link: it stays attached after lb exits.
    ///
    /// Again on an interface it is attached to, this build's program is swapped into the same
    /// link (atomically); in the other --xdp-mode, it is detached and attached afresh.
    Attach {
        /// The interface the encapsulated packets arrive on (eth0).
        interface: String,
        /// How to attach it.
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        xdp_mode: Mode,
    },
    /// Detach lb_decap from an interface and remove its pin (also after the interface is gone).
    Detach { interface: String },
    /// List the links pinned in --decap-dir, and where the kernel says each is attached.
    ///
    /// attached: to the interface of its name here; defunct: its interface is gone (`detach`
    /// removes the pin); elsewhere: to an interface of another network namespace. JSON adds
    /// which tunnel modules the kernel has.
    Status {
        /// table (default), wide (link, program and interface ids) or json.
        #[arg(short, long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Print the commands that make this host a DSR backend, each with why.
    ///
    /// The VIPs on lo, the ARP and reverse-path sysctls, `lb decap attach`; and the kernel's
    /// tunnel devices in its place where this kernel has the modules.
    Recipe {
        /// The interface the encapsulated packets arrive on.
        #[arg(long, default_value = "eth0")]
        interface: String,
        /// A VIP this backend serves (repeat for more; IPv4 or IPv6).
        #[arg(long = "vip", value_name = "ADDRESS")]
        vips: Vec<IpAddr>,
    },
}

/// Runs an `lb decap` command; returns what to print.
pub fn run(args: DecapArgs) -> Result<String, DecapError> {
    let dir = args.decap_dir;
    match args.command {
        Some(DecapCommand::Attach {
            interface,
            xdp_mode,
        }) => {
            let done = attach(&dir, &interface, xdp_mode)?;
            let mut said = attached_text(&done, &interface, xdp_mode, &pin_path(&dir, &interface));
            let tunnels = Tunnels::detect();
            if tunnels.any() {
                said.push_str(&format!(
                    "\nthis kernel also has tunnel modules ({}): `lb decap recipe` shows that way",
                    tunnels.summary()
                ));
            }
            Ok(said)
        }
        Some(DecapCommand::Detach { interface }) => {
            let pin = pin_path(&dir, &interface).display().to_string();
            Ok(match detach(&dir, &interface)? {
                Detached::Detached => format!("detached lb_decap from {interface} (removed {pin})"),
                Detached::Stale => {
                    format!("removed {pin}, whose link's interface was gone (nothing was attached)")
                }
                Detached::Nothing => format!(
                    "nothing to detach: no link pinned for {interface} in {}",
                    dir.display()
                ),
            })
        }
        Some(DecapCommand::Status { output }) => status_text(&dir, output),
        None => status_text(&dir, Format::Table),
        Some(DecapCommand::Recipe { interface, vips }) => {
            Ok(recipe(&interface, &vips, &Tunnels::detect()))
        }
    }
}

fn attached_text(done: &Attached, ifname: &str, mode: Mode, pin: &std::path::Path) -> String {
    let pin = pin.display();
    let stays = format!("link pinned at {pin}: it stays attached after lb exits");
    match done {
        Attached::New => format!("attached lb_decap to {ifname} ({mode}), {stays}"),
        Attached::Stale => format!(
            "removed a stale pin (its link's interface was gone); attached lb_decap to {ifname} \
             ({mode}), {stays}"
        ),
        Attached::Replaced => format!(
            "lb_decap was attached to {ifname} ({mode}) already: this build's program replaced it \
             in the same link (no packet went without it), {stays}"
        ),
        Attached::Remoded { from } => format!(
            "lb_decap was attached to {ifname} in {from} mode: detached and attached again in \
             {mode} mode (in between, packets reached the kernel undecapsulated), {stays}"
        ),
    }
}

fn status_text(dir: &std::path::Path, format: Format) -> Result<String, DecapError> {
    crate::kernel::decap::check_privilege()?;
    let entries = status(dir)?;
    Ok(match format {
        Format::Json => {
            let v = json!({
                "dir": dir.display().to_string(),
                "links": entries,
                "tunnel_modules": Tunnels::detect(),
            });
            serde_json::to_string_pretty(&v).expect("plain data serialises")
        }
        _ if entries.is_empty() => {
            format!("nothing attached: no links pinned in {}", dir.display())
        }
        f => table(&entries, f == Format::Wide),
    })
}

fn table(entries: &[Entry], wide: bool) -> String {
    let mut head = vec!["INTERFACE", "STATE", "MODE", "PIN"];
    if wide {
        head.extend(["LINK", "PROGRAM", "IFINDEX"]);
    }
    let rows = entries.iter().map(|e| {
        let mut r = vec![
            e.interface.clone(),
            e.state.as_str().to_string(),
            e.mode.unwrap_or("-").to_string(),
            e.pin.display().to_string(),
        ];
        if wide {
            r.extend([e.link_id, e.program_id, e.link_ifindex].map(|n| n.to_string()));
        }
        r
    });
    let head = head.into_iter().map(str::to_string).collect();
    crate::observe::show::table(std::iter::once(head).chain(rows))
        .trim_end()
        .to_string()
}
