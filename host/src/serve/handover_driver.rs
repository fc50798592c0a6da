//! A handover as the serving process drives it, between events of the
//! reactor: asked for by an API client, offered to the destination (the
//! device goes on serving while the destination prepares), then finished —
//! paused, committed, answered — when the destination answers or runs out
//! of time.

use crate::api::{ApiError, HandoverRequest};
use crate::backend::NetBackend;
use crate::handover::{source, HandoverReport};
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// Where a handover stands, with the API client (its slot) to answer.
enum Phase {
    /// Asked for during the current event; offered once it is handled.
    Asked {
        request: HandoverRequest,
        client: usize,
    },
    /// Offered; the destination prepares.
    Offered {
        pending: source::Pending,
        client: usize,
    },
}

/// At most one handover at a time.
#[derive(Default)]
pub struct HandoverDriver {
    phase: Option<Phase>,
}

/// A handover that ended, and the API reply for its client.
pub struct Ended {
    pub client: usize,
    pub reply: serde_json::Value,
    /// The destination took the device over: this process is done.
    pub handed_over: bool,
}

impl HandoverDriver {
    /// A handover was asked for or is not over yet: another handover or a
    /// swap would change the device under it.
    pub fn under_way(&self) -> bool {
        self.phase.is_some()
    }

    pub fn ask(&mut self, request: HandoverRequest, client: usize) {
        self.phase = Some(Phase::Asked { request, client });
    }

    /// Offers the device to the destination of a handover asked for.
    /// `Some`: it could not be offered (the reply for the client).
    pub fn offer(
        &mut self,
        backend: &NetBackend,
        sockets: Option<source::Sockets>,
    ) -> Option<Ended> {
        if !matches!(self.phase, Some(Phase::Asked { .. })) {
            return None;
        }
        let Some(Phase::Asked { request, client }) = self.phase.take() else {
            return None;
        };
        let Some(sockets) = sockets else {
            return Some(refused(client, source::HandoverError::NoListener));
        };
        match source::offer(backend, sockets, &request.destination, request.new_tap) {
            Ok(pending) => {
                self.phase = Some(Phase::Offered { pending, client });
                None
            }
            Err(e) => Some(refused(client, e)),
        }
    }

    /// The destination's socket, while it prepares (readable once it
    /// answered).
    pub fn destination(&self) -> Option<BorrowedFd<'_>> {
        match &self.phase {
            Some(Phase::Offered { pending, .. }) => Some(pending.socket()),
            _ => None,
        }
    }

    /// How long the destination may still prepare.
    pub fn time_left(&self) -> Option<Duration> {
        match &self.phase {
            Some(Phase::Offered { pending, .. }) => Some(pending.time_left()),
            _ => None,
        }
    }

    /// Finishes the handover offered (the destination answered, or is out
    /// of time): pause, commit, and say how it ended.
    pub fn finish(
        &mut self,
        backend: &mut NetBackend,
        sockets: Option<source::Sockets>,
    ) -> Option<Ended> {
        if !matches!(self.phase, Some(Phase::Offered { .. })) {
            return None;
        }
        let Some(Phase::Offered { pending, client }) = self.phase.take() else {
            return None;
        };
        let Some(sockets) = sockets else {
            return Some(refused(client, source::HandoverError::NoListener));
        };
        Some(match pending.finish(backend, sockets) {
            Ok(report) => Ended {
                client,
                reply: reply(&report),
                handed_over: true,
            },
            Err(e) => refused(client, e),
        })
    }
}

fn refused(client: usize, why: source::HandoverError) -> Ended {
    Ended {
        client,
        reply: ApiError::Handover(why).reply(),
        handed_over: false,
    }
}

/// The API's answer to a handover that went through.
fn reply(report: &HandoverReport) -> serde_json::Value {
    let micros = |d: Duration| d.as_micros() as u64;
    serde_json::json!({
        "ok": true,
        "downtime_us": report.downtime.map(micros),
        "prepare_us": report.prepared_in.map(micros),
        "to": report.to,
        "fds": report.fds,
        "phases_us": report
            .phases
            .iter()
            .map(|(name, took)| (name.to_string(), micros(*took).into()))
            .collect::<serde_json::Map<_, _>>(),
    })
}
