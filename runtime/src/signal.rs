//! Signal names and numbers as `kill` accepts them: `TERM`, `SIGTERM`, `sigterm`, `15`,
//! and the real-time signals `RTMIN`, `RTMIN+3`, `RTMAX-1`, `SIGRTMIN+3`.

/// (name without "SIG", number) on Linux x86_64.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Linux's SIGRTMIN as user space sees it (glibc reserves 32 and 33).
const RTMIN: i32 = 34;
const RTMAX: i32 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid signal {0:?}: expected a name (TERM, SIGKILL, RTMIN+1) or a number 1-64")]
pub struct SignalError(pub String);

/// Parses a signal name or number.
pub fn parse(s: &str) -> Result<i32, SignalError> {
    let err = || SignalError(s.to_owned());
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return if (1..=RTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(err())
        };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = SIGNALS.iter().find(|(k, _)| *k == name) {
        return Ok(n);
    }
    let rt = |base: i32, rest: &str| -> Result<i32, SignalError> {
        let n = if rest.is_empty() {
            base
        } else if let Some(off) = rest.strip_prefix('+') {
            base + off.parse::<i32>().map_err(|_| err())?
        } else if let Some(off) = rest.strip_prefix('-') {
            base - off.parse::<i32>().map_err(|_| err())?
        } else {
            return Err(err());
        };
        if (RTMIN..=RTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(err())
        }
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rt(RTMIN, rest);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rt(RTMAX, rest);
    }
    Err(err())
}

/// The name of signal `n` ("SIGTERM"), or its number as text.
pub fn name(n: i32) -> String {
    SIGNALS
        .iter()
        .find(|(_, v)| *v == n)
        .map(|(k, _)| format!("SIG{k}"))
        .unwrap_or_else(|| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("TERM"), Ok(15));
        assert_eq!(parse("SIGTERM"), Ok(15));
        assert_eq!(parse("sigkill"), Ok(9));
        assert_eq!(parse("kill"), Ok(9));
        assert_eq!(parse("9"), Ok(9));
        assert_eq!(parse("64"), Ok(64));
        assert_eq!(parse("WINCH"), Ok(28));
        assert_eq!(parse("RTMIN"), Ok(34));
        assert_eq!(parse("SIGRTMIN+3"), Ok(37));
        assert_eq!(parse("RTMAX-1"), Ok(63));
        assert_eq!(name(15), "SIGTERM");
        assert_eq!(name(40), "40");
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "", "0", "65", "-9", "SIGFOO", "RTMIN+40", "RTMAX+1", "RTMIN+x", "TERMX",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
