//! Applying the device model's effects (already validated by the sandbox
//! boundary) to the TAP, the datapath and the frontend.

use super::NetBackend;
use crate::datapath::rx::{MAX_FRAME, MAX_GSO_FRAME};
use crate::datapath::rx_filter::NativeFilter;
use crate::sandbox::DeviceError;
use sandnic_device::{Effect, Offloads};
use std::sync::Arc;
use tracing::{info, warn};

impl NetBackend {
    pub(super) fn apply(&mut self, effects: Vec<Effect>) {
        let mut settings_changed = false;
        let mut notify = false;
        for effect in effects {
            match effect {
                Effect::SetRxFilter(filter) => {
                    self.settings.filter = Arc::new(NativeFilter::from(&filter));
                    settings_changed = true;
                }
                Effect::SetTapOffloads(offloads) => {
                    match self.datapath.tap().set_offloads(offloads) {
                        Ok(()) => {
                            let segmentation = Offloads::TSO4 | Offloads::TSO6 | Offloads::UFO;
                            let gso = !(offloads & segmentation).is_empty();
                            self.settings.frame_room = if gso { MAX_GSO_FRAME } else { MAX_FRAME };
                            settings_changed = true;
                        }
                        Err(e) => notify |= self.tap_refused(&e),
                    }
                }
                Effect::SetVnetHdrLen(len) => match self.datapath.tap().set_vnet_hdr_len(len) {
                    Ok(()) => {
                        self.settings.hdr_len = len as usize;
                        settings_changed = true;
                    }
                    Err(e) => notify |= self.tap_refused(&e),
                },
                Effect::EnableQueuePairs(pairs) => {
                    self.model_pairs = pairs;
                    self.sync_active_pairs();
                }
                Effect::ConfigChanged => notify = true,
                Effect::NeedsReset => {
                    warn!("device model requests a reset");
                    notify = true;
                }
            }
        }
        if settings_changed {
            self.datapath.set_settings(&self.settings);
        }
        if notify {
            self.notify_config_change();
        }
    }

    /// A TAP ioctl the device model's effect needed failed. The datapath
    /// keeps the setting the TAP still has (the two never disagree), and
    /// the device reports NEEDS_RESET with a config-change notification,
    /// since the driver now believes something the TAP does not do.
    fn tap_refused(&mut self, error: &crate::tap::TapError) -> bool {
        self.counters.tap_errors += 1;
        self.device.mark_needs_reset();
        warn!("{error}; the TAP keeps its previous setting and the device needs a reset");
        true
    }

    /// Applies the effects of a device call, or counts its failure.
    pub(super) fn apply_result(
        &mut self,
        result: Result<Vec<Effect>, DeviceError>,
    ) -> Result<(), DeviceError> {
        match result {
            Ok(effects) => {
                self.apply(effects);
                Ok(())
            }
            Err(e) => {
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    /// The link goes up or down (`ctl link`). What each side sees:
    ///
    /// - the host: the TAP's carrier follows (`ip link` shows NO-CARRIER,
    ///   its stack stops sending to the guest);
    /// - the guest, through the device model: the config space's link bit
    ///   and a config-change notification. Frontends that pass config
    ///   changes on (UML's virtio_uml, crosvm) deliver it; QEMU's
    ///   virtio-net takes no config from a vhost-user backend, so its
    ///   guests keep their carrier and see only traffic stop;
    /// - traffic: frames the guest sends are dropped, and none are
    ///   delivered to it.
    pub fn set_link(&mut self, up: bool) -> Result<(), DeviceError> {
        self.change_link(up)?;
        if let Err(e) = self.datapath.tap().set_carrier(up) {
            warn!("the TAP's carrier stays as it was: {e}");
        }
        info!(up, "link changed");
        Ok(())
    }

    /// The link bit as the guest and the datapath see it.
    fn change_link(&mut self, up: bool) -> Result<(), DeviceError> {
        let result = self.device.link_changed(up);
        self.apply_result(result)?;
        self.settings.link_up = up;
        self.datapath.set_settings(&self.settings);
        Ok(())
    }

    /// Called when the datapath's `TapGone` alarm fires: the TAP device was
    /// deleted under the running device. Said once, at warn level; the
    /// guest's link goes down (a config change where the frontend passes
    /// one on), so its stack sees what happened instead of sending into a
    /// void, and nothing reads the dead queues again. `status` reports it
    /// (`tap_gone`) and `ctl link up` is refused from then on.
    pub fn tap_alarm(&mut self) {
        if !self.datapath.tap_gone().acknowledge() {
            return;
        }
        warn!(
            tap = %self.datapath.tap().name(),
            "the TAP device is gone (deleted?): the guest's link is down and what it sends is dropped; serve it on a new TAP (a handover with new_tap, or a restart)"
        );
        if let Err(e) = self.change_link(false) {
            warn!("taking the link down after the TAP went away: {e}");
        }
    }

    /// The TAP device was deleted under the running device.
    pub fn tap_is_gone(&self) -> bool {
        self.datapath.tap_gone().is_gone()
    }

    /// Asks the guest to announce itself (after a migration).
    pub fn announce(&mut self) -> Result<(), DeviceError> {
        let result = self.device.announce();
        self.apply_result(result)
    }
}
