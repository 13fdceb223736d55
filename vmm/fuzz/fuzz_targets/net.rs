//! virtio-net TX frames and RX buffers, with a datagram socket standing in for the tap. The input
//! format is in `husk_vmm::fuzzing::net`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::net(data));
