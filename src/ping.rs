//! Flood ping from a namespace (`ping -i 0 -O -D`, as QEMU's TAP fd
//! migration test does) and what its output says: reply times, gaps,
//! losses and when the lost probes went out.

use crate::harness::{spawn, wait_for_exit, NetNs};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

pub struct FloodPing {
    child: Child,
    log: PathBuf,
}

/// A test that fails before `stop` leaves no ping flooding the machine
/// while the other tests of its binary run.
impl Drop for FloodPing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished flood ping saw.
#[derive(Debug, Clone)]
pub struct PingReport {
    pub transmitted: u64,
    pub received: u64,
    /// Reply timestamps (seconds, from `-D`).
    pub times: Vec<f64>,
    /// Sequence numbers of the replies, in the same order.
    pub reply_seqs: Vec<u64>,
    /// When each answered probe went out (reply time less its round trip),
    /// in the same order.
    pub sent_times: Vec<f64>,
    /// `-O`'s "no answer yet" reports: (sequence, when the next probe went
    /// out).
    pub no_answer: Vec<(u64, f64)>,
}

impl FloodPing {
    pub fn start(ns: &NetNs, target: &str, log: &Path) -> anyhow::Result<Self> {
        Self::every(ns, target, "0", log)
    }

    /// Pings every `interval` seconds (`"0"`: as fast as replies come).
    pub fn every(ns: &NetNs, target: &str, interval: &str, log: &Path) -> anyhow::Result<Self> {
        let mut cmd = ns.command("ping");
        cmd.args(["-i", interval, "-O", "-D", "-W", "1", target])
            .stdout(std::fs::File::create(log)?)
            .stderr(Stdio::null());
        let child = spawn(cmd)?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Stops ping (SIGINT, so it prints its summary) and reads its output.
    pub fn stop(mut self) -> anyhow::Result<PingReport> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        if wait_for_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            // Its summary is lost, but the test goes on to fail instead of
            // waiting for ever.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        Ok(parse(&std::fs::read_to_string(&self.log)?))
    }
}

fn timestamp(line: &str) -> Option<f64> {
    line.strip_prefix('[')?.split(']').next()?.parse().ok()
}

/// A reply's round trip in seconds (`time=0.12 ms`).
fn round_trip(line: &str) -> Option<f64> {
    let ms: f64 = line
        .split("time=")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(ms / 1e3)
}

fn icmp_seq(line: &str) -> Option<u64> {
    line.split("icmp_seq=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub fn parse(output: &str) -> PingReport {
    let replies: Vec<(u64, f64, f64)> = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let at = timestamp(l)?;
            Some((icmp_seq(l)?, at, at - round_trip(l).unwrap_or(0.0)))
        })
        .collect();
    let no_answer = output
        .lines()
        .filter(|l| l.contains("no answer yet"))
        .filter_map(|l| Some((icmp_seq(l)?, timestamp(l)?)))
        .collect();
    let summary = output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let number_before = |word: &str| -> u64 {
        summary
            .split(',')
            .find(|part| part.contains(word))
            .and_then(|part| part.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    PingReport {
        transmitted: number_before("transmitted"),
        received: number_before("received"),
        times: replies.iter().map(|r| r.1).collect(),
        reply_seqs: replies.iter().map(|r| r.0).collect(),
        sent_times: replies.iter().map(|r| r.2).collect(),
        no_answer,
    }
}

impl PingReport {
    /// Probes that never got a reply, with when they were reported missing
    /// (the next probe's send time). Probes no answered one followed, sent
    /// within ping's reply timeout of the end, are left out: their replies
    /// may still have been on their way when ping stopped.
    pub fn lost(&self) -> Vec<(u64, f64)> {
        let answered: std::collections::HashSet<u64> = self.reply_seqs.iter().copied().collect();
        // A probe no later one outran may still have been on its way back
        // when ping stopped, unless it went out longer ago than ping waits
        // for a reply (`-W 1`).
        let last_answered = self.reply_seqs.iter().copied().max().unwrap_or(0);
        let end = self
            .times
            .iter()
            .chain(self.no_answer.iter().map(|(_, t)| t))
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let mut lost: Vec<(u64, f64)> = self
            .no_answer
            .iter()
            .filter(|(seq, _)| !answered.contains(seq))
            .filter(|&&(seq, at)| seq < last_answered || at < end - 1.0)
            .copied()
            .collect();
        lost.sort_by_key(|l| l.0);
        lost.dedup_by_key(|l| l.0);
        lost
    }

    /// Lost probes that surely went out before `from` or after `to`
    /// (wall-clock seconds).
    ///
    /// `-O` reports a probe unanswered when it sends the next one, so the
    /// report's time is only the latest the lost probe can have gone out;
    /// when ping itself stalls (a loaded machine) it comes long after. The
    /// earliest is when the probe before it went out (the report of that
    /// one's own loss, or its reply less the round trip). A probe is judged
    /// outside only when the whole of that span is.
    pub fn lost_outside(&self, from: f64, to: f64) -> Vec<(u64, f64)> {
        self.lost()
            .into_iter()
            .filter(|&(seq, latest)| latest < from || self.earliest_send(seq) > to)
            .collect()
    }

    /// The earliest probe `seq` can have gone out: when the last probe
    /// before it is known to have.
    fn earliest_send(&self, seq: u64) -> f64 {
        let answered = self
            .reply_seqs
            .iter()
            .zip(&self.sent_times)
            .filter(|(s, _)| **s < seq)
            .map(|(_, &t)| t);
        // The report for probe `s` is made as probe `s + 1` goes out.
        let reported = self
            .no_answer
            .iter()
            .filter(|(s, _)| *s < seq)
            .map(|&(_, t)| t);
        answered.chain(reported).fold(f64::NEG_INFINITY, f64::max)
    }

    /// The largest time between two consecutive replies, in seconds.
    pub fn largest_gap(&self) -> f64 {
        self.times
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0, f64::max)
    }

    /// The largest gaps with when they happened (seconds from the first
    /// reply), largest first.
    pub fn top_gaps(&self, n: usize) -> Vec<(f64, f64)> {
        let Some(&t0) = self.times.first() else {
            return Vec::new();
        };
        let mut gaps: Vec<(f64, f64)> = self
            .times
            .windows(2)
            .map(|w| (w[1] - w[0], w[0] - t0))
            .collect();
        gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
        gaps.truncate(n);
        gaps
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_iputils_output() {
        let out = "PING 10.88.0.2 (10.88.0.2) 56(84) bytes of data.\n\
            [1700000000.100000] 64 bytes from 10.88.0.2: icmp_seq=1 ttl=64 time=0.1 ms\n\
            [1700000000.150000] 64 bytes from 10.88.0.2: icmp_seq=2 ttl=64 time=0.1 ms\n\
            [1700000000.300000] no answer yet for icmp_seq=3\n\
            [1700000000.450000] 64 bytes from 10.88.0.2: icmp_seq=3 ttl=64 time=150 ms\n\
            [1700000000.500000] no answer yet for icmp_seq=4\n\
            [1700000000.700000] 64 bytes from 10.88.0.2: icmp_seq=5 ttl=64 time=0.2 ms\n\
            [1700000000.700100] no answer yet for icmp_seq=6\n\n\
            --- 10.88.0.2 ping statistics ---\n\
            7 packets transmitted, 4 received, 42% packet loss, time 5ms\n";
        let r = super::parse(out);
        assert_eq!((r.transmitted, r.received, r.times.len()), (7, 4, 4));
        assert!((r.largest_gap() - 0.3).abs() < 1e-6);
        assert!((r.top_gaps(1)[0].1 - 0.05).abs() < 1e-6);
        assert_eq!(r.reply_seqs, vec![1, 2, 3, 5]);
        assert_eq!(
            r.lost(),
            vec![(4, 1700000000.5)],
            "seq 3 came late, not lost; seq 6 may have been on its way back at the end"
        );
        assert!(r.lost_outside(1700000000.4, 1700000000.6).is_empty());
        // Probe 4 was reported at .5, but it may have gone out as early as
        // .3 (when probe 3 was reported unanswered): not surely after .4.
        assert!(r.lost_outside(1700000000.0, 1700000000.4).is_empty());
        assert_eq!(r.lost_outside(1700000000.0, 1700000000.25).len(), 1);
        assert_eq!(r.lost_outside(1700000000.6, 1700000001.0).len(), 1);
    }
}
