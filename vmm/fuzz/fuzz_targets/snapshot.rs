//! What a restore reads from a snapshot folder: the state file, its payload, the memory
//! layout and each virtio transport's saved registers. The input format is in `husk_vmm::fuzzing::snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::snapshot(data));
