//! Frontend requests, parsed and checked from raw messages. Sizes, indices
//! and fd counts are validated here; anything malformed becomes an error the
//! connection answers (with a NACK when a reply is expected) and counts.

use super::wire::Message;
use crate::datapath::guest_memory::RegionInfo;
use std::os::fd::OwnedFd;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserMemory, VhostUserMemoryRegion, VhostUserVringAddr,
    VhostUserVringState,
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
    /// A request sandnic does not implement (answered with a NACK).
    Unsupported(u32),
}

impl Request {
    /// Requests whose answer is a reply body rather than an ack.
    pub fn has_reply_body(&self) -> bool {
        matches!(
            self,
            Self::GetFeatures
                | Self::GetProtocolFeatures
                | Self::GetVringBase { .. }
                | Self::GetQueueNum
                | Self::GetConfig { .. }
        )
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
            Request::SetVringAddr {
                index: a.index,
                desc: a.descriptor,
                used: a.used,
                avail: a.available,
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
