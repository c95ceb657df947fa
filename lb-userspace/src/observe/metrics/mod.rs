//! Prometheus metrics and the agent's probes, served over HTTP: `/metrics` (read from the
//! pinned maps at each scrape, plus the agent's own figures), `/healthz` and `/readyz`.
//!
//! [`collect`] says what a scrape reports, [`exposition`] how it is written: Prometheus text
//! 0.0.4 by default, OpenMetrics 1.0.0 to a scraper whose `Accept` asks for it.

pub mod collect;
pub mod exposition;

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};

pub use exposition::Format;

use aya::maps::{Array, MapData};
use lb_common::{NextHop, maps as lb_maps};

use crate::{
    kernel::inspect::{InspectError, Pinned},
    kernel::program::open_pinned,
};

/// Figures the agent itself keeps.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub map_writes: AtomicU64,
    /// When a config was last applied (at start, on a reload or a cluster change), in
    /// milliseconds since the Unix epoch; 0 before the first.
    pub last_applied_ms: AtomicU64,
    /// The maps hold the first desired state and the program is attached (`/readyz`).
    pub ready: AtomicBool,
    /// Where the program must be attached: `/readyz` asks the kernel whether it still is.
    pub links: Mutex<crate::kernel::links::Expected>,
    /// (VIP label, backend label, healthy) for every checked backend (see [`crate::model::view`]).
    pub health: Mutex<Vec<(String, String, bool)>>,
    /// The VIPs and backends as the agent last wrote them to its status file: names, modes,
    /// weights, passive health.
    pub vips: Mutex<Vec<crate::status::file::VipStatus>>,
    /// The next-hop keeper's figures, as of its last refresh.
    pub nexthops: Mutex<crate::kernel::nexthop::NexthopStatus>,
    /// What this node announces (None: `node.announce` is off); not served yet.
    pub announce: Mutex<Option<crate::kernel::announce::AnnounceStatus>>,
    /// Migrations done and failed (see [`crate::kernel::migrate`]), and the last one done.
    pub migrations_ok: AtomicU64,
    pub migrations_failed: AtomicU64,
    pub migration: Mutex<Option<crate::kernel::migrate::Migration>>,
    /// Bumped whenever a migration replaced pinned maps: a scrape then opens them again.
    pub maps_generation: AtomicU64,
    /// The overrides in force (`lb drain`, `lb weight`), for the status file.
    pub overrides: Mutex<crate::sources::overrides::Overrides>,
}

impl AgentMetrics {
    /// Records that a config was applied now.
    pub fn applied(&self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_applied_ms.store(ms, Ordering::Relaxed);
    }

    pub fn last_applied_seconds(&self) -> f64 {
        self.last_applied_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Records a load's report: a migration if entries moved (the scraper then reopens the
    /// pins), or the adoption of pins as they were.
    pub fn migrated(&self, report: crate::kernel::migrate::Migration) {
        if report.moved() {
            match report.errors.is_empty() {
                true => self.migrations_ok.fetch_add(1, Ordering::Relaxed),
                false => self.migrations_failed.fetch_add(1, Ordering::Relaxed),
            };
            self.maps_generation.fetch_add(1, Ordering::Relaxed);
        }
        *self.migration.lock().expect("migration lock") = Some(report);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("reading the maps")]
    Maps(#[from] InspectError),
    #[error(transparent)]
    Encode(#[from] exposition::ExpositionError),
}

/// The pinned maps a scrape reads.
pub struct Maps {
    pub pinned: Pinned,
    /// Each member's next hop (`LB_NEXTHOPS`).
    pub nexthops: Array<MapData, NextHop>,
}

impl Maps {
    fn open(pin_dir: &Path) -> Result<Self, InspectError> {
        let pinned = Pinned::open(pin_dir)?;
        let nexthops =
            Array::try_from(open_pinned(pin_dir, lb_maps::NEXTHOPS)?).map_err(|source| {
                InspectError::Map {
                    what: "next hops",
                    source,
                }
            })?;
        Ok(Self { pinned, nexthops })
    }
}

/// Reads a scrape's figures from an agent's pinned maps and its own counters.
pub struct Scraper {
    /// The maps, and the [`AgentMetrics::maps_generation`] they were opened at.
    maps: Mutex<(Maps, u64)>,
    pin_dir: std::path::PathBuf,
    agent: Arc<AgentMetrics>,
}

impl Scraper {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path, agent: Arc<AgentMetrics>) -> Result<Self, InspectError> {
        let generation = agent.maps_generation.load(Ordering::Relaxed);
        Ok(Self {
            maps: Mutex::new((Maps::open(pin_dir)?, generation)),
            pin_dir: pin_dir.to_path_buf(),
            agent,
        })
    }

    /// One scrape, in `format`.
    pub fn scrape(&self, format: Format) -> Result<String, ScrapeError> {
        let families = {
            let mut maps = self.maps.lock().expect("pinned maps lock");
            let generation = self.agent.maps_generation.load(Ordering::Relaxed);
            if maps.1 != generation {
                *maps = (Maps::open(&self.pin_dir)?, generation);
            }
            collect::families(&maps.0, &self.agent)?
        };
        Ok(exposition::encode(families, format)?)
    }
}

/// Serves `/metrics`, and for probes `/healthz` (the agent answers) and `/readyz` (the maps hold
/// the desired state and the program is attached, as the kernel says now).
pub async fn serve(
    listener: tokio::net::TcpListener,
    scraper: Scraper,
    agent: Arc<AgentMetrics>,
) -> std::io::Result<()> {
    let scraper = Arc::new(scraper);
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let agent = agent.clone();
                async move {
                    if !agent.ready.load(Ordering::Relaxed) {
                        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string());
                    }
                    let expected = agent.links.lock().map(|l| l.clone()).unwrap_or_default();
                    match expected.missing() {
                        m if m.is_empty() => (StatusCode::OK, "ready\n".to_string()),
                        m => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("lb's program is not attached to {}\n", m.join(", ")),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move |headers: HeaderMap| {
                let scraper = scraper.clone();
                async move {
                    let accept = headers
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let format = Format::negotiate(accept.as_deref());
                    // Reading the maps is blocking work (a syscall per bucket of the IPv4
                    // flow table): off the runtime's threads.
                    match tokio::task::spawn_blocking(move || scraper.scrape(format)).await {
                        Ok(Ok(body)) => {
                            ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
                        }
                        Ok(Err(e)) => failed(&e),
                        Err(e) => failed(&e),
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

fn failed(e: &dyn std::error::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("scraping failed: {}\n", crate::error_chain(e)),
    )
        .into_response()
}
