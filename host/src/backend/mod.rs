//! `NetBackend`: one virtio-net device behind one vhost-user connection.
//! It answers frontend requests (`requests.rs`), starts and stops rings
//! (`rings.rs`), runs the control queue through the device model
//! (`ctrl_queue.rs`) and applies the model's validated effects to the TAP
//! and the datapath (`effects.rs`).

mod ctrl_queue;
mod effects;
mod handover;
mod requests;
mod rings;

use crate::datapath::guest_memory::GuestMemory;
use crate::datapath::vring::{Vring, VringSetup};
use crate::datapath::{Datapath, Settings};
use crate::sandbox::{DeviceComponent, SandboxedDevice, SwapError, SwapReport};
use crate::tap::Tap;
use crate::vhost_user::ProtocolState;
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use requests::Outcome;

/// Things that went wrong on the control path, counted for `stats`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ControlCounters {
    pub requests: u64,
    pub bad_requests: u64,
    pub unsupported_requests: u64,
    pub ctrl_commands: u64,
    pub ctrl_errors: u64,
    pub ctrl_bad_chains: u64,
    pub config_notifications: u64,
    pub disconnects: u64,
    pub sandbox_failures: u64,
}

pub struct NetBackend {
    device: SandboxedDevice,
    datapath: Datapath,
    proto: ProtocolState,
    /// One per virtqueue: `2 * max_queue_pairs` data queues and the control
    /// queue.
    vrings: Vec<VringSetup>,
    memory: Option<Arc<GuestMemory>>,
    /// The control queue, served on the control thread.
    ctrl: Option<Vring>,
    backend_channel: Option<OwnedFd>,
    settings: Settings,
    /// Device features offered (cached: asked once per component).
    offered: u64,
    active_pairs: u16,
    pub counters: ControlCounters,
}

impl NetBackend {
    pub fn new(device: SandboxedDevice, tap: Arc<Tap>) -> anyhow::Result<Self> {
        let mut device = device;
        let offered = device.device_features()?;
        let queues = 2 * usize::from(device.config().max_queue_pairs) + 1;
        let datapath = Datapath::start(tap)?;
        Ok(Self {
            device,
            datapath,
            proto: ProtocolState::default(),
            vrings: (0..queues).map(|_| VringSetup::default()).collect(),
            memory: None,
            ctrl: None,
            backend_channel: None,
            settings: Settings::default(),
            offered,
            active_pairs: 1,
            counters: ControlCounters::default(),
        })
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

    pub fn protocol(&self) -> &ProtocolState {
        &self.proto
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

    /// The frontend went away: stop everything, forget the connection's
    /// state, and reset the device so the next frontend starts clean.
    pub fn disconnected(&mut self) {
        self.counters.disconnects += 1;
        for index in 0..self.vrings.len() {
            self.stop_ring(index);
        }
        self.vrings
            .iter_mut()
            .for_each(|v| *v = VringSetup::default());
        self.datapath.set_memory(None);
        self.memory = None;
        self.backend_channel = None;
        self.proto = ProtocolState::default();
        match self.device.reset() {
            Ok(effects) => self.apply(effects),
            Err(e) => tracing::warn!("device reset after disconnect: {e}"),
        }
    }
}
