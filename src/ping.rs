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

fn icmp_seq(line: &str) -> Option<u64> {
    line.split("icmp_seq=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub fn parse(output: &str) -> PingReport {
    let replies: Vec<(u64, f64)> = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| Some((icmp_seq(l)?, timestamp(l)?)))
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
        no_answer,
    }
}

impl PingReport {
    /// Probes that never got a reply, with when they were reported missing
    /// (the next probe's send time); the last probe, whose reply may still
    /// have been on its way when ping stopped, is left out.
    pub fn lost(&self) -> Vec<(u64, f64)> {
        let answered: std::collections::HashSet<u64> = self.reply_seqs.iter().copied().collect();
        let mut lost: Vec<(u64, f64)> = self
            .no_answer
            .iter()
            .filter(|(seq, _)| !answered.contains(seq))
            .copied()
            .collect();
        lost.sort_by_key(|l| l.0);
        lost.dedup_by_key(|l| l.0);
        lost
    }

    /// Lost probes outside `[from, to]` (wall-clock seconds).
    pub fn lost_outside(&self, from: f64, to: f64) -> Vec<(u64, f64)> {
        self.lost()
            .into_iter()
            .filter(|&(_, t)| t < from || t > to)
            .collect()
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
            [1700000000.450000] 64 bytes from 10.88.0.2: icmp_seq=3 ttl=64 time=0.1 ms\n\
            [1700000000.500000] no answer yet for icmp_seq=4\n\n\
            --- 10.88.0.2 ping statistics ---\n\
            4 packets transmitted, 3 received, 25% packet loss, time 5ms\n";
        let r = super::parse(out);
        assert_eq!((r.transmitted, r.received, r.times.len()), (4, 3, 3));
        assert!((r.largest_gap() - 0.3).abs() < 1e-6);
        assert!((r.top_gaps(1)[0].1 - 0.05).abs() < 1e-6);
        assert_eq!(r.reply_seqs, vec![1, 2, 3]);
        assert_eq!(
            r.lost(),
            vec![(4, 1700000000.5)],
            "seq 3 came late, not lost"
        );
        assert!(r.lost_outside(1700000000.4, 1700000000.6).is_empty());
        assert_eq!(r.lost_outside(1700000000.0, 1700000000.4).len(), 1);
    }
}
