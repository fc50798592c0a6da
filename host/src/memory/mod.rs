//! Guest memory as the frontend shares it: the SET_MEM_TABLE regions mapped
//! into this process with the buffers the datapath may touch
//! (`guest_memory.rs`), and a migration's dirty-page log (`dirty_log.rs`).
//! Below the protocol, the datapath and the backend, which all use it.

pub mod dirty_log;
pub mod guest_memory;
