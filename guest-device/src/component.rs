//! The WIT boundary: converts between the generated bindings and the plain
//! types of this crate. No device logic lives here.

use crate::bindings::exports::sandnic::device::device::{Guest, GuestNetDevice};
use crate::bindings::sandnic::device::types as wit;
use crate::types as native;
use crate::NetDevice;
use std::cell::RefCell;

struct Component;

/// The exported `net-device` resource. Resource methods take `&self`, so the
/// device sits in a `RefCell` (a component instance is single-threaded).
struct Device(RefCell<NetDevice>);

impl Guest for Component {
    type NetDevice = Device;

    fn info() -> wit::DeviceInfo {
        wit::DeviceInfo {
            name: crate::NAME.into(),
            version: crate::VERSION.into(),
            state_version: crate::state::STATE_VERSION,
            oldest_state_version: crate::state::OLDEST_STATE_VERSION,
        }
    }

    fn describe(state: Vec<u8>) -> Result<String, String> {
        crate::state::describe(&state)
    }
}

impl GuestNetDevice for Device {
    fn new(config: wit::DeviceConfig) -> Self {
        let config = native::DeviceConfig {
            mac: mac_from_wit(config.mac),
            max_queue_pairs: config.max_queue_pairs,
            mtu: config.mtu,
            backend_offloads: native::Offloads::from_bits_truncate(config.backend_offloads.bits()),
            compat: native::Compat {
                local_migration: config.compat.local_migration,
            },
        };
        // The host validates the configuration before constructing; a bad
        // one here is a host bug, and a trap is the right answer to it.
        Device(RefCell::new(
            NetDevice::new(config).expect("host passed an invalid device config"),
        ))
    }

    fn device_features(&self) -> u64 {
        self.0.borrow().device_features()
    }

    fn set_features(&self, acked: u64) -> Result<Vec<wit::Effect>, String> {
        self.0.borrow_mut().set_features(acked).map(effects)
    }

    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        #[cfg(feature = "hostile")]
        if offset == 0xf0f0 {
            return Ok(vec![0x5a; len as usize + 100]);
        }
        self.0.borrow().read_config(offset, len)
    }

    fn write_config(&self, offset: u32, data: Vec<u8>) -> Result<Vec<wit::Effect>, String> {
        self.0.borrow_mut().write_config(offset, &data).map(effects)
    }

    fn config_generation(&self) -> u32 {
        self.0.borrow().config_generation()
    }

    fn set_status(&self, status: u8) -> wit::StatusReply {
        let reply = self.0.borrow_mut().set_status(status);
        wit::StatusReply {
            status: reply.status,
            effects: effects(reply.effects),
        }
    }

    fn reset(&self) -> Vec<wit::Effect> {
        effects(self.0.borrow_mut().reset())
    }

    fn queue_enabled(&self, index: u16, enabled: bool) -> Vec<wit::Effect> {
        effects(self.0.borrow_mut().queue_enabled(index, enabled))
    }

    fn handle_ctrl(&self, command: Vec<u8>) -> wit::CtrlReply {
        let reply = self.0.borrow_mut().handle_ctrl(&command);
        wit::CtrlReply {
            ack: reply.ack,
            effects: effects(reply.effects),
        }
    }

    fn link_changed(&self, up: bool) -> Vec<wit::Effect> {
        effects(self.0.borrow_mut().link_changed(up))
    }

    fn announce(&self) -> Vec<wit::Effect> {
        effects(self.0.borrow_mut().announce())
    }

    fn save(&self) -> Vec<u8> {
        self.0.borrow().save()
    }

    fn load(&self, state: Vec<u8>) -> Result<Vec<wit::Effect>, String> {
        self.0.borrow_mut().load(&state).map(effects)
    }
}

fn effects(list: Vec<native::Effect>) -> Vec<wit::Effect> {
    // A fresh vector: an in-place collect would reuse `list`'s allocation
    // for the differently sized WIT effects and then `realloc` it.
    let mut out = Vec::with_capacity(list.len());
    out.extend(list.into_iter().map(effect));
    out
}

fn effect(effect: native::Effect) -> wit::Effect {
    match effect {
        native::Effect::SetRxFilter(f) => wit::Effect::SetRxFilter(rx_filter(f)),
        native::Effect::SetTapOffloads(o) => {
            wit::Effect::SetTapOffloads(wit::Offloads::from_bits_retain(o.bits()))
        }
        native::Effect::SetVnetHdrLen(len) => wit::Effect::SetVnetHdrLen(len),
        native::Effect::EnableQueuePairs(n) => wit::Effect::EnableQueuePairs(n),
        native::Effect::ConfigChanged => wit::Effect::ConfigChanged,
        native::Effect::NeedsReset => wit::Effect::NeedsReset,
    }
}

fn rx_filter(f: native::RxFilter) -> wit::RxFilter {
    use wit::RxSwitches as S;
    let switches = [
        (f.promisc, S::PROMISC),
        (f.all_multi, S::ALL_MULTI),
        (f.all_uni, S::ALL_UNI),
        (f.no_multi, S::NO_MULTI),
        (f.no_uni, S::NO_UNI),
        (f.no_bcast, S::NO_BCAST),
        (f.unicast_overflow, S::UNICAST_OVERFLOW),
        (f.multicast_overflow, S::MULTICAST_OVERFLOW),
        (f.vlan_filtering, S::VLAN_FILTERING),
    ]
    .into_iter()
    .filter(|&(on, _)| on)
    .fold(S::empty(), |all, (_, switch)| all | switch);
    wit::RxFilter {
        switches,
        mac: mac_to_wit(f.mac),
        unicast: f.unicast.into_flattened(),
        multicast: f.multicast.into_flattened(),
        vlans: f.vlans,
    }
}

fn mac_to_wit([a, b, c, d, e, f]: native::Mac) -> wit::MacAddress {
    (a, b, c, d, e, f)
}

fn mac_from_wit((a, b, c, d, e, f): wit::MacAddress) -> native::Mac {
    [a, b, c, d, e, f]
}

crate::bindings::export!(Component with_types_in crate::bindings);
