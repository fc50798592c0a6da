//! The new process's side of a handover (`sandnic serve --incoming PATH`).
//!
//! It opens nothing of its own: it waits on PATH for one source, receives
//! the offer and the fds, validates every section, loads the device state
//! into its own (possibly newer) component, rebuilds memory, rings and the
//! TAP from the received fds, and only then answers `Ready`. Any failure
//! before that answers `Refused` (the source keeps running) and ends here.

use super::monotonic_ns;
use super::phases::DestinationMarks;
use super::state::{self, FdRole, Offer, Reply};
use super::stream::{self, StreamError};
use crate::backend::NetBackend;
use crate::datapath::DatapathOptions;
use crate::sandbox::{DeviceComponent, Runtime, SandboxedDevice};
use crate::tap::Tap;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// Longest pause between frames of an offer.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// A device taken over, with the sockets that came with it.
pub struct Incoming {
    pub backend: NetBackend,
    pub connection: Option<UnixStream>,
    pub listener: Option<UnixListener>,
    pub api_listener: Option<UnixListener>,
    pub socket_paths: Vec<PathBuf>,
    /// Kept open until the caller has resumed the datapath and reported it.
    pub source: UnixStream,
    pub stopped_at_ns: u64,
    /// When each step here ended, for the source's breakdown.
    pub marks: DestinationMarks,
}

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("waiting for the source on {path}: {error}")]
    Listen { path: PathBuf, error: String },
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Refused (and told the source why).
    #[error("refused the handover: {0}")]
    Refused(String),
}

/// Waits for one source on `path` and takes over its device.
/// Binds the socket a source will hand its device to (owner only: the
/// user this process will run as).
pub fn listen(
    path: &Path,
    owner: Option<crate::hardening::privileges::Target>,
) -> Result<UnixListener, IncomingError> {
    crate::api::bind_private(path, owner).map_err(|error| IncomingError::Listen {
        path: path.into(),
        error,
    })
}

pub fn receive(
    listener: UnixListener,
    path: &Path,
    runtime: Arc<Runtime>,
    component: Arc<DeviceComponent>,
    new_tap: bool,
    options: DatapathOptions,
) -> Result<Incoming, IncomingError> {
    info!(path = %path.display(), "waiting for a handover");
    let (sock, _) = listener.accept().map_err(|e| IncomingError::Listen {
        path: path.into(),
        error: e.to_string(),
    })?;
    drop(listener);
    let _ = std::fs::remove_file(path);
    if let Err(reason) = crate::hardening::peer::same_user(&sock) {
        return Err(IncomingError::Refused(format!("the source: {reason}")));
    }
    let offer: Offer = stream::recv(&sock, FRAME_TIMEOUT)?;
    let refuse = |sock: &UnixStream, reason: String| {
        let _ = stream::send(
            sock,
            &Reply::Refused {
                reason: reason.clone(),
            },
        );
        IncomingError::Refused(reason)
    };
    if let Err(reason) = state::validate(&offer, new_tap) {
        return Err(refuse(&sock, reason));
    }
    let received = stream::recv_fds(&sock, offer.fds.len(), FRAME_TIMEOUT)?;
    let mut fds: HashMap<FdRole, OwnedFd> = offer.fds.iter().copied().zip(received).collect();
    let mut marks = DestinationMarks {
        received_ns: monotonic_ns(),
        ..DestinationMarks::default()
    };
    let taken = take_over(
        &offer, &mut fds, runtime, component, new_tap, options, &mut marks,
    );
    match taken {
        Ok(backend) => {
            marks.rebuilt_ns = monotonic_ns();
            stream::send(&sock, &Reply::Ready)?;
            marks.ready_ns = monotonic_ns();
            let unix = |fd: Option<OwnedFd>| fd.map(UnixStream::from);
            let listener = |fd: Option<OwnedFd>| fd.map(UnixListener::from);
            Ok(Incoming {
                backend,
                connection: unix(fds.remove(&FdRole::Connection)),
                listener: listener(fds.remove(&FdRole::Listener)),
                api_listener: listener(fds.remove(&FdRole::ApiListener)),
                socket_paths: offer.host.socket_paths.clone(),
                source: sock,
                stopped_at_ns: offer.stopped_at_ns,
                marks,
            })
        }
        Err(reason) => Err(refuse(&sock, reason)),
    }
}

/// Builds the device from the offer; nothing runs yet.
fn take_over(
    offer: &Offer,
    fds: &mut HashMap<FdRole, OwnedFd>,
    runtime: Arc<Runtime>,
    component: Arc<DeviceComponent>,
    new_tap: bool,
    options: DatapathOptions,
    marks: &mut DestinationMarks,
) -> Result<NetBackend, String> {
    let host = &offer.host;
    let mut device = SandboxedDevice::new(runtime, component, host.config.clone())
        .map_err(|e| format!("{e:#}"))?;
    let effects = device
        .load(&offer.device_state)
        .map_err(|e| format!("device state: {e}"))?;
    marks.loaded_ns = monotonic_ns();
    let tap_fds: Vec<OwnedFd> = (0..host.tap.queues)
        .filter_map(|q| fds.remove(&FdRole::TapQueue(q)))
        .collect();
    let tap = if new_tap || tap_fds.is_empty() {
        drop(tap_fds);
        Tap::open(&host.tap.name, usize::from(host.tap.queues))
    } else {
        Tap::adopt(tap_fds)
    }
    .map_err(|e| format!("TAP: {e}"))?;
    if tap.queue_count() < usize::from(host.config.max_queue_pairs) {
        return Err(format!(
            "{} TAP queues for {} pairs",
            tap.queue_count(),
            host.config.max_queue_pairs
        ));
    }
    NetBackend::import(device, Arc::new(tap), host, fds, effects, options)
        .map_err(|e| format!("{e:#}"))
}

impl Incoming {
    /// Starts the datapath and tells the source when it ran again.
    pub fn resume(&mut self) {
        self.backend.resume_datapath();
        let at_ns = monotonic_ns();
        let component = self.backend.device().info().clone();
        let resumed = Reply::Resumed {
            at_ns,
            component,
            marks: self.marks,
        };
        let _ = stream::send(&self.source, &resumed);
        info!(
            downtime_us = at_ns.saturating_sub(self.stopped_at_ns) / 1000,
            "took over the device"
        );
    }
}
