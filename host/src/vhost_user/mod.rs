//! The vhost-user protocol: framing (`wire.rs`), request parsing
//! (`request.rs`), a frontend's connection and the reply policy
//! (`connection.rs`), the backend→frontend channel (`backend_channel.rs`) and
//! the negotiated protocol state (`ProtocolState`, kept as plain data so a
//! handover can carry it to a new process).

pub mod backend_channel;
pub mod connection;
pub mod request;
pub mod wire;

use serde::{Deserialize, Serialize};

/// VHOST_USER_F_PROTOCOL_FEATURES in GET/SET_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL: dirty logging, not a device feature.
pub const F_LOG_ALL: u64 = 1 << 26;

/// Protocol features sandnic implements.
pub mod protocol {
    pub const MQ: u64 = 1 << 0;
    /// Dirty logging into shared memory (SET_LOG_BASE carries an fd).
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// SEND_RARP: the backend announces the guest after a migration.
    pub const RARP: u64 = 1 << 2;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const OFFERED: u64 = MQ | LOG_SHMFD | RARP | REPLY_ACK | BACKEND_REQ | CONFIG;
}

/// What the frontend negotiated on this connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolState {
    pub owner: bool,
    /// SET_FEATURES as sent (device features plus bit 30).
    pub acked_features: Option<u64>,
    /// SET_PROTOCOL_FEATURES, limited to what is offered.
    pub protocol_features: u64,
}

impl ProtocolState {
    pub fn reply_ack(&self) -> bool {
        self.protocol_features & protocol::REPLY_ACK != 0
    }

    pub fn has(&self, feature: u64) -> bool {
        self.protocol_features & feature != 0
    }

    /// The device (virtio) features the driver acked, without the
    /// vhost-user transport bits.
    pub fn device_features(&self) -> u64 {
        self.acked_features.unwrap_or(0) & !(F_PROTOCOL_FEATURES | F_LOG_ALL)
    }
}
