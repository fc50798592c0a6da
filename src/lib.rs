//! sandnic's whole-system test support: the in-repo vhost-user test
//! frontend (`frontend/`) and the harness that runs `sandnic serve` next to
//! TAP devices in private network namespaces (`harness/`). The tests live in
//! `tests/`, the benches in `benches/`.

pub mod dpdk;
pub mod flood;
pub mod frames;
pub mod frontend;
pub mod guest;
pub mod harness;
pub mod migration;
pub mod ping;
pub mod qmp;
pub mod service_manager;
pub mod soak;
pub mod steering;
pub mod traffic;
pub mod units;
