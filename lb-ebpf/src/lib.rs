#![no_std]
//! Present so that lb-userspace can name this crate as a build dependency (cargo needs a lib).
