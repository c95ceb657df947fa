//! Runtime overrides of a backend's weight: `lb drain`, `lb undrain` and `lb weight` on a
//! running agent, as `ipvsadm -e -w 0` or Katran's ModifyReal do, without editing the config.
//!
//! The commands write `overrides.json` in the state dir (under a lock) and send the agent
//! SIGUSR1; the agent lays the file over every config it composes (the file's, or the
//! cluster's), so an override survives reloads and restarts. An override lasts until a command
//! removes it or the config names its backend anew: the agent records the weight the config gave
//! when it first applied the override, and a config that gives another weight, or drops the
//! backend or its VIP, clears it (the operator's edit wins). A drain is weight 0: established
//! flows stay on the backend, new ones go elsewhere.

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::sources::config::Config;

/// What an override does.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Weight 0 (`lb drain`).
    Drain,
    /// Another weight (`lb weight`).
    Weight,
}

/// One backend's override, on one VIP.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct Override {
    /// The VIP's label, as lb prints it (`192.0.2.10:80/tcp`).
    pub vip: String,
    pub backend: IpAddr,
    pub kind: Kind,
    pub weight: u32,
    /// The weight the config gave as the agent first applied this override (None until then).
    #[serde(default)]
    pub configured: Option<u32>,
    /// When the command set it (RFC 3339, UTC).
    pub since: String,
}

impl Override {
    pub fn new(vip: String, backend: IpAddr, weight: Option<u32>) -> Self {
        Self {
            vip,
            backend,
            kind: weight.map_or(Kind::Drain, |_| Kind::Weight),
            weight: weight.unwrap_or(0),
            configured: None,
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }

    fn is_for(&self, vip: &str, backend: IpAddr) -> bool {
        self.vip == vip && self.backend == backend
    }
}

/// The contents of `overrides.json`.
#[derive(Serialize, Deserialize, Default, Clone, PartialEq, Eq, Debug)]
pub struct Overrides {
    pub overrides: Vec<Override>,
}

/// An override a config cleared, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleared {
    pub was: Override,
    pub why: String,
}

/// What laying the overrides over a config did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// In force, each with the weight the config gives.
    pub kept: Overrides,
    pub cleared: Vec<Cleared>,
}

impl Overrides {
    pub fn find(&self, vip: &str, backend: IpAddr) -> Option<&Override> {
        self.overrides.iter().find(|o| o.is_for(vip, backend))
    }

    /// Sets `o` in place of any override of its backend on its VIP; returns the one it replaced.
    pub fn set(&mut self, o: Override) -> Option<Override> {
        let old = self.remove(&o.vip, o.backend);
        self.overrides.push(o);
        old
    }

    pub fn remove(&mut self, vip: &str, backend: IpAddr) -> Option<Override> {
        let i = self.overrides.iter().position(|o| o.is_for(vip, backend))?;
        Some(self.overrides.remove(i))
    }

    /// Lays the overrides over `c`'s weights; an override whose VIP or backend `c` lacks, or
    /// whose backend `c` gives another weight than when it was first applied, is cleared.
    pub fn apply(&self, c: &mut Config) -> Applied {
        let mut applied = Applied::default();
        for o in &self.overrides {
            let vip = c.vips.iter_mut().find(|v| v.spec.label() == o.vip);
            let Some(vip) = vip else {
                applied
                    .cleared
                    .push(clear(o, "the VIP is no longer configured"));
                continue;
            };
            let b = vip
                .spec
                .backends
                .iter_mut()
                .find(|b| b.address == o.backend);
            let Some(b) = b else {
                applied
                    .cleared
                    .push(clear(o, "the backend is no longer configured"));
                continue;
            };
            if let Some(was) = o.configured.filter(|w| *w != b.weight) {
                let why = format!("the config changed its weight from {was} to {}", b.weight);
                applied.cleared.push(clear(o, &why));
                continue;
            }
            let mut kept = o.clone();
            kept.configured = Some(b.weight);
            b.weight = o.weight;
            applied.kept.overrides.push(kept);
        }
        applied
    }
}

fn clear(o: &Override, why: &str) -> Cleared {
    Cleared {
        was: o.clone(),
        why: why.to_string(),
    }
}

/// Why the overrides file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OverridesError {
    #[error("{}: not an overrides file (fix or remove it)", path.display())]
    NotOverrides {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} {}", path.display())]
    Io {
        /// `reading`, `writing`, `locking`...
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An I/O error on `path` while `what`.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OverridesError {
    let path = path.to_path_buf();
    move |source| OverridesError::Io { what, path, source }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("overrides.json")
}

/// The overrides in `state_dir` (none without a file).
pub fn load(state_dir: &Path) -> Result<Overrides, OverridesError> {
    let path = path(state_dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|source| OverridesError::NotOverrides { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
        Err(e) => Err(io("reading", &path)(e)),
    }
}

/// Runs `f` on the overrides in `state_dir` with the file locked against other writers, and
/// writes what it leaves (atomically; no file when none is left).
pub fn update<T>(
    state_dir: &Path,
    f: impl FnOnce(&mut Overrides) -> T,
) -> Result<T, OverridesError> {
    std::fs::create_dir_all(state_dir).map_err(io("creating", state_dir))?;
    let lock_path = state_dir.join("overrides.lock");
    let lock = File::create(&lock_path).map_err(io("opening", &lock_path))?;
    lock.lock().map_err(io("locking", &lock_path))?;
    let mut o = load(state_dir)?;
    let before = o.clone();
    let out = f(&mut o);
    if o != before {
        save(state_dir, &o)?;
    }
    Ok(out)
}

fn save(state_dir: &Path, o: &Overrides) -> Result<(), OverridesError> {
    let path = path(state_dir);
    if o.overrides.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", &path)(e)),
            _ => Ok(()),
        };
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(o).expect("overrides serialize");
    std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("writing", &path))
}

/// Records in the file what an accepted config did with the overrides: the weight each one
/// found, and the removal of those it cleared. Entries a command changed meanwhile are left as
/// the command wrote them.
pub fn settle(state_dir: &Path, applied: &Applied) -> Result<(), OverridesError> {
    update(state_dir, |o| {
        for c in &applied.cleared {
            if o.find(&c.was.vip, c.was.backend) == Some(&c.was) {
                o.remove(&c.was.vip, c.was.backend);
            }
        }
        for k in &applied.kept.overrides {
            let same = |e: &&mut Override| {
                e.is_for(&k.vip, k.backend)
                    && (e.kind, e.weight, &e.since) == (k.kind, k.weight, &k.since)
            };
            if let Some(e) = o.overrides.iter_mut().find(same) {
                e.configured = k.configured;
            }
        }
    })
}

#[cfg(test)]
mod tests;
