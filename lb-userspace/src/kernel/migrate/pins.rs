//! What a pin directory holds, map by map, and what a load must do with each map: reuse it,
//! make it, resize it or convert it; or refuse the pins, saying why and the way out.

use std::path::{Path, PathBuf};

use aya::maps::MapInfo;

use super::{
    convert,
    schema::{self, Moves, Schema},
};
use crate::kernel::program::Sizes;

/// Suffix of a map's pin while a migration fills it (renamed over the map's pin after the swap).
pub const STAGED: &str = "@next";

/// A pinned map as found.
#[derive(Clone, Debug)]
pub struct Found {
    pub pin: PathBuf,
    pub version: u32,
    pub max_entries: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pinned with this schema and size: the new program uses it as it is.
    Reuse,
    /// Not pinned: made empty.
    Create,
    /// Pinned with this schema and another size: a new map is filled from it.
    Resize,
    /// Pinned with another schema this release knows: a new map is filled from it, converted.
    Convert,
    /// Pinned with an older schema whose bytes this one reads as they are (a later schema only
    /// gave a meaning to what the older one left unused: see [`convert::as_is`]), at its size:
    /// both programs use the same map (what the old one writes is valid in the new schema), and
    /// its pin is renamed to the new schema's name after the swap.
    Relabel,
    /// Made afresh with the new program because something else migrates (see [`Moves::Program`]).
    Renew,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reuse => "reused",
            Self::Create => "created",
            Self::Resize => "resized",
            Self::Convert => "converted",
            Self::Relabel => "relabelled",
            Self::Renew => "renewed",
        }
    }

    /// Whether the map the new program uses is a new one (pinned under the staged name first).
    pub fn is_new(self) -> bool {
        !matches!(self, Self::Reuse | Self::Relabel)
    }
}

#[derive(Clone, Debug)]
pub struct MapPlan {
    pub schema: &'static Schema,
    pub found: Option<Found>,
    pub action: Action,
    /// Its `max_entries` for the sizes being loaded.
    pub entries: u32,
}

impl MapPlan {
    pub fn pin(&self, dir: &Path) -> PathBuf {
        dir.join(self.schema.pin_name())
    }

    pub fn staged(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}{STAGED}", self.schema.pin_name()))
    }
}

/// What a load does with each map of a pin directory.
#[derive(Clone, Debug)]
pub struct PinPlan {
    pub maps: Vec<MapPlan>,
    /// The layout record 0.1.0 wrote, if any (its sizes are those of the maps it made).
    pub layout: Option<lb_common::LayoutMeta>,
}

impl PinPlan {
    /// Whether any map's entries move into a new map, or a pin is renamed after a swap.
    pub fn migrates(&self) -> bool {
        self.maps
            .iter()
            .any(|m| matches!(m.action, Action::Resize | Action::Convert | Action::Relabel))
    }

    /// Whether pins were found at all (a restart or an upgrade, not a first start).
    pub fn adopts(&self) -> bool {
        self.maps.iter().any(|m| m.found.is_some())
    }

    /// `LB_NAT resized 262144 -> 524288, LB_FLOWS4 resized ...`: the maps that move.
    pub fn summary(&self) -> String {
        let moves: Vec<String> = self
            .maps
            .iter()
            .filter(|m| matches!(m.action, Action::Resize | Action::Convert | Action::Relabel))
            .map(|m| {
                let f = m.found.as_ref().expect("a moved map was found");
                format!(
                    "{} {} v{} {} -> v{} {}",
                    m.schema.map,
                    m.action.as_str(),
                    f.version,
                    f.max_entries,
                    m.schema.version,
                    m.entries
                )
            })
            .collect();
        moves.join(", ")
    }

    pub fn get(&self, map: &str) -> Option<&MapPlan> {
        self.maps.iter().find(|m| m.schema.map == map)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error(
        "{pin} holds {map} at schema v{found}, which this release ({release}, {map} v{ours}) \
         cannot read: a newer release made it; convert the pins back first with that release's \
         `lb migrate --to-release {release}` (or roll back through its agent, which does it on exit)"
    )]
    Newer {
        pin: String,
        map: String,
        found: u32,
        ours: u32,
        release: &'static str,
    },
    #[error(
        "{pin} has key size {key} and value size {value}, not those of {map} v{version} ({want_key}, \
         {want_value}): it was not made by an lb release this one knows; `lb down --pin-dir {dir}` \
         removes the pins (and with them the flow table)"
    )]
    Foreign {
        pin: String,
        dir: String,
        map: String,
        version: u32,
        key: u32,
        value: u32,
        want_key: u32,
        want_value: u32,
    },
    #[error(
        "the maps pinned in {dir} were made by layout version {version}, a build before release \
         0.1.0 that this release cannot read; `lb down --pin-dir {dir}` removes them (and with them \
         the flow table)"
    )]
    PreRelease { dir: String, version: u32 },
    #[error("both {a} and {b} are pinned: two schemas of one map; remove the one not in use")]
    Twice { a: String, b: String },
    #[error("{map}: this release has no conversion from schema v{from} to v{to}")]
    NoConversion { map: String, from: u32, to: u32 },
    #[error("reading the pinned {pin}")]
    Info {
        pin: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The pins of `map` in `dir`: (pin, schema version) of each name that stands for it.
fn pins_of(dir: &Path, map: &str) -> Vec<(PathBuf, u32)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, u32)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (m, v) = schema::parse_pin_name(&name)?;
            (m == map).then(|| (e.path(), v))
        })
        .collect();
    found.sort();
    found
}

/// Decides what a load with `sizes` does with each map pinned in `dir` (none: all made).
pub fn plan(dir: &Path, sizes: &Sizes) -> Result<PinPlan, PinsError> {
    let layout = crate::kernel::program::pinned_meta(dir).ok().flatten();
    if let Some(l) = layout
        && l.version < schema::LAYOUT_7_VERSION
    {
        return Err(PinsError::PreRelease {
            dir: dir.display().to_string(),
            version: l.version,
        });
    }
    let mut maps = Vec::new();
    for s in schema::current() {
        let found = find(dir, s)?;
        let entries = (s.entries)(sizes);
        let action = match &found {
            None => Action::Create,
            Some(f)
                if f.version != s.version
                    && f.max_entries == entries
                    && convert::as_is(s.map, f.version, s.version) =>
            {
                Action::Relabel
            }
            Some(f) if f.version != s.version => Action::Convert,
            Some(f) if f.max_entries != entries => Action::Resize,
            Some(_) => Action::Reuse,
        };
        maps.push(MapPlan {
            schema: s,
            found,
            action,
            entries,
        });
    }
    let mut plan = PinPlan { maps, layout };
    if plan.migrates() {
        for m in &mut plan.maps {
            if m.schema.moves == Moves::Program {
                m.action = Action::Renew;
            }
        }
    }
    Ok(plan)
}

/// The pin of schema `s`'s map in `dir`, checked: refused if another schema of it is pinned
/// too, if its schema is newer than this release's, or if its key and value sizes are not its
/// schema's.
pub fn find(dir: &Path, s: &Schema) -> Result<Option<Found>, PinsError> {
    let pins = pins_of(dir, s.map);
    let (pin, version) = match pins.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        [a, b, ..] => {
            return Err(PinsError::Twice {
                a: a.0.display().to_string(),
                b: b.0.display().to_string(),
            });
        }
    };
    let pin_text = pin.display().to_string();
    if version > s.version {
        return Err(PinsError::Newer {
            pin: pin_text,
            map: s.map.to_string(),
            found: version,
            ours: s.version,
            release: env!("CARGO_PKG_VERSION"),
        });
    }
    let info = MapInfo::from_pin(&pin).map_err(|source| PinsError::Info {
        pin: pin_text.clone(),
        source,
    })?;
    // An older schema must be one this release converts from, with that schema's sizes.
    let (want_key, want_value) = match version == s.version {
        true => (s.key_size, s.value_size),
        false => schema::older(s.map, version).unwrap_or((0, 0)),
    };
    if info.key_size() != want_key || info.value_size() != want_value {
        return Err(PinsError::Foreign {
            pin: pin_text,
            dir: dir.display().to_string(),
            map: s.map.to_string(),
            version,
            key: info.key_size(),
            value: info.value_size(),
            want_key,
            want_value,
        });
    }
    Ok(Some(Found {
        pin,
        version,
        max_entries: info.max_entries(),
    }))
}

/// Removes staged pins a migration left (it stopped before renaming them): they are not in use
/// by an attached program unless the agent died between the swap and the rename, and then the
/// maps live on in the program until the next migration or swap replaces it.
pub fn remove_staged(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("LB_") && n.ends_with(STAGED))
        })
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
}
