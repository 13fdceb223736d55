//! vsock packets from the guest's TX queue, RX buffers and host socket activity, through the muxer.
//! The input format is in `husk_vmm::fuzzing::vsock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::vsock(data));
