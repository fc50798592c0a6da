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

/// Names a frontend connection for as long as the process lives (never
/// reused, so a late event for a gone connection cannot reach a new one).
pub type SessionId = u64;

/// What one frontend connection has set up.
pub struct Session {
    pub id: SessionId,
    /// A frontend is connected to this session (the first session exists
    /// before any frontend does).
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
}

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
        }
    }

    /// Some ring of this session runs: it drives the device.
    pub fn drives(&self) -> bool {
        self.vrings.iter().any(|v| v.running)
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
}
