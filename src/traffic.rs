//! Continuous numbered traffic in both directions between the test frontend
//! and the host side of the TAP, with something happening in the middle
//! (a handover, a swap). Used by the tests (which require every frame once
//! and in order) and the benches (which count what was lost).

use crate::frames;
use crate::frontend::TestNic;
use crate::harness::{NetNs, RIG_GUEST_IP, RIG_GUEST_MAC, RIG_HOST_IP};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TrafficReport<R> {
    /// Frames sent each way.
    pub sent: u64,
    /// Sequence numbers the guest received (host → guest).
    pub guest_got: Vec<u64>,
    /// Sequence numbers the host received (guest → host).
    pub host_got: Vec<u64>,
    pub result: R,
}

impl<R> TrafficReport<R> {
    /// Frames lost in both directions together.
    pub fn lost(&self) -> u64 {
        2 * self.sent - self.guest_got.len() as u64 - self.host_got.len() as u64
    }

    /// Whether `got` is exactly 0..sent: nothing lost, duplicated or
    /// reordered.
    pub fn exact(&self, got: &[u64]) -> Result<(), String> {
        let first_break = got.windows(2).position(|w| w[1] != w[0] + 1);
        if got.len() as u64 == self.sent
            && first_break.is_none()
            && got.first().is_none_or(|&s| s == 0)
        {
            return Ok(());
        }
        Err(format!(
            "{} of {} frames, first break at {:?} ({:?})",
            got.len(),
            self.sent,
            first_break,
            first_break.map(|i| &got[i.saturating_sub(2)..(i + 3).min(got.len())])
        ))
    }
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

fn set_rcvbuf(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 32 << 20;
    // SAFETY: SO_RCVBUFFORCE takes an int; `size` lives for the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            4,
        );
    }
}

/// Frames either side may have in flight (sent, not yet received). Every
/// queue on the way holds more: the TAP's (10 000 frames, see
/// `NetNs::add_tap`) and the host socket's (32 MiB). So a consumer that a
/// loaded machine runs late makes the sender wait instead of a kernel
/// queue drop frames: what the tests count is what sandnic delivers, not
/// how fast the machine is. Unhindered, far fewer are in flight.
const WINDOW: u64 = 4096;

/// Sends `rate` frames/s each way for `duration` (ports 6000/6001 on the
/// host side), running `action` on its own thread after `action_after`.
/// No side drops a frame it wants to send: a full ring, a full socket
/// buffer or a full window (`WINDOW`) waits.
pub fn run<R: Send>(
    nic: &mut TestNic,
    ns: &NetNs,
    tap_mac: frames::Mac,
    rate: u64,
    duration: Duration,
    action_after: Duration,
    action: impl FnOnce() -> R + Send,
) -> TrafficReport<R> {
    // Frames each side has received so far (for the windows).
    let guest_count = AtomicU64::new(0);
    let host_count = AtomicU64::new(0);
    // The guest side has sent its last frame.
    let guest_done = AtomicBool::new(false);
    // The guest side stopped receiving: a sender waiting for window room
    // would wait for ever.
    let receiving_ended = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let host_rx = ns
            .inside(|| Ok(UdpSocket::bind(("10.77.0.1", 6000))?))
            .expect("host rx socket");
        let host_tx = ns
            .inside(|| Ok(UdpSocket::bind(("10.77.0.1", 6001))?))
            .expect("host tx socket");
        set_rcvbuf(&host_rx);
        host_rx
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let total = rate * duration.as_millis() as u64 / 1000;
        let (guest_count, host_count, guest_done, receiving_ended) =
            (&guest_count, &host_count, &guest_done, &receiving_ended);

        // Host → guest: bursts every millisecond, sleeping in between (spinning
        // would take the core the backend needs).
        let sender = scope.spawn(move || {
            let start = Instant::now();
            let mut seq = 0;
            while seq < total && !receiving_ended.load(Ordering::Acquire) {
                let due = (start.elapsed().as_nanos() as u64 * rate / 1_000_000_000).min(total);
                let allowed = due.min(guest_count.load(Ordering::Acquire) + WINDOW);
                while seq < allowed {
                    // A full socket buffer (ENOBUFS) is tried again.
                    if host_tx
                        .send_to(&seq.to_le_bytes(), "10.77.0.2:5000")
                        .is_err()
                    {
                        break;
                    }
                    seq += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let receiver = scope.spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            // Until all came, or nothing for a read timeout after the
            // guest's last frame (not before: a loaded machine may run
            // the guest side late).
            // (A frame that came twice, as after a crash, must not end the
            // count before the last one came: it goes on until that one.)
            while (got.len() as u64) < total || got.last().copied() != total.checked_sub(1) {
                match host_rx.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        got.extend(seq_of(&buf[..n]));
                        host_count.store(got.len() as u64, Ordering::Release);
                    }
                    Err(_) if guest_done.load(Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            got
        });
        let action = scope.spawn(move || {
            std::thread::sleep(action_after);
            action()
        });

        let start = Instant::now();
        let mut next_tx = 0u64;
        let mut guest_got = Vec::new();
        let deadline = start + duration + Duration::from_secs(10);
        let mut quiet_since = None;
        while Instant::now() < deadline {
            let due = (start.elapsed().as_nanos() as u64 * rate / 1_000_000_000).min(total);
            let allowed = due.min(host_count.load(Ordering::Acquire) + WINDOW);
            while next_tx < allowed {
                let frame = frames::udp_frame(
                    tap_mac,
                    RIG_GUEST_MAC,
                    (RIG_GUEST_IP, RIG_HOST_IP),
                    (5000, 6000),
                    &next_tx.to_le_bytes(),
                );
                if nic.send_batch(0, [frame.as_slice()]) == 0 {
                    break;
                }
                next_tx += 1;
            }
            let mut idle = true;
            while let Some(frame) = nic.try_recv(0) {
                idle = false;
                if let Some(seq) = frames::udp_payload(&frame).and_then(seq_of) {
                    guest_got.push(seq);
                }
            }
            guest_count.store(guest_got.len() as u64, Ordering::Release);
            let done_sending = next_tx == total && start.elapsed() > duration;
            if next_tx == total {
                guest_done.store(true, Ordering::Release);
            }
            if done_sending
                && ((guest_got.len() as u64 >= total
                    && guest_got.last().copied() == total.checked_sub(1))
                    || quiet_since
                        .is_some_and(|t: Instant| t.elapsed() > Duration::from_millis(500)))
            {
                break;
            }
            if idle {
                quiet_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_micros(200));
            } else {
                quiet_since = None;
            }
        }
        guest_done.store(true, Ordering::Release);
        receiving_ended.store(true, Ordering::Release);
        sender.join().expect("sender");
        let result = action.join().expect("action");
        let host_got = receiver.join().expect("receiver");
        TrafficReport {
            sent: total,
            guest_got,
            host_got,
            result,
        }
    })
}
