//! Starting and stopping rings as the frontend's requests come in.
//!
//! A ring runs when it was started (kick fd), is enabled, and its size,
//! addresses and guest memory are known. Any change to those stops the ring
//! (remembering where it was) and starts it again, so the datapath always
//! works on a consistent ring.

use super::NetBackend;
use crate::datapath::vring::Vring;
use crate::datapath::Direction;
use sandnic_device::features;
use tracing::warn;

/// Where a virtqueue index lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Data { pair: usize, dir: Direction },
    Ctrl,
}

impl NetBackend {
    /// The control queue follows the data queues: index 2 without MQ,
    /// `2 * max_queue_pairs` with it.
    fn ctrl_index(&self) -> usize {
        let pairs = if self.proto.device_features() & features::MQ != 0 {
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
                dir: if index % 2 == 0 {
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
        let v = &self.vrings[index];
        v.started
            && v.enabled
            && v.num > 0
            && v.addrs.is_some()
            && v.kick.is_some()
            && self.memory.is_some()
    }

    /// Stops ring `index` if it runs; returns (and remembers) where the
    /// driver should continue.
    pub(super) fn stop_ring(&mut self, index: usize) -> Option<u16> {
        let next = match self.slot(index)? {
            Slot::Ctrl => self.ctrl.take().map(|ring| {
                use virtio_queue::QueueT;
                ring.queue.next_avail()
            }),
            Slot::Data { pair, dir } => self.datapath.stop_ring(pair, dir),
        }?;
        self.vrings[index].base = next;
        Some(next)
    }

    /// Brings ring `index` in line with its configuration: restarts it if
    /// it should run, leaves it stopped otherwise.
    pub(super) fn refresh_ring(&mut self, index: usize) {
        self.stop_ring(index);
        if !self.wants_running(index) {
            return;
        }
        let (Some(slot), Some(memory)) = (self.slot(index), self.memory.clone()) else {
            return;
        };
        let event_idx = self.proto.device_features() & features::EVENT_IDX != 0;
        match Vring::start(index as u16, &self.vrings[index], &memory, event_idx) {
            Ok(ring) => match slot {
                Slot::Ctrl => self.ctrl = Some(ring),
                Slot::Data { pair, dir } => self.datapath.install_ring(pair, dir, ring),
            },
            Err(e) => {
                self.counters.bad_requests += 1;
                warn!("cannot start ring: {e}");
            }
        }
    }

    pub(super) fn refresh_all_rings(&mut self) {
        for index in 0..self.vrings.len() {
            self.refresh_ring(index);
        }
    }
}
