//! What lb shows: `/metrics` ([`metrics`]), `lb stats`, `backends`, `explain`, `flows` and
//! `status` ([`show`]), `lb top` ([`top`]), `lb nexthops` ([`nexthop`]). Read-only: from the
//! pinned maps ([`crate::kernel::inspect`]) and the status file ([`crate::status`]).
//!
//! May use: [`crate::model`], [`crate::kernel`], [`crate::sources`], [`crate::status`].
pub mod metrics;
pub mod nexthop;
pub mod show;
pub mod top;
