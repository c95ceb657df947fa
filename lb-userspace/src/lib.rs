//! The lb agent: loads the XDP program and owns its maps.
pub mod agent;
pub mod config;
pub mod dataplane;
pub mod maglev;
pub mod model;
pub mod plan;
pub mod program;
