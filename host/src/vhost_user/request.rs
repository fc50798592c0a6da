//! Frontend requests, parsed and checked from raw messages. Sizes, indices
//! and fd counts are validated here; anything malformed becomes an error the
//! connection answers (with a NACK when a reply is expected) and counts.

use super::wire::Message;
use crate::memory::guest_memory::RegionInfo;
use std::os::fd::OwnedFd;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState,
};
use vm_memory::ByteValued;

/// SET_VRING_KICK/CALL/ERR: low byte is the index, bit 8 means "no fd".
const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;
/// Most memory regions in one table (vhost's limit).
pub const MAX_REGIONS: usize = 32;

#[derive(Debug)]
pub enum Request {
    GetFeatures,
    SetFeatures(u64),
    SetOwner,
    ResetOwner,
    SetMemTable(Vec<RegionInfo>, Vec<OwnedFd>),
    SetVringNum {
        index: u32,
        num: u32,
    },
    SetVringAddr {
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
        /// Guest address of the used ring for the dirty log, when the
        /// VHOST_VRING_F_LOG flag is set.
        log: Option<u64>,
    },
    SetVringBase {
        index: u32,
        base: u32,
    },
    GetVringBase {
        index: u32,
    },
    SetVringKick {
        index: u32,
        fd: Option<OwnedFd>,
    },
    SetVringCall {
        index: u32,
        fd: Option<OwnedFd>,
    },
    SetVringErr {
        index: u32,
        fd: Option<OwnedFd>,
    },
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    SetVringEnable {
        index: u32,
        enable: bool,
    },
    GetConfig {
        offset: u32,
        size: u32,
        flags: u32,
    },
    SetConfig {
        offset: u32,
        flags: u32,
        data: Vec<u8>,
    },
    SetBackendReqFd(OwnedFd),
    /// The dirty-page log: `size` bytes of the fd at `offset`.
    SetLogBase {
        size: u64,
        offset: u64,
        fd: OwnedFd,
    },
    SetLogFd(OwnedFd),
    /// Announce this MAC from the backend (a RARP frame out of the TAP).
    SendRarp([u8; 6]),
    /// A request sandnic does not implement (answered with a NACK).
    Unsupported(u32),
}

/// The body sent back when request `code` fails but its answer is a body,
/// not an ack: the frontend blocks until that body arrives whatever
/// happened, and closing the connection would take the guest's NIC down.
/// `ring` is the ring index the payload started with, if any.
///
/// GET_CONFIG answers with an empty payload, the spec's error reply; the
/// others with a well-formed body holding zeros. `None` for requests that
/// are answered with an ack (only when the frontend asks for one).
pub fn failure_body(code: u32, ring: Option<u32>) -> Option<Vec<u8>> {
    let zero = || Some(0u64.to_ne_bytes().to_vec());
    match FrontendReq::try_from(code).ok()? {
        FrontendReq::GET_FEATURES
        | FrontendReq::GET_PROTOCOL_FEATURES
        | FrontendReq::GET_QUEUE_NUM
        | FrontendReq::GET_MAX_MEM_SLOTS => zero(),
        FrontendReq::GET_VRING_BASE => {
            let state = VhostUserVringState::new(ring.unwrap_or(0), 0);
            Some(state.as_slice().to_vec())
        }
        FrontendReq::GET_CONFIG => Some(Vec::new()),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The payload size is wrong for the request.
    #[error("request {request}: payload of {got} bytes, expected {want}")]
    Size {
        request: u32,
        got: usize,
        want: usize,
    },
    /// Wrong number of fds for the request.
    #[error("request {request}: {got} fds attached, expected {want}")]
    Fds {
        request: u32,
        got: usize,
        want: usize,
    },
    /// A value out of range (region count, index width).
    #[error("request {request}: {why}")]
    Invalid { request: u32, why: String },
}

/// Parses a message. Unknown request codes parse as `Unsupported`.
pub fn parse(msg: Message) -> Result<Request, RequestError> {
    let Message {
        header,
        payload,
        fds,
    } = msg;
    let code = header.request;
    let Ok(req) = FrontendReq::try_from(code) else {
        return Ok(Request::Unsupported(code));
    };
    let p = Payload {
        code,
        bytes: &payload,
    };
    let expect_fds = |want: usize, fds: &Vec<OwnedFd>| {
        if fds.len() == want {
            Ok(())
        } else {
            Err(RequestError::Fds {
                request: code,
                got: fds.len(),
                want,
            })
        }
    };
    let no_fds = |fds: &Vec<OwnedFd>| expect_fds(0, fds);
    let request = match req {
        FrontendReq::GET_FEATURES => Request::GetFeatures,
        FrontendReq::SET_FEATURES => Request::SetFeatures(p.u64()?),
        FrontendReq::SET_OWNER => Request::SetOwner,
        FrontendReq::RESET_OWNER => Request::ResetOwner,
        FrontendReq::SET_MEM_TABLE => return parse_mem_table(p, fds),
        FrontendReq::SET_VRING_NUM => {
            let s: VhostUserVringState = p.exact()?;
            Request::SetVringNum {
                index: s.index,
                num: s.num,
            }
        }
        FrontendReq::SET_VRING_ADDR => {
            let a: VhostUserVringAddr = p.exact()?;
            let flags = a.flags;
            if flags & !VhostUserVringAddrFlags::all().bits() != 0 {
                return Err(RequestError::Invalid {
                    request: code,
                    why: format!("unknown ring address flags {flags:#x}"),
                });
            }
            let logged = flags & VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits() != 0;
            Request::SetVringAddr {
                index: a.index,
                desc: a.descriptor,
                used: a.used,
                avail: a.available,
                log: logged.then_some(a.log),
            }
        }
        FrontendReq::SET_VRING_BASE => {
            let s: VhostUserVringState = p.exact()?;
            Request::SetVringBase {
                index: s.index,
                base: s.num,
            }
        }
        FrontendReq::GET_VRING_BASE => {
            let s: VhostUserVringState = p.exact()?;
            Request::GetVringBase { index: s.index }
        }
        FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL | FrontendReq::SET_VRING_ERR => {
            let value = p.u64()?;
            let index = (value & VRING_IDX_MASK) as u32;
            let fd = if value & VRING_NOFD != 0 {
                no_fds(&fds)?;
                None
            } else {
                expect_fds(1, &fds)?;
                fds.into_iter().next()
            };
            match req {
                FrontendReq::SET_VRING_KICK => Request::SetVringKick { index, fd },
                FrontendReq::SET_VRING_CALL => Request::SetVringCall { index, fd },
                _ => Request::SetVringErr { index, fd },
            }
        }
        FrontendReq::GET_PROTOCOL_FEATURES => Request::GetProtocolFeatures,
        FrontendReq::SET_PROTOCOL_FEATURES => Request::SetProtocolFeatures(p.u64()?),
        FrontendReq::GET_QUEUE_NUM => Request::GetQueueNum,
        FrontendReq::SET_VRING_ENABLE => {
            let s: VhostUserVringState = p.exact()?;
            Request::SetVringEnable {
                index: s.index,
                enable: s.num != 0,
            }
        }
        FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG => {
            let head: VhostUserConfig = p.prefix()?;
            let (offset, size, flags) = (head.offset, head.size, head.flags);
            let data = payload[std::mem::size_of::<VhostUserConfig>()..].to_vec();
            if data.len() != size as usize {
                return Err(RequestError::Size {
                    request: code,
                    got: payload.len(),
                    want: std::mem::size_of::<VhostUserConfig>() + size as usize,
                });
            }
            if req == FrontendReq::GET_CONFIG {
                Request::GetConfig {
                    offset,
                    size,
                    flags,
                }
            } else {
                Request::SetConfig {
                    offset,
                    flags,
                    data,
                }
            }
        }
        FrontendReq::SET_BACKEND_REQ_FD => {
            expect_fds(1, &fds)?;
            Request::SetBackendReqFd(fds.into_iter().next().expect("one fd"))
        }
        FrontendReq::SET_LOG_BASE => {
            let log: VhostUserLog = p.exact()?;
            expect_fds(1, &fds)?;
            Request::SetLogBase {
                size: log.mmap_size,
                offset: log.mmap_offset,
                fd: fds.into_iter().next().expect("one fd"),
            }
        }
        FrontendReq::SET_LOG_FD => {
            expect_fds(1, &fds)?;
            Request::SetLogFd(fds.into_iter().next().expect("one fd"))
        }
        FrontendReq::SEND_RARP => {
            let bytes = p.u64()?.to_ne_bytes();
            Request::SendRarp([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]])
        }
        _ => Request::Unsupported(code),
    };
    Ok(request)
}

/// `{u32 count, u32 padding, regions[count]}` with one fd per region. UML
/// always sends room for two regions, so the payload may be longer than the
/// regions it describes.
fn parse_mem_table(p: Payload<'_>, fds: Vec<OwnedFd>) -> Result<Request, RequestError> {
    let head: VhostUserMemory = p.prefix()?;
    let count = head.num_regions as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(RequestError::Invalid {
            request: p.code,
            why: format!("{count} memory regions"),
        });
    }
    let region_len = std::mem::size_of::<VhostUserMemoryRegion>();
    let want = std::mem::size_of::<VhostUserMemory>() + count * region_len;
    if p.bytes.len() < want {
        return Err(RequestError::Size {
            request: p.code,
            got: p.bytes.len(),
            want,
        });
    }
    if fds.len() != count {
        return Err(RequestError::Fds {
            request: p.code,
            got: fds.len(),
            want: count,
        });
    }
    let regions = (0..count)
        .map(|i| {
            let at = std::mem::size_of::<VhostUserMemory>() + i * region_len;
            let r: VhostUserMemoryRegion =
                read_struct(&p.bytes[at..at + region_len]).expect("length checked");
            RegionInfo {
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.memory_size,
                userspace_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            }
        })
        .collect();
    Ok(Request::SetMemTable(regions, fds))
}

struct Payload<'a> {
    code: u32,
    bytes: &'a [u8],
}

impl Payload<'_> {
    fn exact<T: ByteValued>(&self) -> Result<T, RequestError> {
        let want = std::mem::size_of::<T>();
        if self.bytes.len() != want {
            return Err(RequestError::Size {
                request: self.code,
                got: self.bytes.len(),
                want,
            });
        }
        Ok(read_struct(self.bytes).expect("length checked"))
    }

    fn prefix<T: ByteValued>(&self) -> Result<T, RequestError> {
        let want = std::mem::size_of::<T>();
        read_struct(self.bytes).ok_or(RequestError::Size {
            request: self.code,
            got: self.bytes.len(),
            want,
        })
    }

    fn u64(&self) -> Result<u64, RequestError> {
        let bytes: [u8; 8] = self.bytes.try_into().map_err(|_| RequestError::Size {
            request: self.code,
            got: self.bytes.len(),
            want: 8,
        })?;
        Ok(u64::from_ne_bytes(bytes))
    }
}

/// Copies a wire struct out of a byte buffer (the buffer has no alignment
/// guarantee, so no reference into it is taken).
fn read_struct<T: ByteValued>(bytes: &[u8]) -> Option<T> {
    let len = std::mem::size_of::<T>();
    let src = bytes.get(..len)?;
    let mut value = T::zeroed();
    value.as_mut_slice().copy_from_slice(src);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::wire::{Header, Message, VERSION};

    fn fd() -> OwnedFd {
        nix::sys::eventfd::EventFd::new().expect("eventfd").into()
    }

    fn msg(code: FrontendReq, payload: &[u8], fds: usize) -> Message {
        Message {
            header: Header {
                request: code as u32,
                flags: VERSION,
                size: payload.len() as u32,
            },
            payload: payload.to_vec(),
            fds: (0..fds).map(|_| fd()).collect(),
        }
    }

    fn words(parts: &[u64]) -> Vec<u8> {
        parts.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn vring_addr(index: u32, flags: u32) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&index.to_ne_bytes());
        p.extend_from_slice(&flags.to_ne_bytes());
        p.extend_from_slice(&words(&[0x1000, 0x2000, 0x3000, 0x4000]));
        p
    }

    fn mem_table(regions: u32, slots: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&regions.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        for i in 0..slots as u64 {
            p.extend_from_slice(&words(&[i << 30, 1 << 20, 0x7f00_0000_0000 + (i << 30), 0]));
        }
        p
    }

    fn config(offset: u32, size: u32, data: usize) -> Vec<u8> {
        let mut p = Vec::new();
        for w in [offset, size, 0] {
            p.extend_from_slice(&w.to_ne_bytes());
        }
        p.extend(std::iter::repeat_n(0u8, data));
        p
    }

    type Check = fn(&Result<Request, RequestError>) -> bool;

    /// Every request sandnic parses, well-formed and not: (what, message,
    /// what must come out).
    #[test]
    fn requests_parse_or_are_refused_by_size_fd_count_and_range() {
        use FrontendReq as R;
        let cases: Vec<(&str, Message, Check)> = vec![
            ("GET_FEATURES", msg(R::GET_FEATURES, &[], 0), |r| {
                matches!(r, Ok(Request::GetFeatures))
            }),
            (
                "SET_FEATURES",
                msg(R::SET_FEATURES, &words(&[0x1234]), 0),
                |r| matches!(r, Ok(Request::SetFeatures(0x1234))),
            ),
            (
                "SET_FEATURES short",
                msg(R::SET_FEATURES, &[1; 7], 0),
                |r| {
                    matches!(
                        r,
                        Err(RequestError::Size {
                            got: 7,
                            want: 8,
                            ..
                        })
                    )
                },
            ),
            (
                "SET_VRING_NUM",
                msg(R::SET_VRING_NUM, &words(&[256 << 32 | 1]), 0),
                |r| matches!(r, Ok(Request::SetVringNum { index: 1, num: 256 })),
            ),
            (
                "SET_VRING_NUM short",
                msg(R::SET_VRING_NUM, &[0; 4], 0),
                |r| matches!(r, Err(RequestError::Size { .. })),
            ),
            (
                "SET_VRING_ADDR",
                msg(R::SET_VRING_ADDR, &vring_addr(2, 0), 0),
                |r| {
                    matches!(
                        r,
                        Ok(Request::SetVringAddr {
                            index: 2,
                            desc: 0x1000,
                            used: 0x2000,
                            avail: 0x3000,
                            log: None
                        })
                    )
                },
            ),
            (
                "SET_VRING_ADDR logged",
                msg(R::SET_VRING_ADDR, &vring_addr(0, 1), 0),
                |r| {
                    matches!(
                        r,
                        Ok(Request::SetVringAddr {
                            log: Some(0x4000),
                            ..
                        })
                    )
                },
            ),
            (
                "SET_VRING_ADDR unknown flag",
                msg(R::SET_VRING_ADDR, &vring_addr(0, 2), 0),
                |r| matches!(r, Err(RequestError::Invalid { .. })),
            ),
            (
                "SET_VRING_KICK",
                msg(R::SET_VRING_KICK, &words(&[3]), 1),
                |r| {
                    matches!(
                        r,
                        Ok(Request::SetVringKick {
                            index: 3,
                            fd: Some(_)
                        })
                    )
                },
            ),
            (
                "SET_VRING_KICK no fd flag",
                msg(R::SET_VRING_KICK, &words(&[0x100 | 3]), 0),
                |r| matches!(r, Ok(Request::SetVringKick { index: 3, fd: None })),
            ),
            (
                "SET_VRING_CALL missing fd",
                msg(R::SET_VRING_CALL, &words(&[0]), 0),
                |r| {
                    matches!(
                        r,
                        Err(RequestError::Fds {
                            got: 0,
                            want: 1,
                            ..
                        })
                    )
                },
            ),
            (
                "SET_VRING_ERR two fds",
                msg(R::SET_VRING_ERR, &words(&[0]), 2),
                |r| {
                    matches!(
                        r,
                        Err(RequestError::Fds {
                            got: 2,
                            want: 1,
                            ..
                        })
                    )
                },
            ),
            (
                "SET_VRING_CALL no-fd flag with an fd",
                msg(R::SET_VRING_CALL, &words(&[0x100]), 1),
                |r| {
                    matches!(
                        r,
                        Err(RequestError::Fds {
                            got: 1,
                            want: 0,
                            ..
                        })
                    )
                },
            ),
            (
                "SET_MEM_TABLE",
                msg(R::SET_MEM_TABLE, &mem_table(1, 1), 1),
                |r| matches!(r, Ok(Request::SetMemTable(regions, fds)) if regions.len() == 1 && fds.len() == 1),
            ),
            (
                "SET_MEM_TABLE with UML's spare slot",
                msg(R::SET_MEM_TABLE, &mem_table(1, 2), 1),
                |r| matches!(r, Ok(Request::SetMemTable(regions, _)) if regions.len() == 1),
            ),
            (
                "SET_MEM_TABLE no regions",
                msg(R::SET_MEM_TABLE, &mem_table(0, 0), 0),
                |r| matches!(r, Err(RequestError::Invalid { .. })),
            ),
            (
                "SET_MEM_TABLE too many regions",
                msg(R::SET_MEM_TABLE, &mem_table(33, 33), 0),
                |r| matches!(r, Err(RequestError::Invalid { .. })),
            ),
            (
                "SET_MEM_TABLE cut short",
                msg(R::SET_MEM_TABLE, &mem_table(2, 1), 2),
                |r| matches!(r, Err(RequestError::Size { .. })),
            ),
            (
                "SET_MEM_TABLE fd per region",
                msg(R::SET_MEM_TABLE, &mem_table(2, 2), 1),
                |r| {
                    matches!(
                        r,
                        Err(RequestError::Fds {
                            got: 1,
                            want: 2,
                            ..
                        })
                    )
                },
            ),
            ("GET_CONFIG", msg(R::GET_CONFIG, &config(0, 6, 6), 0), |r| {
                matches!(
                    r,
                    Ok(Request::GetConfig {
                        offset: 0,
                        size: 6,
                        ..
                    })
                )
            }),
            (
                "GET_CONFIG size mismatch",
                msg(R::GET_CONFIG, &config(0, 6, 2), 0),
                |r| matches!(r, Err(RequestError::Size { .. })),
            ),
            (
                "GET_CONFIG short header",
                msg(R::GET_CONFIG, &[0; 3], 0),
                |r| matches!(r, Err(RequestError::Size { .. })),
            ),
            (
                "SET_CONFIG",
                msg(R::SET_CONFIG, &config(4, 2, 2), 0),
                |r| matches!(r, Ok(Request::SetConfig { offset: 4, data, .. }) if data.len() == 2),
            ),
            (
                "SET_LOG_BASE",
                msg(R::SET_LOG_BASE, &words(&[4096, 0]), 1),
                |r| {
                    matches!(
                        r,
                        Ok(Request::SetLogBase {
                            size: 4096,
                            offset: 0,
                            ..
                        })
                    )
                },
            ),
            (
                "SET_LOG_BASE without fd",
                msg(R::SET_LOG_BASE, &words(&[4096, 0]), 0),
                |r| matches!(r, Err(RequestError::Fds { .. })),
            ),
            (
                "SET_LOG_BASE old u64 form",
                msg(R::SET_LOG_BASE, &words(&[0]), 1),
                |r| matches!(r, Err(RequestError::Size { .. })),
            ),
            ("SET_LOG_FD", msg(R::SET_LOG_FD, &[], 1), |r| {
                matches!(r, Ok(Request::SetLogFd(_)))
            }),
            (
                "SEND_RARP",
                msg(R::SEND_RARP, &[0x52, 0x54, 0, 1, 2, 3, 0, 0], 0),
                |r| matches!(r, Ok(Request::SendRarp([0x52, 0x54, 0, 1, 2, 3]))),
            ),
            (
                "SET_BACKEND_REQ_FD",
                msg(R::SET_BACKEND_REQ_FD, &[], 1),
                |r| matches!(r, Ok(Request::SetBackendReqFd(_))),
            ),
            (
                "SET_BACKEND_REQ_FD without fd",
                msg(R::SET_BACKEND_REQ_FD, &[], 0),
                |r| matches!(r, Err(RequestError::Fds { .. })),
            ),
            (
                "SET_VRING_ENABLE",
                msg(R::SET_VRING_ENABLE, &words(&[1 << 32 | 5]), 0),
                |r| {
                    matches!(
                        r,
                        Ok(Request::SetVringEnable {
                            index: 5,
                            enable: true
                        })
                    )
                },
            ),
            (
                "GET_INFLIGHT_FD (not implemented)",
                msg(R::GET_INFLIGHT_FD, &[0; 24], 0),
                |r| matches!(r, Ok(Request::Unsupported(_))),
            ),
        ];
        for (what, message, check) in cases {
            let result = parse(message);
            assert!(check(&result), "{what}: {result:?}");
        }
        let unknown = Message {
            header: Header {
                request: 999,
                flags: VERSION,
                size: 0,
            },
            payload: Vec::new(),
            fds: Vec::new(),
        };
        assert!(matches!(parse(unknown), Ok(Request::Unsupported(999))));
    }

    #[test]
    fn failed_requests_with_a_body_answer_one() {
        use FrontendReq as R;
        let ring_7 = VhostUserVringState::new(7, 0).as_slice().to_vec();
        assert_eq!(
            failure_body(R::GET_VRING_BASE as u32, Some(7)),
            Some(ring_7)
        );
        assert_eq!(failure_body(R::GET_CONFIG as u32, None), Some(Vec::new()));
        assert_eq!(
            failure_body(R::GET_FEATURES as u32, None),
            Some(0u64.to_ne_bytes().to_vec())
        );
        assert_eq!(failure_body(R::SET_FEATURES as u32, None), None);
        assert_eq!(failure_body(R::SET_VRING_KICK as u32, Some(1)), None);
        assert_eq!(failure_body(999, None), None);
    }
}
