//! The agent: [`reconcile`] (holds the config, the health and what the maps hold; reconciles
//! through the [`crate::kernel::dataplane::Dataplane`] trait), [`health`] (active and passive
//! checks), [`changes`] (what a reload changed, for the log) and [`run`] (`lb run`'s event loop:
//! signals, file watch, Kubernetes, health, the status file, `/metrics`).
//!
//! May use: every layer but [`crate::cli`].
pub mod changes;
pub mod health;
pub mod reconcile;
pub mod run;
