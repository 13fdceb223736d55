#![no_main]
// A bundle's config.json: parsed, turned into the guest spec, and sized into a VM.
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_runtime::fuzzing::spec(data));
