//! Fault injection for the kill -9 tests: a reproducible random sequence (seeded from
//! `HUSK_FAULT_SEED` or the clock, printed by the tests), the steps' measured durations
//! (so a fault lands inside a step on fast and slow hosts alike), and the SIGKILL of a
//! target process while a command runs, with a bound on how long that command may take
//! to return afterwards.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant, SystemTime};

/// A number from the environment, `default` when unset or not a number.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `HUSK_FAULT_SEED`, or one from the clock (never 0: xorshift would stay 0).
pub fn seed() -> u64 {
    env_number(
        "HUSK_FAULT_SEED",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    )
    .max(1)
}

/// xorshift64*: a reproducible sequence from the printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// A moment within `window`.
    pub fn moment(&mut self, window: Duration) -> Duration {
        Duration::from_millis(self.below(window.as_millis() as u64 + 1))
    }
}

/// How long each step (keyed by `K`) took when it last ran unfaulted.
pub struct Durations<K>(Vec<(K, Duration)>);

impl<K: PartialEq + Copy> Default for Durations<K> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: PartialEq + Copy> Durations<K> {
    pub fn record(&mut self, key: K, took: Duration) {
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, took));
    }
    /// The last duration of `key`, or `default` before it ran once.
    pub fn window(&self, key: K, default: Duration) -> Duration {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(default, |(_, d)| *d)
    }
}

/// Waits for `command` to exit for at most `bound`; `None` (after killing it) if it did
/// not: the caller reports a hang.
pub fn wait_bounded(command: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(Some(s)) = command.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = command.kill();
            let _ = command.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After `delay`, SIGKILLs one (chosen by `rng`) of the pids `targets` finds, waiting for
/// one to appear while `command` runs (a process the command starts may not exist yet).
/// `targets` is told whether the command has exited (its own pid is then no target: it
/// may be reused). Returns the pid killed, `None` if none appeared before the command
/// exited.
pub fn kill_during(
    command: &mut Child,
    delay: Duration,
    rng: &mut Rng,
    mut targets: impl FnMut(bool) -> Vec<i64>,
) -> Option<i64> {
    std::thread::sleep(delay);
    loop {
        let exited = command.try_wait().ok().flatten().is_some();
        let pids = targets(exited);
        if !pids.is_empty() {
            let pid = pids[rng.below(pids.len() as u64) as usize];
            // SAFETY: kill(2) of a process of the caller's container.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Some(pid);
        }
        if exited {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_sequence_spread_over_its_range() {
        let a: Vec<u64> = (0..50).scan(Rng::new(7), |r, _| Some(r.below(5))).collect();
        let b: Vec<u64> = (0..50).scan(Rng::new(7), |r, _| Some(r.below(5))).collect();
        assert_eq!(a, b);
        for v in 0..5 {
            assert!(a.contains(&v), "{v} never drawn in {a:?}");
        }
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
    }

    #[test]
    fn a_target_that_appears_late_is_killed_and_a_command_that_ends_first_kills_none() {
        let mut rng = Rng::new(1);
        let mut sleeper = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = sleeper.id() as i64;
        let mut calls = 0;
        let killed = kill_during(&mut sleeper, Duration::ZERO, &mut rng, |_| {
            calls += 1;
            if calls < 3 { Vec::new() } else { vec![pid] }
        });
        assert_eq!(killed, Some(pid));
        let status = wait_bounded(&mut sleeper, Duration::from_secs(5)).expect("it died");
        assert!(!status.success());

        let mut quick = std::process::Command::new("true").spawn().unwrap();
        let killed = kill_during(&mut quick, Duration::ZERO, &mut rng, |_| Vec::new());
        assert_eq!(killed, None);
        assert!(wait_bounded(&mut quick, Duration::from_secs(5)).is_some());
    }
}
