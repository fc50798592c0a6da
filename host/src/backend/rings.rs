//! Starting and stopping a session's rings as the frontend's requests come
//! in.
//!
//! A ring runs when it was started (kick fd), is enabled, and its size,
//! addresses and guest memory are known — and no other session drives the
//! device. Any change to those stops the ring (remembering where it was)
//! and starts it again, so the datapath always works on a consistent ring.

use super::session::{Session, SessionId};
use super::NetBackend;
use crate::datapath::vring::Vring;
use crate::datapath::Direction;
use crate::memory::guest_memory::GuestMemory;
use sandnic_device::features;
use std::sync::Arc;
use tracing::warn;

/// Where a virtqueue index lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Data { pair: usize, dir: Direction },
    Ctrl,
}

/// A ring that should run was not started: another session drives the
/// device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "another frontend drives this device; it must stop its rings (GET_VRING_BASE) or leave first"
)]
pub(super) struct OtherSessionDrives;

impl NetBackend {
    /// The control queue follows the data queues: index 2 without MQ,
    /// `2 * max_queue_pairs` with it (as `session` negotiated).
    fn ctrl_index(&self, session: &Session) -> usize {
        let pairs = if session.proto.device_features() & features::MQ != 0 {
            usize::from(self.device.config().max_queue_pairs)
        } else {
            1
        };
        2 * pairs
    }

    /// What virtqueue `index` of `session` is.
    pub(super) fn slot(&self, session: &Session, index: usize) -> Option<Slot> {
        let data_queues = 2 * self.datapath.pair_count();
        if index == self.ctrl_index(session) {
            Some(Slot::Ctrl)
        } else if index < data_queues {
            Some(Slot::Data {
                pair: index / 2,
                dir: if index.is_multiple_of(2) {
                    Direction::Rx
                } else {
                    Direction::Tx
                },
            })
        } else {
            None
        }
    }

    /// Stops ring `index` of session `id` if it runs; returns (and
    /// remembers) where the driver should continue.
    pub(super) fn stop_ring(&mut self, id: SessionId, index: usize) -> Option<u16> {
        let session = self.sessions.get(id)?;
        if !session.vrings.get(index)?.running {
            return None;
        }
        let slot = self.slot(session, index);
        self.sessions.get_mut(id)?.vrings[index].running = false;
        let next = match slot? {
            Slot::Ctrl => self.ctrl.take().map(|ring| {
                use virtio_queue::QueueT;
                ring.queue.next_avail()
            }),
            Slot::Data { pair, dir } => self.datapath.stop_ring(pair, dir),
        }?;
        self.sessions.get_mut(id)?.vrings[index].base = next;
        Some(next)
    }

    /// Stops every ring of session `id` (each base recorded, RX buffers
    /// taken ahead given back); returns how many were running.
    pub(super) fn stop_all_rings(&mut self, id: SessionId) -> usize {
        let rings = self.sessions.get(id).map_or(0, |s| s.vrings.len());
        (0..rings)
            .filter(|&index| self.stop_ring(id, index).is_some())
            .count()
    }

    /// Stops the driving session's rings before sandnic exits (SIGTERM):
    /// the datapath halts at a batch boundary with every used entry
    /// published, RX buffers taken ahead go back to the guest. Returns how
    /// many rings were running.
    pub fn stop_for_exit(&mut self) -> usize {
        match self.sessions.driving().map(|s| s.id) {
            Some(id) => self.stop_all_rings(id),
            None => 0,
        }
    }

    /// Brings ring `index` of session `id` in line with its configuration:
    /// restarts it if it should run, leaves it stopped otherwise. Refused
    /// while another session drives the device.
    pub(super) fn refresh_ring(
        &mut self,
        id: SessionId,
        index: usize,
    ) -> Result<(), OtherSessionDrives> {
        self.stop_ring(id, index);
        let Some(session) = self.sessions.get(id) else {
            return Ok(());
        };
        if !session.wants_running(index) {
            return Ok(());
        }
        if self.sessions.other_drives(id) {
            self.counters.standby_refusals += 1;
            warn!(
                session = id,
                ring = index,
                "standby frontend tried to start a ring: {OtherSessionDrives}"
            );
            return Err(OtherSessionDrives);
        }
        let (Some(slot), Some(memory)) = (self.slot(session, index), session.memory.clone()) else {
            return Ok(());
        };
        self.install_memory(&memory);
        self.sync_dirty_log(id);
        let Some(session) = self.sessions.get(id) else {
            return Ok(());
        };
        let event_idx = session.proto.device_features() & features::EVENT_IDX != 0;
        let log = self.settings.dirty_log.as_ref();
        match Vring::start(
            index as u16,
            &session.vrings[index],
            &memory,
            event_idx,
            log,
        ) {
            Ok(ring) => {
                match slot {
                    Slot::Ctrl => self.ctrl = Some(ring),
                    Slot::Data { pair, dir } => self.datapath.install_ring(pair, dir, ring),
                }
                if let Some(session) = self.sessions.get_mut(id) {
                    session.vrings[index].running = true;
                    session.ever_ran = true;
                }
            }
            Err(e) => {
                self.counters.bad_requests += 1;
                warn!(session = id, "cannot start ring: {e}");
            }
        }
        Ok(())
    }

    /// Refreshes every ring of session `id`; a refusal (another session
    /// drives) is counted in `refresh_ring` and changes nothing.
    pub(super) fn refresh_all_rings(&mut self, id: SessionId) {
        let rings = self.sessions.get(id).map_or(0, |s| s.vrings.len());
        for index in 0..rings {
            let _ = self.refresh_ring(id, index);
        }
    }

    /// Sets how many queue pairs the datapath serves. A frontend that
    /// forwards the control queue (UML's virtio_uml, crosvm) sets the count
    /// with VQ_PAIRS_SET, which the device model answers. One that keeps
    /// the control queue itself (QEMU, Cloud Hypervisor, DPDK's
    /// virtio_user) never sends it: it enables each pair's rings with
    /// SET_VRING_ENABLE instead, so there the enabled rings decide.
    ///
    /// Detaching a TAP queue drops every frame waiting in it, so pairs
    /// are given up only when meant: only the session that drives the
    /// device decides, and while none does (a migration's switch, between
    /// the source's GET_VRING_BASE and the destination's first running
    /// ring) the TAP stays as it is — a destination QEMU sends the pair
    /// enables of the guest it has not loaded yet (one pair) before those
    /// of the guest it runs. And a pair beyond the enabled ones stays
    /// attached until the frontend disables it: a frontend that sets its
    /// rings up one by one runs the first before it enables the others.
    pub(super) fn sync_active_pairs(&mut self) {
        let Some(driver) = self.sessions.driving() else {
            return;
        };
        let wanted = if self.ctrl_in_backend(driver) {
            self.model_pairs
        } else {
            let mut kept = self.enabled_pairs(driver);
            let disabled = |pair: usize| {
                (2 * pair..2 * pair + 2).any(|i| driver.vrings.get(i).is_some_and(|v| v.disabled))
            };
            while kept < self.active_pairs && !disabled(usize::from(kept)) {
                kept += 1;
            }
            kept
        };
        let wanted = wanted.clamp(1, self.datapath.pair_count().max(1) as u16);
        if wanted != self.active_pairs {
            tracing::info!(from = self.active_pairs, to = wanted, "active queue pairs");
            self.datapath.set_active_pairs(usize::from(wanted));
            self.active_pairs = wanted;
        }
    }

    /// The frontend forwards the control queue: its ring was set up here.
    fn ctrl_in_backend(&self, session: &Session) -> bool {
        session
            .vrings
            .get(self.ctrl_index(session))
            .is_some_and(|v| v.started)
    }

    /// The leading pairs whose two rings the frontend enabled (one pair
    /// without MQ).
    fn enabled_pairs(&self, session: &Session) -> u16 {
        if session.proto.device_features() & features::MQ == 0 {
            return 1;
        }
        let rings = &session.vrings;
        let enabled = |i: usize| rings.get(i).is_some_and(|v| v.enabled);
        (0..self.datapath.pair_count())
            .take_while(|&p| enabled(2 * p) && enabled(2 * p + 1))
            .count() as u16
    }

    /// Points the datapath at `memory` (the session's about to drive)
    /// unless it already works on it.
    fn install_memory(&mut self, memory: &Arc<GuestMemory>) {
        let installed = self
            .installed_memory
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, memory));
        if !installed {
            self.datapath.set_memory(Some(memory.clone()));
            self.installed_memory = Some(memory.clone());
        }
    }

    /// Gives the datapath session `id`'s dirty log (or none) if it does
    /// not have it yet.
    fn sync_dirty_log(&mut self, id: SessionId) {
        let wanted = self.sessions.get(id).and_then(|s| s.dirty_log().cloned());
        let same = match (&self.settings.dirty_log, &wanted) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.settings.dirty_log = wanted;
            self.datapath.set_settings(&self.settings);
        }
    }
}
