//! Emulated devices: the legacy PC devices a Linux guest expects and the virtio devices.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
