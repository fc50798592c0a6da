//! Frontend sessions. Each vhost-user connection has its own session: what
//! that frontend negotiated and set up (protocol state, ring setup with its
//! call/err fds, memory table, backend channel, dirty log).
//!
//! Two sessions may exist at once: during a local migration a second VMM
//! (QEMU's `-incoming` instance) connects to the same sandnic while the
//! first still runs the guest. The device, the datapath and the TAP are
//! shared; the session whose rings run *drives* the device. A session may
//! start rings only while the other drives nothing — after it stopped its
//! rings (GET_VRING_BASE) or left — so the TAP is never served for two
//! guests at once, and a standby that tries earlier is refused without
//! touching the driving session.

use crate::datapath::vring::VringSetup;
use crate::memory::dirty_log::DirtyLog;
use crate::memory::guest_memory::GuestMemory;
use crate::vhost_user::{ProtocolState, F_LOG_ALL};
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::vhost_user::connection::SessionId;

/// What one frontend connection has set up.
pub struct Session {
    pub id: SessionId,
    /// A frontend is connected to this session (a handover's destination
    /// fills its session before it serves the connection that came along).
    pub connected: bool,
    pub proto: ProtocolState,
    /// One per virtqueue: `2 * max_queue_pairs` data queues and the
    /// control queue.
    pub vrings: Vec<VringSetup>,
    pub memory: Option<Arc<GuestMemory>>,
    pub backend_channel: Option<OwnedFd>,
    /// SET_LOG_BASE: the dirty-page log, used while LOG_ALL is acked.
    pub log: Option<Arc<DirtyLog>>,
    /// SET_LOG_FD: kept for the frontend's sake; QEMU does not send it.
    pub log_call: Option<OwnedFd>,
    /// When the frontend first set the features: a frontend that starts
    /// its device does so then (QEMU at the driver's DRIVER_OK), and
    /// should give a memory table and start rings right after.
    pub features_set_at: Option<Instant>,
    /// A ring of this session ran at some point.
    pub ever_ran: bool,
    /// Why this session looks stuck, once `SETUP_GRACE` passed without a
    /// running ring (logged once, shown in `status`).
    pub stalled: Option<String>,
}

/// The sessions of the frontends connected (at most two: a running VMM
/// and, during a local migration, its successor), by id. Every operation
/// on a session names it; none is "current".
#[derive(Default)]
pub struct Sessions {
    list: Vec<Session>,
    next_id: SessionId,
}

impl Sessions {
    pub fn get(&self, id: SessionId) -> Option<&Session> {
        self.list.iter().find(|s| s.id == id)
    }

    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.list.iter_mut().find(|s| s.id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.list.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.list.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The session that drives the device (some ring of it runs), if any.
    pub fn driving(&self) -> Option<&Session> {
        self.list.iter().find(|s| s.drives())
    }

    /// A session other than `id` drives the device.
    pub fn other_drives(&self, id: SessionId) -> bool {
        self.list.iter().any(|s| s.id != id && s.drives())
    }

    /// A new session with `queues` rings, not connected yet.
    pub fn open(&mut self, queues: usize) -> SessionId {
        let id = self.next_id;
        self.next_id += 1;
        self.list.push(Session::new(id, queues));
        id
    }

    pub fn remove(&mut self, id: SessionId) -> Option<Session> {
        let at = self.list.iter().position(|s| s.id == id)?;
        Some(self.list.remove(at))
    }
}

/// How long a frontend may take from setting the features to running a
/// ring before sandnic says what is missing. QEMU whose guest RAM is not
/// shared never sends a memory table: it falls back to its own datapath,
/// and without this the device would just stay silent.
pub const SETUP_GRACE: Duration = Duration::from_secs(3);

impl Session {
    pub fn new(id: SessionId, queues: usize) -> Self {
        Self {
            id,
            connected: false,
            proto: ProtocolState::default(),
            vrings: (0..queues).map(|_| VringSetup::default()).collect(),
            memory: None,
            backend_channel: None,
            log: None,
            log_call: None,
            features_set_at: None,
            ever_ran: false,
            stalled: None,
        }
    }

    /// When this session's setup is due to be judged (`stalled_setup`),
    /// if it still is to be.
    pub fn setup_deadline(&self) -> Option<Instant> {
        if !self.connected || self.ever_ran || self.stalled.is_some() {
            return None;
        }
        Some(self.features_set_at? + SETUP_GRACE)
    }

    /// What is missing, if the setup is overdue at `now`.
    pub fn stalled_setup(&self, now: Instant) -> Option<String> {
        if self.setup_deadline()? > now {
            return None;
        }
        Some(if self.memory.is_none() {
            "the frontend set the features but sent no memory table: it cannot share guest \
             memory. QEMU needs its guest RAM in a shared memory backend \
             (-object memory-backend-memfd,id=mem,size=RAM,share=on -numa node,memdev=mem) \
             and otherwise falls back to its own datapath (\"falling back on userspace virtio\")"
                .to_string()
        } else {
            "the frontend sent a memory table but started no ring (no kick fd, addresses or \
             enable yet)"
                .to_string()
        })
    }

    /// Some ring of this session runs: it drives the device.
    pub fn drives(&self) -> bool {
        self.vrings.iter().any(|v| v.running)
    }

    /// Ring `index` is fully set up and enabled: it should run (if no
    /// other session drives the device).
    pub fn wants_running(&self, index: usize) -> bool {
        self.vrings.get(index).is_some_and(|v| {
            v.started && v.enabled && v.num > 0 && v.addrs.is_some() && v.kick.is_some()
        }) && self.memory.is_some()
    }

    /// The log to mark while this session drives: only while the frontend
    /// has LOG_ALL acked and gave a log base.
    pub fn dirty_log(&self) -> Option<&Arc<DirtyLog>> {
        let logging = self
            .proto
            .acked_features
            .is_some_and(|f| f & F_LOG_ALL != 0);
        self.log.as_ref().filter(|_| logging)
    }

    pub fn report(&self) -> SessionReport {
        SessionReport {
            id: self.id,
            connected: self.connected,
            drives: self.drives(),
            acked_features: self.proto.acked_features,
            protocol_features: self.proto.protocol_features,
            logging: self.dirty_log().is_some(),
            log_size: self.log.as_ref().map(|l| l.size()),
            rings_running: self.vrings.iter().filter(|v| v.running).count(),
            rings_started: self.vrings.iter().filter(|v| v.started).count(),
            stalled: self.stalled.clone(),
        }
    }
}

/// A session as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub id: SessionId,
    pub connected: bool,
    pub drives: bool,
    pub acked_features: Option<u64>,
    pub protocol_features: u64,
    pub logging: bool,
    pub log_size: Option<u64>,
    pub rings_running: usize,
    pub rings_started: usize,
    /// Why the session looks stuck (see `SETUP_GRACE`).
    pub stalled: Option<String>,
}
