//! One frontend's vhost-user connection: it receives a message, parses it,
//! has the device answer it (`Device`, with the session named), and
//! replies as the protocol asks. The reply policy lives here, whole:
//! which requests answer with a body (also when they fail), when an ack
//! goes back (REPLY_ACK), what a malformed request gets.

use super::request::{self, Request, RequestError};
use super::wire::{self, Header, WireError};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use tracing::{info, warn};

/// The answer to one request; `E` is the device's reason for a refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<E> {
    /// A reply body (GET_* requests).
    Reply(Vec<u8>),
    /// Done; acked with 0 if the frontend asked for an ack.
    Ok,
    /// Refused; acked with 1 if the frontend asked for an ack.
    Failed(E),
    /// Cannot be honoured and cannot be refused either (the frontend would
    /// not notice): the connection must be closed. Only for a dirty log
    /// that cannot be kept, where going on would let a migration complete
    /// with pages unlogged.
    Disconnect(E),
}

/// Names a frontend connection (and its session in the backend) for as
/// long as the process lives: never reused, so a late event for a gone
/// connection cannot reach a new one.
pub type SessionId = u64;

/// How long a frontend may take to send the rest of a message it started.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// What answers a frontend's requests: the device behind the connection,
/// told which session each request comes from.
pub trait Device {
    /// Why the device refuses a request or ends a connection.
    type Refusal: std::error::Error + Send + Sync + 'static;
    /// The answer to a well-formed request of session `session`.
    fn handle(&mut self, session: SessionId, request: Request) -> Outcome<Self::Refusal>;
    /// The answer to a request of session `session` that did not parse.
    fn malformed(
        &mut self,
        session: SessionId,
        code: u32,
        error: RequestError,
    ) -> Outcome<Self::Refusal>;
    /// Whether session `session` negotiated REPLY_ACK.
    fn reply_ack(&self, session: SessionId) -> bool;
}

/// Why a connection is over.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    /// The frontend closed it.
    #[error("the frontend closed the connection")]
    ByFrontend,
    /// What came could not be read as vhost-user.
    #[error("unreadable message: {0}")]
    Unreadable(WireError),
    /// The device asked for it (a dirty log it cannot keep).
    #[error(transparent)]
    ByDevice(Box<dyn std::error::Error + Send + Sync>),
}

/// A frontend's connection and the session it speaks for.
pub struct FrontendConnection {
    pub session: SessionId,
    stream: UnixStream,
}

impl FrontendConnection {
    /// Serves `stream` as session `session`; a message started must finish
    /// within `MESSAGE_TIMEOUT`.
    pub fn new(session: SessionId, stream: UnixStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
        Ok(Self { session, stream })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Serves the message waiting on the connection. `Err`: the connection
    /// is over, and the caller closes it.
    pub fn serve_one(&self, device: &mut impl Device) -> Result<(), Closed> {
        let sock = self.stream.as_fd();
        let msg = match wire::recv(sock) {
            Ok(msg) => msg,
            Err(WireError::Closed) => return Err(Closed::ByFrontend),
            Err(e) => return Err(Closed::Unreadable(e)),
        };
        let header = msg.header;
        let ring = first_word(&msg.payload);
        let outcome = match request::parse(msg) {
            Ok(request) => device.handle(self.session, request),
            Err(e) => {
                warn!(session = self.session, "malformed request: {e}");
                device.malformed(self.session, header.request, e)
            }
        };
        if let Outcome::Disconnect(why) = outcome {
            return Err(Closed::ByDevice(Box::new(why)));
        }
        let reply_ack = device.reply_ack(self.session);
        if let Err(e) = answer(sock, header, ring, outcome, reply_ack) {
            warn!(
                session = self.session,
                "replying to request {}: {e}", header.request
            );
        }
        Ok(())
    }

    /// Logs why the connection ends.
    pub fn log_close(&self, why: &Closed) {
        match why {
            Closed::ByFrontend => info!(session = self.session, "frontend disconnected"),
            other => warn!(
                session = self.session,
                "dropping the frontend connection: {other}"
            ),
        }
    }
}

/// The first 32-bit word of a payload: the ring index of ring requests,
/// which a failure body must echo.
fn first_word(payload: &[u8]) -> Option<u32> {
    payload
        .get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Replies as the protocol asks: a body for GET requests, also when they
/// failed (`request::failure_body`: the frontend blocks until it comes);
/// otherwise an ack (0 ok, 1 failed) only when REPLY_ACK was negotiated and
/// the request asked for one.
fn answer<E>(
    sock: BorrowedFd<'_>,
    header: Header,
    ring: Option<u32>,
    outcome: Outcome<E>,
    reply_ack: bool,
) -> Result<(), WireError> {
    let failure_body = request::failure_body(header.request, ring);
    match (outcome, failure_body) {
        (Outcome::Reply(body), _) => wire::reply(sock, header.request, &body),
        (Outcome::Failed(_), Some(body)) => wire::reply(sock, header.request, &body),
        (Outcome::Ok, _) if header.needs_reply() && reply_ack => {
            wire::reply(sock, header.request, &0u64.to_ne_bytes())
        }
        (Outcome::Failed(_), None) if header.needs_reply() && reply_ack => {
            wire::reply(sock, header.request, &1u64.to_ne_bytes())
        }
        _ => Ok(()),
    }
}
