//! Taking a running device apart for a handover, and putting it together
//! again in the new process; the plain data the host's half becomes (the
//! handover stream in `crate::handover` carries and validates it).

use super::session::{Session, SessionId};
use super::{ControlCounters, NetBackend};
use crate::datapath::rate_limit::LimitSpecs;
use crate::datapath::stats::StatsSnapshot;
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

/// Why a device cannot be handed over now: a VM migration is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MigrationUnderWay {
    #[error("a second frontend is connected (a VM migration is under way)")]
    SecondFrontend,
    #[error("the frontend is logging dirty pages (a VM migration is under way)")]
    DirtyLogging,
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
    /// Client mode: the frontend's socket, which the destination dials
    /// when the connection drops (absent from older releases: none).
    #[serde(default)]
    pub connect: Option<PathBuf>,
    /// The counters so far, so that `stats` goes on counting in the new
    /// process (absent from older releases: counting then starts anew).
    #[serde(default)]
    pub counters: ControlCounters,
    #[serde(default)]
    pub queue_stats: Vec<StatsSnapshot>,
    /// The rate limits, kept across a handover and a restart (absent from
    /// older releases: none).
    #[serde(default)]
    pub limits: LimitSpecs,
}

impl NetBackend {
    /// Stops every ring at a batch boundary. Each ring's base becomes the
    /// next available index to process; RX buffers taken ahead go back.
    pub fn stop_datapath(&mut self) {
        for id in self.session_ids() {
            self.stop_all_rings(id);
        }
    }

    fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.iter().map(|s| s.id).collect()
    }

    /// The session a handover carries: the only one (`handover_blocker`
    /// refuses while there are two). None before any frontend connected.
    fn handed_over(&self) -> Option<&Session> {
        self.sessions.iter().next()
    }

    /// The session a handover's destination fills from the source's state
    /// (served once the connection that came along is: `connect`).
    fn adopted(&mut self) -> &mut Session {
        if self.sessions.is_empty() {
            self.sessions.open(Self::queue_count(&self.device));
        }
        self.sessions
            .iter_mut()
            .next()
            .expect("a session was just opened")
    }

    /// Why this device cannot be handed over now, if it cannot: a VM
    /// migration is under way (a second frontend is connected, or the
    /// frontend logs dirty pages). Its state (the standby's connection, the
    /// log) does not travel in a handover, and the migration would break.
    pub fn handover_blocker(&self) -> Option<MigrationUnderWay> {
        if self.sessions.len() > 1 {
            return Some(MigrationUnderWay::SecondFrontend);
        }
        if self.handed_over().is_some_and(|s| s.dirty_log().is_some()) {
            return Some(MigrationUnderWay::DirtyLogging);
        }
        None
    }

    /// Starts every ring that should run (after a failed handover, or in the
    /// destination once it has taken over).
    pub fn resume_datapath(&mut self) {
        for id in self.session_ids() {
            self.refresh_all_rings(id);
        }
        // Now that the rings run, the session drives and decides the pairs.
        self.sync_active_pairs();
    }

    /// The host state and the fds that carry the device (rings must be
    /// stopped). TAP fds are left out for the new-TAP path.
    pub fn export(&self, with_tap: bool) -> (HostState, Vec<(FdRole, RawFd)>) {
        let fresh;
        let session = match self.handed_over() {
            Some(session) => session,
            None => {
                fresh = Session::new(0, Self::queue_count(&self.device));
                &fresh
            }
        };
        let vrings = session
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
            protocol: session.proto.clone(),
            vrings,
            regions: session
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
            connect: None,
            counters: self.counters.clone(),
            queue_stats: self.datapath.stats(),
            limits: self.datapath.limits(),
        };
        let mut fds = Vec::new();
        if let Some(memory) = &session.memory {
            for (i, fd) in memory.region_fds().into_iter().enumerate() {
                fds.push((FdRole::MemoryRegion(i as u32), fd.as_raw_fd()));
            }
        }
        for (i, v) in session.vrings.iter().enumerate() {
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
        if let Some(fd) = &session.backend_channel {
            fds.push((FdRole::BackendChannel, fd.as_raw_fd()));
        }
        if with_tap {
            for (i, fd) in tap.queue_fds().iter().enumerate() {
                fds.push((FdRole::TapQueue(i as u16), fd.as_raw_fd()));
            }
        }
        (host, fds)
    }

    /// Builds the device in a handover's destination from what the source
    /// sent while its device still runs: the memory mapped and the pages of
    /// the rings touched, the datapath threads created (idle: no ring runs),
    /// the fds in place. The TAP is left exactly as the source has it: its
    /// queues still serve the source. `adopt_stopped_state` finishes the job
    /// inside the pause.
    pub fn prepare(
        device: SandboxedDevice,
        tap: Arc<Tap>,
        host: &HostState,
        fds: &mut HashMap<FdRole, OwnedFd>,
        options: DatapathOptions,
    ) -> anyhow::Result<Self> {
        let mut b = Self::with_datapath(device, tap, options)?;
        b.adopt_fds(host, fds)?;
        b.adopt_positions(host);
        b.prefault_rings();
        Ok(b)
    }

    /// Takes the fds that carry the device: the memory table (mapped here),
    /// every ring's kick, call and err, the backend channel. Used when
    /// preparing, and again in the pause when the source's set changed
    /// after the preparation (a new memory table, a new kick fd, …).
    pub fn adopt_fds(
        &mut self,
        host: &HostState,
        fds: &mut HashMap<FdRole, OwnedFd>,
    ) -> anyhow::Result<()> {
        let session = self.adopted();
        for (i, setup) in session.vrings.iter_mut().enumerate() {
            let q = i as u16;
            setup.kick = fds.remove(&FdRole::Kick(q)).map(Arc::new);
            setup.call = fds.remove(&FdRole::Call(q)).map(Arc::new);
            setup.err = fds.remove(&FdRole::Err(q));
        }
        session.memory = if host.regions.is_empty() {
            None
        } else {
            let region_fds = (0..host.regions.len() as u32)
                .map(|i| {
                    fds.remove(&FdRole::MemoryRegion(i))
                        .ok_or_else(|| anyhow::anyhow!("memory region {i} has no fd"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Some(Arc::new(GuestMemory::map(
                host.regions.clone(),
                region_fds,
            )?))
        };
        session.backend_channel = fds.remove(&FdRole::BackendChannel);
        Ok(())
    }

    /// The plain-data half of the host state: negotiated protocol, each
    /// ring's size, addresses and position, the link. No fd, no mapping.
    fn adopt_positions(&mut self, host: &HostState) {
        let session = self.adopted();
        session.proto = host.protocol.clone();
        for (setup, v) in session.vrings.iter_mut().zip(&host.vrings) {
            setup.num = v.num;
            setup.addrs = v.addrs;
            setup.base = v.base;
            setup.enabled = v.enabled;
            setup.started = v.started;
        }
        let mergeable = session.proto.device_features() & features::MRG_RXBUF != 0;
        self.settings.mergeable = mergeable;
        self.settings.link_up = host.link_up;
    }

    /// Finishes a prepared device with what the source saved once stopped:
    /// where every ring continues, and the loaded device model's effects
    /// (filters, offloads, active pairs). Nothing here maps, spawns or
    /// compiles: it runs inside the handover's pause.
    pub fn adopt_stopped_state(&mut self, host: &HostState, load_effects: Vec<Effect>) {
        self.adopt_positions(host);
        self.counters = host.counters.clone();
        self.datapath.restore_stats(&host.queue_stats);
        self.datapath.set_limits(host.limits);
        self.apply(load_effects);
        self.sync_active_pairs();
        self.datapath.set_settings(&self.settings);
    }

    /// After the process that served the device died (`serve::restart`):
    /// every ring goes on from the used index in the guest's memory, as a
    /// frontend restores a ring whose backend is gone. Chains the dead
    /// process took but never completed are taken again: a TX frame is sent
    /// a second time (at most a batch of them), an RX buffer is filled as
    /// if new.
    pub fn rebase_on_used_index(&mut self) {
        let session = self.adopted();
        let Some(memory) = session.memory.clone() else {
            return;
        };
        for (q, setup) in session.vrings.iter_mut().enumerate() {
            let Some(addrs) = setup.addrs else { continue };
            match addrs.used_index(&memory) {
                Some(used) => setup.base = used,
                None => tracing::warn!(queue = q, "the used ring is outside guest memory"),
            }
        }
    }

    /// Touches every page of every ring once, so that the first pass over a
    /// ring after the pause takes no page fault on the fresh mapping.
    fn prefault_rings(&self) {
        let Some(session) = self.handed_over() else {
            return;
        };
        let Some(memory) = &session.memory else {
            return;
        };
        for setup in &session.vrings {
            let Some(addrs) = setup.addrs else { continue };
            for (_, va, len) in addrs.parts(setup.num) {
                memory.prefault(va, len);
            }
        }
    }
}
