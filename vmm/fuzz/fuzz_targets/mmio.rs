//! virtio-mmio register reads and writes against a real device (rng, block, net or vsock), then the
//! queues the fuzzed driver activated. The input format is in `husk_vmm::fuzzing::mmio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::mmio(data));
