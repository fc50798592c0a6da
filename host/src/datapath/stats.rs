//! Per-queue-pair counters, updated by the worker once per batch and read
//! by the `stats` API without taking the datapath lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct QueueStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP but not delivered: truncated (larger than
    /// the buffers offered) or arriving while the link is down.
    pub rx_drops: AtomicU64,
    /// Frames the rx filter rejected.
    pub rx_filtered: AtomicU64,
    /// TAP reads that failed with anything but "empty" (the frame is then
    /// discarded so the TAP cannot stay readable forever).
    pub rx_errors: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the TAP refused, or sent while the link was down.
    pub tx_drops: AtomicU64,
    /// Descriptor chains that were malformed (loops, addresses outside guest
    /// memory, wrong direction, zero or huge lengths); returned unused.
    pub bad_chains: AtomicU64,
}

/// Counts gathered during one batch, added to the shared counters at once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub filtered: u64,
    pub bad_chains: u64,
    pub errors: u64,
}

impl QueueStats {
    pub fn add_rx(&self, b: &Batch) {
        self.rx_packets.fetch_add(b.packets, Relaxed);
        self.rx_bytes.fetch_add(b.bytes, Relaxed);
        self.rx_drops.fetch_add(b.drops, Relaxed);
        self.rx_filtered.fetch_add(b.filtered, Relaxed);
        self.rx_errors.fetch_add(b.errors, Relaxed);
        self.bad_chains.fetch_add(b.bad_chains, Relaxed);
    }

    pub fn add_tx(&self, b: &Batch) {
        self.tx_packets.fetch_add(b.packets, Relaxed);
        self.tx_bytes.fetch_add(b.bytes, Relaxed);
        self.tx_drops.fetch_add(b.drops, Relaxed);
        self.bad_chains.fetch_add(b.bad_chains, Relaxed);
    }

    /// Sets every counter to `s`'s value.
    pub fn restore(&self, s: &StatsSnapshot) {
        self.rx_packets.store(s.rx_packets, Relaxed);
        self.rx_bytes.store(s.rx_bytes, Relaxed);
        self.rx_drops.store(s.rx_drops, Relaxed);
        self.rx_filtered.store(s.rx_filtered, Relaxed);
        self.rx_errors.store(s.rx_errors, Relaxed);
        self.tx_packets.store(s.tx_packets, Relaxed);
        self.tx_bytes.store(s.tx_bytes, Relaxed);
        self.tx_drops.store(s.tx_drops, Relaxed);
        self.bad_chains.store(s.bad_chains, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            rx_drops: self.rx_drops.load(Relaxed),
            rx_filtered: self.rx_filtered.load(Relaxed),
            rx_errors: self.rx_errors.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            tx_drops: self.tx_drops.load(Relaxed),
            bad_chains: self.bad_chains.load(Relaxed),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_drops: u64,
    pub rx_filtered: u64,
    pub rx_errors: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_drops: u64,
    pub bad_chains: u64,
}
