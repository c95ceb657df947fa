//! The status file's schema (`status.json`): written by the agent ([`crate::agent::run`]), read
//! by the inspecting commands ([`crate::observe`]) and the next agent. It sits below both, so
//! that neither reaches into the other: [`file`] (the file, its path, reading it), [`life`]
//! (what the agent says of itself).
//!
//! May use: [`crate::model`], [`crate::kernel`], [`crate::sources`].
pub mod file;
pub mod life;
