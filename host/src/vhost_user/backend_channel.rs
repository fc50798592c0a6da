//! Requests from the backend to the frontend (SET_BACKEND_REQ_FD's
//! socket). sandnic sends one: CONFIG_CHANGE_MSG, so the driver re-reads
//! its config space (link status, announce).

use super::wire::{self, Header, VERSION};
use std::os::fd::{AsFd, OwnedFd};

const CONFIG_CHANGE_MSG: u32 = 2;

/// Tells the frontend the config space changed. No reply is requested: a
/// frontend that is slow to answer must not stall the backend.
pub fn config_changed(channel: &OwnedFd) -> Result<(), wire::WireError> {
    wire::send(
        channel.as_fd(),
        Header {
            request: CONFIG_CHANGE_MSG,
            flags: VERSION,
            size: 0,
        },
        &[],
        &[],
    )
}
