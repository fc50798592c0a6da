//! Typed bindings for the WIT world (`wit/device.wit`) and conversions
//! between its types and the device model's. What the host does for the
//! component's one import (`host-log`) is in `store.rs`.

wasmtime::component::bindgen!({
    world: "virtio-net-device",
    path: "../wit",
});

pub use exports::sandnic::device::device as device_api;
pub use sandnic::device::types as wit;

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
