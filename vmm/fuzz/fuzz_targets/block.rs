//! virtio-blk request chains against an in-memory disk image. The input format is in
//! `husk_vmm::fuzzing::block`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::block(data));
