//! What an operator asks for: a rate in bytes and/or frames per second
//! with a burst, for one direction. Parsed from `--tx-limit SPEC` /
//! `--rx-limit SPEC` and from the API's `limit` command, and validated
//! here in one place, so both refuse the same values for the same reason.

use serde::{Deserialize, Serialize};

/// Largest rate or burst accepted: 1 TB/s or 1 T frames/s is beyond any
/// NIC, and keeps every product of a rate with a time in range.
pub const MAX_VALUE: u64 = 1_000_000_000_000;
/// The largest frame a TAP carries: a GSO super-frame. A byte burst is at
/// least this, so the bucket can always hold the frame that is next.
pub const MAX_FRAME_BYTES: u64 = 65_550;
/// A burst defaults to this share of a second of the rate: enough for a
/// TCP window's worth of frames to pass at once without the guest's stack
/// seeing the limit as loss, small enough that the long-run rate shows
/// within a second.
pub const DEFAULT_BURST_SECONDS: f64 = 0.1;
/// The smallest default frame burst: a batch of small frames passes whole.
pub const MIN_DEFAULT_FRAME_BURST: u64 = 64;

/// One direction's limit: at least one of `bytes` and `frames`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    /// Ethernet frame bytes per second, as the TAP counts them (no
    /// virtio-net header; a GSO super-frame counts its whole length).
    pub bytes: Option<u64>,
    /// Frames per second (a GSO super-frame is one).
    pub frames: Option<u64>,
    /// The byte bucket's size (see `default_burst_bytes`).
    pub burst_bytes: Option<u64>,
    /// The frame bucket's size (see `default_burst_frames`).
    pub burst_frames: Option<u64>,
}

/// Why a limit is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `{0}` is not `key=value`
    #[error("`{0}` is not key=value")]
    NotKeyValue(String),
    #[error("unknown key `{0}` (known: bytes, frames, burst-bytes, burst-frames)")]
    UnknownKey(String),
    #[error("`{0}` is given twice")]
    Repeated(String),
    #[error("`{key}={value}` is not a whole number (decimal suffixes k, M, G allowed)")]
    NotANumber { key: String, value: String },
    #[error("`{0}` must be more than 0 (to stop traffic, take the link down)")]
    Zero(String),
    #[error("`{0}` is above {MAX_VALUE}")]
    TooLarge(String),
    #[error("a limit needs bytes= or frames=")]
    NoRate,
    #[error("burst-bytes is given without bytes")]
    BurstBytesWithoutRate,
    #[error("burst-frames is given without frames")]
    BurstFramesWithoutRate,
    #[error("burst-bytes must be at least {MAX_FRAME_BYTES} (the largest frame)")]
    BurstBelowFrame,
}

impl RateSpec {
    /// Checks a spec built field by field (the API's JSON form).
    pub fn validated(self) -> Result<Self, SpecError> {
        for (key, value) in [
            ("bytes", self.bytes),
            ("frames", self.frames),
            ("burst-bytes", self.burst_bytes),
            ("burst-frames", self.burst_frames),
        ] {
            match value {
                Some(0) => return Err(SpecError::Zero(key.into())),
                Some(v) if v > MAX_VALUE => return Err(SpecError::TooLarge(key.into())),
                _ => {}
            }
        }
        if self.bytes.is_none() && self.frames.is_none() {
            return Err(SpecError::NoRate);
        }
        if self.burst_bytes.is_some() && self.bytes.is_none() {
            return Err(SpecError::BurstBytesWithoutRate);
        }
        if self.burst_frames.is_some() && self.frames.is_none() {
            return Err(SpecError::BurstFramesWithoutRate);
        }
        if self.burst_bytes.is_some_and(|b| b < MAX_FRAME_BYTES) {
            return Err(SpecError::BurstBelowFrame);
        }
        Ok(self)
    }

    /// The byte bucket's size: as given, or a tenth of a second of the
    /// rate, and never below the largest frame.
    pub fn burst_bytes_or_default(&self) -> Option<u64> {
        let rate = self.bytes?;
        Some(
            self.burst_bytes
                .unwrap_or_else(|| share_of_second(rate).max(2 * MAX_FRAME_BYTES)),
        )
    }

    /// The frame bucket's size: as given, or a tenth of a second of the
    /// rate, at least `MIN_DEFAULT_FRAME_BURST`.
    pub fn burst_frames_or_default(&self) -> Option<u64> {
        let rate = self.frames?;
        Some(
            self.burst_frames
                .unwrap_or_else(|| share_of_second(rate).max(MIN_DEFAULT_FRAME_BURST)),
        )
    }
}

fn share_of_second(rate: u64) -> u64 {
    (rate as f64 * DEFAULT_BURST_SECONDS) as u64
}

impl std::str::FromStr for RateSpec {
    type Err = SpecError;

    /// `bytes=N[,frames=N][,burst-bytes=N][,burst-frames=N]`, in any order.
    fn from_str(text: &str) -> Result<Self, SpecError> {
        let mut spec = RateSpec {
            bytes: None,
            frames: None,
            burst_bytes: None,
            burst_frames: None,
        };
        for item in text.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(item.into()))?;
            let slot = match key {
                "bytes" => &mut spec.bytes,
                "frames" => &mut spec.frames,
                "burst-bytes" => &mut spec.burst_bytes,
                "burst-frames" => &mut spec.burst_frames,
                _ => return Err(SpecError::UnknownKey(key.into())),
            };
            if slot.is_some() {
                return Err(SpecError::Repeated(key.into()));
            }
            *slot = Some(parse_count(key, value)?);
        }
        spec.validated()
    }
}

impl std::fmt::Display for RateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("bytes", self.bytes),
            ("frames", self.frames),
            ("burst-bytes", self.burst_bytes),
            ("burst-frames", self.burst_frames),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
        f.write_str(&parts.join(","))
    }
}

/// A whole number with an optional decimal suffix: `k` (10³), `M` (10⁶),
/// `G` (10⁹). No bits, no fractions.
fn parse_count(key: &str, value: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::NotANumber {
        key: key.into(),
        value: value.into(),
    };
    let (digits, scale) = match value.char_indices().last() {
        Some((at, 'k')) => (&value[..at], 1_000),
        Some((at, 'M')) => (&value[..at], 1_000_000),
        Some((at, 'G')) => (&value[..at], 1_000_000_000),
        _ => (value, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SpecError::TooLarge(key.into()))?;
    n.checked_mul(scale)
        .filter(|&v| v <= MAX_VALUE)
        .ok_or_else(|| SpecError::TooLarge(key.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RateSpec, SpecError> {
        text.parse()
    }

    #[test]
    fn suffixes_are_decimal() {
        let spec = parse("bytes=12500k,frames=100k").unwrap();
        assert_eq!(spec.bytes, Some(12_500_000));
        assert_eq!(spec.frames, Some(100_000));
        assert_eq!(parse("bytes=1G").unwrap().bytes, Some(1_000_000_000));
        assert_eq!(parse("bytes=125M").unwrap().bytes, Some(125_000_000));
        assert_eq!(parse("frames=7").unwrap().frames, Some(7));
    }

    #[test]
    fn default_bursts_are_a_tenth_of_a_second_with_floors() {
        let spec = parse("bytes=125M,frames=100k").unwrap();
        assert_eq!(spec.burst_bytes_or_default(), Some(12_500_000));
        assert_eq!(spec.burst_frames_or_default(), Some(10_000));
        let slow = parse("bytes=1k,frames=10").unwrap();
        assert_eq!(slow.burst_bytes_or_default(), Some(2 * MAX_FRAME_BYTES));
        assert_eq!(slow.burst_frames_or_default(), Some(64));
        let given = parse("bytes=1M,burst-bytes=200k").unwrap();
        assert_eq!(given.burst_bytes_or_default(), Some(200_000));
    }

    #[test]
    fn malformed_specs_say_why() {
        for (text, want) in [
            ("", SpecError::NotKeyValue(String::new())),
            ("bytes", SpecError::NotKeyValue("bytes".into())),
            ("bits=5", SpecError::UnknownKey("bits".into())),
            ("bytes=1,bytes=2", SpecError::Repeated("bytes".into())),
            ("bytes=0", SpecError::Zero("bytes".into())),
            (
                "bytes=1.5M",
                SpecError::NotANumber {
                    key: "bytes".into(),
                    value: "1.5M".into(),
                },
            ),
            (
                "bytes=-1",
                SpecError::NotANumber {
                    key: "bytes".into(),
                    value: "-1".into(),
                },
            ),
            (
                "bytes=10m",
                SpecError::NotANumber {
                    key: "bytes".into(),
                    value: "10m".into(),
                },
            ),
            (
                "bytes=k",
                SpecError::NotANumber {
                    key: "bytes".into(),
                    value: "k".into(),
                },
            ),
            (
                "bytes=99999999999999999999",
                SpecError::TooLarge("bytes".into()),
            ),
            ("bytes=2000G", SpecError::TooLarge("bytes".into())),
            ("burst-bytes=100k", SpecError::NoRate),
            (
                "frames=10,burst-bytes=100k",
                SpecError::BurstBytesWithoutRate,
            ),
            (
                "bytes=10,burst-frames=100",
                SpecError::BurstFramesWithoutRate,
            ),
            ("bytes=1M,burst-bytes=1k", SpecError::BurstBelowFrame),
        ] {
            assert_eq!(parse(text), Err(want), "{text}");
        }
    }

    #[test]
    fn display_parses_back() {
        let spec = parse("frames=10k,bytes=1M,burst-frames=500").unwrap();
        assert_eq!(
            spec.to_string(),
            "bytes=1000000,frames=10000,burst-frames=500"
        );
        assert_eq!(parse(&spec.to_string()), Ok(spec));
    }
}
