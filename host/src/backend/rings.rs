//! Starting and stopping rings as the frontend's requests come in.
//!
//! A ring runs when it was started (kick fd), is enabled, and its size,
//! addresses and guest memory are known — and the other session, if any,
//! drives nothing. Any change to those stops the ring (remembering where it
//! was) and starts it again, so the datapath always works on a consistent
//! ring.

use super::{NetBackend, Session};
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

/// A ring that should run was not started: the other session drives the
/// device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OtherSessionDrives;

impl std::fmt::Display for OtherSessionDrives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "another frontend drives this device; it must stop its rings (GET_VRING_BASE) or leave first",
        )
    }
}

impl NetBackend {
    /// The control queue follows the data queues: index 2 without MQ,
    /// `2 * max_queue_pairs` with it.
    fn ctrl_index(&self) -> usize {
        self.ctrl_index_of(&self.session)
    }

    fn ctrl_index_of(&self, session: &Session) -> usize {
        let pairs = if session.proto.device_features() & features::MQ != 0 {
            usize::from(self.device.config().max_queue_pairs)
        } else {
            1
        };
        2 * pairs
    }

    pub(super) fn slot(&self, index: usize) -> Option<Slot> {
        let data_queues = 2 * self.datapath.pair_count();
        if index == self.ctrl_index() {
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

    fn wants_running(&self, index: usize) -> bool {
        let v = &self.session.vrings[index];
        v.started
            && v.enabled
            && v.num > 0
            && v.addrs.is_some()
            && v.kick.is_some()
            && self.session.memory.is_some()
    }

    /// Stops ring `index` of the focused session if it runs; returns (and
    /// remembers) where the driver should continue.
    pub(super) fn stop_ring(&mut self, index: usize) -> Option<u16> {
        if !self.session.vrings.get(index)?.running {
            return None;
        }
        self.session.vrings[index].running = false;
        let next = match self.slot(index)? {
            Slot::Ctrl => self.ctrl.take().map(|ring| {
                use virtio_queue::QueueT;
                ring.queue.next_avail()
            }),
            Slot::Data { pair, dir } => self.datapath.stop_ring(pair, dir),
        }?;
        self.session.vrings[index].base = next;
        Some(next)
    }

    /// Stops every ring of the focused session (each base recorded, RX
    /// buffers taken ahead given back); returns how many were running.
    pub(super) fn stop_all_rings(&mut self) -> usize {
        (0..self.session.vrings.len())
            .filter(|&index| self.stop_ring(index).is_some())
            .count()
    }

    /// Stops the driving session's rings before sandnic exits (SIGTERM):
    /// the datapath halts at a batch boundary with every used entry
    /// published, RX buffers taken ahead go back to the guest. Returns how
    /// many rings were running.
    pub fn stop_for_exit(&mut self) -> usize {
        self.focus_driver();
        self.stop_all_rings()
    }

    /// Brings ring `index` in line with its configuration: restarts it if
    /// it should run, leaves it stopped otherwise. Refused while the other
    /// session drives the device.
    pub(super) fn refresh_ring(&mut self, index: usize) -> Result<(), OtherSessionDrives> {
        self.stop_ring(index);
        if !self.wants_running(index) {
            return Ok(());
        }
        if self.other_drives() {
            self.counters.standby_refusals += 1;
            warn!(
                ring = index,
                "standby frontend tried to start a ring: {OtherSessionDrives}"
            );
            return Err(OtherSessionDrives);
        }
        let (Some(slot), Some(memory)) = (self.slot(index), self.session.memory.clone()) else {
            return Ok(());
        };
        self.install_memory(&memory);
        self.sync_dirty_log();
        let event_idx = self.session.proto.device_features() & features::EVENT_IDX != 0;
        let log = self.settings.dirty_log.clone();
        let setup = &self.session.vrings[index];
        match Vring::start(index as u16, setup, &memory, event_idx, log.as_ref()) {
            Ok(ring) => {
                match slot {
                    Slot::Ctrl => self.ctrl = Some(ring),
                    Slot::Data { pair, dir } => self.datapath.install_ring(pair, dir, ring),
                }
                self.session.vrings[index].running = true;
                self.session.ever_ran = true;
            }
            Err(e) => {
                self.counters.bad_requests += 1;
                warn!("cannot start ring: {e}");
            }
        }
        Ok(())
    }

    /// Refreshes every ring; a refusal (the other session drives) is
    /// counted in `refresh_ring` and changes nothing.
    pub(super) fn refresh_all_rings(&mut self) {
        for index in 0..self.session.vrings.len() {
            let _ = self.refresh_ring(index);
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
        let Some(driver) = self.driving_session() else {
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
            .get(self.ctrl_index_of(session))
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

    /// Points the datapath at `memory` (the focused session's, about to
    /// drive) unless it already works on it.
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

    /// Gives the datapath the focused session's dirty log (or none) if it
    /// does not have it yet.
    fn sync_dirty_log(&mut self) {
        let wanted = self.session.dirty_log().cloned();
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
