//! Taking a running device apart for a handover, and putting it together
//! again in the new process; the plain data the host's half becomes (the
//! handover stream in `crate::handover` carries and validates it).

use super::NetBackend;
use crate::datapath::vring::RingAddrs;
use crate::datapath::DatapathOptions;
use crate::memory::guest_memory::GuestMemory;
use crate::memory::guest_memory::RegionInfo;
use crate::sandbox::SandboxedDevice;
use crate::tap::Tap;
use crate::vhost_user::ProtocolState;
use sandnic_device::DeviceConfig;
use sandnic_device::{features, Effect};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

/// The role of one fd in the stream, in sending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FdRole {
    /// The connected vhost-user socket.
    Connection,
    /// The vhost-user listening socket (for later reconnects).
    Listener,
    /// The control API's listening socket.
    ApiListener,
    /// The backend→frontend request channel.
    BackendChannel,
    MemoryRegion(u32),
    Kick(u16),
    Call(u16),
    Err(u16),
    TapQueue(u16),
}

/// One virtqueue as the frontend configured it; `base` is where the driver
/// continues (the ring was stopped, pending RX buffers given back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    pub num: u16,
    pub addrs: Option<RingAddrs>,
    pub base: u16,
    pub enabled: bool,
    pub started: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapState {
    pub name: String,
    pub queues: u16,
}

/// The host's half of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub config: DeviceConfig,
    pub protocol: ProtocolState,
    pub vrings: Vec<VringState>,
    pub regions: Vec<RegionInfo>,
    pub tap: TapState,
    pub link_up: bool,
    /// Socket files the destination takes over (and removes when done).
    pub socket_paths: Vec<PathBuf>,
}

impl NetBackend {
    /// Stops every ring at a batch boundary. Each ring's base becomes the
    /// next available index to process; RX buffers taken ahead go back.
    pub fn stop_datapath(&mut self) {
        self.stop_all_rings();
    }

    /// Why this device cannot be handed over now, if it cannot: a VM
    /// migration is under way (a second frontend is connected, or the
    /// frontend logs dirty pages). Its state (the standby's connection, the
    /// log) does not travel in a handover, and the migration would break.
    pub fn handover_blocker(&self) -> Option<String> {
        if self.other.is_some() {
            return Some("a second frontend is connected (a VM migration is under way)".into());
        }
        if self.session.dirty_log().is_some() {
            return Some(
                "the frontend is logging dirty pages (a VM migration is under way)".into(),
            );
        }
        None
    }

    /// Starts every ring that should run (after a failed handover, or in the
    /// destination once it has taken over).
    pub fn resume_datapath(&mut self) {
        self.refresh_all_rings();
    }

    /// The host state and the fds that carry the device (rings must be
    /// stopped). TAP fds are left out for the new-TAP path.
    pub fn export(&self, with_tap: bool) -> (HostState, Vec<(FdRole, RawFd)>) {
        let vrings = self
            .session
            .vrings
            .iter()
            .map(|v| VringState {
                num: v.num,
                addrs: v.addrs,
                base: v.base,
                enabled: v.enabled,
                started: v.started,
            })
            .collect();
        let tap = self.datapath.tap();
        let host = HostState {
            config: self.device.config().clone(),
            protocol: self.session.proto.clone(),
            vrings,
            regions: self
                .session
                .memory
                .as_ref()
                .map(|m| m.regions().to_vec())
                .unwrap_or_default(),
            tap: TapState {
                name: tap.name().to_string(),
                queues: tap.queue_count() as u16,
            },
            link_up: self.settings.link_up,
            socket_paths: Vec::new(),
        };
        let mut fds = Vec::new();
        if let Some(memory) = &self.session.memory {
            for (i, fd) in memory.region_fds().into_iter().enumerate() {
                fds.push((FdRole::MemoryRegion(i as u32), fd.as_raw_fd()));
            }
        }
        for (i, v) in self.session.vrings.iter().enumerate() {
            let q = i as u16;
            if let Some(fd) = &v.kick {
                fds.push((FdRole::Kick(q), fd.as_raw_fd()));
            }
            if let Some(fd) = &v.call {
                fds.push((FdRole::Call(q), fd.as_raw_fd()));
            }
            if let Some(fd) = &v.err {
                fds.push((FdRole::Err(q), fd.as_raw_fd()));
            }
        }
        if let Some(fd) = &self.session.backend_channel {
            fds.push((FdRole::BackendChannel, fd.as_raw_fd()));
        }
        if with_tap {
            for (i, fd) in tap.queue_fds().iter().enumerate() {
                fds.push((FdRole::TapQueue(i as u16), fd.as_raw_fd()));
            }
        }
        (host, fds)
    }

    /// Rebuilds a device from a handover: the loaded device model, the TAP,
    /// the host state and its fds. Rings stay stopped until
    /// `resume_datapath`.
    pub fn import(
        device: SandboxedDevice,
        tap: Arc<Tap>,
        host: &HostState,
        fds: &mut HashMap<FdRole, OwnedFd>,
        load_effects: Vec<Effect>,
        options: DatapathOptions,
    ) -> anyhow::Result<Self> {
        let mut b = Self::new(device, tap, options)?;
        b.session.proto = host.protocol.clone();
        for (i, v) in host.vrings.iter().enumerate() {
            let q = i as u16;
            let setup = &mut b.session.vrings[i];
            setup.num = v.num;
            setup.addrs = v.addrs;
            setup.base = v.base;
            setup.enabled = v.enabled;
            setup.started = v.started;
            setup.kick = fds.remove(&FdRole::Kick(q)).map(Arc::new);
            setup.call = fds.remove(&FdRole::Call(q)).map(Arc::new);
            setup.err = fds.remove(&FdRole::Err(q));
        }
        if !host.regions.is_empty() {
            let region_fds = (0..host.regions.len() as u32)
                .map(|i| {
                    fds.remove(&FdRole::MemoryRegion(i))
                        .ok_or_else(|| anyhow::anyhow!("memory region {i} has no fd"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let memory = Arc::new(GuestMemory::map(host.regions.clone(), region_fds)?);
            b.session.memory = Some(memory);
        }
        b.session.backend_channel = fds.remove(&FdRole::BackendChannel);
        b.settings.mergeable = b.session.proto.device_features() & features::MRG_RXBUF != 0;
        b.settings.link_up = host.link_up;
        b.apply(load_effects);
        Ok(b)
    }
}
