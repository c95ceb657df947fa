//! What is wanted and how to get there, pure: no kernel, no I/O, no clock. The desired state
//! ([`desired`]), weighted Maglev tables ([`maglev`], kept compact by [`table`]), the plan of
//! map writes that differ ([`plan`], [`planner`]), and the one shape a VIP or backend is shown
//! in ([`view`]), and port ranges as the map holds them ([`port_ranges`]).
//!
//! May use: `lb-common` only (the bottom layer of the crate).
pub mod desired;
pub mod maglev;
pub mod plan;
pub mod planner;
pub mod port_ranges;
pub mod table;
pub mod view;
