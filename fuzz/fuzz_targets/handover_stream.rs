//! The handover stream parser: whatever a (possibly hostile or broken)
//! source sends, the destination decodes and validates it without panicking.

#![no_main]
use libfuzzer_sys::fuzz_target;
use sandnic_host::handover::state::{self, Commit, Offer, Reply};
use sandnic_host::handover::stream;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    if data.len() > 1 << 16 {
        return;
    }
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    tx.write_all(data).expect("write");
    drop(tx);
    // As the destination reads it: an offer, then a commit checked
    // against the offer.
    if let Ok(offer) = stream::recv::<Offer>(&rx, Duration::from_millis(50)) {
        let _ = state::validate(&offer, false);
        let _ = state::validate(&offer, true);
        if let Ok(commit) = stream::recv::<Commit>(&rx, Duration::from_millis(10)) {
            let _ = state::validate_commit(&commit, &offer.host, false);
            let _ = state::validate_commit(&commit, &offer.host, true);
        }
    }
    // A commit on its own, and the fds a manifest announces.
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    tx.write_all(data).expect("write");
    drop(tx);
    if let Ok(commit) = stream::recv::<Commit>(&rx, Duration::from_millis(50)) {
        let _ = stream::recv_fds(&rx, commit.fds.len().min(8), Duration::from_millis(10));
    }
    let (mut tx, rx) = UnixStream::pair().expect("socketpair");
    tx.write_all(data).expect("write");
    drop(tx);
    let _ = stream::recv::<Reply>(&rx, Duration::from_millis(50));
});
