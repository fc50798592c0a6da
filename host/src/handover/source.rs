//! The old process's side of a handover.
//!
//! Stop the datapath at a batch boundary, save the device model's state,
//! send everything (state, fd manifest, fds) and wait for the destination's
//! `Ready`. Until then the running device is only paused: any failure — the
//! destination refuses, dies, times out, or the stream breaks — resumes it
//! exactly where it stopped. After `Ready` the destination owns the device;
//! the caller exits without touching anything.

use super::phases::{self, SourceMarks};
use super::state::{FdRole, Offer, Reply};
use super::stream::{self, StreamError};
use super::{monotonic_ns, HandoverReport};
use crate::backend::NetBackend;
use crate::sandbox::DeviceError;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long the destination may take to validate and rebuild everything.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
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
    Busy(String),
    /// The device model could not save its state; the device resumed.
    #[error("saving the device state failed: {0}")]
    Save(DeviceError),
    /// The destination refused the device; the device resumed.
    #[error("the destination refused the handover: {0}")]
    Refused(String),
    /// The stream broke or timed out before `Ready`; the device resumed.
    #[error("handover failed before the destination took over: {0}")]
    Stream(#[from] StreamError),
}

/// The listening sockets and the connection that go with the device.
pub struct Sockets {
    pub connection: Option<RawFd>,
    pub listener: RawFd,
    pub api_listener: Option<RawFd>,
    /// Their paths, for the destination to clean up at the end.
    pub paths: Vec<PathBuf>,
}

/// Hands the device over to the process listening at `destination`.
pub fn hand_over(
    backend: &mut NetBackend,
    sockets: Sockets,
    destination: &Path,
    new_tap: bool,
) -> Result<HandoverReport, HandoverError> {
    if let Some(why) = backend.handover_blocker() {
        return Err(HandoverError::Busy(why));
    }
    let sock = UnixStream::connect(destination).map_err(|error| HandoverError::Connect {
        path: destination.to_path_buf(),
        error,
    })?;
    // The device's memory and TAP go only to a process of our own user.
    crate::hardening::peer::same_user(&sock).map_err(HandoverError::Busy)?;
    let mut marks = SourceMarks {
        stopping_ns: monotonic_ns(),
        ..SourceMarks::default()
    };
    backend.stop_datapath();
    marks.stopped_ns = monotonic_ns();
    match send_and_wait_ready(backend, &sock, sockets, &mut marks, new_tap) {
        Ok(fd_count) => {
            // Committed: the destination runs the device now.
            let resumed = stream::recv::<Reply>(&sock, RESUMED_TIMEOUT);
            let report = match resumed {
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
                },
                _ => HandoverReport {
                    downtime: None,
                    to: None,
                    fds: fd_count,
                    phases: Vec::new(),
                },
            };
            info!(
                downtime_us = report.downtime.map(|d| d.as_micros() as u64),
                "handed over"
            );
            debug!("handover pause by step (µs): {}", describe(&report.phases));
            Ok(report)
        }
        Err(e) => {
            warn!("handover failed, resuming: {e}");
            backend.resume_datapath();
            Err(e)
        }
    }
}

/// `stop=12 save=40 …` for the log.
fn describe(phases: &[(&str, Duration)]) -> String {
    let steps: Vec<String> = phases
        .iter()
        .map(|(name, took)| format!("{name}={}", took.as_micros()))
        .collect();
    steps.join(" ")
}

fn send_and_wait_ready(
    backend: &mut NetBackend,
    sock: &UnixStream,
    sockets: Sockets,
    marks: &mut SourceMarks,
    new_tap: bool,
) -> Result<usize, HandoverError> {
    let device_state = backend.device_mut().save().map_err(HandoverError::Save)?;
    let (mut host, mut fds) = backend.export(!new_tap);
    host.socket_paths = sockets.paths;
    if let Some(conn) = sockets.connection {
        fds.insert(0, (FdRole::Connection, conn));
    }
    fds.push((FdRole::Listener, sockets.listener));
    if let Some(api) = sockets.api_listener {
        fds.push((FdRole::ApiListener, api));
    }
    let offer = Offer {
        magic: stream::MAGIC.into(),
        version: stream::VERSION,
        stopped_at_ns: marks.stopping_ns,
        source_component: backend.device().info().clone(),
        host,
        device_state,
        fds: fds.iter().map(|(role, _)| *role).collect(),
    };
    marks.saved_ns = monotonic_ns();
    stream::send(sock, &offer)?;
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
    stream::send_fds(sock, &raw)?;
    marks.sent_ns = monotonic_ns();
    match stream::recv::<Reply>(sock, READY_TIMEOUT)? {
        Reply::Ready => Ok(raw.len()),
        Reply::Refused { reason } => Err(HandoverError::Refused(reason)),
        Reply::Resumed { .. } => Err(HandoverError::Refused(
            "destination answered out of order".into(),
        )),
    }
}
