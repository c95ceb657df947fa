//! `lb check --config FILE`: everything `lb run` would check before touching anything, without
//! running. The config is validated by anyone (every problem with its path, and warnings; the
//! kernel memory its sizes need is shown, and refused over `node.kernel_memory_limit` before
//! anything is loaded), the configured interfaces must exist here, the XDP mode each would be
//! attached in is worked out as `lb run` would (an explicit `native` that cannot deliver is an
//! error), and the pin dir must be on a bpffs; with the capabilities to load BPF programs it also
//! proves that the pin dir is writable and that this kernel loads and verifies the program with
//! the config's sizes. Without them it says that part was skipped and why, rather than passing
//! it silently.

use std::{fmt, path::Path};

use crate::{
    kernel::links,
    kernel::mapmem,
    kernel::pindir,
    kernel::privilege,
    kernel::program,
    kernel::xdpmode::{self, Choice, Problem},
    sources::config::{Config, ConfigError},
};

/// What `lb check` found (`-o json` prints it as it is, with `valid`).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Problems that make `lb run` refuse the config, each starting with its path.
    pub errors: Vec<String>,
    /// Things that work but may not be what was meant, each starting with its path.
    pub warnings: Vec<String>,
    /// What was proven on this host (kernel, interfaces).
    pub host: Vec<String>,
    /// The host checks skipped, and why.
    pub skipped: Vec<String>,
    /// The mode `lb run` would attach each interface in, and why (empty if the interfaces do
    /// not resolve, or an explicit `native` cannot deliver).
    pub xdp_modes: Vec<Choice>,
    /// Where an explicit `node.xdp_mode: native` cannot deliver: the interface, why, the fix
    /// (each also among `errors`).
    pub xdp_problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks the config at `path`, and this host (with the pin dir `pin_dir`) as far as the
/// process's privileges allow.
pub fn check(path: &Path, pin_dir: &Path) -> Report {
    let mut r = Report::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(ConfigError::Invalid {
            problems, warnings, ..
        }) => {
            r.errors = problems.iter().map(|p| p.to_string()).collect();
            r.warnings = warnings;
            return r;
        }
        Err(ConfigError::Parse { problems, .. }) => {
            r.errors = problems.iter().map(|p| p.to_string()).collect();
            return r;
        }
        Err(e) => {
            r.errors.push(crate::error_chain(&e));
            return r;
        }
    };
    r.warnings = config.warnings.clone();
    kernel_memory(&config, &mut r);
    let mut config = config;
    match crate::sources::uplink::fill(&mut config.node) {
        Ok(None) => {}
        Ok(Some(up)) => r.host.push(format!(
            "node.interfaces: not set; `lb run` would attach to {}, the interface of the {} default route",
            up.name, up.family
        )),
        Err(e) => {
            r.errors.push(crate::error_chain(&e));
            return r;
        }
    }
    interfaces(&config, &mut r);
    pins(pin_dir, &mut r);
    let missing = privilege::missing_to_load();
    match missing.is_empty() {
        true => load(&config, &mut r),
        false => r.skipped.push(format!(
            "loading the program needs root or {} (this process lacks {}): run `lb check` as \
                 root on the host to also prove that its kernel loads the program with these sizes",
            privilege::LOAD_NAMES,
            missing.join(", ")
        )),
    }
    r
}

/// The configured interfaces exist here (looking a name up needs no privilege), and the mode
/// each would be attached in.
fn interfaces(config: &Config, r: &mut Report) {
    match links::resolve(&config.node.interfaces) {
        Ok(found) => {
            r.host.push(format!(
                "node.interfaces: {} exist on this host",
                found
                    .iter()
                    .map(|(n, i)| format!("{n} (index {i})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            xdp_modes(config, &found, r);
        }
        Err(e) => r.errors.push(format!("{e:#}")),
    }
}

/// The kernel memory the maps of the config's sizes need (the config was refused if over the
/// limit, before anything was loaded).
fn kernel_memory(config: &Config, r: &mut Report) {
    if let Ok(need) = mapmem::need(&config.node.sizes) {
        r.host.push(format!(
            "the maps need about {} of kernel memory with these sizes on {} possible CPUs \
             (limit {}, node.kernel_memory_limit)",
            mapmem::human(need.total),
            need.cpus,
            mapmem::human(config.node.kernel_memory_limit)
        ));
    }
}

/// The pin dir as `lb run` checks it, in its words: on a bpffs (which needs no privilege to
/// see), and writable (which does). An agent running on it now is noted: `lb run` would be
/// refused while it does, a reload of that agent is not.
fn pins(dir: &Path, r: &mut Report) {
    if let Err(e) = pindir::check_bpffs(dir) {
        r.errors.push(crate::error_chain(&e));
        return;
    }
    let shown = dir.display();
    if let Err(e) = pindir::check_writable(dir) {
        match privilege::missing_to_load().is_empty() {
            true => r.errors.push(crate::error_chain(&e)),
            false => r.skipped.push(format!(
                "{shown} is on a bpffs, but this process may not write there ({}): `lb run` \
                 runs as root",
                crate::error_chain(&e)
            )),
        }
        return;
    }
    // Read from /proc/locks, not by taking the lock: an agent starting now must not find it
    // taken by `lb check`.
    let held = match pindir::holder(dir) {
        Some(pid) => format!(
            "; an lb agent (pid {pid}) runs on it now (`lb run` is refused while it does, its \
             reloads are not)"
        ),
        None => String::new(),
    };
    r.host
        .push(format!("{shown} is on a bpffs and writable{held}"));
}

/// The mode `lb run` would attach each interface in, or why an explicit `native` cannot
/// deliver.
fn xdp_modes(config: &Config, found: &[(String, u32)], r: &mut Report) {
    match xdpmode::choose(config.node.xdp_mode, found) {
        Ok(choices) => {
            for c in &choices {
                let target = match c.redirect_target {
                    true => "",
                    false => " (not a redirect target)",
                };
                r.host.push(format!(
                    "node.xdp_mode: {} would be attached in {} mode{target}: {}",
                    c.interface, c.mode, c.reason
                ));
            }
            r.xdp_modes = choices;
        }
        Err(refused) => {
            r.errors
                .extend(refused.to_string().lines().map(str::to_string));
            r.xdp_problems = refused.0;
        }
    }
}

/// This kernel loads and verifies the program with the config's sizes.
fn load(config: &Config, r: &mut Report) {
    match program::load(&config.node.sizes, None) {
        Ok(_) => r.host.push(format!(
            "this kernel loads and verifies the program with {}",
            config.node.sizes
        )),
        Err(e) => r.errors.push(format!(
            "this kernel does not load the program with {}: {}",
            config.node.sizes,
            crate::error_chain(&e)
        )),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A problem stays on one line (with its path, for grep); what the host proved is
        // wrapped to 100 columns, its later lines indented.
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        let mut line = |head: &str, text: &str| {
            let opts = textwrap::Options::new(100)
                .initial_indent(head)
                .subsequent_indent("    ");
            writeln!(f, "{}", textwrap::fill(text, opts))
        };
        for h in &self.host {
            line("ok: ", h)?;
        }
        for s in &self.skipped {
            line("skipped: ", s)?;
        }
        Ok(())
    }
}
