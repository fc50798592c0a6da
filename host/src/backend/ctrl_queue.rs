//! The control virtqueue. Each chain carries a command in its readable
//! part and room for the one-byte ack in its writable part. The command
//! bytes are copied out (bounded) and interpreted by the device model in the
//! sandbox; the host only writes the ack it returns.

use super::NetBackend;
use crate::datapath::notify;
use sandnic_device::ACK_ERR;
use std::os::fd::AsFd;
use tracing::warn;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Largest command copied out of the guest: room for a MAC table of about
/// 10 000 addresses. Bounded because the guest chooses the length.
pub const MAX_CTRL_LEN: usize = 64 * 1024;

#[derive(Debug)]
enum BadChain {
    NoAckRoom,
    TooLong,
    OutsideMemory,
    ReadableAfterWritable,
    Truncated,
}

impl NetBackend {
    /// Serves every command waiting on the control queue.
    /// The control ring runs as a ring of the session that drives the
    /// device, over its memory.
    pub fn process_ctrl_queue(&mut self) {
        let Some(memory) = self.sessions.driving().and_then(|s| s.memory.clone()) else {
            return;
        };
        let Some(mut ring) = self.ctrl.take() else {
            return;
        };
        notify::drain(ring.kick.as_fd());
        let mem = memory.mmap();
        let mut served = 0;
        loop {
            ring.disable_notification(mem);
            while let Some(chain) = ring.pop(mem) {
                let head = chain.head_index();
                let used = self.serve_command(chain, mem);
                ring.push_used(mem, head, used);
                served += 1;
            }
            if !ring.enable_and_recheck(mem) {
                break;
            }
        }
        if served > 0 {
            ring.notify(mem);
        }
        self.ctrl = Some(ring);
    }

    /// Returns the used length (1 if an ack was written).
    fn serve_command(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        self.counters.ctrl_commands += 1;
        let (command, ack_at) = match read_command(chain, mem) {
            Ok(parts) => parts,
            Err((why, ack_at)) => {
                self.counters.ctrl_bad_chains += 1;
                warn!("malformed control chain: {why:?}");
                let written = ack_at.filter(|&at| mem.write_obj(ACK_ERR, at).is_ok());
                if let (Some(at), Some(log)) = (written, &self.settings.dirty_log) {
                    log.mark(at.0, 1);
                }
                return u32::from(written.is_some());
            }
        };
        let outcome = self.device.handle_ctrl(&command);
        if let Some(failure) = &outcome.failure {
            self.counters.sandbox_failures += 1;
            warn!("control command failed in the sandbox: {failure}");
        }
        if outcome.ack != sandnic_device::ACK_OK {
            self.counters.ctrl_errors += 1;
        }
        self.apply(outcome.effects);
        let written = mem.write_obj(outcome.ack, ack_at).is_ok();
        if let (true, Some(log)) = (written, &self.settings.dirty_log) {
            log.mark(ack_at.0, 1);
        }
        u32::from(written)
    }
}

/// The readable bytes of a control chain and the address of its ack byte.
/// On error, the ack address if one was found (to answer ERR).
fn read_command(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<(Vec<u8>, GuestAddress), (BadChain, Option<GuestAddress>)> {
    let mut command = Vec::new();
    let mut ack_at = None;
    let mut last_points_on = false;
    let mut error = None;
    for desc in chain {
        last_points_on = desc.has_next();
        if desc.is_write_only() {
            if ack_at.is_none() && desc.len() > 0 {
                ack_at = Some(desc.addr());
            }
            continue;
        }
        if ack_at.is_some() {
            error.get_or_insert(BadChain::ReadableAfterWritable);
            continue;
        }
        let len = desc.len() as usize;
        if command.len() + len > MAX_CTRL_LEN {
            error.get_or_insert(BadChain::TooLong);
            continue;
        }
        let start = command.len();
        command.resize(start + len, 0);
        if mem.read_slice(&mut command[start..], desc.addr()).is_err() {
            error.get_or_insert(BadChain::OutsideMemory);
        }
    }
    if last_points_on {
        error.get_or_insert(BadChain::Truncated);
    }
    // The ack byte itself must be writable guest memory.
    let ack_at = ack_at.filter(|at| mem.read_obj::<u8>(*at).is_ok());
    match (error, ack_at) {
        (None, Some(at)) => Ok((command, at)),
        (Some(e), at) => Err((e, at)),
        (None, None) => Err((BadChain::NoAckRoom, None)),
    }
}
