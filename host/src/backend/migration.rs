//! What a migration of the VM needs from the backend: the dirty-page log
//! (SET_LOG_BASE; the datapath marks pages through `datapath::dirty_log`)
//! and the RARP announcement a VMM asks for after an incoming migration
//! (SEND_RARP). Two frontend sessions during a local migration are in
//! `session.rs`.

use super::{NetBackend, Outcome, Refusal, SessionId};
use crate::memory::dirty_log::DirtyLog;
use crate::vhost_user::protocol;
use crate::vhost_user::request::RequestError;
use sandnic_device::format_mac;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tracing::{info, warn};
use vhost::vhost_user::message::{FrontendReq, VhostUserLog};
use vm_memory::ByteValued;

/// EtherType of RARP.
const ETH_P_RARP: u16 = 0x8035;
/// RARP "request reverse", as QEMU's own announcement (qemu_announce_self)
/// sends it.
const RARP_REQUEST_REVERSE: u16 = 3;
/// An Ethernet frame's minimum length without its FCS: the RARP frame is
/// padded to it.
const MIN_FRAME: usize = 60;

impl NetBackend {
    /// SET_LOG_BASE. With LOG_SHMFD the frontend waits for a reply but only
    /// looks at its request code, so a refusal would go unseen and the
    /// migration would complete with pages unlogged: a log that cannot be
    /// kept closes the connection instead.
    pub(super) fn set_log_base(
        &mut self,
        id: SessionId,
        size: u64,
        offset: u64,
        fd: OwnedFd,
    ) -> Outcome {
        let log = match DirtyLog::map(fd, size, offset) {
            Ok(log) => log,
            Err(e) => {
                self.counters.log_failures += 1;
                return Outcome::Disconnect(e.into());
            }
        };
        let Some(session) = self.sessions.get_mut(id) else {
            return Outcome::Failed(Refusal::NoSession(id));
        };
        if let Some(memory) = &session.memory {
            if !log.covers(memory.end()) {
                let end = memory.end();
                self.counters.log_failures += 1;
                return Outcome::Disconnect(Refusal::LogShort { size, end });
            }
        }
        session.log = Some(Arc::new(log));
        let (drives, shmfd) = (session.drives(), session.proto.has(protocol::LOG_SHMFD));
        if drives {
            // Restart the rings so they mark the new log.
            self.stop_all_rings(id);
            self.refresh_all_rings(id);
        }
        if shmfd {
            // QEMU reads any body and checks only the request code;
            // rust-vmm's frontend expects the VhostUserLog echoed back.
            Outcome::Reply(VhostUserLog::new(size, offset).as_slice().to_vec())
        } else {
            Outcome::Ok
        }
    }

    /// A request that did not parse. A malformed SET_LOG_BASE cannot be
    /// refused any more than a valid one that cannot be honoured (see
    /// `set_log_base`): the connection is closed.
    pub fn malformed(&mut self, code: u32, error: RequestError) -> Outcome {
        self.counters.bad_requests += 1;
        if code == FrontendReq::SET_LOG_BASE as u32 {
            self.counters.log_failures += 1;
            return Outcome::Disconnect(Refusal::MalformedLogBase(error));
        }
        Outcome::Failed(Refusal::Malformed(error))
    }

    /// SEND_RARP: announce `mac` from the TAP, so bridges and switches
    /// learn the guest's new port at once. The VMM asks for it after an
    /// incoming migration when the guest cannot announce itself (no
    /// GUEST_ANNOUNCE).
    pub(super) fn send_rarp(&mut self, mac: [u8; 6]) -> Outcome {
        if mac[0] & 1 != 0 {
            return Outcome::Failed(Refusal::RarpNotUnicast(format_mac(&mac)));
        }
        let mut frame = vec![0u8; self.settings.hdr_len];
        frame.extend_from_slice(&rarp_frame(mac));
        let tap = self.datapath.tap().clone();
        let Some(queue) = tap.queue(0) else {
            return Outcome::Failed(Refusal::RarpNoTap);
        };
        match nix::unistd::write(queue, &frame) {
            Ok(_) => {
                self.counters.rarps_sent += 1;
                info!(mac = %format_mac(&mac), "announced the guest (RARP)");
                Outcome::Ok
            }
            Err(e) => {
                warn!(fd = queue.as_raw_fd(), "SEND_RARP: writing to the TAP: {e}");
                Outcome::Failed(Refusal::RarpWrite(e))
            }
        }
    }
}

/// A broadcast RARP "request reverse" announcing `mac` (RFC 903), padded to
/// the minimum Ethernet frame.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(MIN_FRAME, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), MIN_FRAME);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
