//! The in-repo test frontend: what a VMM and a guest driver do, in one
//! process, over a memfd shared with the backend.

pub mod guest_ram;
pub mod nic;
pub mod virtq;

pub use nic::{NicConfig, QueueId, Standby, TestNic};
pub use virtq::RawDesc;
