//! The old process's side of a handover, in two steps.
//!
//! 1. `offer`: while the device keeps running, send the destination what
//!    does not change when it stops (connection, memory, eventfds, TAP
//!    queues, host state) so it can build its device ahead of the pause.
//!    The serve loop goes on serving requests meanwhile.
//! 2. `Pending::finish`, once the destination answers `Prepared`: stop the
//!    datapath at a batch boundary, save the device model's state, send it
//!    with the ring positions (and the whole fd set again if any request
//!    came in since the offer), and wait for `Ready`.
//!
//! Until `Ready` the running device is at most paused: any failure — the
//! destination refuses, dies, times out, or the stream breaks — resumes it
//! exactly where it stopped. After `Ready` the destination owns the device;
//! the caller exits without touching anything.

use super::phases::{self, SourceMarks};
use super::priority::PauseAtRealTime;
use super::state::{Commit, FdRole, HostState, Offer, Reply};
use super::stream::{self, StreamError};
use super::{monotonic_ns, HandoverReport};
use crate::backend::NetBackend;
use crate::sandbox::DeviceError;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How long the destination may take to validate the offer and build its
/// device (it may have to compile a component it has not cached).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take from the commit to `Ready`. The
/// device is paused meanwhile, and the work left is about 100 µs (more on
/// the new-TAP path, which opens the TAP and starts threads): a destination
/// this late is stuck, and the source resumes rather than wait longer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for the destination to report its datapath running.
const RESUMED_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The destination could not be reached; nothing was stopped.
    #[error("cannot reach the destination at {path}: {error}")]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A VM migration is under way; nothing was stopped or sent.
    #[error("cannot hand over now: {0}")]
    Busy(crate::backend::MigrationUnderWay),
    /// The process at the destination runs as another user: the device's
    /// memory and TAP go to no one else.
    #[error("the destination is refused: {0}")]
    Peer(crate::hardening::peer::PeerError),
    /// There is no listening socket to hand over with the device.
    #[error("there is no vhost-user listening socket to hand over")]
    NoListener,
    /// The destination did not prepare in time; nothing was stopped.
    #[error("the destination did not prepare within {0:?}")]
    NotPrepared(Duration),
    /// The device model could not save its state; the device resumed.
    #[error("saving the device state failed: {0}")]
    Save(DeviceError),
    /// The destination refused the device; the device resumed. `why` is
    /// the destination's name for the reason (empty from older releases).
    #[error("the destination refused the handover: {reason}")]
    Refused { reason: String, why: String },
    /// The destination answered something its step does not allow.
    #[error("the destination answered out of order ({0})")]
    OutOfOrder(&'static str),
    /// The stream broke or timed out before `Ready`; the device resumed.
    #[error("handover failed before the destination took over: {0}")]
    Stream(#[from] StreamError),
}

impl HandoverError {
    /// A stable name for the API's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "handover_unreachable",
            Self::Busy(_) => "migration_under_way",
            Self::Peer(_) => "handover_peer_refused",
            Self::NoListener => "handover_no_listener",
            Self::NotPrepared(_) => "handover_not_prepared",
            Self::Save(_) => "handover_save_failed",
            Self::Refused { .. } => "handover_refused",
            Self::Stream(StreamError::Timeout) => "handover_timed_out",
            Self::OutOfOrder(_) => "handover_stream_broken",
            Self::Stream(_) => "handover_stream_broken",
        }
    }
}

/// A refusal as the destination gave it, or any other answer as out of
/// order.
fn unexpected(reply: Reply) -> HandoverError {
    match reply {
        Reply::Refused { reason, kind } => HandoverError::Refused { reason, why: kind },
        Reply::Prepared => HandoverError::OutOfOrder("prepared"),
        Reply::Ready => HandoverError::OutOfOrder("ready"),
        Reply::Resumed { .. } => HandoverError::OutOfOrder("resumed"),
    }
}

/// The listening sockets and the connection that go with the device.
pub struct Sockets {
    pub connection: Option<RawFd>,
    /// None in client mode, where `connect` names the frontend's socket.
    pub listener: Option<RawFd>,
    pub connect: Option<PathBuf>,
    pub api_listener: Option<RawFd>,
    /// Their paths, for the destination to clean up at the end.
    pub paths: Vec<PathBuf>,
}

/// A handover offered to a destination that is building its device; the
/// device here still runs.
pub struct Pending {
    sock: UnixStream,
    /// `NetBackend::setup_changes` when the offer's fds were collected.
    setup_changes: u64,
    new_tap: bool,
    offered_ns: u64,
    deadline: Instant,
}

/// Offers the device to the process listening at `destination`.
pub fn offer(
    backend: &NetBackend,
    sockets: Sockets,
    destination: &Path,
    new_tap: bool,
) -> Result<Pending, HandoverError> {
    if let Some(why) = backend.handover_blocker() {
        return Err(HandoverError::Busy(why));
    }
    let sock = UnixStream::connect(destination).map_err(|error| HandoverError::Connect {
        path: destination.to_path_buf(),
        error,
    })?;
    // The device's memory and TAP go only to a process of our own user.
    crate::hardening::peer::same_user(&sock).map_err(HandoverError::Peer)?;
    let offered_ns = monotonic_ns();
    let (offer, fds) = describe_device(backend, sockets, new_tap);
    stream::send(&sock, &offer)?;
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
    stream::send_fds(&sock, &raw)?;
    Ok(Pending {
        sock,
        setup_changes: backend.setup_changes(),
        new_tap,
        offered_ns,
        deadline: Instant::now() + PREPARE_TIMEOUT,
    })
}

impl Pending {
    /// Readable when the destination has answered the offer.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Time left for the destination to answer the offer.
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Reads the destination's answer to the offer (call when `socket` is
    /// readable or `time_left` is zero) and, if it is `Prepared`, hands the
    /// device over: stop, save, commit, wait for `Ready`.
    pub fn finish(
        self,
        backend: &mut NetBackend,
        sockets: Sockets,
    ) -> Result<HandoverReport, HandoverError> {
        let wait = self.time_left().max(Duration::from_millis(1));
        match stream::recv::<Reply>(&self.sock, wait) {
            Ok(Reply::Prepared) => {}
            Ok(other) => return Err(unexpected(other)),
            Err(StreamError::Timeout) => return Err(HandoverError::NotPrepared(PREPARE_TIMEOUT)),
            Err(e) => return Err(e.into()),
        }
        let prepared_in = Duration::from_nanos(monotonic_ns().saturating_sub(self.offered_ns));
        // A standby or a dirty log may have come while the destination
        // prepared: their state does not travel.
        if let Some(why) = backend.handover_blocker() {
            return Err(HandoverError::Busy(why));
        }
        let mut report = self.pause_and_commit(backend, sockets)?;
        report.prepared_in = Some(prepared_in);
        Ok(report)
    }

    fn pause_and_commit(
        &self,
        backend: &mut NetBackend,
        sockets: Sockets,
    ) -> Result<HandoverReport, HandoverError> {
        let realtime = PauseAtRealTime::raise_with(&backend.datapath().thread_ids());
        let mut marks = SourceMarks {
            stopping_ns: monotonic_ns(),
            ..SourceMarks::default()
        };
        backend.stop_datapath();
        marks.stopped_ns = monotonic_ns();
        let fd_count = match self.commit_and_wait_ready(backend, sockets, &mut marks) {
            Ok(fd_count) => fd_count,
            Err(e) => {
                warn!("handover failed, resuming: {e}");
                backend.resume_datapath();
                return Err(e);
            }
        };
        drop(realtime);
        // Committed: the destination runs the device now.
        let report = match stream::recv::<Reply>(&self.sock, RESUMED_TIMEOUT) {
            Ok(Reply::Resumed {
                at_ns,
                component,
                marks: theirs,
            }) => HandoverReport {
                downtime: Some(Duration::from_nanos(
                    at_ns.saturating_sub(marks.stopping_ns),
                )),
                to: Some(component),
                fds: fd_count,
                phases: phases::breakdown(marks, theirs, at_ns),
                prepared_in: None,
            },
            _ => HandoverReport {
                downtime: None,
                to: None,
                fds: fd_count,
                phases: Vec::new(),
                prepared_in: None,
            },
        };
        info!(
            downtime_us = report.downtime.map(|d| d.as_micros() as u64),
            "handed over"
        );
        debug!("handover pause by step (µs): {}", describe(&report.phases));
        Ok(report)
    }

    /// Saves the stopped device and sends the commit; the number of fds the
    /// destination holds of ours.
    fn commit_and_wait_ready(
        &self,
        backend: &mut NetBackend,
        sockets: Sockets,
        marks: &mut SourceMarks,
    ) -> Result<usize, HandoverError> {
        let device_state = backend.device_mut().save().map_err(HandoverError::Save)?;
        let (host, fds) = collect(backend, sockets, self.new_tap);
        let changed = backend.setup_changes() != self.setup_changes;
        let resent: Vec<(FdRole, RawFd)> = if changed { fds.clone() } else { Vec::new() };
        let commit = Commit {
            stopped_at_ns: marks.stopping_ns,
            host,
            device_state,
            fds: resent.iter().map(|(role, _)| *role).collect(),
        };
        marks.saved_ns = monotonic_ns();
        stream::send(&self.sock, &commit)?;
        if changed {
            let raw: Vec<RawFd> = resent.iter().map(|(_, fd)| *fd).collect();
            stream::send_fds(&self.sock, &raw)?;
        }
        marks.sent_ns = monotonic_ns();
        match stream::recv::<Reply>(&self.sock, READY_TIMEOUT)? {
            Reply::Ready => Ok(fds.len()),
            other => Err(unexpected(other)),
        }
    }
}

/// The device as an offer describes it (host state, component, the roles
/// of its fds), and those fds: what a handover sends, and what the fd
/// store keeps (`daemon::fd_store`).
pub fn describe_device(
    backend: &NetBackend,
    sockets: Sockets,
    new_tap: bool,
) -> (Offer, Vec<(FdRole, RawFd)>) {
    let (host, fds) = collect(backend, sockets, new_tap);
    let offer = Offer {
        magic: stream::MAGIC.into(),
        version: stream::VERSION,
        source_component: backend.device().info().clone(),
        component_wasm: backend
            .device()
            .component()
            .wasm
            .as_deref()
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
        host,
        fds: fds.iter().map(|(role, _)| *role).collect(),
    };
    (offer, fds)
}

/// The host state and every fd that carries the device, sockets included.
fn collect(
    backend: &NetBackend,
    sockets: Sockets,
    new_tap: bool,
) -> (HostState, Vec<(FdRole, RawFd)>) {
    let (mut host, mut fds) = backend.export(!new_tap);
    host.socket_paths = sockets.paths;
    host.connect = sockets.connect;
    if let Some(conn) = sockets.connection {
        fds.insert(0, (FdRole::Connection, conn));
    }
    if let Some(listener) = sockets.listener {
        fds.push((FdRole::Listener, listener));
    }
    if let Some(api) = sockets.api_listener {
        fds.push((FdRole::ApiListener, api));
    }
    (host, fds)
}

/// `stop=12 save=40 …` for the log.
fn describe(phases: &[(&str, Duration)]) -> String {
    let steps: Vec<String> = phases
        .iter()
        .map(|(name, took)| format!("{name}={}", took.as_micros()))
        .collect();
    steps.join(" ")
}
