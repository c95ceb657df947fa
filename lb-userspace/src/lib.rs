//! The lb agent: loads the XDP program and owns its maps, and the `lb` command line.
//!
//! The modules are folders per layer, from the bottom up; a layer uses the layers below it,
//! never those above (`tests/tests/lints.rs` checks it, ARCHITECTURE.md draws it):
//! [`model`] (pure: desired state, Maglev, plan), [`kernel`] (the program, its maps and links),
//! [`sources`] (the config file, Kubernetes, the operator's overrides), [`status`] (the status
//! file's schema), [`observe`] (`/metrics`, the inspecting commands), [`agent`] (reconcile and
//! `lb run`'s event loop), [`cli`] (parses and dispatches).
pub mod agent;
pub mod cli;
pub mod kernel;
pub mod model;
pub mod observe;
pub mod sources;
pub mod status;

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
