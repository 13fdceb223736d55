//! The "stdio loses nothing" checks: a container writes `seq 1 N` and exits at once, and
//! every byte must arrive (through `husk run`, `ctr run`, the CRI log file).

/// N: `HUSK_STDIO_LINES`, 500,000 lines (3.4 MB) unless set (nightly: 12,500,000, 101 MB).
pub fn lines() -> u64 {
    std::env::var("HUSK_STDIO_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000)
}

/// What `seq 1 n` prints.
pub fn seq_output(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

/// Equal, or a panic with `what`, the lengths and the first difference (not 100 MB of
/// output).
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    let around = |v: &[u8]| {
        String::from_utf8_lossy(&v[at.saturating_sub(20).min(v.len())..(at + 20).min(v.len())])
            .into_owned()
    };
    panic!(
        "{what} differs: {} bytes received, {} expected, first difference at byte {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        around(got),
        around(want)
    );
}
