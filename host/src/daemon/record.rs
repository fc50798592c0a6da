//! The state record a restarted sandnic rebuilds its device from: a memfd
//! kept in the service manager's fd store (`fd_store.rs`) beside the fds
//! it describes.
//!
//! A process can die at any instruction, also in the middle of writing
//! the record, so the file holds two copies, each with a generation number
//! and a checksum. A write goes to the copy not holding the newest
//! generation, header last; a reader takes the valid copy with the highest
//! generation. A torn write spoils at most the copy being written, whose
//! checksum then fails, and the other still holds the previous record.
//!
//! The first page holds one more byte, written on its own: whether the
//! record may be behind the device (`set_busy`). It is set when a frontend
//! message is taken and cleared once a record written after it is whole;
//! it stays set while a VM migration is under way. A process that died
//! mid-message may owe the frontend a reply, or have read half a message;
//! one that died mid-migration leaves a second frontend and a dirty log
//! the record does not hold, and a source VMM whose log a restarted
//! process would not fill (the migrated guest would read stale pages).
//! The next process cannot finish either, so it closes that connection
//! rather than guess (see `serve::restart`).
//!
//! File layout: `[busy page][copy A][copy B]`, each copy a 32-byte header
//! (magic, generation, length, FNV-1a of the payload) and its payload.

use crate::backend::handover::FdRole;
use crate::handover::state::Offer;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const MAGIC: [u8; 8] = *b"sandrec1";
const BUSY_PAGE: u64 = 4096;
const HEADER: u64 = 32;
/// Room for one copy. A record is a few KiB, plus a component's bytes when
/// one was swapped in from a file (`sandbox::MAX_COMPONENT_BYTES`, 8 MiB);
/// the memfd is sparse, so only what is written takes memory.
const COPY_SIZE: u64 = 9 << 20;

/// What a restarted process needs besides the fds: the device as a
/// handover would offer it, its model's state, and under which name each
/// fd is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Host state, component and fd roles. Ring positions in it are not
    /// used: a restart resumes each ring at the used index in guest
    /// memory.
    pub offer: Offer,
    #[serde(with = "crate::handover::state::serde_bytes_compat")]
    pub device_state: Vec<u8>,
    /// The stored name of each role's fd. Two roles may share a name: the
    /// manager keeps one copy of an open file, under its first name.
    pub names: Vec<(FdRole, String)>,
    /// When processes started from this record (ms since the epoch), the
    /// recent ones: a device that keeps dying is given up on.
    pub restarts: Vec<u64>,
}

/// Why no record can be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading the state record: {0}")]
    Io(#[from] std::io::Error),
    #[error("neither copy of the state record is whole (torn or never written)")]
    NoValidCopy,
    #[error("the state record does not decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("the state record is {0} bytes, more than a copy holds")]
    TooLarge(usize),
}

/// The memfd and which copy holds the newest generation.
pub struct RecordFile {
    fd: OwnedFd,
    generation: u64,
    /// The payload last written, to skip writing the same again.
    last: Vec<u8>,
}

impl RecordFile {
    /// A new, empty record file.
    pub fn create() -> std::io::Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; the result is
        // checked and owned at once.
        let fd = unsafe { libc::memfd_create(c"sandnic-record".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::unistd::ftruncate(&fd, (BUSY_PAGE + 2 * COPY_SIZE) as i64)?;
        Ok(Self {
            fd,
            generation: 0,
            last: Vec::new(),
        })
    }

    /// The record file a previous process stored, and its newest record.
    pub fn open(fd: OwnedFd) -> Result<(Self, Record), RecordError> {
        let mut best: Option<(u64, Vec<u8>)> = None;
        for copy in 0..2 {
            if let Some((generation, payload)) = read_copy(fd.as_fd(), copy)? {
                if best.as_ref().is_none_or(|(g, _)| generation > *g) {
                    best = Some((generation, payload));
                }
            }
        }
        let (generation, payload) = best.ok_or(RecordError::NoValidCopy)?;
        let record = rmp_serde::from_slice(&payload)?;
        Ok((
            Self {
                fd,
                generation,
                last: payload,
            },
            record,
        ))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The newest generation written (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes `record` as the newest generation, unless it is what the
    /// newest already holds.
    pub fn write(&mut self, record: &Record) -> Result<(), RecordError> {
        let payload = rmp_serde::to_vec_named(record).expect("a record serializes");
        if payload == self.last {
            return Ok(());
        }
        if payload.len() as u64 > COPY_SIZE - HEADER {
            return Err(RecordError::TooLarge(payload.len()));
        }
        let generation = self.generation + 1;
        let copy = generation % 2;
        let at = copy_offset(copy);
        pwrite_all(self.fd.as_fd(), &payload, at + HEADER)?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        header[24..32].copy_from_slice(&fnv1a(&payload).to_le_bytes());
        pwrite_all(self.fd.as_fd(), &header, at)?;
        self.generation = generation;
        self.last = payload;
        Ok(())
    }

    /// Marks whether the record may be behind the device (one byte, one
    /// system call: it brackets every frontend message).
    pub fn set_busy(&self, busy: bool) {
        let _ = pwrite_all(self.fd.as_fd(), &[u8::from(busy)], 0);
    }

    /// Whether the process that wrote this died with the record behind the
    /// device: inside a frontend message, or during a VM migration.
    pub fn was_busy(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(nix::sys::uio::pread(&self.fd, &mut byte, 0), Ok(1) if byte[0] != 0)
    }
}

fn copy_offset(copy: u64) -> u64 {
    BUSY_PAGE + copy * COPY_SIZE
}

/// A copy's generation and payload, if its header and checksum hold.
fn read_copy(fd: BorrowedFd<'_>, copy: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let at = copy_offset(copy);
    let mut header = [0u8; HEADER as usize];
    if nix::sys::uio::pread(fd, &mut header, at as i64)? < header.len() {
        return Ok(None);
    }
    let word = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    let (generation, len, sum) = (word(8), word(16), word(24));
    if header[..8] != MAGIC || len > COPY_SIZE - HEADER {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    if nix::sys::uio::pread(fd, &mut payload, (at + HEADER) as i64)? < payload.len() {
        return Ok(None);
    }
    Ok((fnv1a(&payload) == sum).then_some((generation, payload)))
}

fn pwrite_all(fd: BorrowedFd<'_>, mut bytes: &[u8], mut at: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match nix::sys::uio::pwrite(fd, bytes, at as i64) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                at += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// FNV-1a, 64 bits: catches a torn or stale copy (not an adversary: the
/// file is sandnic's own, kept by the service manager).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl AsRawFd for RecordFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tag: u8) -> Record {
        let mut offer = crate::handover::state::tests::offer();
        offer.host.link_up = tag.is_multiple_of(2);
        Record {
            offer,
            device_state: vec![tag; 100],
            names: vec![(FdRole::Connection, format!("sandnic.conn.{tag}"))],
            restarts: vec![],
        }
    }

    fn reopen(file: &RecordFile) -> Result<(RecordFile, Record), RecordError> {
        RecordFile::open(file.fd.try_clone()?)
    }

    #[test]
    fn the_newest_whole_copy_is_read_back() {
        let mut file = RecordFile::create().unwrap();
        assert!(matches!(reopen(&file), Err(RecordError::NoValidCopy)));
        for tag in 1..=3 {
            file.write(&record(tag)).unwrap();
            assert_eq!(reopen(&file).unwrap().1, record(tag));
        }
    }

    #[test]
    fn a_torn_write_leaves_the_previous_record() {
        let mut file = RecordFile::create().unwrap();
        file.write(&record(1)).unwrap();
        file.write(&record(2)).unwrap();
        // Generation 3 goes to copy 1 (where 1 was): its payload is half
        // written when the process dies, the header still the old one.
        let at = copy_offset(1) + HEADER;
        pwrite_all(file.fd(), &[0xee; 40], at).unwrap();
        assert_eq!(reopen(&file).unwrap().1, record(2));
        // Its header written over a payload that does not match.
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..16].copy_from_slice(&9u64.to_le_bytes());
        header[16..24].copy_from_slice(&40u64.to_le_bytes());
        pwrite_all(file.fd(), &header, copy_offset(1)).unwrap();
        assert_eq!(reopen(&file).unwrap().1, record(2));
        // Both copies spoiled: no record, not a wrong one.
        pwrite_all(file.fd(), &[0xee; 40], copy_offset(0) + HEADER).unwrap();
        assert!(matches!(reopen(&file), Err(RecordError::NoValidCopy)));
    }

    #[test]
    fn the_busy_byte_is_its_own() {
        let mut file = RecordFile::create().unwrap();
        file.write(&record(1)).unwrap();
        assert!(!file.was_busy());
        file.set_busy(true);
        let (again, read) = reopen(&file).unwrap();
        assert!(again.was_busy());
        assert_eq!(read, record(1));
        file.set_busy(false);
        assert!(!reopen(&file).unwrap().0.was_busy());
    }
}
