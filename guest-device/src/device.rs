//! The virtio-net device model: one value per device, driven by the host's
//! calls (the WIT `net-device` resource), answering with effects.

use crate::config_space::{self, ConfigView, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::ctrl::{self, CtrlCommand, CtrlError, RxSwitch};
use crate::features;
use crate::log::{log, Level};
use crate::rx_filter::{MacTable, RxMode, VlanTable};
use crate::types::{
    format_mac, is_valid_unicast, CtrlReply, DeviceConfig, Effect, Mac, RxFilter, StatusReply,
    ACK_ERR, ACK_OK,
};
use serde::{Deserialize, Serialize};

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
    pub const KNOWN: u8 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | NEEDS_RESET | FAILED;
}

/// Everything about a device that changes at run time and is saved.
///
/// This is also the version-1 wire layout of the saved state: never change
/// it. A new state version wraps it and adds fields (see `state.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Features the driver acked (0 until negotiation).
    pub acked: u64,
    /// The last acked set the device accepted; it is accepted again whatever
    /// happened since, so re-negotiation never fails (survives reset).
    pub accepted: Option<u64>,
    /// The last `set-features` was refused: FEATURES_OK must not stick.
    pub features_refused: bool,
    pub status: u8,
    /// Bumped on every config-space change.
    pub generation: u32,
    pub link_up: bool,
    pub announce_pending: bool,
    /// Current primary MAC (config mac until MAC_ADDR_SET or a legacy write).
    pub mac: Mac,
    pub rx_mode: RxMode,
    pub mac_table: MacTable,
    pub vlans: VlanTable,
    /// Active queue pairs (VQ_PAIRS_SET), 1..=max.
    pub queue_pairs: u16,
    /// Guest receive offloads in effect (feature bits).
    pub guest_offloads: u64,
    /// Virtqueue indices the frontend has enabled, ascending.
    pub enabled_queues: Vec<u16>,
}

impl DeviceState {
    fn initial(config: &DeviceConfig, link_up: bool, generation: u32) -> Self {
        Self {
            acked: 0,
            accepted: None,
            features_refused: false,
            status: 0,
            generation,
            link_up,
            announce_pending: false,
            mac: config.mac,
            rx_mode: RxMode::default(),
            mac_table: MacTable::default(),
            vlans: VlanTable::default(),
            queue_pairs: 1,
            guest_offloads: 0,
            enabled_queues: Vec::new(),
        }
    }
}

pub struct NetDevice {
    pub(crate) config: DeviceConfig,
    pub(crate) offered: u64,
    pub(crate) state: DeviceState,
    /// Version-2 state: how many announcements the host started.
    #[cfg(feature = "v2")]
    pub(crate) announce_count: u32,
}

impl NetDevice {
    /// A device in its reset state with the link up.
    pub fn new(config: DeviceConfig) -> Result<Self, String> {
        config.validate()?;
        let state = DeviceState::initial(&config, true, 0);
        Ok(Self {
            offered: features::offered(&config),
            config,
            state,
            #[cfg(feature = "v2")]
            announce_count: 0,
        })
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn device_features(&self) -> u64 {
        self.offered
    }

    pub fn config_generation(&self) -> u32 {
        self.state.generation
    }

    pub fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, String> {
        if let Err(why) = self.check_features(acked) {
            // A refused renegotiation after FEATURES_OK leaves the accepted
            // features (and FEATURES_OK) as they were.
            if self.state.status & status::FEATURES_OK == 0 {
                self.state.features_refused = true;
            }
            log(Level::Warn, &format!("refusing features {acked:#x}: {why}"));
            return Err(why);
        }
        self.state.features_refused = false;
        self.state.acked = acked;
        self.state.accepted = Some(acked);
        // Everything that depends on a feature follows the new set (a driver
        // may renegotiate before FEATURES_OK).
        self.state.guest_offloads = acked & features::GUEST_OFFLOADS;
        if features::control_queue_in_frontend(acked) {
            self.state.queue_pairs = self.config.max_queue_pairs;
        } else if acked & features::MQ == 0 {
            self.state.queue_pairs = 1;
        }
        self.state.announce_pending &= acked & features::GUEST_ANNOUNCE != 0;
        Ok(self.datapath_effects())
    }

    fn check_features(&self, acked: u64) -> Result<(), String> {
        if self.state.accepted == Some(acked) {
            return Ok(());
        }
        if self.state.status & status::FEATURES_OK != 0 && acked != self.state.acked {
            return Err("features cannot change after FEATURES_OK without a reset".into());
        }
        features::validate_acked(self.offered, acked).map_err(|e| e.to_string())
    }

    /// Effects that configure the whole datapath for the current state.
    pub(crate) fn datapath_effects(&self) -> Vec<Effect> {
        vec![
            Effect::SetVnetHdrLen(features::vnet_hdr_len(self.state.acked)),
            Effect::SetTapOffloads(features::tap_offloads(self.state.guest_offloads)),
            Effect::SetRxFilter(self.rx_filter()),
            Effect::EnableQueuePairs(self.state.queue_pairs),
        ]
    }

    fn config_view(&self) -> ConfigView {
        let mut status = 0;
        if self.state.link_up {
            status |= STATUS_LINK_UP;
        }
        if self.state.announce_pending {
            status |= STATUS_ANNOUNCE;
        }
        ConfigView {
            mac: self.state.mac,
            status,
            max_queue_pairs: self.config.max_queue_pairs,
            mtu: self.config.mtu.unwrap_or(0),
        }
    }

    pub fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        self.config_view().read(offset, len)
    }

    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, String> {
        let legacy_mac_write =
            self.state.acked & (features::VERSION_1 | features::CTRL_MAC_ADDR) == 0;
        let mut mac = self.state.mac;
        config_space::write(&mut mac, legacy_mac_write, offset, data)?;
        self.state.mac = mac;
        self.config_changed();
        Ok(vec![Effect::SetRxFilter(self.rx_filter())])
    }

    fn config_changed(&mut self) {
        self.state.generation = self.state.generation.wrapping_add(1);
    }

    /// Applies the status rules: 0 resets; FEATURES_OK sticks only after an
    /// accepted `set-features`; NEEDS_RESET is the device's to set.
    pub fn set_status(&mut self, requested: u8) -> StatusReply {
        if requested == 0 {
            return StatusReply {
                status: 0,
                effects: self.reset(),
            };
        }
        let mut status = requested & status::KNOWN & !status::NEEDS_RESET;
        if status & status::FEATURES_OK != 0 && self.state.features_refused {
            status &= !status::FEATURES_OK;
        }
        self.state.status = status | (self.state.status & status::NEEDS_RESET);
        StatusReply {
            status: self.state.status,
            effects: Vec::new(),
        }
    }

    /// Back to the reset state. The link state is the host's and stays.
    pub fn reset(&mut self) -> Vec<Effect> {
        let generation = self.state.generation.wrapping_add(1);
        let accepted = self.state.accepted;
        self.state = DeviceState {
            accepted,
            ..DeviceState::initial(&self.config, self.state.link_up, generation)
        };
        vec![
            Effect::SetTapOffloads(features::tap_offloads(0)),
            Effect::SetRxFilter(self.rx_filter()),
            Effect::EnableQueuePairs(1),
        ]
    }

    pub fn queue_enabled(&mut self, index: u16, enabled: bool) -> Vec<Effect> {
        let queues = u32::from(self.config.max_queue_pairs) * 2 + 1;
        if u32::from(index) >= queues {
            log(
                Level::Warn,
                &format!("queue {index} does not exist (device has {queues})"),
            );
            return Vec::new();
        }
        let list = &mut self.state.enabled_queues;
        match (list.binary_search(&index), enabled) {
            (Err(at), true) => list.insert(at, index),
            (Ok(at), false) => {
                list.remove(at);
            }
            _ => {}
        }
        Vec::new()
    }

    /// One control command. ERR leaves the state exactly as it was.
    pub fn handle_ctrl(&mut self, bytes: &[u8]) -> CtrlReply {
        #[cfg(feature = "hostile")]
        if let Some(reply) = crate::hostile::ctrl(bytes) {
            return reply;
        }
        match self.try_ctrl(bytes) {
            Ok(effects) => CtrlReply {
                ack: ACK_OK,
                effects,
            },
            Err(why) => {
                log(Level::Warn, &format!("control command refused: {why}"));
                CtrlReply {
                    ack: ACK_ERR,
                    effects: Vec::new(),
                }
            }
        }
    }

    fn try_ctrl(&mut self, bytes: &[u8]) -> Result<Vec<Effect>, CtrlError> {
        let command = ctrl::parse(bytes)?;
        let feature = command.required_feature();
        let needs = feature | features::CTRL_VQ;
        if self.state.acked & needs != needs {
            return Err(CtrlError::NotNegotiated {
                feature: needs & !self.state.acked,
            });
        }
        match command {
            CtrlCommand::Rx { switch, on } => {
                *self.rx_switch(switch) = on;
                Ok(vec![Effect::SetRxFilter(self.rx_filter())])
            }
            CtrlCommand::MacTableSet { unicast, multicast } => {
                self.state.mac_table = MacTable::from_lists(unicast, multicast);
                Ok(vec![Effect::SetRxFilter(self.rx_filter())])
            }
            CtrlCommand::MacAddrSet(mac) => {
                if !is_valid_unicast(&mac) {
                    return Err(CtrlError::Invalid(format!(
                        "{} is not a unicast address",
                        format_mac(&mac)
                    )));
                }
                self.state.mac = mac;
                self.config_changed();
                Ok(vec![Effect::SetRxFilter(self.rx_filter())])
            }
            CtrlCommand::VlanAdd(vid) | CtrlCommand::VlanDel(vid) if vid >= 4096 => {
                Err(CtrlError::Invalid(format!("VLAN id {vid} outside 0..4096")))
            }
            CtrlCommand::VlanAdd(vid) => {
                self.state.vlans.set(vid, true);
                Ok(vec![Effect::SetRxFilter(self.rx_filter())])
            }
            CtrlCommand::VlanDel(vid) => {
                self.state.vlans.set(vid, false);
                Ok(vec![Effect::SetRxFilter(self.rx_filter())])
            }
            CtrlCommand::AnnounceAck => {
                if self.state.announce_pending {
                    self.state.announce_pending = false;
                    self.config_changed();
                }
                Ok(Vec::new())
            }
            CtrlCommand::MqPairsSet(pairs) => {
                if pairs == 0 || pairs > self.config.max_queue_pairs {
                    return Err(CtrlError::Invalid(format!(
                        "{pairs} queue pairs outside 1..={}",
                        self.config.max_queue_pairs
                    )));
                }
                self.state.queue_pairs = pairs;
                Ok(vec![Effect::EnableQueuePairs(pairs)])
            }
            CtrlCommand::GuestOffloadsSet(bits) => {
                let negotiated = self.state.acked & features::GUEST_OFFLOADS;
                if bits & !negotiated != 0 || !features::guest_offloads_consistent(bits) {
                    return Err(CtrlError::Invalid(format!(
                        "guest offloads {bits:#x} not within negotiated {negotiated:#x} or inconsistent"
                    )));
                }
                self.state.guest_offloads = bits;
                Ok(vec![Effect::SetTapOffloads(features::tap_offloads(bits))])
            }
        }
    }

    fn rx_switch(&mut self, switch: RxSwitch) -> &mut bool {
        let mode = &mut self.state.rx_mode;
        match switch {
            RxSwitch::Promisc => &mut mode.promisc,
            RxSwitch::AllMulti => &mut mode.all_multi,
            RxSwitch::AllUni => &mut mode.all_uni,
            RxSwitch::NoMulti => &mut mode.no_multi,
            RxSwitch::NoUni => &mut mode.no_uni,
            RxSwitch::NoBcast => &mut mode.no_bcast,
        }
    }

    /// The compiled filter the host applies to every received frame.
    pub fn rx_filter(&self) -> RxFilter {
        let (mode, table) = (&self.state.rx_mode, &self.state.mac_table);
        RxFilter {
            promisc: mode.promisc,
            all_multi: mode.all_multi,
            all_uni: mode.all_uni,
            no_multi: mode.no_multi,
            no_uni: mode.no_uni,
            no_bcast: mode.no_bcast,
            mac: self.state.mac,
            unicast: table.unicast.clone(),
            multicast: table.multicast.clone(),
            unicast_overflow: table.unicast_overflow,
            multicast_overflow: table.multicast_overflow,
            vlan_filtering: self.state.acked & features::CTRL_VLAN != 0,
            vlans: self.state.vlans.0.clone(),
        }
    }

    pub fn link_changed(&mut self, up: bool) -> Vec<Effect> {
        if self.state.link_up == up {
            return Vec::new();
        }
        self.state.link_up = up;
        self.config_changed();
        vec![Effect::ConfigChanged]
    }

    /// Asks the driver to announce itself (GUEST_ANNOUNCE). Without that
    /// feature — or with the control queue in the frontend, which then
    /// announces itself — there is nothing for the device to do and no
    /// effect is returned.
    pub fn announce(&mut self) -> Vec<Effect> {
        let needs = features::GUEST_ANNOUNCE | features::CTRL_VQ;
        if self.state.acked & needs != needs || !self.state.link_up {
            return Vec::new();
        }
        self.state.announce_pending = true;
        #[cfg(feature = "v2")]
        {
            self.announce_count = self.announce_count.wrapping_add(1);
        }
        self.config_changed();
        vec![Effect::ConfigChanged]
    }
}
