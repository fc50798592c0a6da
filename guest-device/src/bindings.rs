//! The component's bindings of the WIT world (`wit/device.wit`): what it
//! exports (used by `component.rs`) and its one import, `host-log` (used by
//! `log.rs`).

wit_bindgen::generate!({ world: "virtio-net-device", path: "../wit" });
