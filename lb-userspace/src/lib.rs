//! The lb agent: loads the XDP program and owns its maps, and the `lb` command line.
//!
//! Pure parts (no kernel): [`maglev`], [`plan`], [`config`], [`model`], [`agent`] over the
//! [`dataplane::Dataplane`] trait, the choice of XDP mode ([`xdpmode::decide`]). Kernel parts:
//! [`program`], [`dataplane::kernel`], [`links`], [`inspect`], [`run`].
pub mod agent;
pub mod announce;
pub mod changes;
pub mod check;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod decap;
pub mod flowmap;
pub mod health;
pub mod inspect;
pub mod k8s;
pub mod leastconn;
pub mod life;
pub mod links;
pub mod maglev;
pub mod mapmem;
pub mod mapping;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod nexthop;
pub mod overrides;
pub mod pindir;
pub mod plan;
pub mod planner;
pub mod privilege;
pub mod program;
pub mod ring;
pub mod run;
pub mod show;
pub mod status;
pub mod table;
pub mod top;
pub mod uplink;
pub mod view;
pub mod xdpmode;

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
