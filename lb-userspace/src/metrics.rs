//! Prometheus metrics, read from the pinned maps at each scrape (so they are the same numbers
//! `lb stats` shows), plus the agent's own: reloads, health.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    inspect::{Pinned, backend_label},
    model::vip_label,
};

/// Counters the agent itself keeps.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub map_writes: AtomicU64,
    /// The maps hold the first desired state and the program is attached (`/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
    /// (VIP label, backend address) -> healthy, for every checked backend.
    pub health: Mutex<Vec<(String, String, bool)>>,
    /// The next-hop keeper's figures, as of its last refresh.
    pub nexthops: Mutex<crate::nexthop::NexthopStatus>,
    /// What this node announces (None: `node.announce` is off); not served yet.
    pub announce: Mutex<Option<crate::announce::AnnounceStatus>>,
}

struct MapsCollector {
    pinned: Mutex<Pinned>,
    agent: Arc<AgentMetrics>,
}

impl std::fmt::Debug for MapsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapsCollector")
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(&owned(labels))?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(&owned(labels))?)?;
    }
    Ok(())
}

fn owned(labels: &[(&str, String)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

impl Collector for MapsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = self.pinned.lock().map_err(|_| std::fmt::Error)?;
        let counters = p.counters().map_err(|_| std::fmt::Error)?;
        let rows: Vec<_> = counters
            .iter()
            .map(|(c, v)| (vec![("counter", c.name().to_string())], *v))
            .collect();
        counter(
            &mut enc,
            "lb_packets",
            "Packets by outcome (verdicts) and event, from the XDP program",
            &rows,
        )?;

        let vips = p.vips().map_err(|_| std::fmt::Error)?;
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        let mut flows = Vec::new();
        for (k, v) in &vips {
            let s = p.vip_stats(v.id).map_err(|_| std::fmt::Error)?;
            let l = vec![("vip", vip_label(k))];
            packets.push((l.clone(), s.packets));
            bytes.push((l.clone(), s.bytes));
            flows.push((l, s.new_flows));
        }
        counter(&mut enc, "lb_vip_packets", "Packets per VIP", &packets)?;
        counter(
            &mut enc,
            "lb_vip_bytes",
            "Bytes per VIP (as received)",
            &bytes,
        )?;
        counter(&mut enc, "lb_vip_new_flows", "New flows per VIP", &flows)?;

        let (mut packets, mut bytes, mut flows) = (Vec::new(), Vec::new(), Vec::new());
        let mut attempts = Vec::new();
        let mut streaks = Vec::new();
        // Per member: a backend serving two VIPs has a series under each (`sum by (backend)`
        // adds them up).
        let vip_labels: std::collections::BTreeMap<u32, String> =
            vips.iter().map(|(k, v)| (v.id, vip_label(k))).collect();
        for (id, b) in p.members().map_err(|_| std::fmt::Error)? {
            let s = p.member_stats(id).map_err(|_| std::fmt::Error)?;
            let vip = vip_labels.get(&b.vip_id).cloned().unwrap_or_default();
            let l = vec![("vip", vip), ("backend", backend_label(&b))];
            packets.push((l.clone(), s.packets));
            bytes.push((l.clone(), s.bytes));
            flows.push((l.clone(), s.new_flows));
            let h = p.passive(id).map_err(|_| std::fmt::Error)?;
            for (outcome, n) in [
                ("answered", h.answered),
                ("refused", h.refused),
                ("unreachable", h.unreachable),
                ("syn_timeout", h.syn_timeouts),
            ] {
                let mut l = l.clone();
                l.push(("outcome", outcome.to_string()));
                attempts.push((l, n));
            }
            streaks.push((l, h.consecutive_failures as i64));
        }
        counter(
            &mut enc,
            "lb_backend_connection_attempts",
            "NAT mode: connection attempts per backend by how the backend answered (passive health)",
            &attempts,
        )?;
        gauge(
            &mut enc,
            "lb_backend_consecutive_failures",
            "NAT mode: failed connection attempts since the backend last answered one",
            &streaks,
        )?;
        counter(
            &mut enc,
            "lb_backend_packets",
            "Packets per backend of each VIP",
            &packets,
        )?;
        counter(
            &mut enc,
            "lb_backend_bytes",
            "Bytes per backend of each VIP (as received)",
            &bytes,
        )?;
        counter(
            &mut enc,
            "lb_backend_new_flows",
            "New flows per backend of each VIP",
            &flows,
        )?;

        let a = &self.agent;
        counter(
            &mut enc,
            "lb_config_reloads",
            "Config reloads applied",
            &[(vec![], a.reloads_ok.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut enc,
            "lb_config_reloads_rejected",
            "Config reloads refused (the previous config kept serving)",
            &[(vec![], a.reloads_rejected.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut enc,
            "lb_map_writes",
            "Map entries written by the agent",
            &[(vec![], a.map_writes.load(Ordering::Relaxed))],
        )?;
        let health: Vec<_> = a
            .health
            .lock()
            .map_err(|_| std::fmt::Error)?
            .iter()
            .map(|(vip, backend, ok)| {
                (
                    vec![("vip", vip.clone()), ("backend", backend.clone())],
                    *ok as i64,
                )
            })
            .collect();
        gauge(
            &mut enc,
            "lb_backend_healthy",
            "1 if the backend passes its health check",
            &health,
        )?;
        let nh = a.nexthops.lock().map_err(|_| std::fmt::Error)?.clone();
        encode_nexthops(&mut enc, &nh)
    }
}

/// The next-hop keeper's gauges and counters.
fn encode_nexthops(
    enc: &mut DescriptorEncoder,
    nh: &crate::nexthop::NexthopStatus,
) -> std::fmt::Result {
    gauge(
        enc,
        "lb_nexthops",
        "Live members by next-hop state: resolved by the agent, or left to bpf_fib_lookup",
        &[
            (vec![("state", "resolved".to_string())], nh.resolved as i64),
            (
                vec![("state", "unresolved".to_string())],
                nh.unresolved as i64,
            ),
        ],
    )?;
    for (name, help, v) in [
        (
            "lb_nexthop_refreshes",
            "Next-hop refreshes done (each looks at every live member)",
            nh.refreshes,
        ),
        (
            "lb_nexthop_failures",
            "Next hops the agent failed to resolve or write",
            nh.failures,
        ),
        ("lb_nexthop_writes", "Next-hop entries written", nh.writes),
    ] {
        counter(enc, name, help, &[(vec![], v)])?;
    }
    Ok(())
}

/// A registry whose scrape reads `pinned`.
pub fn registry(pinned: Pinned, agent: Arc<AgentMetrics>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(MapsCollector {
        pinned: Mutex::new(pinned),
        agent,
    }));
    r
}

/// Serves `/metrics`, and for probes `/healthz` (the agent answers) and `/readyz` (the maps hold
/// the desired state and the program is attached).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    agent: Arc<AgentMetrics>,
) -> std::io::Result<()> {
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = agent.ready.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response_parts(),
                        Err(_) => (
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "encoding metrics failed".to_string(),
                        )
                            .into_response_parts(),
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

trait IntoParts {
    fn into_response_parts(self) -> axum::response::Response;
}

impl<T: axum::response::IntoResponse> IntoParts for T {
    fn into_response_parts(self) -> axum::response::Response {
        self.into_response()
    }
}
