//! `NetBackend`: one virtio-net device behind one vhost-user connection.
//! It answers frontend requests (`requests.rs`), starts and stops rings
//! (`rings.rs`), runs the control queue through the device model
//! (`ctrl_queue.rs`) and applies the model's validated effects to the TAP
//! and the datapath (`effects.rs`).

mod ctrl_queue;
mod effects;
pub mod handover;
pub use handover::MigrationUnderWay;
mod migration;
mod refusal;
pub use refusal::Refusal;
mod requests;
mod rings;
mod session;

use crate::datapath::vring::Vring;
use crate::datapath::{Datapath, DatapathOptions, Settings};
use crate::memory::guest_memory::GuestMemory;
use crate::sandbox::{DeviceComponent, SandboxedDevice, SwapError, SwapReport};
use crate::tap::Tap;
use crate::vhost_user::ProtocolState;
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// The answer to a frontend's request, with the backend's reasons.
pub type Outcome = crate::vhost_user::connection::Outcome<Refusal>;
pub use session::{Session, SessionId, SessionReport, Sessions};

/// Things that went wrong on the control path, counted for `stats`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ControlCounters {
    pub requests: u64,
    pub bad_requests: u64,
    pub unsupported_requests: u64,
    pub ctrl_commands: u64,
    pub ctrl_errors: u64,
    pub ctrl_bad_chains: u64,
    pub config_notifications: u64,
    pub disconnects: u64,
    /// Frontend connections accepted on the listening socket. A connection
    /// that came with a handover is not one: over a run of handovers, the
    /// sum over the processes counts the frontend's (re)connections.
    pub frontends_accepted: u64,
    pub sandbox_failures: u64,
    /// Requests of a standby session refused because the other session
    /// drives the device.
    pub standby_refusals: u64,
    /// SET_LOG_BASE that could not be honoured (the connection is closed so
    /// the migration fails instead of completing with pages unlogged).
    pub log_failures: u64,
    /// RARP announcements sent out of the TAP (SEND_RARP).
    pub rarps_sent: u64,
    /// TAP ioctls that failed (the device then needs a reset).
    pub tap_errors: u64,
}

pub struct NetBackend {
    device: SandboxedDevice,
    datapath: Datapath,
    /// The frontends' sessions, by id.
    sessions: Sessions,
    /// The memory the datapath's pairs work on (the driving session's).
    installed_memory: Option<Arc<GuestMemory>>,
    /// The control queue, served on the control thread.
    ctrl: Option<Vring>,
    settings: Settings,
    /// Device features offered (cached: asked once per component).
    offered: u64,
    /// Queue pairs the datapath serves (see `sync_active_pairs`).
    active_pairs: u16,
    /// Queue pairs the device model enabled (VQ_PAIRS_SET through a
    /// control queue the frontend forwards).
    model_pairs: u16,
    /// Bumped by anything that may change what a handover carries as fds:
    /// every vhost-user request, a frontend connecting or leaving. A
    /// handover prepared before a change sends the whole set again.
    setup_changes: u64,
    pub counters: ControlCounters,
}

impl NetBackend {
    /// A fresh device: only pair 0's TAP queue stays attached until the
    /// device model enables more.
    pub fn new(
        device: SandboxedDevice,
        tap: Arc<Tap>,
        options: DatapathOptions,
    ) -> anyhow::Result<Self> {
        let backend = Self::with_datapath(device, tap, options)?;
        backend.datapath.set_active_pairs(1);
        Ok(backend)
    }

    /// The device with its datapath threads started (idle), leaving the
    /// TAP's queues as they are.
    fn with_datapath(
        device: SandboxedDevice,
        tap: Arc<Tap>,
        options: DatapathOptions,
    ) -> anyhow::Result<Self> {
        let mut device = device;
        let offered = device.device_features()?;
        let datapath = Datapath::start(tap, options)?;
        Ok(Self {
            device,
            datapath,
            sessions: Sessions::default(),
            installed_memory: None,
            ctrl: None,
            settings: Settings::default(),
            offered,
            active_pairs: 1,
            model_pairs: 1,
            setup_changes: 0,
            counters: ControlCounters::default(),
        })
    }

    /// Virtqueues: `2 * max_queue_pairs` data queues and the control queue.
    fn queue_count(device: &SandboxedDevice) -> usize {
        2 * usize::from(device.config().max_queue_pairs) + 1
    }

    /// See `setup_changes`: equal values mean the same fds.
    pub fn setup_changes(&self) -> u64 {
        self.setup_changes
    }

    pub fn device(&self) -> &SandboxedDevice {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut SandboxedDevice {
        &mut self.device
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// The protocol state of session `id` (for REPLY_ACK, `status`).
    pub fn protocol(&self, id: SessionId) -> Option<&ProtocolState> {
        self.sessions.get(id).map(|s| &s.proto)
    }

    /// Every connected session, the driving one first, then by id.
    pub fn session_reports(&self) -> Vec<SessionReport> {
        let mut reports: Vec<_> = self
            .sessions
            .iter()
            .filter(|s| s.connected)
            .map(Session::report)
            .collect();
        reports.sort_by_key(|r| (!r.drives, r.id));
        reports
    }

    /// The session that drives the device, if any.
    pub fn driving_session(&self) -> Option<&Session> {
        self.sessions.driving()
    }

    pub fn link_up(&self) -> bool {
        self.settings.link_up
    }

    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// The control queue's kick fd, for the control thread's poll set.
    pub fn ctrl_kick(&self) -> Option<Arc<OwnedFd>> {
        self.ctrl.as_ref().map(|ring| ring.kick.clone())
    }

    /// Hot-swaps the device component; the datapath keeps running.
    pub fn swap(&mut self, component: Arc<DeviceComponent>) -> Result<SwapReport, SwapError> {
        let report = self.device.swap(component)?;
        self.apply(report.effects.clone());
        if let Ok(offered) = self.device.device_features() {
            self.offered = offered;
        }
        Ok(report)
    }

    /// A frontend connected: it gets a session of its own (the one a
    /// handover's destination filled for it, if there is one), or `None`
    /// when two are connected already (a third has no role in a migration).
    pub fn connect(&mut self) -> Option<SessionId> {
        self.setup_changes += 1;
        if let Some(waiting) = self.sessions.iter_mut().find(|s| !s.connected) {
            waiting.connected = true;
            return Some(waiting.id);
        }
        if self.sessions.len() >= 2 {
            return None;
        }
        let id = self.sessions.open(Self::queue_count(&self.device));
        if let Some(session) = self.sessions.get_mut(id) {
            session.connected = true;
        }
        Some(id)
    }

    /// Says (once, at warn level, and in `status`) what each session whose
    /// setup is overdue lacks (`session::SETUP_GRACE`); returns when the
    /// next one falls due, if any is pending.
    pub fn check_setup(&mut self, now: std::time::Instant) -> Option<std::time::Instant> {
        let mut next = None;
        for session in self.sessions.iter_mut() {
            if let Some(why) = session.stalled_setup(now) {
                tracing::warn!(session = session.id, "{why}");
                session.stalled = Some(why);
            }
            next = match (next, session.setup_deadline()) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
        }
        next
    }

    /// Frontend `id` went away: stop its rings and forget its session. The
    /// device is reset only when no frontend is left, so a migration's
    /// other side keeps it as it is.
    pub fn disconnected(&mut self, id: SessionId) {
        self.setup_changes += 1;
        if self.sessions.get(id).is_none() {
            return;
        }
        self.counters.disconnects += 1;
        self.stop_all_rings(id);
        self.sessions.remove(id);
        if self.sessions.is_empty() {
            self.reset_device();
        }
    }

    /// No frontend left: no memory, the device reset so the next frontend
    /// starts clean.
    fn reset_device(&mut self) {
        self.datapath.set_memory(None);
        self.installed_memory = None;
        match self.device.reset() {
            Ok(effects) => self.apply(effects),
            Err(e) => tracing::warn!("device reset after disconnect: {e}"),
        }
    }
}
