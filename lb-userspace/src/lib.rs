//! The lb agent: loads the XDP program and owns its maps.
pub mod maglev;
pub mod program;
