//! Confining the native host, which is the trusted part: it drops root
//! (`privileges.rs`) and puts a default-deny seccomp filter on every thread
//! (`seccomp.rs`), one role per thread for its whole life, with every
//! allowlist in one file (`allowlists.rs`).
//!
//! Order matters. glibc applies `setuid` to every thread by signalling
//! them, so privileges are dropped before any filter goes on; a filter can
//! only be tightened, so each thread gets the one filter of its role once
//! set-up is over: the control thread (which also serves the API, swaps
//! components and is the handover source; `serve --incoming` becomes it)
//! and the datapath workers.

pub mod allowlists;
pub mod peer;
pub mod privileges;
pub mod seccomp;
