//! Answers to frontend requests.

use super::rings::OtherSessionDrives;
use super::{NetBackend, SessionId};
use crate::datapath::vring::RingAddrs;
use crate::memory::guest_memory::{GuestMemory, RegionInfo};
use crate::sandbox::DeviceError;
use crate::vhost_user::request::Request;
use crate::vhost_user::{protocol, F_LOG_ALL, F_PROTOCOL_FEATURES};
use sandnic_device::features;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserConfig, VhostUserVringState};
use vm_memory::ByteValued;

/// The answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A reply body (GET_* requests).
    Reply(Vec<u8>),
    /// Done; acked with 0 if the frontend asked for an ack.
    Ok,
    /// Refused; acked with 1 if the frontend asked for an ack.
    Failed(String),
    /// Cannot be honoured and cannot be refused either (the frontend would
    /// not notice): the connection must be closed. Only for a dirty log
    /// that cannot be kept, where going on would let a migration complete
    /// with pages unlogged.
    Disconnect(String),
}

fn u64_reply(value: u64) -> Outcome {
    Outcome::Reply(value.to_ne_bytes().to_vec())
}

impl NetBackend {
    /// Handles one request of session `id`.
    pub fn handle(&mut self, id: SessionId, request: Request) -> Outcome {
        self.counters.requests += 1;
        self.setup_changes += 1;
        debug!(session = id, ?request, "vhost-user request");
        if !self.focus(id) {
            return Outcome::Failed(format!("no session {id}"));
        }
        let outcome = self.dispatch(request);
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

    fn dispatch(&mut self, request: Request) -> Outcome {
        match request {
            Request::GetFeatures => u64_reply(self.offered | F_PROTOCOL_FEATURES | F_LOG_ALL),
            Request::SetFeatures(acked) => self.set_features(acked),
            Request::GetProtocolFeatures => u64_reply(protocol::OFFERED),
            Request::SetProtocolFeatures(bits) => {
                self.session.proto.protocol_features = bits & protocol::OFFERED;
                Outcome::Ok
            }
            Request::SetOwner => {
                self.session.proto.owner = true;
                Outcome::Ok
            }
            Request::ResetOwner => {
                self.stop_all_rings();
                self.session
                    .vrings
                    .iter_mut()
                    .for_each(|v| v.started = false);
                self.session.proto.owner = false;
                Outcome::Ok
            }
            Request::GetQueueNum => u64_reply(u64::from(self.device.config().max_queue_pairs)),
            Request::SetMemTable(regions, fds) => self.set_mem_table(regions, fds),
            Request::SetVringNum { index, num } => self.with_ring(index, |b, i| {
                let num = u16::try_from(num).map_err(|_| format!("ring size {num}"))?;
                b.session.vrings[i].num = num;
                Ok(())
            }),
            Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
                log,
            } => self.with_ring(index, |b, i| {
                b.session.vrings[i].addrs = Some(RingAddrs { desc, avail, used });
                b.session.vrings[i].log_addr = log;
                Ok(())
            }),
            Request::SetVringBase { index, base } => self.with_ring(index, |b, i| {
                b.session.vrings[i].base =
                    u16::try_from(base).map_err(|_| format!("ring base {base}"))?;
                Ok(())
            }),
            Request::GetVringBase { index } => self.get_vring_base(index),
            Request::SetVringKick { index, fd } => self.with_ring(index, |b, i| {
                let fd = fd.ok_or("polling without a kick fd is not supported")?;
                pollable(&fd)?;
                nonblocking(&fd)?;
                b.session.vrings[i].kick = Some(Arc::new(fd));
                b.session.vrings[i].started = true;
                Ok(())
            }),
            Request::SetVringCall { index, fd } => self.with_ring(index, |b, i| {
                if let Some(fd) = &fd {
                    nonblocking(fd)?;
                }
                b.session.vrings[i].call = fd.map(Arc::new);
                Ok(())
            }),
            Request::SetVringErr { index, fd } => self.with_ring(index, |b, i| {
                b.session.vrings[i].err = fd;
                Ok(())
            }),
            Request::SetVringEnable { index, enable } => self.set_vring_enable(index, enable),
            Request::GetConfig {
                offset,
                size,
                flags,
            } => self.get_config(offset, size, flags),
            Request::SetConfig { offset, data, .. } => {
                if self.other_drives() {
                    return self.refuse_standby("SET_CONFIG");
                }
                let result = self.device.write_config(offset, &data);
                match self.apply_result(result) {
                    Ok(()) => Outcome::Ok,
                    Err(why) => Outcome::Failed(why),
                }
            }
            Request::SetBackendReqFd(fd) => {
                self.session.backend_channel = Some(fd);
                Outcome::Ok
            }
            Request::SetLogBase { size, offset, fd } => self.set_log_base(size, offset, fd),
            Request::SetLogFd(fd) => {
                self.session.log_call = Some(fd);
                Outcome::Ok
            }
            Request::SendRarp(mac) => self.send_rarp(mac),
            Request::Unsupported(code) => {
                self.counters.unsupported_requests += 1;
                Outcome::Failed(format!("unsupported request {code}"))
            }
        }
    }

    /// A standby asked for something that would change the device the
    /// other session drives.
    fn refuse_standby(&mut self, what: &str) -> Outcome {
        self.counters.standby_refusals += 1;
        Outcome::Failed(format!("{what}: {OtherSessionDrives}"))
    }

    /// Applies a change to ring `index`'s configuration and brings the ring
    /// in line with it.
    fn with_ring(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut Self, usize) -> Result<(), String>,
    ) -> Outcome {
        let i = index as usize;
        if i >= self.session.vrings.len() {
            return Outcome::Failed(format!(
                "ring {index} does not exist ({} rings)",
                self.session.vrings.len()
            ));
        }
        if let Err(why) = f(self, i) {
            return Outcome::Failed(why);
        }
        match self.refresh_ring(i) {
            Ok(()) => Outcome::Ok,
            Err(refused) => Outcome::Failed(format!("ring {index}: {refused}")),
        }
    }

    fn set_features(&mut self, acked: u64) -> Outcome {
        if self.other_drives() {
            return self.refuse_standby("SET_FEATURES");
        }
        self.session
            .features_set_at
            .get_or_insert_with(std::time::Instant::now);
        let previous = self.session.proto.acked_features;
        let previous_device = self.session.proto.device_features();
        // The queue layout (control queue index), EVENT_IDX and the dirty
        // log may change: stop the rings under the old layout first.
        self.stop_all_rings();
        self.session.proto.acked_features = Some(acked);
        let device_features = self.session.proto.device_features();
        // LOG_ALL alone is the frontend's business, not the device's: QEMU
        // toggles it on running rings, pair by pair.
        if previous.is_none() || device_features != previous_device {
            match self.device.set_features(device_features) {
                Ok(effects) => {
                    self.settings.mergeable = device_features & features::MRG_RXBUF != 0;
                    self.apply(effects);
                }
                Err(e) => {
                    self.session.proto.acked_features = previous;
                    self.note_failure(&e);
                    self.refresh_all_rings();
                    return Outcome::Failed(format!("features {acked:#x}: {e}"));
                }
            }
        }
        if acked & F_PROTOCOL_FEATURES == 0 {
            self.session
                .vrings
                .iter_mut()
                .for_each(|v| v.enabled = true);
        }
        self.refresh_all_rings();
        Outcome::Ok
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Outcome {
        if self
            .session
            .proto
            .acked_features
            .is_some_and(|f| f & F_PROTOCOL_FEATURES == 0)
        {
            return Outcome::Failed("SET_VRING_ENABLE without protocol features".into());
        }
        let outcome = self.with_ring(index, |b, i| {
            b.session.vrings[i].enabled = enable;
            b.session.vrings[i].disabled = !enable;
            Ok(())
        });
        // The device model hears of it only from the session that may
        // drive the device; a standby's rings are its own business.
        if outcome == Outcome::Ok && !self.other_drives() {
            let effects = self.device.queue_enabled(index as u16, enable);
            if let Err(e) = self.apply_result(effects) {
                warn!("queue-enabled: {e}");
            }
        }
        outcome
    }

    fn set_mem_table(&mut self, regions: Vec<RegionInfo>, fds: Vec<OwnedFd>) -> Outcome {
        let memory = match GuestMemory::map(regions, fds) {
            Ok(memory) => Arc::new(memory),
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if let Some(log) = self.session.dirty_log() {
            if !log.covers(memory.end()) {
                self.counters.log_failures += 1;
                return Outcome::Disconnect(format!(
                    "the dirty log ({} bytes) does not cover the new memory table (ends at {:#x})",
                    log.size(),
                    memory.end()
                ));
            }
        }
        let running: Vec<usize> = (0..self.session.vrings.len())
            .filter(|&i| self.stop_ring(i).is_some())
            .collect();
        self.session.memory = Some(memory);
        for index in 0..self.session.vrings.len() {
            if running.contains(&index) || self.session.vrings[index].started {
                let _ = self.refresh_ring(index);
            }
        }
        Outcome::Ok
    }

    fn get_vring_base(&mut self, index: u32) -> Outcome {
        let i = index as usize;
        if i >= self.session.vrings.len() {
            return Outcome::Failed(format!("ring {index} does not exist"));
        }
        let base = self.stop_ring(i).unwrap_or(self.session.vrings[i].base);
        self.session.vrings[i].started = false;
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
                return Outcome::Failed(format!("config read at {offset} of {size} bytes: {e}"));
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

    /// Sends CONFIG_CHANGE_MSG if the frontend asked for config
    /// notifications and gave a channel.
    /// Goes to the driving session (the focused one if none drives).
    pub(super) fn notify_config_change(&mut self) {
        let session = self.driving_session().unwrap_or(&self.session);
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
fn pollable(fd: &OwnedFd) -> Result<(), String> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
    epoll
        .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 0))
        .map_err(|e| format!("the kick fd cannot be polled ({e})"))
}

fn nonblocking(fd: &OwnedFd) -> Result<(), String> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| format!("fcntl: {e}"))?;
    fcntl(
        fd.as_fd().as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map(drop)
    .map_err(|e| format!("fcntl: {e}"))
}
