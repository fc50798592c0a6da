//! `TestNic`: a vhost-user frontend (the `vhost` crate's `Frontend`) plus a
//! minimal virtio-net driver over shared memfd memory. It plays the VMM and
//! the guest at once, deterministically, for the integration tests and the
//! benches.

use super::guest_ram::GuestRam;
use super::virtq::{Buf, RawDesc, Virtq};
use anyhow::{anyhow, bail, Context};
use sandnic_device::features as f;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL: log dirty pages (acked while a migration runs).
pub const LOG_ALL: u64 = 1 << 26;

#[derive(Debug, Clone)]
pub struct NicConfig {
    /// Queue pairs to set up (all are enabled; MQ must be offered for > 1).
    pub pairs: u16,
    pub queue_size: u16,
    /// Features the driver is willing to ack (intersected with the offer).
    pub features: u64,
    /// Bytes per RX buffer (one descriptor per chain).
    pub rx_buf_len: u32,
    /// Bytes per TX buffer.
    pub tx_buf_len: u32,
    pub ram_size: u64,
    /// Ask for config-change notifications on a backend channel.
    pub backend_channel: bool,
    /// RX buffers kept posted (default: the whole ring).
    pub rx_posted: Option<usize>,
    /// Keep the control queue in the frontend, as QEMU, Cloud Hypervisor
    /// and DPDK's virtio_user do: CTRL_VQ not acked (the other control
    /// features still are, as virtio_user does), no control ring on the
    /// backend, queue pairs switched with SET_VRING_ENABLE only.
    pub ctrl_in_frontend: bool,
}

impl Default for NicConfig {
    fn default() -> Self {
        Self {
            pairs: 1,
            queue_size: 256,
            features: f::VERSION_1
                | f::MAC
                | f::STATUS
                | f::CTRL_VQ
                | f::CTRL_RX
                | f::CTRL_RX_EXTRA
                | f::CTRL_VLAN
                | f::GUEST_ANNOUNCE
                | f::MQ
                | f::CTRL_MAC_ADDR
                | f::MRG_RXBUF
                | f::EVENT_IDX,
            rx_buf_len: 2048,
            tx_buf_len: 2048,
            ram_size: 64 << 20,
            backend_channel: true,
            rx_posted: None,
            ctrl_in_frontend: false,
        }
    }
}

/// Which queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueId {
    Rx(usize),
    Tx(usize),
    Ctrl,
}

/// One virtqueue with its eventfds and one fixed buffer per descriptor.
pub struct Queue {
    pub vq: Virtq,
    pub kick: EventFd,
    pub call: EventFd,
    bufs: Vec<GuestAddress>,
    buf_len: u32,
}

/// A frontend that has negotiated but set up no memory or queues yet.
pub struct Standby {
    fe: Frontend,
    config: NicConfig,
    offered: u64,
    proto: VhostUserProtocolFeatures,
}

impl Standby {
    fn negotiate(mut fe: Frontend, config: &NicConfig) -> anyhow::Result<Self> {
        let offered = fe.get_features()?;
        if offered & PROTOCOL_FEATURES == 0 {
            bail!("backend does not offer protocol features");
        }
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ;
        let proto = fe.get_protocol_features()? & wanted;
        fe.set_protocol_features(proto)?;
        fe.set_owner()?;
        Ok(Self {
            fe,
            config: config.clone(),
            offered,
            proto,
        })
    }

    /// Memory table, backend channel, every queue started and RX filled.
    pub fn start(self) -> anyhow::Result<TestNic> {
        let Self {
            mut fe,
            config,
            offered,
            proto,
        } = self;
        let config = &config;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let mut acked = offered & (config.features | PROTOCOL_FEATURES);
        if config.ctrl_in_frontend {
            acked &= !f::CTRL_VQ;
        }
        fe.set_features(acked)?;
        let hdr_len = if acked & (f::VERSION_1 | f::MRG_RXBUF) != 0 {
            12
        } else {
            10
        };

        let ram = GuestRam::new(config.ram_size)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: super::guest_ram::RAM_BASE,
            memory_size: ram.size(),
            userspace_addr: ram.host_address(),
            mmap_offset: 0,
            mmap_handle: ram.fd(),
        };
        fe.set_mem_table(&[region])?;

        let backend_channel =
            if config.backend_channel && proto.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
                let (ours, theirs) = UnixStream::pair()?;
                fe.set_backend_request_fd(&theirs)?;
                ours.set_nonblocking(true)?;
                Some(ours)
            } else {
                None
            };

        let event_idx = acked & f::EVENT_IDX != 0;
        let mut nic = TestNic {
            frontend: fe,
            ram,
            offered,
            acked,
            hdr_len,
            rx: vec![],
            tx: vec![],
            ctrl: None,
            backend_channel,
            rx_posted: None,
        };
        let pairs = if acked & f::MQ != 0 { config.pairs } else { 1 };
        for pair in 0..pairs {
            let rx = nic.make_queue(
                2 * usize::from(pair),
                config.queue_size,
                config.rx_buf_len,
                event_idx,
            )?;
            let mut tx = nic.make_queue(
                2 * usize::from(pair) + 1,
                config.queue_size,
                config.tx_buf_len,
                event_idx,
            )?;
            // TX completions are reaped by polling.
            tx.vq.polled = true;
            tx.vq.quiet();
            nic.rx.push(rx);
            nic.tx.push(tx);
        }
        if acked & f::CTRL_VQ != 0 && !config.ctrl_in_frontend {
            let index = if acked & f::MQ != 0 {
                2 * usize::from(config.pairs)
            } else {
                2
            };
            nic.ctrl = Some(nic.make_queue(index, 64, 4096, event_idx)?);
        }
        nic.rx_posted = config.rx_posted;
        for pair in 0..nic.rx.len() {
            nic.fill_rx(pair);
        }
        if nic.rx.len() > 1 && nic.ctrl.is_some() {
            // As a Linux driver does at probe: use every queue pair.
            let command =
                sandnic_device::ctrl::CtrlCommand::MqPairsSet(nic.rx.len() as u16).encode();
            if nic.ctrl(&command)? != sandnic_device::ACK_OK {
                bail!("the device refused VQ_PAIRS_SET {}", nic.rx.len());
            }
        }
        Ok(nic)
    }
}

impl Queue {
    /// The fixed buffer of descriptor `head`.
    pub fn buffer(&self, head: u16) -> GuestAddress {
        self.bufs[usize::from(head)]
    }
}

pub struct TestNic {
    pub frontend: Frontend,
    pub ram: GuestRam,
    pub offered: u64,
    pub acked: u64,
    pub hdr_len: usize,
    pub rx: Vec<Queue>,
    pub tx: Vec<Queue>,
    pub ctrl: Option<Queue>,
    backend_channel: Option<UnixStream>,
    rx_posted: Option<usize>,
}

impl TestNic {
    /// Connects (retrying while the backend starts) and sets up every queue.
    pub fn connect(socket: &Path, config: &NicConfig) -> anyhow::Result<Self> {
        Self::connect_standby(socket, config)?.start()
    }

    /// Waits on `listener` for the backend to dial in (client mode, as a
    /// QEMU with `server=on` does) and sets up every queue.
    pub fn accept(
        listener: &std::os::unix::net::UnixListener,
        config: &NicConfig,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("no backend dialled in within {timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        Standby::negotiate(
            Frontend::from_stream(stream, 2 * u64::from(config.pairs) + 1),
            config,
        )?
        .start()
    }

    /// Hangs up the connection, as a frontend that exits does.
    pub fn hang_up(&self) {
        // SAFETY: the fd is this frontend's open connection; shutdown does
        // not close it (it is closed when the frontend is dropped).
        unsafe { libc::shutdown(self.socket_fd(), libc::SHUT_RDWR) };
    }

    /// Connects and negotiates only, as a migration's destination VMM does
    /// at its start; `Standby::start` sets up memory and queues later.
    pub fn connect_standby(socket: &Path, config: &NicConfig) -> anyhow::Result<Standby> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", socket.display()))
                }
            }
        };
        Standby::negotiate(
            Frontend::from_stream(stream, 2 * u64::from(config.pairs) + 1),
            config,
        )
    }

    fn make_queue(
        &mut self,
        index: usize,
        size: u16,
        buf_len: u32,
        event_idx: bool,
    ) -> anyhow::Result<Queue> {
        let mut vq = Virtq::new(&self.ram, size);
        vq.event_idx = event_idx;
        let bufs = (0..size)
            .map(|_| self.ram.alloc(u64::from(buf_len), 64))
            .collect();
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let fe = &mut self.frontend;
        fe.set_vring_num(index, size)?;
        fe.set_vring_base(index, 0)?;
        let data = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.ram.va_of(vq.desc),
            used_ring_addr: self.ram.va_of(vq.used),
            avail_ring_addr: self.ram.va_of(vq.avail),
            log_addr: None,
        };
        fe.set_vring_addr(index, &data)?;
        fe.set_vring_call(index, &call)?;
        fe.set_vring_kick(index, &kick)?;
        fe.set_vring_enable(index, true)?;
        vq.want_interrupts();
        Ok(Queue {
            vq,
            kick,
            call,
            bufs,
            buf_len,
        })
    }

    /// Posts every free RX descriptor as a buffer (up to the `rx_posted`
    /// limit) and kicks if the device asks for it.
    pub fn fill_rx(&mut self, pair: usize) {
        if self.post_rx(pair) && self.rx[pair].vq.needs_kick() {
            let _ = self.rx[pair].kick.write(1);
        }
    }

    /// Posts RX buffers like `fill_rx` but does not kick: the device sees
    /// them at its next look at the ring. True if any were posted.
    pub fn post_rx(&mut self, pair: usize) -> bool {
        let limit = self.rx_posted.unwrap_or(usize::MAX);
        let q = &mut self.rx[pair];
        let mut added = false;
        while q.vq.free_descriptors() > 0
            && usize::from(q.vq.size) - q.vq.free_descriptors() < limit
        {
            // One descriptor per chain: its index is the head, which names
            // its fixed buffer.
            let Some(probe) = q.vq.next_free() else { break };
            let buf = Buf {
                addr: q.bufs[usize::from(probe)],
                len: q.buf_len,
                writable: true,
            };
            if q.vq.add(&[buf]).is_none() {
                break;
            }
            added = true;
        }
        added
    }

    /// How many RX buffers `fill_rx` keeps posted (`None`: the whole ring).
    pub fn set_rx_posted(&mut self, limit: Option<usize>) {
        self.rx_posted = limit;
    }

    /// Queues frames on TX (header zeroed: no offloads) and kicks once.
    /// Returns how many were queued (fewer when the ring is full).
    pub fn send_batch<'a>(
        &mut self,
        pair: usize,
        frames: impl IntoIterator<Item = &'a [u8]>,
    ) -> usize {
        let zero = [0u8; 12];
        let hdr = &zero[..self.hdr_len];
        self.send_batch_with_header(pair, hdr, frames)
    }

    /// Like `send_batch`, with `header` (a full virtio-net header, e.g. with
    /// GSO fields) in front of every frame.
    pub fn send_batch_with_header<'a>(
        &mut self,
        pair: usize,
        header: &[u8],
        frames: impl IntoIterator<Item = &'a [u8]>,
    ) -> usize {
        let ram = &self.ram;
        let hdr = self.hdr_len;
        assert_eq!(header.len(), hdr, "header length");
        let q = &mut self.tx[pair];
        while q.vq.pop_used().is_some() {}
        q.vq.quiet();
        let mut sent = 0;
        for frame in frames {
            if q.vq.free_descriptors() == 0 {
                break;
            }
            let Some(probe) = q.vq.next_free() else { break };
            let addr = q.bufs[usize::from(probe)];
            let len = hdr + frame.len();
            assert!(len <= q.buf_len as usize, "frame larger than the TX buffer");
            let dst = ram.ptr(addr, len as u64);
            // SAFETY: `dst` has room for `len` bytes (checked by `ptr`); the
            // source slices are live and do not overlap guest RAM.
            unsafe {
                std::ptr::copy_nonoverlapping(header.as_ptr(), dst, hdr);
                std::ptr::copy_nonoverlapping(frame.as_ptr(), dst.add(hdr), frame.len());
            }
            q.vq.add(&[Buf {
                addr,
                len: len as u32,
                writable: false,
            }])
            .expect("free descriptor");
            sent += 1;
        }
        if sent > 0 && q.vq.needs_kick() {
            let _ = q.kick.write(1);
        }
        sent
    }

    /// Writes `header + frame` into every TX buffer of `pair` once, for
    /// `send_prepared` (benches: the frontend's own copy is not what they
    /// measure).
    pub fn prepare_tx(&mut self, pair: usize, header: &[u8], frame: &[u8]) -> usize {
        let ram = &self.ram;
        let q = &self.tx[pair];
        let len = header.len() + frame.len();
        assert!(len <= q.buf_len as usize, "frame larger than the TX buffer");
        for &addr in &q.bufs {
            let dst = ram.ptr(addr, len as u64);
            // SAFETY: `dst` has room for `len` bytes (checked by `ptr`).
            unsafe {
                std::ptr::copy_nonoverlapping(header.as_ptr(), dst, header.len());
                std::ptr::copy_nonoverlapping(frame.as_ptr(), dst.add(header.len()), frame.len());
            }
        }
        len
    }

    /// Queues up to `n` chains of `len` bytes whose buffers `prepare_tx`
    /// filled; kicks once. Returns how many were queued.
    pub fn send_prepared(&mut self, pair: usize, n: usize, len: usize) -> usize {
        let q = &mut self.tx[pair];
        while q.vq.pop_used().is_some() {}
        q.vq.quiet();
        let mut sent = 0;
        while sent < n {
            let Some(probe) = q.vq.next_free() else { break };
            let addr = q.bufs[usize::from(probe)];
            q.vq.add(&[Buf {
                addr,
                len: len as u32,
                writable: false,
            }])
            .expect("free descriptor");
            sent += 1;
        }
        if sent > 0 && q.vq.needs_kick() {
            let _ = q.kick.write(1);
        }
        sent
    }

    pub fn send(&mut self, pair: usize, frame: &[u8]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.send_batch(pair, [frame]) == 0 {
            if Instant::now() > deadline {
                bail!("TX ring stayed full");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    /// TX chains the device has returned so far are reclaimed; how many TX
    /// descriptors are still with the device.
    pub fn tx_in_flight(&mut self, pair: usize) -> usize {
        let q = &mut self.tx[pair];
        while q.vq.pop_used().is_some() {}
        usize::from(q.vq.size) - q.vq.free_descriptors()
    }

    /// Takes every received frame off the RX ring without copying it and
    /// gives the buffers back; returns (frames, bytes without headers).
    pub fn reap_rx(&mut self, pair: usize) -> (u64, u64) {
        let mem = self.ram.mem();
        let hdr = self.hdr_len as u64;
        let q = &mut self.rx[pair];
        let (mut frames, mut bytes) = (0, 0);
        while let Some((head, len)) = q.vq.pop_used() {
            let num_buffers: u16 = if hdr == 12 {
                mem.read_obj(GuestAddress(q.bufs[usize::from(head)].0 + 10))
                    .unwrap()
            } else {
                1
            };
            bytes += u64::from(len).saturating_sub(hdr);
            for _ in 1..num_buffers.max(1) {
                match q.vq.pop_used() {
                    Some((_, more)) => bytes += u64::from(more),
                    None => break,
                }
            }
            frames += 1;
        }
        if frames > 0 {
            self.fill_rx(pair);
        }
        (frames, bytes)
    }

    /// The next received frame (without the virtio-net header), if any.
    pub fn try_recv(&mut self, pair: usize) -> Option<Vec<u8>> {
        let mem = self.ram.mem();
        let hdr = self.hdr_len;
        let q = &mut self.rx[pair];
        let (head, len) = q.vq.pop_used()?;
        let first = q.bufs[usize::from(head)];
        let num_buffers: u16 = if hdr == 12 {
            mem.read_obj(GuestAddress(first.0 + 10)).unwrap()
        } else {
            1
        };
        let mut frame = vec![0u8; (len as usize).saturating_sub(hdr)];
        mem.read_slice(&mut frame, GuestAddress(first.0 + hdr as u64))
            .unwrap();
        for _ in 1..num_buffers.max(1) {
            let Some((head, len)) = q.vq.pop_used() else {
                break;
            };
            let mut more = vec![0u8; len as usize];
            mem.read_slice(&mut more, q.bufs[usize::from(head)])
                .unwrap();
            frame.extend_from_slice(&more);
        }
        self.fill_rx(pair);
        Some(frame)
    }

    pub fn recv(&mut self, pair: usize, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.try_recv(pair) {
                return Some(frame);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sends one control command and returns the device's ack.
    pub fn ctrl(&mut self, command: &[u8]) -> anyhow::Result<u8> {
        let mem = self.ram.mem();
        let q = self
            .ctrl
            .as_mut()
            .ok_or_else(|| anyhow!("no control queue negotiated"))?;
        let cmd_at = q.bufs[0];
        let ack_at = GuestAddress(cmd_at.0 + u64::from(q.buf_len) - 1);
        assert!(command.len() < q.buf_len as usize);
        mem.write_slice(command, cmd_at).unwrap();
        mem.write_obj(0xffu8, ack_at).unwrap();
        let ours =
            q.vq.add(&[
                Buf {
                    addr: cmd_at,
                    len: command.len() as u32,
                    writable: false,
                },
                Buf {
                    addr: ack_at,
                    len: 1,
                    writable: true,
                },
            ])
            .ok_or_else(|| anyhow!("control queue full"))?;
        let _ = q.kick.write(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // Used entries of other chains (hand-made ones) are skipped.
            if let Some((head, _)) = q.vq.pop_used() {
                if head == ours {
                    return Ok(mem.read_obj(ack_at).unwrap());
                }
                continue;
            }
            if Instant::now() > deadline {
                bail!("no answer on the control queue");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    pub fn queue(&mut self, id: QueueId) -> &mut Queue {
        match id {
            QueueId::Rx(pair) => &mut self.rx[pair],
            QueueId::Tx(pair) => &mut self.tx[pair],
            QueueId::Ctrl => self.ctrl.as_mut().expect("control queue"),
        }
    }

    /// Takes `n` descriptor slots for hand-made descriptors (their indices,
    /// for `next` fields and `raw_chain`).
    pub fn reserve(&mut self, id: QueueId, n: usize) -> Vec<u16> {
        self.queue(id).vq.take_free(n)
    }

    /// Writes hand-made descriptors into reserved `slots`, publishes `head`
    /// and kicks (for the bad-input tests).
    pub fn raw_chain(&mut self, id: QueueId, descs: &[RawDesc], slots: &[u16], head: u16) {
        let q = self.queue(id);
        q.vq.add_raw(descs, slots, head);
        let _ = q.kick.write(1);
    }

    /// A guest address inside this frontend's RAM, for hand-made descriptors.
    pub fn scratch(&self, len: u64) -> GuestAddress {
        self.ram.alloc(len, 64)
    }

    /// Starts dirty-page logging into `size` bytes of `log` at `offset`, in
    /// QEMU's order: SET_LOG_BASE, SET_FEATURES with LOG_ALL, then every
    /// ring's address again with the log flag and its used ring's guest
    /// address.
    pub fn start_dirty_log(
        &mut self,
        log: &impl AsRawFd,
        size: u64,
        offset: u64,
    ) -> anyhow::Result<()> {
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: log.as_raw_fd(),
        };
        self.frontend.set_log_base(0, Some(region))?;
        self.frontend.set_features(self.acked | LOG_ALL)?;
        self.set_ring_log_flags(true)
    }

    /// Stops dirty-page logging: SET_FEATURES without LOG_ALL, rings without
    /// the log flag.
    pub fn stop_dirty_log(&mut self) -> anyhow::Result<()> {
        self.frontend.set_features(self.acked)?;
        self.set_ring_log_flags(false)
    }

    fn set_ring_log_flags(&mut self, log: bool) -> anyhow::Result<()> {
        let rings: Vec<(usize, u16, [GuestAddress; 3])> = self
            .queue_indices()
            .into_iter()
            .map(|(index, id)| {
                let vq = &self.queue(id).vq;
                (index, vq.size, [vq.desc, vq.avail, vq.used])
            })
            .collect();
        for (index, size, [desc, avail, used]) in rings {
            let data = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: u32::from(log),
                desc_table_addr: self.ram.va_of(desc),
                used_ring_addr: self.ram.va_of(used),
                avail_ring_addr: self.ram.va_of(avail),
                log_addr: log.then_some(used.0),
            };
            self.frontend.set_vring_addr(index, &data)?;
        }
        Ok(())
    }

    /// Switches queue pair `pair` on or off as a frontend that keeps the
    /// control queue does for VQ_PAIRS_SET: SET_VRING_ENABLE on both rings.
    pub fn enable_pair(&mut self, pair: usize, enable: bool) -> anyhow::Result<()> {
        self.frontend.set_vring_enable(2 * pair, enable)?;
        self.frontend.set_vring_enable(2 * pair + 1, enable)?;
        Ok(())
    }

    /// Gives queue `id` a new kick eventfd (SET_VRING_KICK), as a VMM may
    /// at any time; the old one is closed and never written again.
    pub fn replace_kick(&mut self, id: QueueId) -> anyhow::Result<()> {
        let Some((index, _)) = self.queue_indices().into_iter().find(|(_, q)| *q == id) else {
            bail!("no queue {id:?}");
        };
        let kick = EventFd::new(EFD_NONBLOCK)?;
        self.frontend.set_vring_kick(index, &kick)?;
        self.queue(id).kick = kick;
        Ok(())
    }

    /// Stops every ring as a VMM does when the VM stops (GET_VRING_BASE);
    /// returns where each would continue.
    pub fn stop_rings(&mut self) -> anyhow::Result<Vec<u32>> {
        self.queue_indices()
            .into_iter()
            .map(|(index, _)| Ok(self.frontend.get_vring_base(index)?))
            .collect()
    }

    /// Starts every ring again where `stop_rings` left it (`bases`, in its
    /// order), each with a new call eventfd, as a VMM does when the VM runs
    /// again (`cont`, a migration's destination). Signals on the old call
    /// fds are never read again.
    pub fn restart_rings(&mut self, bases: &[u32]) -> anyhow::Result<()> {
        for ((index, id), &base) in self.queue_indices().into_iter().zip(bases) {
            let call = EventFd::new(EFD_NONBLOCK)?;
            self.frontend.set_vring_base(index, u16::try_from(base)?)?;
            self.frontend.set_vring_call(index, &call)?;
            let q = self.queue(id);
            q.call = call;
            let kick = q.kick.try_clone()?;
            self.frontend.set_vring_kick(index, &kick)?;
        }
        Ok(())
    }

    /// Whether the device signalled queue `id`'s call eventfd since the last
    /// look (reading it clears it).
    pub fn notified(&mut self, id: QueueId) -> bool {
        self.queue(id).call.read().is_ok()
    }

    /// Every queue with its virtqueue index.
    fn queue_indices(&self) -> Vec<(usize, QueueId)> {
        let mut ids = Vec::new();
        for pair in 0..self.rx.len() {
            ids.push((2 * pair, QueueId::Rx(pair)));
            ids.push((2 * pair + 1, QueueId::Tx(pair)));
        }
        if self.ctrl.is_some() {
            let index = if self.acked & f::MQ != 0 {
                2 * self.rx.len()
            } else {
                2
            };
            ids.push((index, QueueId::Ctrl));
        }
        ids
    }

    /// The device's config space (GET_CONFIG).
    pub fn config(&mut self, len: u32) -> anyhow::Result<Vec<u8>> {
        let (_, bytes) = self.frontend.get_config(
            0,
            len,
            VhostUserConfigFlags::WRITABLE,
            &vec![0; len as usize],
        )?;
        Ok(bytes)
    }

    /// Waits for a CONFIG_CHANGE_MSG on the backend channel.
    pub fn wait_config_change(&mut self, timeout: Duration) -> bool {
        let Some(channel) = &mut self.backend_channel else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let mut header = [0u8; 12];
        while Instant::now() < deadline {
            match channel.read(&mut header) {
                Ok(12) => {
                    return u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) == 2
                }
                Ok(_) => return false,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        false
    }

    pub fn socket_fd(&self) -> i32 {
        self.frontend.as_raw_fd()
    }
}
