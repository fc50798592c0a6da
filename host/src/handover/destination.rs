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
    /// Client mode: the frontend's socket to dial.
    pub connect: Option<PathBuf>,
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
    /// The socket to wait on could not be bound.
    #[error("waiting for the source: {0}")]
    Bind(#[from] crate::unix_socket::BindError),
    #[error("waiting for the source on {path}: {error}")]
    Listen {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Refused (and told the source why).
    #[error("refused the handover: {0}")]
    Refused(#[from] Refusal),
}

/// Why a destination refuses a device; the source is told, keeps running,
/// and reports `kind`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The source runs as another user.
    #[error("the source: {0}")]
    Peer(#[from] crate::hardening::peer::PeerError),
    /// The offer or commit does not describe a device this build can run.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// No component reads the source's device state.
    #[error("no component built into this sandnic reads state version {wanted} (the source runs {source_name} {source_version}): start the destination with --component naming one that does")]
    NoComponent {
        wanted: u32,
        source_name: String,
        source_version: String,
    },
    /// A component (the source's, or one built in) did not load.
    #[error("the component: {0:#}")]
    Component(anyhow::Error),
    /// The device model refused or failed on the source's state.
    #[error("device state: {0}")]
    DeviceState(crate::sandbox::DeviceError),
    /// The TAP the device uses could not be taken or has too few queues.
    #[error("TAP: {0}")]
    Tap(#[from] crate::tap::TapError),
    #[error("{queues} TAP queues for {pairs} pairs")]
    TapQueues { queues: usize, pairs: u16 },
    /// The device could not be built from what came (memory, rings, fds).
    #[error("{0:#}")]
    Build(anyhow::Error),
}

impl Refusal {
    /// A stable name for the reason, sent to the source with it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Peer(_) => "peer_not_allowed",
            Self::State(_) => "invalid_offer",
            Self::NoComponent { .. } => "no_component",
            Self::Component(_) => "component_failed",
            Self::DeviceState(_) => "device_state_refused",
            Self::Tap(_) | Self::TapQueues { .. } => "tap_unusable",
            Self::Build(_) => "device_not_built",
        }
    }
}

/// Binds the socket a source will hand its device to (owner only: the
/// user this process will run as).
pub fn listen(
    path: &Path,
    owner: Option<crate::hardening::privileges::Target>,
) -> Result<UnixListener, IncomingError> {
    Ok(crate::unix_socket::bind_private(path, owner)?)
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
    let listen_error = |error: std::io::Error| IncomingError::Listen {
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
            Err(e) => break Err(listen_error(e.into())),
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
                .map_err(listen_error);
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
    crate::hardening::peer::same_user(&sock).map_err(Refusal::Peer)?;
    let offer: Offer = stream::recv(&sock, FRAME_TIMEOUT)?;
    if let Err(reason) = state::validate(&offer, new_tap) {
        return Err(refuse(&sock, reason.into()));
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
        return Err(refuse(&sock, reason.into()));
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
        connect: commit.host.connect.clone(),
        source: sock,
        stopped_at_ns: commit.stopped_at_ns,
        marks,
        realtime: Some(realtime),
    })
}

/// Rebuilds a device from what a process that died left in the service
/// manager's store (`serve::restart`): the same steps as a handover's
/// destination, with the offer and the device state from the state record
/// and the fds from the store. The rings keep the positions of the offer,
/// which the caller moves to where the guest's memory says.
pub fn rebuild(
    offer: &Offer,
    device_state: &[u8],
    fds: &mut HashMap<FdRole, OwnedFd>,
    runtime: Arc<Runtime>,
    component: Option<Arc<DeviceComponent>>,
    options: DatapathOptions,
) -> Result<NetBackend, Refusal> {
    state::validate(offer, false)?;
    let component = match component {
        Some(component) => component,
        None => component_for(offer, &runtime)?,
    };
    let prepared = Prepared::build(offer, fds, runtime, component, false, options)?;
    let commit = Commit {
        stopped_at_ns: 0,
        host: offer.host.clone(),
        device_state: device_state.to_vec(),
        fds: Vec::new(),
    };
    prepared.finish(&commit, fds, false, &mut DestinationMarks::default())
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
fn component_for(offer: &Offer, runtime: &Arc<Runtime>) -> Result<Arc<DeviceComponent>, Refusal> {
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
            .map_err(|e| Refusal::Component(e.context("the source's component")));
    }
    let wanted = source.state_version;
    let candidates = std::iter::once(ComponentSource::Builtin)
        .chain(RELEASED.iter().map(ComponentSource::Released));
    for candidate in candidates {
        let component = runtime.load(&candidate).map_err(Refusal::Component)?;
        let info = &component.info;
        if (info.oldest_state_version..=info.state_version).contains(&wanted) {
            return Ok(component);
        }
    }
    Err(Refusal::NoComponent {
        wanted,
        source_name: source.name.clone(),
        source_version: source.version.clone(),
    })
}

/// Tells the source why, and ends the handover here.
fn refuse(sock: &UnixStream, reason: Refusal) -> IncomingError {
    let _ = stream::send(
        sock,
        &Reply::Refused {
            reason: reason.to_string(),
            kind: reason.kind().into(),
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
    ) -> Result<Self, Refusal> {
        let host = &offer.host;
        let device = SandboxedDevice::new(runtime, component, host.config.clone())
            .map_err(Refusal::Component)?;
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
            NetBackend::prepare(device, tap, host, fds, options).map_err(Refusal::Build)?;
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
    ) -> Result<NetBackend, Refusal> {
        let host = &commit.host;
        let load = |device: &mut SandboxedDevice| {
            device
                .load(&commit.device_state)
                .map_err(Refusal::DeviceState)
        };
        match self {
            Self::Device(mut backend) => {
                let effects = load(backend.device_mut())?;
                marks.loaded_ns = monotonic_ns();
                if changed {
                    backend.adopt_fds(host, fds).map_err(Refusal::Build)?;
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
                let mut backend = NetBackend::new(*device, tap, options).map_err(Refusal::Build)?;
                backend.adopt_fds(host, fds).map_err(Refusal::Build)?;
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
) -> Result<Arc<Tap>, Refusal> {
    let tap = tap?;
    if tap.queue_count() < usize::from(host.config.max_queue_pairs) {
        return Err(Refusal::TapQueues {
            queues: tap.queue_count(),
            pairs: host.config.max_queue_pairs,
        });
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
