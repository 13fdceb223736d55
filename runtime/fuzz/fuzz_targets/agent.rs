#![no_main]
// What the host reads from a hostile guest: the VMM's handshake, the agent's ttrpc replies
// and stdio ATTACH answers; a decoded StatsContainer reply becomes the shim's metrics, as
// for `ctr task metrics` and the CRI.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(stats) = husk_protocol::fuzzing::agent(data).stats {
        let _ = husk_shim::stats::to_metrics(&stats);
    }
});
