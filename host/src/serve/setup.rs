//! Setting a device up for the reactor: a fresh one on a TAP, listening on
//! the vhost-user socket (its own or an inherited one), or the device a
//! running sandnic hands over (`--incoming`).

use super::{drop_privileges, ServeError, ServeOptions, TapSource};
use crate::backend::NetBackend;
use crate::daemon::inherited_sockets::{self, InheritedSockets};
use crate::handover::destination;
use crate::sandbox::{DeviceComponent, Runtime, SandboxedDevice};
use crate::tap::Tap;
use crate::unix_socket::{self, BindError};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use sandnic_device::{Compat, DeviceConfig};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::info;

/// What the reactor serves: the device and the sockets that reach it.
pub struct Serving {
    pub backend: NetBackend,
    pub listener: Option<UnixListener>,
    pub api_listener: Option<UnixListener>,
    /// The frontend's connection, when it came with a handover.
    pub connection: Option<UnixStream>,
    /// Client mode: where the frontend listens (sandnic dials it).
    pub connect: Option<PathBuf>,
    pub socket_files: SocketFiles,
}

/// Removes the listening sockets when serving ends, whatever the reason.
pub struct SocketFiles(pub Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The device a running sandnic hands over on `path` (`--incoming`), or
/// None if a signal came first.
pub fn incoming(
    opts: &ServeOptions,
    path: &Path,
    runtime: Arc<Runtime>,
    component: Option<Arc<DeviceComponent>>,
    signals: &SignalFd,
    notifier: Option<&crate::daemon::notify::Notifier>,
) -> Result<Option<Serving>, ServeError> {
    let runtime_error = |e: destination::IncomingError| ServeError::Runtime(e.into());
    let listener = destination::listen(path, opts.user).map_err(runtime_error)?;
    // The source's fds arrive after the drop: nothing here needs root, and
    // the source checks that we run as its user.
    drop_privileges(opts)?;
    let Some(source) =
        destination::wait_for_source(listener, path, signals).map_err(runtime_error)?
    else {
        return Ok(None);
    };
    let mut incoming =
        destination::receive(source, runtime, component, opts.new_tap, opts.datapath)
            .map_err(runtime_error)?;
    if let Some(notifier) = notifier {
        notifier.main_pid();
    }
    incoming.resume();
    Ok(Some(Serving {
        api_listener: incoming.api_listener.take(),
        listener: incoming.listener.take(),
        connection: incoming.connection.take(),
        connect: incoming.connect.take(),
        socket_files: SocketFiles(std::mem::take(&mut incoming.socket_paths)),
        backend: incoming.backend,
    }))
}

/// The sockets the process was started with (`--socket-fd`, `--api-fd`,
/// socket activation) and the fds of a stored device.
pub fn inherited(opts: &ServeOptions) -> Result<InheritedSockets, ServeError> {
    let claimed = match &opts.tap {
        Some(TapSource::Fds(fds)) => fds.as_slice(),
        _ => &[],
    };
    inherited_sockets::take(opts.socket_fd, opts.api_fd, claimed)
        .map_err(|e| ServeError::Usage(e.to_string()))
}

/// A new device on a TAP, listening on the vhost-user socket.
pub fn fresh(
    opts: &ServeOptions,
    runtime: Arc<Runtime>,
    component: Arc<DeviceComponent>,
    inherited: InheritedSockets,
) -> Result<Serving, ServeError> {
    let usage = |e: String| ServeError::Usage(e);
    let mut missing = Vec::new();
    if opts.tap.is_none() {
        missing.push("--tap NAME (or --tap-fd FD)");
    }
    let listens = inherited.vhost_user.is_some() || opts.socket.is_some();
    if listens && opts.connect.is_some() {
        return Err(usage(
            "--connect dials the frontend: it cannot be used with a vhost-user socket to listen on (--socket, --socket-fd or a socket-activated one)".into(),
        ));
    }
    if !listens && opts.connect.is_none() {
        missing.push("--socket PATH (or --socket-fd FD, a socket-activated vhost-user socket, or --connect PATH)");
    }
    if !missing.is_empty() {
        return Err(usage(format!(
            "serve needs {} (or --incoming PATH to take over a running device)",
            missing.join(" and ")
        )));
    }
    let tap = Arc::new(open_tap(opts)?);
    let config = DeviceConfig {
        mac: opts
            .mac
            .unwrap_or_else(|| crate::default_mac::for_tap(tap.name())),
        max_queue_pairs: opts.queues,
        mtu: opts.mtu,
        backend_offloads: tap.offload_caps(),
        compat: Compat::default(),
    };
    config.validate().map_err(usage)?;
    let mac = config.mac;
    let device =
        SandboxedDevice::new(runtime.clone(), component, config).map_err(ServeError::Runtime)?;
    let mut files = SocketFiles(Vec::new());
    let listener = inherited_or_bound(
        inherited.vhost_user,
        opts.socket.as_ref(),
        "--socket",
        unix_socket::bind_unix,
        &mut files,
    )
    .map_err(|e| usage(e.to_string()))?;
    let api_listener = inherited_or_bound(
        inherited.api,
        opts.api.as_ref(),
        "--api",
        |path| unix_socket::bind_private(path, opts.user),
        &mut files,
    )
    .map_err(|e| usage(e.to_string()))?;
    let backend =
        NetBackend::new(device, tap.clone(), opts.datapath).map_err(ServeError::Runtime)?;
    backend.datapath().set_limits(opts.limits);
    let socket_name = match (&opts.connect, &opts.socket, &listener) {
        (Some(path), _, _) => format!("dialling {}", path.display()),
        (None, Some(path), _) => path.display().to_string(),
        (None, None, Some(listener)) => listener_name(listener),
        (None, None, None) => unreachable!("checked above: a socket or --connect"),
    };
    info!(
        socket = %socket_name,
        tap = tap.name(),
        mac = %sandnic_device::format_mac(&mac),
        queues = opts.queues,
        offloads = ?tap.offload_caps(),
        component = %backend.device().info().version,
        tx_limit = ?opts.limits.tx.map(|s| s.to_string()),
        rx_limit = ?opts.limits.rx.map(|s| s.to_string()),
        "serving"
    );
    Ok(Serving {
        backend,
        listener,
        api_listener,
        connection: None,
        connect: opts.connect.clone(),
        socket_files: files,
    })
}

/// A listening socket: the inherited one, or one bound at `path` (its file
/// then sandnic's to remove); both is a usage error.
fn inherited_or_bound(
    inherited: Option<UnixListener>,
    path: Option<&PathBuf>,
    flag: &'static str,
    bind: impl FnOnce(&std::path::Path) -> Result<UnixListener, BindError>,
    files: &mut SocketFiles,
) -> Result<Option<UnixListener>, ListenError> {
    match (inherited, path) {
        (Some(_), Some(_)) => Err(ListenError::AlsoActivated(flag)),
        (Some(listener), None) => Ok(Some(listener)),
        (None, Some(path)) => {
            let listener = bind(path)?;
            files.0.push(path.clone());
            Ok(Some(listener))
        }
        (None, None) => Ok(None),
    }
}

#[derive(Debug, thiserror::Error)]
enum ListenError {
    /// The flag names a socket that socket activation brought as well.
    #[error("{0} given, but that socket is socket-activated")]
    AlsoActivated(&'static str),
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// Where a listener listens, for the log.
fn listener_name(listener: &UnixListener) -> String {
    match listener.local_addr() {
        Ok(addr) => match addr.as_pathname() {
            Some(path) => path.display().to_string(),
            None => format!("{addr:?}"),
        },
        Err(e) => format!("? ({e})"),
    }
}

fn open_tap(opts: &ServeOptions) -> Result<Tap, ServeError> {
    let tap = match opts
        .tap
        .as_ref()
        .ok_or_else(|| ServeError::Usage("no TAP".into()))?
    {
        TapSource::Name(name) => Tap::open_unused(name, usize::from(opts.queues)),
        TapSource::Fds(fds) => {
            // SAFETY: the fds were named on the command line as ours to
            // take over (inherited from the parent); each is adopted once.
            let owned = fds
                .iter()
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            Tap::adopt(owned)
        }
    }
    .map_err(|e| ServeError::Usage(e.to_string()))?;
    if tap.queue_count() < usize::from(opts.queues) {
        return Err(ServeError::Usage(format!(
            "{} TAP queues for {} queue pairs",
            tap.queue_count(),
            opts.queues
        )));
    }
    Ok(tap)
}

/// SIGINT/SIGTERM become readable events (blocked before any thread
/// starts, so every thread inherits the mask).
pub fn block_signals() -> anyhow::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}
