//! `sandnic serve`: set the device up (`setup.rs`: a fresh one on a TAP,
//! or one a running sandnic hands over with `--incoming`), confine every
//! thread, and run the reactor (`reactor.rs`) until a signal or a handover
//! (`handover_driver.rs`) ends it.

mod dialer;
mod handover_driver;
mod reactor;
mod restart;
mod setup;

use crate::daemon::fd_store::{self, FdStore};
use crate::daemon::notify::Notifier;
use crate::datapath::rate_limit::LimitSpecs;
use crate::datapath::DatapathOptions;
use crate::hardening::allowlists::Role;
use crate::hardening::privileges::{self, Target};
use crate::hardening::seccomp::{self, Mode};
use crate::sandbox::{ComponentSource, Runtime};
use reactor::{Exit, Server};
use sandnic_device::Mac;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::info;

#[derive(Debug, Clone)]
pub enum TapSource {
    Name(String),
    Fds(Vec<RawFd>),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The vhost-user socket (not with `incoming`: it comes with the device).
    pub socket: Option<PathBuf>,
    /// Client mode: dial the frontend listening here instead (`dialer.rs`).
    pub connect: Option<PathBuf>,
    /// Inherited listening sockets (`--socket-fd`, `--api-fd`); systemd's
    /// socket activation needs no option.
    pub socket_fd: Option<RawFd>,
    pub api_fd: Option<RawFd>,
    pub tap: Option<TapSource>,
    /// None: derived from the machine and the TAP name (`default_mac`).
    pub mac: Option<Mac>,
    pub queues: u16,
    pub mtu: Option<u16>,
    /// None: the builtin one (a fresh device), or what the source's state
    /// needs (a handover destination: `destination::component_for`).
    pub component: Option<ComponentSource>,
    pub api: Option<PathBuf>,
    /// Wait here for a running sandnic to hand its device over.
    pub incoming: Option<PathBuf>,
    /// Incoming: open the TAP by name instead of taking the source's fds.
    pub new_tap: bool,
    pub datapath: DatapathOptions,
    /// Become this user once everything that needs root is open.
    pub user: Option<Target>,
    /// `FileDescriptorStoreMax=` for a systemd that does not pass it in
    /// `$FDSTORE` (before 254): keep the device's fds in the service
    /// manager's store (`daemon::fd_store`).
    pub fd_store: Option<usize>,
    pub seccomp: Mode,
    /// `--tx-limit`/`--rx-limit` for a device set up here (a handover or a
    /// restart keeps the limits the device had).
    pub limits: LimitSpecs,
}

/// Why `serve` stopped: a usage problem (exit 2) or a runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    let usage = |e: String| ServeError::Usage(e);
    seccomp::install_violation_reporter();
    let notifier = Notifier::from_env()
        .map_err(|e| usage(e.to_string()))?
        .map(Arc::new);
    let store_limit = fd_store::limit_from_env(opts.fd_store);
    if store_limit > 0 && notifier.is_none() {
        tracing::warn!("--fd-store (or $FDSTORE) without a service manager's NOTIFY_SOCKET: nothing is stored, and a crash closes the frontend's connection");
    }
    let signals = setup::block_signals().map_err(ServeError::Runtime)?;
    let runtime = Runtime::with_defaults_for(opts.user.map(|t| (t.uid, t.gid)))
        .map_err(ServeError::Runtime)?;
    let component = match &opts.component {
        Some(source) => Some(runtime.load(source).map_err(|e| usage(format!("{e:#}")))?),
        None => None,
    };
    let mut store = None;
    let serving = match &opts.incoming {
        Some(path) => match setup::incoming(
            &opts,
            path,
            runtime.clone(),
            component,
            &signals,
            notifier.as_deref(),
        )? {
            Some(serving) => serving,
            None => {
                info!("signal received while waiting for a handover; exiting");
                return Ok(());
            }
        },
        None => {
            let mut inherited = setup::inherited(&opts)?;
            let stored = std::mem::take(&mut inherited.stored);
            let picked_up = match &notifier {
                Some(notifier) if !stored.is_empty() => restart::pick_up(
                    &opts,
                    runtime.clone(),
                    component.clone(),
                    stored,
                    notifier,
                    store_limit,
                ),
                _ => restart::PickedUp::Nothing,
            };
            let serving = match picked_up {
                restart::PickedUp::Device(serving, adopted) => {
                    store = Some(adopted);
                    serving
                }
                restart::PickedUp::Nothing => {
                    let component = match component {
                        Some(component) => component,
                        None => runtime
                            .load(&ComponentSource::Builtin)
                            .map_err(ServeError::Runtime)?,
                    };
                    setup::fresh(&opts, runtime.clone(), component, inherited)?
                }
            };
            drop_privileges(&opts)?;
            serving
        }
    };
    if let (None, Some(notifier), true) = (&store, &notifier, store_limit > 0) {
        store = Some(
            FdStore::create(notifier.clone(), store_limit)
                .map_err(|e| ServeError::Runtime(e.into()))?,
        );
    }
    let mut server = Server::new(serving, runtime, signals, store);
    confine(&opts, &server).map_err(ServeError::Runtime)?;
    // The store and its record hold this process's device (and, after a
    // pick-up, count it) before the manager hears it is ready.
    server.sync_store();
    if let Some(notifier) = &notifier {
        notifier.ready();
    }
    match server.run().map_err(ServeError::Runtime)? {
        Exit::Signal => {
            if let Some(notifier) = &notifier {
                notifier.stopping();
            }
            let rings = server.stop_for_exit();
            server.empty_store();
            info!(rings, "rings stopped, used entries published; exiting");
            Ok(())
        }
        Exit::HandedOver => {
            // The destination owns the sockets (and their files) now, and
            // stores the device's fds itself.
            server.forget_socket_files();
            server.empty_store();
            Ok(())
        }
    }
}

/// Gives up root if `--user` asks for it (before any filter goes on), and
/// forbids new privileges either way.
fn drop_privileges(opts: &ServeOptions) -> Result<(), ServeError> {
    // Still root: keep the handover's pause at real-time priority possible.
    crate::handover::priority::allow_after_drop();
    let result = match opts.user {
        Some(target) => privileges::drop_to(target).map(|()| {
            info!(
                uid = target.uid.as_raw(),
                gid = target.gid.as_raw(),
                "dropped privileges"
            );
        }),
        None => privileges::forbid_new_privileges(),
    };
    result.map_err(|e| ServeError::Runtime(e.into()))
}

/// Puts each thread's seccomp filter on: the datapath threads', then this
/// (the control) thread's.
fn confine(opts: &ServeOptions, server: &Server) -> anyhow::Result<()> {
    let datapath = seccomp::filter(Role::Datapath, opts.seccomp)?;
    let control = seccomp::filter(Role::Control, opts.seccomp)?;
    if let (Some(datapath), Some(control)) = (datapath, control) {
        server.datapath().confine(Arc::new(datapath))?;
        seccomp::apply(Role::Control, &control)?;
        info!(mode = ?opts.seccomp, "seccomp filters on every thread");
    }
    Ok(())
}
