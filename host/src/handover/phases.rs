//! Where a handover's pause goes: the instants at which each step ended,
//! taken with CLOCK_MONOTONIC in both processes (one host, so one clock).
//! The source marks its own steps; the destination sends its marks with
//! `Resumed`. A busy host stretches some steps more than others, and only a
//! breakdown shows which to move out of the pause.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The destination's marks (0: not reported, e.g. by an older release).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationMarks {
    /// Commit (and any new fds) received and validated.
    pub received_ns: u64,
    /// Device state loaded into the component.
    pub loaded_ns: u64,
    /// Ring positions and the loaded state's effects applied (and, if the
    /// source's fds changed after the offer, the new ones taken).
    pub rebuilt_ns: u64,
    /// `Ready` sent.
    pub ready_ns: u64,
}

/// The source's marks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceMarks {
    /// The pause began.
    pub stopping_ns: u64,
    /// Every ring stopped at a batch boundary.
    pub stopped_ns: u64,
    /// Device state saved, host state exported.
    pub saved_ns: u64,
    /// Commit (and any new fds) written to the socket.
    pub sent_ns: u64,
}

/// The pause, step by step, in order: each step's name and how long it
/// took. Empty when the destination did not report its marks.
pub fn breakdown(
    source: SourceMarks,
    destination: DestinationMarks,
    resumed_ns: u64,
) -> Vec<(&'static str, Duration)> {
    if destination == DestinationMarks::default() {
        return Vec::new();
    }
    let ends = [
        ("stop", source.stopped_ns),
        ("save", source.saved_ns),
        ("send", source.sent_ns),
        ("receive", destination.received_ns),
        ("load", destination.loaded_ns),
        ("rebuild", destination.rebuilt_ns),
        ("ready", destination.ready_ns),
        ("resume", resumed_ns),
    ];
    let mut from = source.stopping_ns;
    ends.iter()
        .map(|&(name, end)| {
            let took = Duration::from_nanos(end.saturating_sub(from));
            from = from.max(end);
            (name, took)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_each_other() {
        let source = SourceMarks {
            stopping_ns: 1_000,
            stopped_ns: 1_100,
            saved_ns: 1_300,
            sent_ns: 1_400,
        };
        let destination = DestinationMarks {
            received_ns: 1_450,
            loaded_ns: 1_700,
            rebuilt_ns: 2_000,
            ready_ns: 2_050,
        };
        let steps = breakdown(source, destination, 2_500);
        let micros: Vec<(&str, u64)> = steps
            .iter()
            .map(|(n, d)| (*n, d.as_nanos() as u64))
            .collect();
        assert_eq!(
            micros,
            [
                ("stop", 100),
                ("save", 200),
                ("send", 100),
                ("receive", 50),
                ("load", 250),
                ("rebuild", 300),
                ("ready", 50),
                ("resume", 450)
            ]
        );
        let total: Duration = steps.iter().map(|(_, d)| *d).sum();
        assert_eq!(total, Duration::from_nanos(1_500));
    }

    #[test]
    fn an_older_destination_gives_no_breakdown() {
        assert!(breakdown(SourceMarks::default(), DestinationMarks::default(), 5).is_empty());
    }

    #[test]
    fn a_mark_out_of_order_counts_as_zero_not_as_a_wrap() {
        let source = SourceMarks {
            stopping_ns: 100,
            stopped_ns: 200,
            saved_ns: 150,
            sent_ns: 300,
        };
        let destination = DestinationMarks {
            received_ns: 310,
            loaded_ns: 320,
            rebuilt_ns: 330,
            ready_ns: 340,
        };
        let steps = breakdown(source, destination, 350);
        assert_eq!(steps[1], ("save", Duration::ZERO));
        assert_eq!(steps[2], ("send", Duration::from_nanos(100)));
    }
}
