//! virtio-rng requests. The input format is in `husk_vmm::fuzzing::rng`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::rng(data));
