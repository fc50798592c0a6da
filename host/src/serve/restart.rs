//! Picking the device up after the process that served it died: the
//! service manager restarted sandnic with the fds the dead process had put
//! in its store (`daemon::fd_store`), the state record among them.
//!
//! The frontend's connection never closed (the store held it), so the
//! frontend sees nothing: no reconnect, no link change. The device is
//! rebuilt as a handover's destination builds it (`destination::rebuild`),
//! and every ring goes on from the used index in guest memory
//! (`NetBackend::rebase_on_used_index`).
//!
//! When the device cannot be picked up whole — no readable record, an fd
//! it names missing (the store was too small, or the manager dropped it),
//! a record that does not validate, the dead process in the middle of a
//! frontend message (a reply may be owed, or half a message read), or a
//! device that died too often in a row — nothing of it is served: every
//! stored fd is taken out of the store and closed, so the frontend sees its
//! connection close and its own reconnect applies, and sandnic starts
//! afresh from its flags. A connection is never served "fresh" by a process
//! that does not know its setup.

use super::setup::{Serving, SocketFiles};
use super::ServeOptions;
use crate::backend::handover::FdRole;
use crate::daemon::fd_store::{FdStore, RECORD_PREFIX};
use crate::daemon::notify::Notifier;
use crate::daemon::record::{Record, RecordFile};
use crate::handover::destination;
use crate::sandbox::{DeviceComponent, Runtime};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{error, info, warn};

/// A device that died this often within `RESTART_WINDOW` is not picked up
/// again: whatever kills it (a frontend message, a guest's control
/// command) would kill the next process too, and the manager's own start
/// limit would end the service with the guest's connection stuck open. A
/// loop like that dies within moments of each pick-up; the window is
/// systemd's default start-limit interval, and the count stays below its
/// default burst (5 starts: the fifth, after three pick-ups, gives up), so
/// sandnic gives up first and closes the connection itself.
const MAX_RESTARTS: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// Why a stored device is not picked up.
#[derive(Debug, thiserror::Error)]
pub enum NotPickedUp {
    #[error("no state record among the stored fds")]
    NoRecord,
    #[error(transparent)]
    Record(#[from] crate::daemon::record::RecordError),
    #[error("the process died while handling a frontend message (a reply may be owed, or a message half read) or during a VM migration (the record holds neither the second frontend nor the dirty log)")]
    RecordBehind,
    #[error("the device was restarted {0} times within {RESTART_WINDOW:?}")]
    TooManyRestarts(usize),
    #[error("the record names {0:?}, which the store did not return")]
    Missing(String),
    #[error("rebuilding the device: {0}")]
    Rebuild(#[from] destination::Refusal),
}

/// What `pick_up` found: the device whole, with the store taken over; or
/// nothing (the store emptied), to start afresh.
#[allow(clippy::large_enum_variant)]
pub enum PickedUp {
    Device(Serving, FdStore),
    Nothing,
}

/// Picks up the device whose fds the service manager passed (`stored`).
pub fn pick_up(
    opts: &ServeOptions,
    runtime: Arc<Runtime>,
    component: Option<Arc<DeviceComponent>>,
    stored: Vec<(String, OwnedFd)>,
    notifier: &Arc<Notifier>,
    limit: usize,
) -> PickedUp {
    let names: Vec<String> = stored.iter().map(|(n, _)| n.clone()).collect();
    match rebuild(opts, runtime, component, stored, notifier, limit) {
        Ok((serving, store)) => {
            info!(fds = names.len(), "picked the device up from the service manager's fd store: the frontend's connection never closed");
            PickedUp::Device(serving, store)
        }
        Err(why) => {
            error!("not picking the stored device up: {why}; closing its connection (the frontend's reconnect applies) and starting afresh");
            for name in &names {
                let _ = notifier.remove_fds(name);
            }
            wait_for_release(opts);
            PickedUp::Nothing
        }
    }
}

/// The manager closes what it removes from its store when it reads the
/// message, not before: a fresh start right away would find the TAP's
/// queues still held (and refuse it) or the socket still listening. Waits
/// until neither is, for a second at most.
fn wait_for_release(opts: &ServeOptions) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let tap_held = || match &opts.tap {
        Some(super::TapSource::Name(name)) => {
            crate::tap::Tap::queues_open(name).is_some_and(|q| q.any())
        }
        _ => false,
    };
    let socket_held = || {
        opts.socket
            .as_ref()
            .is_some_and(|path| UnixStream::connect(path).is_ok())
    };
    while (tap_held() || socket_held()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rebuild(
    opts: &ServeOptions,
    runtime: Arc<Runtime>,
    component: Option<Arc<DeviceComponent>>,
    mut stored: Vec<(String, OwnedFd)>,
    notifier: &Arc<Notifier>,
    limit: usize,
) -> Result<(Serving, FdStore), NotPickedUp> {
    let (file, record_name, mut record) = newest_record(&mut stored)?;
    if file.was_busy() {
        return Err(NotPickedUp::RecordBehind);
    }
    file.set_busy(false);
    let now = now_ms();
    let window = RESTART_WINDOW.as_millis() as u64;
    record
        .restarts
        .retain(|&at| now.saturating_sub(at) < window);
    if record.restarts.len() >= MAX_RESTARTS {
        return Err(NotPickedUp::TooManyRestarts(record.restarts.len()));
    }
    record.restarts.push(now);
    let mut fds = fds_by_role(&record, &stored)?;
    let mut backend = destination::rebuild(
        &record.offer,
        &record.device_state,
        &mut fds,
        runtime,
        component,
        opts.datapath,
    )?;
    backend.rebase_on_used_index();
    backend.resume_datapath();
    let host = &record.offer.host;
    let serving = Serving {
        backend,
        connection: fds.remove(&FdRole::Connection).map(UnixStream::from),
        listener: fds.remove(&FdRole::Listener).map(UnixListener::from),
        api_listener: fds.remove(&FdRole::ApiListener).map(UnixListener::from),
        connect: host.connect.clone(),
        socket_files: SocketFiles(host.socket_paths.clone()),
    };
    let store = FdStore::adopt(
        notifier.clone(),
        limit,
        (file, record_name),
        stored,
        record.restarts.clone(),
    );
    Ok((serving, store))
}

/// The record with the newest generation among the stored ones (a
/// handover that died half way may leave two), taken out of `stored`;
/// any other record is left in `stored`, to be removed as unclaimed.
fn newest_record(
    stored: &mut Vec<(String, OwnedFd)>,
) -> Result<(RecordFile, String, Record), NotPickedUp> {
    let mut best: Option<(RecordFile, String, Record)> = None;
    let mut last_error = None;
    let mut i = 0;
    while i < stored.len() {
        if !stored[i].0.starts_with(RECORD_PREFIX) {
            i += 1;
            continue;
        }
        let copy = match stored[i].1.try_clone() {
            Ok(copy) => copy,
            Err(e) => {
                last_error = Some(NotPickedUp::Record(e.into()));
                i += 1;
                continue;
            }
        };
        match RecordFile::open(copy) {
            Ok((file, record)) => {
                if best
                    .as_ref()
                    .is_none_or(|(f, _, _)| file.generation() > f.generation())
                {
                    best = Some((file, stored[i].0.clone(), record));
                }
            }
            Err(e) => {
                warn!(name = %stored[i].0, "a stored state record does not read: {e}");
                last_error = Some(e.into());
            }
        }
        i += 1;
    }
    let best = best.ok_or(last_error.unwrap_or(NotPickedUp::NoRecord))?;
    stored.retain(|(name, _)| *name != best.1);
    Ok(best)
}

/// Each role's fd, by the name the record gives it (a copy: a name may
/// serve two roles, and the store keeps the original for `FdStore`).
fn fds_by_role(
    record: &Record,
    stored: &[(String, OwnedFd)],
) -> Result<HashMap<FdRole, OwnedFd>, NotPickedUp> {
    let mut fds = HashMap::new();
    for (role, name) in &record.names {
        let fd = stored
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, fd)| fd.try_clone().ok())
            .ok_or_else(|| NotPickedUp::Missing(name.clone()))?;
        fds.insert(*role, fd);
    }
    Ok(fds)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
