//! Answers to frontend requests.

use super::NetBackend;
use crate::datapath::guest_memory::{GuestMemory, RegionInfo};
use crate::datapath::vring::RingAddrs;
use crate::sandbox::DeviceError;
use crate::vhost_user::request::Request;
use crate::vhost_user::{protocol, F_PROTOCOL_FEATURES};
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
}

fn u64_reply(value: u64) -> Outcome {
    Outcome::Reply(value.to_ne_bytes().to_vec())
}

impl NetBackend {
    pub fn handle(&mut self, request: Request) -> Outcome {
        self.counters.requests += 1;
        debug!(?request, "vhost-user request");
        let outcome = self.dispatch(request);
        if let Outcome::Failed(why) = &outcome {
            self.counters.bad_requests += 1;
            warn!("request refused: {why}");
        }
        outcome
    }

    fn dispatch(&mut self, request: Request) -> Outcome {
        match request {
            Request::GetFeatures => u64_reply(self.offered | F_PROTOCOL_FEATURES),
            Request::SetFeatures(acked) => self.set_features(acked),
            Request::GetProtocolFeatures => u64_reply(protocol::OFFERED),
            Request::SetProtocolFeatures(bits) => {
                self.proto.protocol_features = bits & protocol::OFFERED;
                Outcome::Ok
            }
            Request::SetOwner => {
                self.proto.owner = true;
                Outcome::Ok
            }
            Request::ResetOwner => {
                for index in 0..self.vrings.len() {
                    self.stop_ring(index);
                    self.vrings[index].started = false;
                }
                self.proto.owner = false;
                Outcome::Ok
            }
            Request::GetQueueNum => u64_reply(u64::from(self.device.config().max_queue_pairs)),
            Request::SetMemTable(regions, fds) => self.set_mem_table(regions, fds),
            Request::SetVringNum { index, num } => self.with_ring(index, |b, i| {
                let num = u16::try_from(num).map_err(|_| format!("ring size {num}"))?;
                b.vrings[i].num = num;
                Ok(())
            }),
            Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
            } => self.with_ring(index, |b, i| {
                b.vrings[i].addrs = Some(RingAddrs { desc, avail, used });
                Ok(())
            }),
            Request::SetVringBase { index, base } => self.with_ring(index, |b, i| {
                b.vrings[i].base = u16::try_from(base).map_err(|_| format!("ring base {base}"))?;
                Ok(())
            }),
            Request::GetVringBase { index } => self.get_vring_base(index),
            Request::SetVringKick { index, fd } => self.with_ring(index, |b, i| {
                let fd = fd.ok_or("polling without a kick fd is not supported")?;
                nonblocking(&fd)?;
                b.vrings[i].kick = Some(Arc::new(fd));
                b.vrings[i].started = true;
                Ok(())
            }),
            Request::SetVringCall { index, fd } => self.with_ring(index, |b, i| {
                if let Some(fd) = &fd {
                    nonblocking(fd)?;
                }
                b.vrings[i].call = fd.map(Arc::new);
                Ok(())
            }),
            Request::SetVringErr { index, fd } => self.with_ring(index, |b, i| {
                b.vrings[i].err = fd;
                Ok(())
            }),
            Request::SetVringEnable { index, enable } => {
                if self
                    .proto
                    .acked_features
                    .is_some_and(|f| f & F_PROTOCOL_FEATURES == 0)
                {
                    return Outcome::Failed("SET_VRING_ENABLE without protocol features".into());
                }
                let outcome = self.with_ring(index, |b, i| {
                    b.vrings[i].enabled = enable;
                    Ok(())
                });
                if outcome == Outcome::Ok {
                    let effects = self.device.queue_enabled(index as u16, enable);
                    if let Err(e) = self.apply_result(effects) {
                        warn!("queue-enabled: {e}");
                    }
                }
                outcome
            }
            Request::GetConfig {
                offset,
                size,
                flags,
            } => self.get_config(offset, size, flags),
            Request::SetConfig { offset, data, .. } => {
                let result = self.device.write_config(offset, &data);
                match self.apply_result(result) {
                    Ok(()) => Outcome::Ok,
                    Err(why) => Outcome::Failed(why),
                }
            }
            Request::SetBackendReqFd(fd) => {
                self.backend_channel = Some(fd);
                Outcome::Ok
            }
            Request::Unsupported(code) => {
                self.counters.unsupported_requests += 1;
                Outcome::Failed(format!("unsupported request {code}"))
            }
        }
    }

    /// Applies a change to ring `index`'s configuration and brings the ring
    /// in line with it.
    fn with_ring(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut Self, usize) -> Result<(), String>,
    ) -> Outcome {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Outcome::Failed(format!(
                "ring {index} does not exist ({} rings)",
                self.vrings.len()
            ));
        }
        match f(self, i) {
            Ok(()) => {
                self.refresh_ring(i);
                Outcome::Ok
            }
            Err(why) => Outcome::Failed(why),
        }
    }

    fn set_features(&mut self, acked: u64) -> Outcome {
        let previous = self.proto.acked_features.replace(acked);
        let device_features = self.proto.device_features();
        match self.device.set_features(device_features) {
            Ok(effects) => {
                self.settings.mergeable = device_features & features::MRG_RXBUF != 0;
                self.apply(effects);
                if acked & F_PROTOCOL_FEATURES == 0 {
                    self.vrings.iter_mut().for_each(|v| v.enabled = true);
                }
                // The queue layout (control queue index) and EVENT_IDX may
                // have changed.
                self.refresh_all_rings();
                Outcome::Ok
            }
            Err(e) => {
                self.proto.acked_features = previous;
                self.note_failure(&e);
                Outcome::Failed(format!("features {acked:#x}: {e}"))
            }
        }
    }

    fn set_mem_table(&mut self, regions: Vec<RegionInfo>, fds: Vec<OwnedFd>) -> Outcome {
        match GuestMemory::map(regions, fds) {
            Ok(memory) => {
                let running: Vec<usize> = (0..self.vrings.len())
                    .filter(|&i| self.stop_ring(i).is_some())
                    .collect();
                let memory = Arc::new(memory);
                self.memory = Some(memory.clone());
                self.datapath.set_memory(Some(memory));
                for index in 0..self.vrings.len() {
                    if running.contains(&index) || self.vrings[index].started {
                        self.refresh_ring(index);
                    }
                }
                Outcome::Ok
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    fn get_vring_base(&mut self, index: u32) -> Outcome {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Outcome::Failed(format!("ring {index} does not exist"));
        }
        let base = self.stop_ring(i).unwrap_or(self.vrings[i].base);
        self.vrings[i].started = false;
        let state = VhostUserVringState::new(index, u32::from(base));
        Outcome::Reply(state.as_slice().to_vec())
    }

    /// GET_CONFIG answers with the same header and the bytes; a refused read
    /// answers with size 0, which frontends treat as an error.
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> Outcome {
        let data = match self.device.read_config(offset, size) {
            Ok(data) => data,
            Err(e) => {
                self.note_failure(&e);
                Vec::new()
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
    pub(super) fn notify_config_change(&mut self) {
        let negotiated = self.proto.has(protocol::BACKEND_REQ) && self.proto.has(protocol::CONFIG);
        if let (true, Some(channel)) = (negotiated, &self.backend_channel) {
            match crate::vhost_user::backend_channel::config_changed(channel) {
                Ok(()) => self.counters.config_notifications += 1,
                Err(e) => warn!("config change notification failed: {e}"),
            }
        }
    }
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
