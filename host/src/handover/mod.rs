//! Live handover of the whole running device to a new process.
//!
//! - `stream.rs` — framing and fd passing over the handover socket
//! - `state.rs` — the host state, the fd manifest, their validation
//! - `source.rs` — the old process: offer while running; then stop, commit,
//!   wait for `Ready`, or resume
//! - `destination.rs` — the new process: prepare from the offer while the
//!   source runs; then apply the commit and resume
//! - `phases.rs` — where the pause went, step by step
//! - `priority.rs` — the pause at real-time priority, and only the pause
//!
//! Nothing is reconnected and nothing is reopened: the connected vhost-user
//! socket, guest memory, kick/call fds and the TAP queues themselves move.
//! Frames arriving during the switch wait in the TAP queue.

pub mod destination;
pub mod phases;
pub mod priority;
pub mod source;
pub mod state;
pub mod stream;

use crate::sandbox::ComponentInfo;
use std::time::Duration;

/// What the source reports after handing over.
#[derive(Debug, Clone)]
pub struct HandoverReport {
    /// Datapath stopped in the source → running in the destination (None if
    /// the destination did not say when).
    pub downtime: Option<Duration>,
    pub to: Option<ComponentInfo>,
    pub fds: usize,
    /// The pause step by step (empty if the destination gave no marks).
    pub phases: Vec<(&'static str, Duration)>,
    /// Offer sent → destination prepared (the device ran meanwhile).
    pub prepared_in: Option<Duration>,
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on one host.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
