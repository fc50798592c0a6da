//! Typed bindings for the WIT world (`wit/device.wit`) and the host side of
//! its one import, `host-log`.

use super::instance::InstanceData;
use tracing::{debug, error, info, warn};

wasmtime::component::bindgen!({
    world: "virtio-net-device",
    path: "../wit",
});

pub use exports::sandnic::device::device as device_api;
pub use sandnic::device::types as wit;

impl sandnic::device::types::Host for InstanceData {}

const OFFLOADS: [(wit::Offloads, sandnic_device::Offloads); 5] = [
    (wit::Offloads::CSUM, sandnic_device::Offloads::CSUM),
    (wit::Offloads::TSO4, sandnic_device::Offloads::TSO4),
    (wit::Offloads::TSO6, sandnic_device::Offloads::TSO6),
    (wit::Offloads::ECN, sandnic_device::Offloads::ECN),
    (wit::Offloads::UFO, sandnic_device::Offloads::UFO),
];

impl From<wit::Offloads> for sandnic_device::Offloads {
    fn from(flags: wit::Offloads) -> Self {
        OFFLOADS
            .iter()
            .filter(|(w, _)| flags.contains(*w))
            .fold(Self::empty(), |acc, (_, n)| acc | *n)
    }
}

impl From<sandnic_device::Offloads> for wit::Offloads {
    fn from(flags: sandnic_device::Offloads) -> Self {
        OFFLOADS
            .iter()
            .filter(|(_, n)| flags.contains(*n))
            .fold(Self::empty(), |acc, (w, _)| acc | *w)
    }
}

pub fn mac_to_wit([a, b, c, d, e, f]: sandnic_device::Mac) -> wit::MacAddress {
    (a, b, c, d, e, f)
}

pub fn mac_from_wit((a, b, c, d, e, f): wit::MacAddress) -> sandnic_device::Mac {
    [a, b, c, d, e, f]
}

impl sandnic::device::host_log::Host for InstanceData {
    /// Component log lines go to `tracing`, cut to the text limit: the
    /// component chooses their length.
    fn log(&mut self, level: wit::LogLevel, message: String) {
        let message = super::validate::truncate_text(&message, self.max_text_bytes);
        match level {
            wit::LogLevel::Error => error!(target: "sandnic::component", "{message}"),
            wit::LogLevel::Warn => warn!(target: "sandnic::component", "{message}"),
            wit::LogLevel::Info => info!(target: "sandnic::component", "{message}"),
            wit::LogLevel::Debug => debug!(target: "sandnic::component", "{message}"),
        }
    }
}
