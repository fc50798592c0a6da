//! The new process's side of a handover (`sandnic serve --incoming PATH`).
//!
//! It opens nothing of its own: it waits on PATH for one source and
//! receives the offer and its fds while the source's device still runs.
//! It validates every section and builds its device from them: component
//! instantiated, memory mapped, datapath threads created, idle. It answers
//! `Prepared` and waits for the commit, which crosses the source's pause:
//! it loads the device state into its own (possibly newer) component,
//! takes the ring positions (and a new fd set, if the source's changed),
//! and only then answers `Ready`. Any failure before that answers
//! `Refused` (the source keeps running) and ends here.

use super::monotonic_ns;
use super::phases::DestinationMarks;
use super::priority::PauseAtRealTime;
use super::source;
use super::state::{self, Commit, FdRole, HostState, Offer, Reply};
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
    /// Real-time priority until the datapath runs again.
    realtime: Option<PauseAtRealTime>,
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

/// Waits on `listener` (bound at `path`) for one source, or for a signal
/// on `signals` (SIGTERM, SIGINT: blocked in every thread, so only this
/// wait can see them). Either way the socket file is removed. `None`: a
/// signal came first.
pub fn wait_for_source(
    listener: UnixListener,
    path: &Path,
    signals: &nix::sys::signalfd::SignalFd,
) -> Result<Option<UnixStream>, IncomingError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    info!(path = %path.display(), "waiting for a handover");
    let listen_error = |error: String| IncomingError::Listen {
        path: path.into(),
        error,
    };
    let result = loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(listen_error(e.to_string())),
            Ok(_) => {}
        }
        let fired = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if fired(&fds[1]) {
            break Ok(None);
        }
        if fired(&fds[0]) {
            break listener
                .accept()
                .map(|(sock, _)| Some(sock))
                .map_err(|e| listen_error(e.to_string()));
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(path);
    result
}

/// Takes over the device of the source connected on `sock`. `component`
/// is the one `--component` named; without it the destination runs what
/// `component_for` picks.
pub fn receive(
    sock: UnixStream,
    runtime: Arc<Runtime>,
    component: Option<Arc<DeviceComponent>>,
    new_tap: bool,
    options: DatapathOptions,
) -> Result<Incoming, IncomingError> {
    if let Err(reason) = crate::hardening::peer::same_user(&sock) {
        return Err(IncomingError::Refused(format!("the source: {reason}")));
    }
    let offer: Offer = stream::recv(&sock, FRAME_TIMEOUT)?;
    if let Err(reason) = state::validate(&offer, new_tap) {
        return Err(refuse(&sock, reason));
    }
    let mut fds = receive_fds(&sock, &offer.fds)?;
    let prepared = match component {
        Some(component) => Ok(component),
        None => component_for(&offer, &runtime),
    }
    .and_then(|component| Prepared::build(&offer, &mut fds, runtime, component, new_tap, options))
    .map_err(|reason| refuse(&sock, reason))?;
    // From here to the resume, a commit wakes this thread at once.
    let realtime = PauseAtRealTime::raise();
    stream::send(&sock, &Reply::Prepared)?;
    // The source serves its frontend until it reads `Prepared`, then pauses.
    let commit: Commit = stream::recv(&sock, source::PREPARE_TIMEOUT)?;
    let mut marks = DestinationMarks::default();
    if let Err(reason) = state::validate_commit(&commit, &offer.host, new_tap) {
        return Err(refuse(&sock, reason));
    }
    let changed = !commit.fds.is_empty();
    if changed {
        fds = receive_fds(&sock, &commit.fds)?;
    }
    marks.received_ns = monotonic_ns();
    let backend = prepared
        .finish(&commit, &mut fds, changed, &mut marks)
        .map_err(|reason| refuse(&sock, reason))?;
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
        socket_paths: commit.host.socket_paths.clone(),
        source: sock,
        stopped_at_ns: commit.stopped_at_ns,
        marks,
        realtime: Some(realtime),
    })
}

/// The component a destination runs when `--component` names none:
///
/// - the one the source runs, when that is not built into sandnic (it was
///   swapped in from a file) — its bytes came with the offer, and a
///   handover keeps the device logic an operator chose;
/// - otherwise this binary's builtin if it reads the source's state
///   version (an upgrade moves to the new binary's device logic);
/// - otherwise the oldest release built into this binary that reads it
///   (the source had been swapped to a newer release).
fn component_for(offer: &Offer, runtime: &Arc<Runtime>) -> Result<Arc<DeviceComponent>, String> {
    use crate::sandbox::components::RELEASED;
    use crate::sandbox::ComponentSource;
    let source = &offer.source_component;
    if !offer.component_wasm.is_empty() {
        let received = ComponentSource::Received {
            bytes: offer.component_wasm.as_slice().into(),
            origin: format!("{} {}", source.name, source.version),
        };
        return runtime
            .load(&received)
            .map_err(|e| format!("the source's component: {e:#}"));
    }
    let wanted = source.state_version;
    let candidates = std::iter::once(ComponentSource::Builtin)
        .chain(RELEASED.iter().map(ComponentSource::Released));
    for candidate in candidates {
        let component = runtime.load(&candidate).map_err(|e| format!("{e:#}"))?;
        let info = &component.info;
        if (info.oldest_state_version..=info.state_version).contains(&wanted) {
            return Ok(component);
        }
    }
    Err(format!(
        "no component built into this sandnic reads state version {wanted} (the source runs {} {}): \
         start the destination with --component naming one that does",
        source.name, source.version
    ))
}

/// Tells the source why, and ends the handover here.
fn refuse(sock: &UnixStream, reason: String) -> IncomingError {
    let _ = stream::send(
        sock,
        &Reply::Refused {
            reason: reason.clone(),
        },
    );
    IncomingError::Refused(reason)
}

/// The fds a manifest announces, by role.
fn receive_fds(
    sock: &UnixStream,
    roles: &[FdRole],
) -> Result<HashMap<FdRole, OwnedFd>, IncomingError> {
    let received = stream::recv_fds(sock, roles.len(), FRAME_TIMEOUT)?;
    Ok(roles.iter().copied().zip(received).collect())
}

/// What the destination built from the offer, before the pause.
enum Prepared {
    /// The whole device on the TAP queues the source passed.
    Device(Box<NetBackend>),
    /// `--new-tap`, or a source that sent no TAP fds: the TAP is opened by
    /// name inside the pause (opened earlier, its new queues would take
    /// frames from the source's), so only the device model is ready.
    Model {
        device: Box<SandboxedDevice>,
        options: DatapathOptions,
    },
}

impl Prepared {
    fn build(
        offer: &Offer,
        fds: &mut HashMap<FdRole, OwnedFd>,
        runtime: Arc<Runtime>,
        component: Arc<DeviceComponent>,
        new_tap: bool,
        options: DatapathOptions,
    ) -> Result<Self, String> {
        let host = &offer.host;
        let device = SandboxedDevice::new(runtime, component, host.config.clone())
            .map_err(|e| format!("{e:#}"))?;
        let tap_fds: Vec<OwnedFd> = (0..host.tap.queues)
            .filter_map(|q| fds.remove(&FdRole::TapQueue(q)))
            .collect();
        if new_tap || tap_fds.is_empty() {
            return Ok(Self::Model {
                device: Box::new(device),
                options,
            });
        }
        let tap = checked_tap(Tap::adopt(tap_fds), host)?;
        let backend =
            NetBackend::prepare(device, tap, host, fds, options).map_err(|e| format!("{e:#}"))?;
        Ok(Self::Device(Box::new(backend)))
    }

    /// Applies the commit: the device state loaded into the component, the
    /// new fd set if the source's changed, every ring's position.
    fn finish(
        self,
        commit: &Commit,
        fds: &mut HashMap<FdRole, OwnedFd>,
        changed: bool,
        marks: &mut DestinationMarks,
    ) -> Result<NetBackend, String> {
        let host = &commit.host;
        let load = |device: &mut SandboxedDevice| {
            device
                .load(&commit.device_state)
                .map_err(|e| format!("device state: {e}"))
        };
        match self {
            Self::Device(mut backend) => {
                let effects = load(backend.device_mut())?;
                marks.loaded_ns = monotonic_ns();
                if changed {
                    backend.adopt_fds(host, fds).map_err(|e| format!("{e:#}"))?;
                }
                backend.adopt_stopped_state(host, effects);
                Ok(*backend)
            }
            Self::Model {
                mut device,
                options,
            } => {
                let effects = load(&mut device)?;
                marks.loaded_ns = monotonic_ns();
                let tap = checked_tap(
                    Tap::open(&host.tap.name, usize::from(host.tap.queues)),
                    host,
                )?;
                let mut backend =
                    NetBackend::new(*device, tap, options).map_err(|e| format!("{e:#}"))?;
                backend.adopt_fds(host, fds).map_err(|e| format!("{e:#}"))?;
                backend.adopt_stopped_state(host, effects);
                Ok(backend)
            }
        }
    }
}

/// The TAP, if it has a queue for every pair the device may use.
fn checked_tap(
    tap: Result<Tap, crate::tap::TapError>,
    host: &HostState,
) -> Result<Arc<Tap>, String> {
    let tap = tap.map_err(|e| format!("TAP: {e}"))?;
    if tap.queue_count() < usize::from(host.config.max_queue_pairs) {
        return Err(format!(
            "{} TAP queues for {} pairs",
            tap.queue_count(),
            host.config.max_queue_pairs
        ));
    }
    Ok(Arc::new(tap))
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
        self.realtime = None;
        info!(
            downtime_us = at_ns.saturating_sub(self.stopped_at_ns) / 1000,
            "took over the device"
        );
    }
}
