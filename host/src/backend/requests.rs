//! Answers to frontend requests.

use super::rings::OtherSessionDrives;
use super::session::Session;
use super::{NetBackend, Outcome, Refusal, SessionId};
use crate::datapath::vring::{RingAddrs, VringSetup};
use crate::memory::guest_memory::{GuestMemory, RegionInfo};
use crate::sandbox::DeviceError;

use crate::vhost_user::request::{Request, RequestError};
use crate::vhost_user::{protocol, F_LOG_ALL, F_PROTOCOL_FEATURES};
use sandnic_device::features;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserConfig, VhostUserVringState};
use vm_memory::ByteValued;

fn u64_reply(value: u64) -> Outcome {
    Outcome::Reply(value.to_ne_bytes().to_vec())
}

impl NetBackend {
    /// Handles one request of session `id`.
    pub fn handle(&mut self, id: SessionId, request: Request) -> Outcome {
        self.counters.requests += 1;
        self.setup_changes += 1;
        debug!(session = id, ?request, "vhost-user request");
        if self.sessions.get(id).is_none() {
            return Outcome::Failed(Refusal::NoSession(id));
        }
        let outcome = self.dispatch(id, request);
        self.sync_active_pairs();
        match &outcome {
            Outcome::Failed(why) => {
                self.counters.bad_requests += 1;
                warn!(session = id, "request refused: {why}");
            }
            Outcome::Disconnect(why) => {
                self.counters.bad_requests += 1;
                warn!(session = id, "closing the frontend connection: {why}");
            }
            _ => {}
        }
        outcome
    }

    /// Session `id`, which `handle` checked exists (no request removes
    /// one: a frontend leaves only when its connection closes).
    fn session_mut(&mut self, id: SessionId) -> &mut Session {
        self.sessions
            .get_mut(id)
            .expect("handle checked the session exists")
    }

    fn dispatch(&mut self, id: SessionId, request: Request) -> Outcome {
        match request {
            Request::GetFeatures => u64_reply(self.offered | F_PROTOCOL_FEATURES | F_LOG_ALL),
            Request::SetFeatures(acked) => self.set_features(id, acked),
            Request::GetProtocolFeatures => u64_reply(protocol::OFFERED),
            Request::SetProtocolFeatures(bits) => {
                self.session_mut(id).proto.protocol_features = bits & protocol::OFFERED;
                Outcome::Ok
            }
            Request::SetOwner => {
                self.session_mut(id).proto.owner = true;
                Outcome::Ok
            }
            Request::ResetOwner => {
                self.stop_all_rings(id);
                let session = self.session_mut(id);
                session.vrings.iter_mut().for_each(|v| v.started = false);
                session.proto.owner = false;
                Outcome::Ok
            }
            Request::GetQueueNum => u64_reply(u64::from(self.device.config().max_queue_pairs)),
            Request::SetMemTable(regions, fds) => self.set_mem_table(id, regions, fds),
            Request::SetVringNum { index, num } => self.with_ring(id, index, |v| {
                v.num = u16::try_from(num).map_err(|_| Refusal::RingSize(num))?;
                Ok(())
            }),
            Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
                log,
            } => self.with_ring(id, index, |v| {
                v.addrs = Some(RingAddrs { desc, avail, used });
                v.log_addr = log;
                Ok(())
            }),
            Request::SetVringBase { index, base } => self.with_ring(id, index, |v| {
                v.base = u16::try_from(base).map_err(|_| Refusal::RingBase(base))?;
                Ok(())
            }),
            Request::GetVringBase { index } => self.get_vring_base(id, index),
            Request::SetVringKick { index, fd } => self.with_ring(id, index, |v| {
                let fd = fd.ok_or(Refusal::NoKickFd)?;
                pollable(&fd)?;
                nonblocking(&fd)?;
                v.kick = Some(Arc::new(fd));
                v.started = true;
                Ok(())
            }),
            Request::SetVringCall { index, fd } => self.with_ring(id, index, |v| {
                if let Some(fd) = &fd {
                    nonblocking(fd)?;
                }
                v.call = fd.map(Arc::new);
                Ok(())
            }),
            Request::SetVringErr { index, fd } => self.with_ring(id, index, |v| {
                v.err = fd;
                Ok(())
            }),
            Request::SetVringEnable { index, enable } => self.set_vring_enable(id, index, enable),
            Request::GetConfig {
                offset,
                size,
                flags,
            } => self.get_config(offset, size, flags),
            Request::SetConfig { offset, data, .. } => {
                if self.sessions.other_drives(id) {
                    return self.refuse_standby("SET_CONFIG");
                }
                let result = self.device.write_config(offset, &data);
                match self.apply_result(result) {
                    Ok(()) => Outcome::Ok,
                    Err(why) => Outcome::Failed(Refusal::ConfigWrite(why)),
                }
            }
            Request::SetBackendReqFd(fd) => {
                self.session_mut(id).backend_channel = Some(fd);
                Outcome::Ok
            }
            Request::SetLogBase { size, offset, fd } => self.set_log_base(id, size, offset, fd),
            Request::SetLogFd(fd) => {
                self.session_mut(id).log_call = Some(fd);
                Outcome::Ok
            }
            Request::SendRarp(mac) => self.send_rarp(mac),
            Request::Unsupported(code) => {
                self.counters.unsupported_requests += 1;
                Outcome::Failed(Refusal::Unsupported(code))
            }
        }
    }

    /// A standby asked for something that would change the device the
    /// other session drives.
    fn refuse_standby(&mut self, what: &'static str) -> Outcome {
        self.counters.standby_refusals += 1;
        Outcome::Failed(Refusal::Standby(what))
    }

    /// Applies a change to ring `index` of session `id` and brings the ring
    /// in line with it.
    fn with_ring(
        &mut self,
        id: SessionId,
        index: u32,
        change: impl FnOnce(&mut VringSetup) -> Result<(), Refusal>,
    ) -> Outcome {
        let i = index as usize;
        let rings = self.session_mut(id).vrings.len();
        let Some(setup) = self.session_mut(id).vrings.get_mut(i) else {
            return Outcome::Failed(Refusal::NoRing { index, rings });
        };
        if let Err(why) = change(setup) {
            return Outcome::Failed(why);
        }
        match self.refresh_ring(id, i) {
            Ok(()) => Outcome::Ok,
            Err(OtherSessionDrives) => Outcome::Failed(Refusal::RingOfStandby { index }),
        }
    }

    fn set_features(&mut self, id: SessionId, acked: u64) -> Outcome {
        if self.sessions.other_drives(id) {
            return self.refuse_standby("SET_FEATURES");
        }
        let session = self.session_mut(id);
        session
            .features_set_at
            .get_or_insert_with(std::time::Instant::now);
        let previous = session.proto.acked_features;
        let previous_device = session.proto.device_features();
        // The queue layout (control queue index), EVENT_IDX and the dirty
        // log may change: stop the rings under the old layout first.
        self.stop_all_rings(id);
        let session = self.session_mut(id);
        session.proto.acked_features = Some(acked);
        let device_features = session.proto.device_features();
        // LOG_ALL alone is the frontend's business, not the device's: QEMU
        // toggles it on running rings, pair by pair.
        if previous.is_none() || device_features != previous_device {
            match self.device.set_features(device_features) {
                Ok(effects) => {
                    self.settings.mergeable = device_features & features::MRG_RXBUF != 0;
                    self.apply(effects);
                }
                Err(e) => {
                    self.session_mut(id).proto.acked_features = previous;
                    self.note_failure(&e);
                    self.refresh_all_rings(id);
                    return Outcome::Failed(Refusal::Features { acked, error: e });
                }
            }
        }
        if acked & F_PROTOCOL_FEATURES == 0 {
            self.session_mut(id)
                .vrings
                .iter_mut()
                .for_each(|v| v.enabled = true);
        }
        self.refresh_all_rings(id);
        Outcome::Ok
    }

    fn set_vring_enable(&mut self, id: SessionId, index: u32, enable: bool) -> Outcome {
        if self
            .session_mut(id)
            .proto
            .acked_features
            .is_some_and(|f| f & F_PROTOCOL_FEATURES == 0)
        {
            return Outcome::Failed(Refusal::EnableWithoutProtocolFeatures);
        }
        let outcome = self.with_ring(id, index, |v| {
            v.enabled = enable;
            v.disabled = !enable;
            Ok(())
        });
        // The device model hears of it only from the session that may
        // drive the device; a standby's rings are its own business.
        if matches!(outcome, Outcome::Ok) && !self.sessions.other_drives(id) {
            let effects = self.device.queue_enabled(index as u16, enable);
            if let Err(e) = self.apply_result(effects) {
                warn!("queue-enabled: {e}");
            }
        }
        outcome
    }

    fn set_mem_table(
        &mut self,
        id: SessionId,
        regions: Vec<RegionInfo>,
        fds: Vec<OwnedFd>,
    ) -> Outcome {
        let memory = match GuestMemory::map(regions, fds) {
            Ok(memory) => Arc::new(memory),
            Err(e) => return Outcome::Failed(e.into()),
        };
        if let Some(log) = self.session_mut(id).dirty_log() {
            if !log.covers(memory.end()) {
                let size = log.size();
                self.counters.log_failures += 1;
                return Outcome::Disconnect(Refusal::LogShort {
                    size,
                    end: memory.end(),
                });
            }
        }
        let rings = self.session_mut(id).vrings.len();
        let running: Vec<usize> = (0..rings)
            .filter(|&i| self.stop_ring(id, i).is_some())
            .collect();
        self.session_mut(id).memory = Some(memory);
        for index in 0..rings {
            if running.contains(&index) || self.session_mut(id).vrings[index].started {
                let _ = self.refresh_ring(id, index);
            }
        }
        Outcome::Ok
    }

    fn get_vring_base(&mut self, id: SessionId, index: u32) -> Outcome {
        let i = index as usize;
        if i >= self.session_mut(id).vrings.len() {
            return Outcome::Failed(Refusal::NoRing {
                index,
                rings: self.session_mut(id).vrings.len(),
            });
        }
        let stopped = self.stop_ring(id, i);
        let setup = &mut self.session_mut(id).vrings[i];
        let base = stopped.unwrap_or(setup.base);
        setup.started = false;
        let state = VhostUserVringState::new(index, u32::from(base));
        Outcome::Reply(state.as_slice().to_vec())
    }

    /// GET_CONFIG answers with the same header and the bytes; a refused read
    /// fails, answered with the spec's error reply (an empty payload).
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> Outcome {
        let data = match self.device.read_config(offset, size) {
            Ok(data) => data,
            Err(e) => {
                self.note_failure(&e);
                return Outcome::Failed(Refusal::ConfigRead {
                    offset,
                    size,
                    error: e,
                });
            }
        };
        let head = VhostUserConfig::new(
            offset,
            data.len() as u32,
            vhost::vhost_user::message::VhostUserConfigFlags::from_bits_retain(flags),
        );
        let mut body = head.as_slice().to_vec();
        body.extend_from_slice(&data);
        Outcome::Reply(body)
    }

    pub(super) fn note_failure(&mut self, error: &DeviceError) {
        if matches!(error, DeviceError::Sandbox(_)) {
            self.counters.sandbox_failures += 1;
        }
    }

    /// Sends CONFIG_CHANGE_MSG to the frontend that drives the device (or,
    /// while none does, the one connected), if it asked for config
    /// notifications and gave a channel.
    pub(super) fn notify_config_change(&mut self) {
        let Some(session) = self
            .sessions
            .driving()
            .or_else(|| self.sessions.iter().find(|s| s.connected))
        else {
            return;
        };
        let proto = &session.proto;
        let negotiated = proto.has(protocol::BACKEND_REQ) && proto.has(protocol::CONFIG);
        let sent = match (negotiated, &session.backend_channel) {
            (true, Some(channel)) => crate::vhost_user::backend_channel::config_changed(channel),
            _ => return,
        };
        match sent {
            Ok(()) => self.counters.config_notifications += 1,
            Err(e) => warn!("config change notification failed: {e}"),
        }
    }
}

/// The datapath waits for kicks in epoll: an fd epoll refuses (a regular
/// file, a memfd) would leave the ring's thread unable to wait at all.
fn pollable(fd: &OwnedFd) -> Result<(), Refusal> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(Refusal::KickNotPollable)?;
    epoll
        .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 0))
        .map_err(Refusal::KickNotPollable)
}

fn nonblocking(fd: &OwnedFd) -> Result<(), Refusal> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(Refusal::Fcntl)?;
    fcntl(
        fd.as_fd().as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map(drop)
    .map_err(Refusal::Fcntl)
}

/// The device behind a frontend's connection.
impl crate::vhost_user::connection::Device for NetBackend {
    type Refusal = Refusal;

    fn handle(&mut self, session: SessionId, request: Request) -> Outcome {
        NetBackend::handle(self, session, request)
    }

    fn malformed(&mut self, _session: SessionId, code: u32, error: RequestError) -> Outcome {
        NetBackend::malformed(self, code, error)
    }

    fn reply_ack(&self, session: SessionId) -> bool {
        self.protocol(session).is_some_and(|p| p.reply_ack())
    }
}
