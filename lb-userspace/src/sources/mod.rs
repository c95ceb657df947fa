//! Where the desired state comes from: the config file ([`config`]: YAML -> validated
//! `Config`, the uplink filled in by [`uplink`]), Kubernetes and the Gateway API ([`k8s`]), and
//! the operator's drains and weights laid over either ([`overrides`]).
//!
//! May use: [`crate::model`], [`crate::kernel`] (the sizes and the kernel memory they need).
pub mod config;
pub mod k8s;
pub mod overrides;
pub mod uplink;
