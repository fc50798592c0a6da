//! Rate limits: one per device and direction, shared by all its queue
//! pairs (`--tx-limit`, `--rx-limit`, the API's `limit` command).
//!
//! - `spec.rs`: what an operator asks for, parsed and validated;
//! - `bucket.rs`: the token buckets and the turn order between pairs.
//!
//! How the datapath uses a limit (`worker.rs`): before a batch, a pair with
//! frames waiting asks for its turn. Granted, it passes frames while the
//! allowance lasts and gives the rest back. Told to wait, it leaves the
//! frames where they are — TX chains in the guest's ring, RX frames in
//! the TAP's queue — and sleeps on a timer until its turn, without polling.
//! TX and RX are limited apart, so a throttled direction never holds up
//! the other.

pub mod bucket;
pub mod spec;

pub use bucket::{Allowance, Turn};
pub use spec::{RateSpec, SpecError};

use bucket::Buckets;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One direction's limit, shared by every pair's thread.
#[derive(Debug, Default)]
pub struct DirectionLimit {
    /// Whether a limit is set: read without the lock on every batch, so an
    /// unlimited device pays one relaxed load.
    limited: AtomicBool,
    buckets: Mutex<Option<Buckets>>,
    /// Times a pair had to wait for its turn.
    waits: AtomicU64,
}

/// What a pair may do now in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// No limit: pass what there is.
    Unlimited,
    /// Pass at most this, then `give_back` the rest.
    Granted(Allowance),
    /// Leave the frames waiting until this instant.
    WaitUntil(Instant),
    /// Under a limit, with nothing waiting: pass nothing (no turn taken).
    Idle,
}

impl DirectionLimit {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Buckets>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a limit is set (no lock).
    pub fn is_limited(&self) -> bool {
        self.limited.load(Ordering::Relaxed)
    }

    /// Pair `pair`, with frames waiting, asks for its turn.
    pub fn take(&self, pair: u16, now: Instant) -> Take {
        if !self.is_limited() {
            return Take::Unlimited;
        }
        let mut buckets = self.lock();
        let Some(b) = buckets.as_mut() else {
            return Take::Unlimited;
        };
        match b.take(pair, now) {
            Turn::Granted(allowance) => Take::Granted(allowance),
            Turn::Wait { until, newly } => {
                if newly {
                    self.waits.fetch_add(1, Ordering::Relaxed);
                }
                Take::WaitUntil(until)
            }
        }
    }

    /// Returns what is left of a granted allowance.
    pub fn give_back(&self, left: Allowance) {
        if let Some(b) = self.lock().as_mut() {
            b.give_back(left);
        }
    }

    /// Pair `pair` has nothing to pass in this direction.
    pub fn leave(&self, pair: u16) {
        if !self.is_limited() {
            return;
        }
        if let Some(b) = self.lock().as_mut() {
            b.leave(pair);
        }
    }

    pub fn spec(&self) -> Option<RateSpec> {
        self.lock().as_ref().map(Buckets::spec)
    }

    /// Sets (or with None, removes) the limit at once.
    pub fn set(&self, spec: Option<RateSpec>) {
        let mut buckets = self.lock();
        *buckets = spec.map(|s| Buckets::new(s, Instant::now(), buckets.as_ref()));
        self.limited.store(buckets.is_some(), Ordering::Relaxed);
    }

    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

/// The device's limits, one per direction.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// Guest → TAP.
    pub tx: DirectionLimit,
    /// TAP → guest.
    pub rx: DirectionLimit,
}

/// The limits as set: what `status` shows, a handover and the fd store's
/// record carry, and `--tx-limit`/`--rx-limit` give.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpecs {
    pub tx: Option<RateSpec>,
    pub rx: Option<RateSpec>,
}

impl RateLimits {
    pub fn specs(&self) -> LimitSpecs {
        LimitSpecs {
            tx: self.tx.spec(),
            rx: self.rx.spec(),
        }
    }

    pub fn set(&self, specs: LimitSpecs) {
        self.tx.set(specs.tx);
        self.rx.set(specs.rx);
    }
}
