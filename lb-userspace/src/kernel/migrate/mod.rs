//! Migrations: loading this release's program on the maps an agent of this or another release
//! pinned, moving every entry that carries a connection into maps of this release's schemas and
//! the config's sizes, without a moment when traffic meets no program or lost state.
//!
//! 1. [`pins::plan`] decides map by map: reuse (same schema and size), resize, convert (an
//!    older schema), create (not pinned); or refuses what it cannot read, saying the way out.
//! 2. [`load`] makes the new maps under staged pins (`LB_NAT@next`) while the old program
//!    serves, copies the old maps into them (converting), and verifies the new program on them.
//!    Nothing the old program uses has changed yet: a failure here removes the staged pins and
//!    leaves the old program and its maps serving.
//! 3. The caller swaps the new program into the pinned XDP links (`bpf_link_update`: atomic,
//!    never a detach), then calls [`Pending::finish`]: it waits until no CPU still runs the old
//!    program (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which is `synchronize_rcu`: XDP programs
//!    run inside RCU read-side sections), merges what the old program wrote after the copy, and
//!    renames the staged pins over the old ones. The old maps go with the old program.

pub mod batch;
pub mod convert;
pub mod copy;
pub mod pins;
pub mod schema;

use std::{
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
};
use lb_common::{Member, VipValue, maps};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use self::{
    convert::WontFit,
    copy::{CopyError, Snapshot},
    pins::{Action, MapPlan, PinPlan, PinsError},
    schema::{Moves, Schema},
};
use crate::kernel::program::{self, LoadError, Sizes};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(
        "making the maps of the new program (the old program and its maps serve on, unchanged)"
    )]
    Create(#[source] LoadError),
    #[error("copying into the new maps (the old program and its maps serve on, unchanged)")]
    Copy(#[from] CopyError),
    #[error(transparent)]
    WontFit(#[from] WontFit),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a load did with the pins, for `lb status`, the log and the metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Migration {
    /// When it finished (RFC 3339, UTC).
    pub at: String,
    /// `start` or `reload`.
    pub trigger: String,
    /// The release of the agent that ran on the pins before, if known.
    pub from_release: Option<String>,
    pub to_release: String,
    /// From the first map read to the last pin renamed, the swap included.
    pub duration_ms: f64,
    /// Entries copied into new maps.
    pub entries: u64,
    /// Entries the old program wrote after the first copy, copied right before the swap.
    #[serde(default)]
    pub caught_up: u64,
    /// Entries the old program wrote in the last moments before the swap, merged in after it.
    pub merged: u64,
    /// Entries both programs changed around the swap, where the new program's stands (for
    /// `LB_NAT_REV`: a source port both handed out; the old program's connection lost it).
    #[serde(default)]
    pub conflicts: u64,
    /// What went wrong after the swap (a merge that failed loses the old program's last writes
    /// to that map; the new maps serve on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    pub maps: Vec<MapMove>,
}

/// What happened to one map.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MapMove {
    pub map: String,
    /// `reused`, `created`, `resized`, `converted` or `renewed`.
    pub action: String,
    pub from_schema: Option<u32>,
    pub to_schema: u32,
    pub from_entries: Option<u32>,
    pub to_entries: u32,
    /// Entries copied (0 for a map used as it is).
    pub entries: u64,
    #[serde(default)]
    pub caught_up: u64,
    pub merged: u64,
    /// Time spent copying and merging this map.
    pub ms: f64,
}

impl Migration {
    /// Whether any map's entries moved.
    pub fn moved(&self) -> bool {
        self.maps
            .iter()
            .any(|m| m.action == "resized" || m.action == "converted")
    }

    /// `LB_NAT resized 262144 -> 524288 (5012 entries), ...`: the maps that moved.
    pub fn summary(&self) -> String {
        let moved: Vec<String> = self
            .maps
            .iter()
            .filter(|m| m.action == "resized" || m.action == "converted")
            .map(|m| {
                format!(
                    "{} {} {} -> {} ({} entries, {} merged)",
                    m.map,
                    m.action,
                    m.from_entries.unwrap_or(0),
                    m.to_entries,
                    m.entries,
                    m.merged
                )
            })
            .collect();
        if moved.is_empty() {
            "every map reused as it is".to_string()
        } else {
            moved.join(", ")
        }
    }
}

/// A map whose entries moved, kept until [`Pending::finish`] merges the old program's late
/// writes.
struct Moved {
    schema: &'static Schema,
    old: Map,
    /// What the first copy read from the old map (in the new map's form: sizes differ only).
    base: Snapshot,
    old_entries: u32,
    /// The new map's `max_entries`.
    new_entries: u32,
    /// The old map's schema (its late writes are converted like the first copy).
    from_schema: u32,
}

/// A load whose new maps are staged: finish it after the swap, or drop it to take them away.
pub struct Pending {
    started: Instant,
    report: Migration,
    /// (staged pin, final pin) of every new map.
    staged: Vec<(PathBuf, PathBuf)>,
    /// (old schema's pin, new schema's pin) of every map both programs use (relabelled).
    relabel: Vec<(PathBuf, PathBuf)>,
    /// Pins of converted maps under their old schema's name (`LB_VIPS` when `LB_VIPS@v2`
    /// replaces it): removed once the new pins are in place.
    obsolete: Vec<PathBuf>,
    moved: Vec<Moved>,
    sizes: Sizes,
    done: bool,
}

/// The loaded program and, if maps moved, what is left to do after the swap.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub pending: Option<Pending>,
    /// What was done with pins found (None on a first start).
    pub report: Option<Migration>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Loads this release's program with `sizes` on the maps pinned in `dir` (made if missing),
/// migrating those whose schema or size differ (see the module's documentation). `trigger` and
/// `from_release` are for the report.
pub fn load(
    sizes: &Sizes,
    dir: &Path,
    trigger: &str,
    from_release: Option<String>,
) -> Result<Loaded, MigrateError> {
    let started = Instant::now();
    sizes.check()?;
    let plan = pins::plan(dir, sizes)?;
    for p in pins::remove_staged(dir) {
        warn!(pin = %p.display(), "removed a staged pin an earlier migration left");
    }
    let migrates = plan.migrates();
    if migrates {
        check_ids(&plan, sizes)?;
    }
    let flow_buckets = lb_common::flowtab::buckets_for(sizes.flow_table_size);
    let mut loader = EbpfLoader::new();
    program::configure(&mut loader, sizes, &flow_buckets);
    let paths: Vec<(&str, PathBuf)> = plan
        .maps
        .iter()
        .map(|m| match (migrates && m.action.is_new(), &m.found) {
            (true, _) => (m.schema.map, m.staged(dir)),
            (false, Some(f)) if m.action == Action::Relabel => (m.schema.map, f.pin.clone()),
            (false, _) => (m.schema.map, m.pin(dir)),
        })
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let (staged, relabel, obsolete) = pin_moves(&plan, dir, migrates);
    let mut pending = Pending {
        started,
        report: report_of(&plan, trigger, from_release),
        staged,
        relabel,
        obsolete,
        moved: Vec::new(),
        sizes: sizes.clone(),
        done: !migrates,
    };
    let mut ebpf = loader.load(program::object()?).map_err(|e| {
        let e = program::object_error(e, Some(dir));
        match migrates {
            true => MigrateError::Create(e),
            false => MigrateError::Load(e),
        }
    })?;
    if migrates {
        pending.copy(&plan, &mut ebpf)?;
    } else {
        program::write_meta(&mut ebpf, sizes)?;
    }
    program::verify(&mut ebpf)?;
    let adopts = plan.adopts();
    let report = adopts.then(|| pending.report.clone());
    match migrates {
        true => Ok(Loaded {
            ebpf,
            pending: Some(pending),
            report,
        }),
        false => {
            let mut report = report;
            if let Some(r) = &mut report {
                r.duration_ms = ms(started);
            }
            Ok(Loaded {
                ebpf,
                pending: None,
                report,
            })
        }
    }
}

/// A pin, and the path it is renamed to.
type Rename = (PathBuf, PathBuf);

/// The pins `plan` moves once a load in `dir` succeeds: the staged pins to rename over the old
/// ones (when it `migrates`), the pins to rename to their new schema's name (maps taken over as
/// they are) and the old schemas' pins to remove.
fn pin_moves(
    plan: &PinPlan,
    dir: &Path,
    migrates: bool,
) -> (Vec<Rename>, Vec<Rename>, Vec<PathBuf>) {
    let staged: Vec<(PathBuf, PathBuf)> = match migrates {
        true => plan
            .maps
            .iter()
            .filter(|m| m.action.is_new())
            .map(|m| (m.staged(dir), m.pin(dir)))
            .collect(),
        false => Vec::new(),
    };
    let (relabel, obsolete): (Vec<_>, Vec<_>) = plan
        .maps
        .iter()
        .filter_map(|m| m.found.as_ref().map(|f| (m, f)))
        .filter(|(m, f)| f.pin != m.pin(dir))
        .partition(|(m, _)| m.action == Action::Relabel);
    let relabel: Vec<(PathBuf, PathBuf)> = relabel
        .into_iter()
        .map(|(m, f)| (f.pin.clone(), m.pin(dir)))
        .collect();
    let obsolete: Vec<PathBuf> = obsolete.into_iter().map(|(_, f)| f.pin.clone()).collect();
    (staged, relabel, obsolete)
}

fn report_of(plan: &PinPlan, trigger: &str, from_release: Option<String>) -> Migration {
    Migration {
        at: now(),
        trigger: trigger.to_string(),
        from_release,
        to_release: env!("CARGO_PKG_VERSION").to_string(),
        duration_ms: 0.0,
        entries: 0,
        caught_up: 0,
        merged: 0,
        conflicts: 0,
        errors: Vec::new(),
        maps: plan
            .maps
            .iter()
            .map(|m| MapMove {
                map: m.schema.map.to_string(),
                action: m.action.as_str().to_string(),
                from_schema: m.found.as_ref().map(|f| f.version),
                to_schema: m.schema.version,
                from_entries: m.found.as_ref().map(|f| f.max_entries),
                to_entries: m.entries,
                entries: 0,
                caught_up: 0,
                merged: 0,
                ms: 0.0,
            })
            .collect(),
    }
}

fn open_old(m: &MapPlan) -> Result<Map, MigrateError> {
    let f = m.found.as_ref().expect("a moved map was found");
    let pin_err = |source| LoadError::Pin {
        path: f.pin.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&f.pin).map_err(pin_err)?;
    Ok(Map::from_map_data(data).map_err(pin_err)?)
}

/// A shrink of `node.max_vips` or `node.max_backends` must leave room for every VIP id and
/// live member id in use (the tables indexed by them are cut).
fn check_ids(plan: &PinPlan, sizes: &Sizes) -> Result<(), MigrateError> {
    let shrinks = |map: &str, to: u32| {
        plan.get(map).is_some_and(|m| {
            m.action == Action::Resize && m.found.as_ref().is_some_and(|f| f.max_entries > to)
        })
    };
    if let Some(m) = plan.get(maps::MEMBERS)
        && m.found.is_some()
        && shrinks(maps::MEMBERS, sizes.max_backends)
    {
        let old = copy::read(
            &open_old(m)?,
            m.schema,
            m.found.as_ref().unwrap().max_entries,
        )?;
        let Snapshot::Array(bytes) = old else {
            unreachable!("an array")
        };
        let live: Vec<usize> = bytes
            .chunks_exact(size_of::<Member>())
            .enumerate()
            .filter(|(_, b)| {
                // SAFETY: Member is plain integers; the read is unaligned.
                let m: Member = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
                m.is_live()
            })
            .map(|(i, _)| i)
            .collect();
        let past = live
            .iter()
            .filter(|&&i| i >= sizes.max_backends as usize)
            .count();
        if past > 0 {
            return Err(WontFit {
                map: maps::MEMBERS.to_string(),
                key: "node.max_backends",
                to: sizes.max_backends,
                live: live.len() as u64,
                dropped: past as u64,
            }
            .into());
        }
    }
    if let Some(m) = plan.get(maps::VIPS)
        && m.found.is_some()
        && (shrinks(maps::VIP_STATS, sizes.max_vips)
            || plan
                .get(maps::RING)
                .is_some_and(|r| r.action == Action::Resize))
    {
        let old = copy::read(&open_old(m)?, m.schema, 0)?;
        let Snapshot::Hash(h) = old else {
            unreachable!("a hash map")
        };
        let ids: Vec<u32> = h
            .values()
            .map(|v| {
                // SAFETY: VipValue is plain integers; the read is unaligned.
                let v: VipValue = unsafe { std::ptr::read_unaligned(v.as_ptr().cast()) };
                v.id
            })
            .collect();
        let past = ids.iter().filter(|&&id| id >= sizes.max_vips).count();
        if past > 0 {
            return Err(WontFit {
                map: maps::VIPS.to_string(),
                key: "node.max_vips",
                to: sizes.max_vips,
                live: ids.len() as u64,
                dropped: past as u64,
            }
            .into());
        }
    }
    Ok(())
}

impl Pending {
    /// The first copy: every map that moves, from its old map into its staged new one, while
    /// the old program serves.
    fn copy(&mut self, plan: &PinPlan, ebpf: &mut Ebpf) -> Result<(), MigrateError> {
        let sizes = self.sizes.clone();
        for m in plan.maps.iter().filter(|m| {
            matches!(m.action, Action::Resize | Action::Convert) && m.schema.moves != Moves::Program
        }) {
            let t = Instant::now();
            let s = m.schema;
            let old = open_old(m)?;
            let old_entries = m.found.as_ref().unwrap().max_entries;
            let snap = converted(m, copy::read(&old, s, old_entries)?)?;
            let Some(new_snap) = resized(m, snap, &sizes)? else {
                // The Maglev ring of another table size: the agent writes it before the swap.
                self.note(s.map, 0, t);
                continue;
            };
            let new = ebpf
                .map_mut(s.map)
                .expect("every schema's map is in the object");
            let n = copy::write(new, s, &new_snap)?;
            self.note(s.map, n, t);
            if matches!(s.moves, Moves::State | Moves::Counters) {
                self.moved.push(Moved {
                    schema: s,
                    old,
                    base: new_snap,
                    old_entries,
                    new_entries: m.entries,
                    from_schema: m.found.as_ref().map_or(s.version, |f| f.version),
                });
            }
        }
        Ok(())
    }

    fn note(&mut self, map: &str, entries: u64, t: Instant) {
        if let Some(mv) = self.report.maps.iter_mut().find(|mv| mv.map == map) {
            mv.entries += entries;
            mv.ms += ms(t);
        }
        self.report.entries += entries;
    }

    fn note_merged(&mut self, map: &str, merged: u64, t: Instant) {
        if let Some(mv) = self.report.maps.iter_mut().find(|mv| mv.map == map) {
            mv.merged += merged;
            mv.ms += ms(t);
        }
        self.report.merged += merged;
    }

    /// Right before the swap: copies what the old program wrote since the first copy (the
    /// program verification and the config took time), so that what [`Pending::finish`] merges
    /// after the swap is only what the old program writes in the last moments.
    pub fn catch_up(&mut self, ebpf: &mut Ebpf) -> Result<(), MigrateError> {
        if self.moves_nat() {
            set_hold(ebpf, true)?;
        }
        for mv in &mut self.moved {
            let t = Instant::now();
            // The new program does not run yet: every change of the old one is taken. The base
            // of the merge after the swap is then what the old map held now (not the new map,
            // which also holds what the agent wrote: a member id given anew, its counters and
            // passive health zeroed, must not look like a change of the old program's).
            let (n, _, old_now) = merge(mv, ebpf)?;
            let vs = mv.schema.value_size as usize;
            mv.base = match old_now {
                Snapshot::Array(a) => {
                    Snapshot::Array(convert::resize_array(&a, vs, mv.new_entries))
                }
                Snapshot::PerCpu(c) => Snapshot::PerCpu(
                    c.iter()
                        .map(|a| convert::resize_array(a, vs, mv.new_entries))
                        .collect(),
                ),
                other => other,
            };
            if let Some(m) = self.report.maps.iter_mut().find(|m| m.map == mv.schema.map) {
                m.caught_up += n;
                m.ms += ms(t);
            }
            self.report.caught_up += n;
        }
        Ok(())
    }

    /// After the swap: waits until the old program runs nowhere, merges what it wrote after
    /// the first copy, renames the staged pins over the old ones and rewrites the layout
    /// record. Returns the report.
    pub fn finish(mut self, ebpf: &mut Ebpf) -> Result<Migration, MigrateError> {
        grace_period();
        let mut moved = std::mem::take(&mut self.moved);
        // The NAT tables first, so that new translations are held back no longer than their
        // merge takes.
        moved.sort_by_key(|mv| !matches!(mv.schema.map, maps::NAT | maps::NAT_REV));
        let mut errors = Vec::new();
        let mut released = false;
        for mv in &moved {
            if !released && !matches!(mv.schema.map, maps::NAT | maps::NAT_REV) {
                released = true;
                if let Err(e) = set_hold(ebpf, false) {
                    errors.push(crate::error_chain(&e));
                }
            }
            let t = Instant::now();
            // From the swap on, the new maps are the state: a merge that fails loses the old
            // program's last writes to that map (said, and counted), never the migration.
            match merge(mv, ebpf) {
                Ok((n, both, _)) => {
                    self.note_merged(mv.schema.map, n, t);
                    self.report.conflicts += both;
                }
                Err(e) => errors.push(format!(
                    "merging {}: {}",
                    mv.schema.map,
                    crate::error_chain(&e)
                )),
            }
        }
        if !released && let Err(e) = set_hold(ebpf, false) {
            errors.push(crate::error_chain(&e));
        }
        // Renamed whatever else fails: the staged pins are the maps the program uses.
        self.done = true;
        self.settle_pins(&mut errors);
        for e in &errors {
            error!("after the swap: {e}");
        }
        self.report.errors = errors;
        if let Err(e) = program::write_meta(ebpf, &self.sizes) {
            self.report.errors.push(crate::error_chain(&e));
        }
        self.report.duration_ms = ms(self.started);
        self.report.at = now();
        info!(
            trigger = %self.report.trigger,
            entries = self.report.entries,
            merged = self.report.merged,
            duration_ms = self.report.duration_ms,
            "migrated the maps: {}",
            self.report.summary()
        );
        Ok(self.report.clone())
    }

    /// The staged pins renamed over the old ones, the maps taken over as they are renamed to
    /// their new schema's name, the old schema's pins removed; what failed goes into `errors`.
    fn settle_pins(&self, errors: &mut Vec<String>) {
        for (staged, pin) in &self.staged {
            if let Err(e) = std::fs::rename(staged, pin) {
                errors.push(format!(
                    "renaming {} over {}: {e}",
                    staged.display(),
                    pin.display()
                ));
            }
        }
        // A map the new program took over as it is gets its new schema's name, now that no
        // older program uses it.
        for (old, pin) in &self.relabel {
            if let Err(e) = std::fs::rename(old, pin) {
                errors.push(format!(
                    "renaming {} to {}: {e}",
                    old.display(),
                    pin.display()
                ));
            }
        }
        // The old schema's pin names a map no program uses any more: without this it would
        // stay, and the next start would find two schemas of one map.
        for pin in &self.obsolete {
            match std::fs::remove_file(pin) {
                Ok(()) => info!(pin = %pin.display(), "removed the pin of the old schema"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("removing {}: {e}", pin.display())),
            }
        }
    }
}

impl Pending {
    /// Lets the new program make NAT translations again: for a swap that failed (the new
    /// program may run on some interfaces: it must not go on refusing new connections there).
    pub fn release_hold(&self, ebpf: &mut Ebpf) {
        if self.moves_nat()
            && let Err(e) = set_hold(ebpf, false)
        {
            error!("releasing the NAT hold: {}", crate::error_chain(&e));
        }
    }

    /// Whether NAT translations move into new maps (then new ones are held back from just
    /// before the swap until the old program's last ones are merged: see [`maps::NAT_HOLD`]).
    fn moves_nat(&self) -> bool {
        self.moved
            .iter()
            .any(|mv| matches!(mv.schema.map, maps::NAT | maps::NAT_REV))
    }
}

/// Holds new NAT translations back in the program of `ebpf`, or lets them be made again.
fn set_hold(ebpf: &mut Ebpf, hold: bool) -> Result<(), MigrateError> {
    let map = ebpf
        .map_mut(maps::NAT_HOLD)
        .ok_or(MigrateError::Load(LoadError::NoProgram))?;
    let mut a: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(map).map_err(|source| LoadError::Write {
            what: "the NAT hold",
            source,
        })?;
    a.set(0, u32::from(hold), 0).map_err(|source| {
        MigrateError::Load(LoadError::Write {
            what: "the NAT hold",
            source,
        })
    })
}

impl Drop for Pending {
    /// An unfinished migration takes its staged pins away: the old maps stay as they were.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for (staged, _) in &self.staged {
            if let Err(e) = std::fs::remove_file(staged)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(
                    "removing {} after the failed migration: {e}",
                    staged.display()
                );
            }
        }
    }
}

/// The old map's snapshot in the new map's schema: unchanged for a map of the same schema,
/// else its values converted (see [`convert::values`]).
fn converted(m: &MapPlan, snap: Snapshot) -> Result<Snapshot, MigrateError> {
    let from = m.found.as_ref().map_or(m.schema.version, |f| f.version);
    converted_from(m.schema, from, snap)
}

fn converted_from(s: &Schema, from: u32, snap: Snapshot) -> Result<Snapshot, MigrateError> {
    if from == s.version {
        return Ok(snap);
    }
    let conv = convert::values(s.map, from, s.version).ok_or_else(|| {
        MigrateError::Pins(PinsError::NoConversion {
            map: s.map.to_string(),
            from,
            to: s.version,
        })
    })?;
    let vs = s.value_size as usize;
    Ok(match snap {
        Snapshot::Hash(h) => Snapshot::Hash(h.into_iter().map(|(k, v)| (k, conv(&v))).collect()),
        Snapshot::Array(a) if vs > 0 => Snapshot::Array(a.chunks(vs).flat_map(conv).collect()),
        Snapshot::Buckets(b) => Snapshot::Buckets(copy::buckets_of(
            &copy::bucket_bytes(&b)
                .chunks(vs)
                .flat_map(conv)
                .collect::<Vec<u8>>(),
        )),
        other => {
            return Err(MigrateError::Pins(PinsError::NoConversion {
                map: format!(
                    "{} ({} entries, not a hash map or array)",
                    s.map,
                    other.len(1)
                ),
                from,
                to: s.version,
            }));
        }
    })
}

/// The old map's snapshot in the form of the new map: resized (see [`convert`]). None for a
/// Maglev ring of another table size (slots of another table cannot be reused).
fn resized(m: &MapPlan, snap: Snapshot, sizes: &Sizes) -> Result<Option<Snapshot>, MigrateError> {
    let s = m.schema;
    let vs = s.value_size as usize;
    Ok(Some(match snap {
        Snapshot::Hash(h) => {
            convert::check_fits(
                s.map,
                config_key(s.map),
                m.entries,
                h.len(),
                room(s, m.entries),
            )?;
            Snapshot::Hash(h)
        }
        Snapshot::Buckets(b) => {
            Snapshot::Buckets(convert::rehash_flows(&b, m.entries, sizes.flow_table_size)?)
        }
        Snapshot::Array(_) if s.map == maps::RING && !same_table_size(m, sizes) => return Ok(None),
        Snapshot::Array(a) => Snapshot::Array(convert::resize_array(&a, vs, m.entries)),
        Snapshot::PerCpu(c) => Snapshot::PerCpu(
            c.iter()
                .map(|a| convert::resize_array(a, vs, m.entries))
                .collect(),
        ),
        other => other,
    }))
}

/// The entries a map of `max_entries` takes without evicting: an LRU hash keeps up to 128 free
/// entries on each possible CPU's list (`LOCAL_FREE_TARGET`), which a writer on another CPU
/// cannot use, and evicts rather than fail.
fn room(s: &Schema, max_entries: u32) -> u32 {
    if s.shape != schema::Shape::LruHash {
        return max_entries;
    }
    // SAFETY: sysconf reads a constant.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u32;
    max_entries.saturating_sub(128 * cpus)
}

/// Whether the ring's slots keep their meaning: the same Maglev table size (then only the
/// number of VIPs changed, and VIP `v`'s table stays at `v * M`).
fn same_table_size(m: &MapPlan, sizes: &Sizes) -> bool {
    let old = m.found.as_ref().map_or(0, |f| f.max_entries);
    old.is_multiple_of(sizes.table_size) && m.entries.is_multiple_of(sizes.table_size)
}

/// The config key that sizes `map`.
fn config_key(map: &str) -> &'static str {
    match map {
        maps::FLOWS | maps::FLOWS4 => "node.flow_table_size",
        maps::AFFINITY => "node.affinity_table_size",
        maps::NAT | maps::NAT_REV => "node.nat_table_size",
        maps::RING => "node.table_size",
        maps::VIP_STATS
        | maps::VIP_DROPS
        | maps::NEW_FLOW_BUDGET
        | maps::VIP_BUDGET_DROPS
        | maps::VIP_REPLY_STATS => "node.max_vips",
        maps::MEMBERS
        | maps::NEXTHOPS
        | maps::MEMBER_STATS
        | maps::MEMBER_PASSIVE
        | maps::MEMBER_REPLY_STATS
        | maps::MEMBER_HOLD
        | maps::MEMBER_CONNS => "node.max_backends",
        _ => "(a size fixed by the release)",
    }
}

/// Waits until every CPU is out of the XDP program it ran before the swap:
/// `MEMBARRIER_CMD_GLOBAL` returns after `synchronize_rcu()`, and XDP programs run inside RCU
/// read-side critical sections. Where it is unavailable (nohz_full kernels refuse it), a pause
/// far longer than any program run.
fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        warn!(
            "membarrier(MEMBARRIER_CMD_GLOBAL) failed ({}): waiting 100 ms for the old program to finish instead",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Merges what the old program wrote into `mv`'s map after the first copy (see
/// [`convert::merge3`]); returns the entries written and those both programs changed, where the
/// new program's stands.
fn merge(mv: &Moved, ebpf: &mut Ebpf) -> Result<(u64, u64, Snapshot), MigrateError> {
    let s = mv.schema;
    let new = ebpf
        .map_mut(s.map)
        .expect("every schema's map is in the object");
    let old_now = converted_from(s, mv.from_schema, copy::read(&mv.old, s, mv.old_entries)?)?;
    let vs = s.value_size as usize;
    let (n, both) = match (&mv.base, &old_now) {
        (Snapshot::Hash(base), Snapshot::Hash(old)) => merge_hash(new, s, base, old)?,
        (Snapshot::Buckets(base_new), Snapshot::Buckets(old)) => {
            let entries = mv.new_entries;
            let Snapshot::Buckets(now) = copy::read(new, s, entries)? else {
                unreachable!("a flow table")
            };
            // The base in the old table's form: the flows the first copy read.
            let base_old = convert::flows_of(base_new);
            let writes =
                convert::merge3(&base_old, &convert::flows_of(old), &convert::flows_of(&now));
            let (n, lost) = copy::merge_flows_live(new, s, entries, &writes)?;
            if lost > 0 {
                warn!("{}: no room to merge {lost} late flows", s.map);
            }
            (n, lost)
        }
        (Snapshot::Array(base), Snapshot::Array(old)) => {
            let Snapshot::Array(now) = copy::read(new, s, (base.len() / vs) as u32)? else {
                unreachable!("an array")
            };
            let writes: Vec<(u32, Vec<u8>)> = (0..base.len() / vs)
                .filter_map(|i| {
                    let r = i * vs..(i + 1) * vs;
                    let (b, o, n) = (base.get(r.clone())?, old.get(r.clone())?, now.get(r)?);
                    (o != b && n == b).then(|| (i as u32, o.to_vec()))
                })
                .collect();
            (copy::write_array_entries(new, s, &writes)?, 0)
        }
        (Snapshot::PerCpu(base), Snapshot::PerCpu(old)) => {
            let Snapshot::PerCpu(mut now) = copy::read(new, s, 0)? else {
                unreachable!("a per-CPU array")
            };
            let len = base.first().map_or(0, |b| b.len()) / vs;
            let changed: Vec<u32> = (0..len)
                .filter(|&i| {
                    let r = i * vs..(i + 1) * vs;
                    base.iter()
                        .zip(old.iter())
                        .any(|(b, o)| b.get(r.clone()) != o.get(r.clone()))
                })
                .map(|i| i as u32)
                .collect();
            for ((b, o), n) in base.iter().zip(old.iter()).zip(now.iter_mut()) {
                for &i in &changed {
                    let r = i as usize * vs..(i as usize + 1) * vs;
                    if let (Some(b), Some(o)) = (b.get(r.clone()), o.get(r.clone())) {
                        convert::add_counted(b, o, &mut n[r]);
                    }
                }
            }
            (copy::write_percpu_entries(new, s, &now, &changed)?, 0)
        }
        _ => (0, 0),
    };
    Ok((n, both, old_now))
}

/// [`merge`] of a hash map: the keys the old program changed since the first copy (`base` ->
/// `old`) merged into the new map. The entries written, and those both programs changed.
fn merge_hash(
    new: &mut aya::maps::Map,
    s: &Schema,
    base: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    old: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<(u64, u64), MigrateError> {
    // Only the entries the old program changed after the copy are looked up in the new
    // map (few, against the whole table): the merge is the window in which they are
    // missing from the maps the new program uses.
    let changed = convert::changed(base, old);
    let keys: Vec<&[u8]> = changed.iter().map(|k| k.as_slice()).collect();
    let now: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = keys
        .iter()
        .zip(copy::hash_values(new, s, &keys)?)
        .filter_map(|(k, v)| Some((k.to_vec(), v?)))
        .collect();
    let base: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = changed
        .iter()
        .filter_map(|k| Some((k.clone(), base.get(k)?.clone())))
        .collect();
    let old: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = changed
        .iter()
        .filter_map(|k| Some((k.clone(), old.get(k)?.clone())))
        .collect();
    // Both programs changed it: the new one's stands (for NAT_REV, a source port both
    // handed out in the window; the old program's connection then lost it).
    let both = changed
        .iter()
        .filter(|k| {
            let (b, o, n) = (base.get(*k), old.get(*k), now.get(*k));
            n != b && o != b && n != o
        })
        .count() as u64;
    let writes: Vec<copy::MergeWrite> = convert::merge3(&base, &old, &now)
        .into_iter()
        .map(|(k, v)| {
            let existed = now.contains_key(&k);
            (k, v, existed)
        })
        .collect();
    let (n, kept) = copy::write_hash_merge(new, s, &writes)?;
    Ok((n, both + kept))
}

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error(
        "this release ({ours}) knows no release {to}: it rolls back to {known} only (an older \
         release's agent may not read these pins)"
    )]
    Unknown {
        to: String,
        ours: &'static str,
        known: String,
    },
    #[error(
        "{to} reads {map} at schema v{theirs}, and the pins hold v{ours}: this release has no \
         conversion down to it"
    )]
    NoConversion {
        to: String,
        map: String,
        theirs: u32,
        ours: u32,
    },
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Leaves the pins in `dir` as release `to` reads them, before that release's agent starts on
/// them (a rollback): converts down, in place, every map whose schema `to` reads at an older
/// version, renaming its pin to that version's name, and removes the pins of maps `to` does
/// not know. Returns what it did, in one line.
///
/// 0.3.0 -> 0.2.0 / 0.1.0: `LB_VIPS@v2` becomes `LB_VIPS` with `VIP_F_SOURCE_RANGES` and
/// `VIP_F_NEW_FLOW_BUDGET` cleared (the layout is the same), `LB_FLOWS4@v2` becomes `LB_FLOWS4`
/// with its confirmed bits cleared (word by word: the program may be recording flows), and `LB_SRC_RANGES`,
/// `LB_VIP_DROPS`, `LB_NEW_FLOW_BUDGET`, `LB_VIP_BUDGET_DROPS`, `LB_MEMBER_CONNS`, the reply
/// counters (`LB_VIP_REPLY_STATS`, `LB_MEMBER_REPLY_STATS`) and the port-range VIPs
/// (`LB_VIP_RANGES`) are unpinned. A program of this release still attached then takes every
/// source and every new flow, and keeps serving its port ranges from the map it holds, until the
/// older agent replaces it (0.2.0 has no port ranges: their ports are then not balanced).
pub fn prepare_rollback(dir: &Path, to: &semver::Version) -> Result<String, RollbackError> {
    let to_text = to.to_string();
    let release = schema::release(&to_text).ok_or_else(|| RollbackError::Unknown {
        to: to_text.clone(),
        ours: env!("CARGO_PKG_VERSION"),
        known: schema::RELEASES
            .iter()
            .map(|r| r.version)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    // Staged pins of a migration that stopped part way: the older release knows no such names.
    for p in pins::remove_staged(dir) {
        warn!(pin = %p.display(), "removed a staged pin an earlier migration left");
    }
    // Check every map first, so that a rollback this release cannot do changes nothing.
    let work = rollback_work(dir, release, &to_text)?;
    let mut done = Vec::new();
    for (s, found, theirs) in work {
        if theirs == 0 {
            std::fs::remove_file(&found.pin).map_err(|source| RollbackError::Io {
                what: "removing",
                path: found.pin.display().to_string(),
                source,
            })?;
            done.push(format!("removed {} ({to_text} has no such map)", s.map));
            continue;
        }
        let conv = convert::values(s.map, found.version, theirs).expect("checked above");
        let n = convert_in_place(&found.pin, s, conv)?;
        let pin = dir.join(schema::pin_name(s.map, theirs));
        std::fs::rename(&found.pin, &pin).map_err(|source| RollbackError::Io {
            what: "renaming the converted pin to",
            path: pin.display().to_string(),
            source,
        })?;
        done.push(format!(
            "converted {} v{} -> v{theirs} in place ({n} entries changed), pinned as {}",
            s.map,
            found.version,
            schema::pin_name(s.map, theirs)
        ));
    }
    // A release that reads layout 7 only checks the version `LB_META` records.
    let layout_7 = release
        .schemas
        .iter()
        .all(|m| schema::RELEASES[0].schemas.contains(m));
    if layout_7 && let Some(d) = record_layout_7(dir)? {
        done.push(d);
    }
    Ok(match done.is_empty() {
        true => format!(
            "nothing to convert: every map pinned in {} is at a schema {to_text} reads",
            dir.display()
        ),
        false => format!(
            "left the pins in {} as {to_text} reads them: {}",
            dir.display(),
            done.join("; ")
        ),
    })
}

/// What a rollback to `release` (`to_text`) does to each pinned map: the map's schema, its pin,
/// and the version `release` reads (0: none, the pin goes). Refused if a map cannot be converted.
fn rollback_work(
    dir: &Path,
    release: &schema::Release,
    to_text: &str,
) -> Result<Vec<(&'static Schema, pins::Found, u32)>, RollbackError> {
    let mut work = Vec::new();
    for s in schema::current() {
        let Some(found) = pins::find(dir, s)? else {
            continue;
        };
        let theirs = release
            .schemas
            .iter()
            .find(|(m, _)| *m == s.map)
            .map_or(0, |(_, v)| *v);
        if theirs == found.version {
            continue;
        }
        if theirs != 0 && convert::values(s.map, found.version, theirs).is_none() {
            return Err(RollbackError::NoConversion {
                to: to_text.to_string(),
                map: s.map.to_string(),
                theirs,
                ours: found.version,
            });
        }
        work.push((s, found, theirs));
    }
    Ok(work)
}

/// Makes `LB_META` record layout 7's version, for a release that reads layout 7 (it checks
/// only the version `LB_META` records). What it changed, if anything.
fn record_layout_7(dir: &Path) -> Result<Option<String>, RollbackError> {
    if let Some(meta) = crate::kernel::program::pinned_meta(dir)?
        && meta.version != schema::LAYOUT_7_VERSION
    {
        let map = crate::kernel::program::open_pinned(dir, maps::META)?;
        let mut a: aya::maps::Array<_, lb_common::LayoutMeta> = aya::maps::Array::try_from(map)
            .map_err(|source| LoadError::Write {
                what: "the layout record",
                source,
            })?;
        a.set(
            0,
            lb_common::LayoutMeta {
                version: schema::LAYOUT_7_VERSION,
                ..meta
            },
            0,
        )
        .map_err(|source| LoadError::Write {
            what: "the layout record",
            source,
        })?;
        return Ok(Some(format!(
            "LB_META records layout {} (was {})",
            schema::LAYOUT_7_VERSION,
            meta.version
        )));
    }
    Ok(None)
}

/// Rewrites every value of the hash map pinned at `pin` with `conv` (the same layout: a
/// conversion of meaning). Returns the entries rewritten.
fn convert_in_place(
    pin: &Path,
    s: &'static Schema,
    conv: convert::ValueConversion,
) -> Result<u64, RollbackError> {
    let pin_err = |source| LoadError::Pin {
        path: pin.display().to_string(),
        source,
    };
    let data = MapData::from_pin(pin).map_err(pin_err)?;
    let buckets = data.info().map(|i| i.max_entries());
    let mut map = Map::from_map_data(data).map_err(pin_err)?;
    if s.shape == schema::Shape::FlowBuckets {
        // The program of this release may still be writing it: word by word.
        let buckets = buckets.map_err(|source| copy::CopyError::Map {
            map: s.map.to_string(),
            what: "reading its info",
            source,
        })?;
        return Ok(copy::convert_buckets_in_place(&map, s, buckets, conv)?);
    }
    match copy::read(&map, s, 0)? {
        Snapshot::Hash(h) => {
            let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = h
                .into_iter()
                .filter_map(|(k, v)| {
                    let c = conv(&v);
                    (c != v).then_some((k, Some(c)))
                })
                .collect();
            Ok(copy::write_hash_entries(&mut map, s, &writes)?)
        }
        Snapshot::Array(a) => {
            let writes: Vec<(u32, Vec<u8>)> = a
                .chunks(s.value_size as usize)
                .enumerate()
                .filter_map(|(i, v)| {
                    let c = conv(v);
                    (c != v).then_some((i as u32, c))
                })
                .collect();
            Ok(copy::write_array_entries(&mut map, s, &writes)?)
        }
        _ => unreachable!("converted in place: a hash map or an array"),
    }
}
