//! One direction's token buckets (one per limited measure: bytes, frames)
//! and the turn order that shares them between queue pairs.
//!
//! Why a turn order: the limit is the device's, shared by every pair, and
//! pairs served by different threads would otherwise race for each refill
//! — whichever thread woke first would win every time. A pair takes tokens
//! a quantum at a time; a pair that finds too few queues up, and a pair
//! `k` places back in the queue gets its quantum only once the bucket
//! holds `k + 1` quanta, so the pairs ahead of it are served first.
//! Backlogged pairs so take turns with equal quanta (equal shares), and an
//! idle pair is never in the queue, so its share goes to the others
//! (work-conserving).
//!
//! A frame is let through while the allowance is positive and charged
//! whole after it went: the last frame of an allowance may overdraw it, and
//! the bucket carries that debt into the next refill. The long-run rate is
//! exact, nothing waits for a bucket large enough for a 64 KiB frame, and
//! no frame is ever split.

use super::spec::RateSpec;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a quantum lasts at the full rate. Sets how often a throttled
/// pair wakes (about 500 times a second at most, whatever the rate), so
/// the CPU a throttled device spends is in proportion to what it passes.
const QUANTUM_SECONDS: f64 = 0.002;
/// The smallest byte quantum: one full-sized Ethernet frame, so a slow
/// limit does not wake the thread for every few bytes.
const MIN_BYTE_QUANTUM: f64 = 1514.0;
/// A queued pair that does not come back this long after its turn was
/// due (its ring stopped, its thread is gone) loses its place, so the
/// pairs behind it are not held up.
const TURN_GRACE: Duration = Duration::from_millis(20);
/// Stands for "no limit" in an allowance's measure: far from overflow
/// whatever is charged in one batch.
const UNLIMITED: i64 = i64::MAX / 4;
/// Waits shorter than this are not worth a sleep (and float rounding can
/// leave a bucket a hair short of a quantum it has in fact refilled).
const SHORTEST_WAIT: f64 = 1e-6;

/// What a pair may pass now: bytes and frames. A frame goes while both are
/// positive, and is charged after it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub bytes: i64,
    pub frames: i64,
}

impl Allowance {
    /// No limit in either measure.
    pub fn unlimited() -> Self {
        Self {
            bytes: UNLIMITED,
            frames: UNLIMITED,
        }
    }

    /// Nothing may go.
    pub fn none() -> Self {
        Self {
            bytes: 0,
            frames: 0,
        }
    }

    /// Another frame may go.
    pub fn allows_another(&self) -> bool {
        self.bytes > 0 && self.frames > 0
    }

    /// Charges a frame of `bytes` that went.
    pub fn charge(&mut self, bytes: u64) {
        self.bytes = self
            .bytes
            .saturating_sub(bytes.min(UNLIMITED as u64) as i64);
        self.frames -= 1;
    }
}

/// One measure's bucket.
#[derive(Debug, Clone)]
struct Measure {
    /// Tokens per second.
    rate: f64,
    /// The bucket's size (the burst).
    size: f64,
    /// May be negative: the debt of a frame that overdrew its allowance.
    tokens: f64,
    /// What a pair takes per turn.
    quantum: f64,
}

impl Measure {
    fn new(rate: u64, size: u64, min_quantum: f64, tokens: Option<f64>) -> Self {
        let (rate, size) = (rate as f64, size as f64);
        Self {
            rate,
            size,
            tokens: tokens.map_or(size, |t| t.min(size)),
            quantum: (rate * QUANTUM_SECONDS).max(min_quantum).min(size),
        }
    }

    /// Seconds until the bucket holds `turns` quanta (0 if it does).
    fn wait_for(&self, turns: f64) -> f64 {
        ((self.quantum * turns - self.tokens) / self.rate).max(0.0)
    }
}

/// The buckets of one limited direction.
#[derive(Debug, Clone)]
pub struct Buckets {
    spec: RateSpec,
    bytes: Option<Measure>,
    frames: Option<Measure>,
    refilled: Instant,
    /// Pairs waiting for a turn, with when their place lapses.
    queue: VecDeque<(u16, Instant)>,
}

/// The answer to a pair that asks for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Pass this much now; give back what is left (`give_back`).
    Granted(Allowance),
    /// Come back at this instant. `newly` is true when the pair was not
    /// waiting already (it counts as one throttling).
    Wait { until: Instant, newly: bool },
}

impl Buckets {
    /// Buckets for `spec`, full; or, when `before` limited this direction
    /// too, holding what it held (at most the new sizes), so a change of
    /// rate is not a fresh burst.
    pub fn new(spec: RateSpec, now: Instant, before: Option<&Buckets>) -> Self {
        let tokens = |m: Option<&Measure>| m.map(|m| m.tokens);
        let bytes = spec.bytes.zip(spec.burst_bytes_or_default()).map(|(r, s)| {
            Measure::new(
                r,
                s,
                MIN_BYTE_QUANTUM,
                tokens(before.and_then(|b| b.bytes.as_ref())),
            )
        });
        let frames = spec
            .frames
            .zip(spec.burst_frames_or_default())
            .map(|(r, s)| Measure::new(r, s, 1.0, tokens(before.and_then(|b| b.frames.as_ref()))));
        Self {
            spec,
            bytes,
            frames,
            refilled: now,
            queue: before.map(|b| b.queue.clone()).unwrap_or_default(),
        }
    }

    pub fn spec(&self) -> RateSpec {
        self.spec
    }

    fn measures(&mut self) -> impl Iterator<Item = &mut Measure> {
        self.bytes.iter_mut().chain(self.frames.iter_mut())
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        for m in self.measures() {
            m.tokens = (m.tokens + m.rate * elapsed).min(m.size);
        }
    }

    /// Pair `pair`, which has frames to pass, asks for its turn.
    pub fn take(&mut self, pair: u16, now: Instant) -> Turn {
        self.refill(now);
        self.queue.retain(|&(_, lapses)| lapses > now);
        let place = self.queue.iter().position(|&(p, _)| p == pair);
        let turns = place.unwrap_or(self.queue.len()) as f64 + 1.0;
        let wait = self
            .measures()
            .map(|m| m.wait_for(turns))
            .fold(0.0, f64::max);
        if wait > SHORTEST_WAIT {
            let until = now + Duration::from_secs_f64(wait);
            let lapses = until + TURN_GRACE;
            match place {
                Some(at) => self.queue[at].1 = lapses,
                None => self.queue.push_back((pair, lapses)),
            }
            return Turn::Wait {
                until,
                newly: place.is_none(),
            };
        }
        if let Some(at) = place {
            self.queue.remove(at);
        }
        let mut allowance = Allowance::unlimited();
        if let Some(m) = &mut self.bytes {
            m.tokens -= m.quantum;
            allowance.bytes = m.quantum as i64;
        }
        if let Some(m) = &mut self.frames {
            m.tokens -= m.quantum;
            allowance.frames = m.quantum as i64;
        }
        Turn::Granted(allowance)
    }

    /// What is left of an allowance (negative: what the last frame
    /// overdrew) goes back into the buckets.
    pub fn give_back(&mut self, left: Allowance) {
        if let Some(m) = &mut self.bytes {
            m.tokens = (m.tokens + left.bytes as f64).min(m.size);
        }
        if let Some(m) = &mut self.frames {
            m.tokens = (m.tokens + left.frames as f64).min(m.size);
        }
    }

    /// Pair `pair` has nothing to pass: it gives up its place.
    pub fn leave(&mut self, pair: u16) {
        self.queue.retain(|&(p, _)| p != pair);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(spec: &str, now: Instant) -> Buckets {
        Buckets::new(spec.parse().unwrap(), now, None)
    }

    /// Frames of `len` bytes that `pairs` (all backlogged, taking turns as
    /// the worker does) pass in `seconds` of simulated time from `start`
    /// (0: the burst alone), each pair's count.
    fn simulate(b: &mut Buckets, start: Instant, pairs: u16, len: u64, seconds: f64) -> Vec<u64> {
        let end = start + Duration::from_secs_f64(seconds);
        let mut next = vec![start; usize::from(pairs)];
        let mut passed = vec![0u64; usize::from(pairs)];
        loop {
            let (p, &at) = next.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            if at > end {
                return passed;
            }
            match b.take(p as u16, at) {
                Turn::Granted(mut a) => {
                    while a.allows_another() {
                        a.charge(len);
                        passed[p] += 1;
                    }
                    b.give_back(a);
                }
                Turn::Wait { until, .. } => next[p] = until,
            }
        }
    }

    #[test]
    fn the_long_run_rate_is_the_limit_after_the_burst() {
        let start = Instant::now();
        for (spec, len, per_second) in [
            ("bytes=1250k", 1514, 1_250_000.0 / 1514.0),
            ("bytes=125M", 1514, 125e6 / 1514.0),
            ("bytes=12500k", 65_550, 12.5e6 / 65_550.0),
            ("frames=10k", 60, 10_000.0),
            ("bytes=1G,frames=100k", 60, 100_000.0),
        ] {
            let mut b = buckets(spec, start);
            simulate(&mut b, start, 1, len, 0.0);
            let rate = simulate(&mut b, start, 1, len, 5.0)[0] as f64 / 5.0;
            assert!(
                (rate / per_second - 1.0).abs() < 0.01,
                "{spec}: {rate} frames/s, want {per_second}"
            );
        }
    }

    #[test]
    fn backlogged_pairs_share_equally() {
        let start = Instant::now();
        let mut b = buckets("bytes=12500k", start);
        let passed = simulate(&mut b, start, 2, 1514, 5.0);
        let (a, c) = (passed[0] as f64, passed[1] as f64);
        assert!((a / c - 1.0).abs() < 0.05, "{passed:?}");
    }

    #[test]
    fn a_pair_behind_others_waits_for_their_quanta() {
        let start = Instant::now();
        let mut b = buckets("frames=1000,burst-frames=2", start);
        // The quantum is 2 frames (the burst caps it): pair 0 takes the
        // full bucket, pair 1 queues, then pair 2 queues behind it.
        assert!(matches!(b.take(0, start), Turn::Granted(a) if a.frames == 2));
        let Turn::Wait {
            until: first,
            newly: true,
        } = b.take(1, start)
        else {
            panic!()
        };
        let Turn::Wait {
            until: second,
            newly: true,
        } = b.take(2, start)
        else {
            panic!()
        };
        assert!(second > first);
        // Pair 2 comes early, at pair 1's time: not its turn yet.
        assert!(matches!(b.take(2, first), Turn::Wait { newly: false, .. }));
        assert!(matches!(b.take(1, first), Turn::Granted(_)));
        assert!(matches!(b.take(2, second), Turn::Granted(_)));
    }

    #[test]
    fn an_idle_pair_lapses_or_leaves_and_holds_nobody_up() {
        let start = Instant::now();
        let mut b = buckets("frames=1000,burst-frames=2", start);
        assert!(matches!(b.take(0, start), Turn::Granted(_)));
        assert!(matches!(b.take(1, start), Turn::Wait { .. }));
        b.leave(1);
        // Pair 0 is first in line again: one quantum is enough.
        let soon = start + Duration::from_millis(2);
        assert!(matches!(b.take(0, soon), Turn::Granted(_)));
        // A place never claimed lapses.
        assert!(matches!(b.take(1, soon), Turn::Wait { .. }));
        let later = soon + Duration::from_millis(100);
        assert!(matches!(b.take(0, later), Turn::Granted(_)));
    }

    #[test]
    fn an_overdraft_is_paid_back() {
        let start = Instant::now();
        let mut b = buckets("bytes=1M", start);
        let Turn::Granted(mut a) = b.take(0, start) else {
            panic!()
        };
        a.charge(u64::try_from(a.bytes).unwrap() + 65_000);
        assert!(!a.allows_another());
        b.give_back(a);
        let tokens = b.bytes.as_ref().unwrap().tokens;
        let size = b.bytes.as_ref().unwrap().size;
        assert!(tokens < size - 65_000.0, "{tokens}");
    }

    #[test]
    fn a_new_rate_keeps_the_tokens_held() {
        let start = Instant::now();
        let mut b = buckets("bytes=10M", start);
        simulate(&mut b, start, 1, 1514, 0.0);
        let again = Buckets::new("bytes=20M".parse().unwrap(), start, Some(&b));
        // At most one old quantum (20 kB) left, of a 2 MB bucket.
        assert!(again.bytes.as_ref().unwrap().tokens <= 20_000.0);
    }
}
