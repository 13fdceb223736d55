//! The steps the agent reports for a container's creation, start or exec (where the guest
//! spent the time), as one log line.

use crate::agent::Step;

/// `total 812.0 ms: rootfs 300.1 ms, child: mounts 120.4 ms, …` (steps in order).
pub fn summary(steps: &[Step]) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let total: u64 = steps.iter().map(|s| s.micros).sum();
    let parts: Vec<String> = steps
        .iter()
        .map(|s| format!("{} {:.1} ms", s.name, ms(s.micros)))
        .collect();
    format!("total {:.1} ms: {}", ms(total), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_lists_steps_in_order_with_their_total() {
        let step = |name: &str, micros| {
            let mut s = Step::new();
            s.name = name.into();
            s.micros = micros;
            s
        };
        assert_eq!(
            summary(&[step("rootfs", 1500), step("execve", 250)]),
            "total 1.8 ms: rootfs 1.5 ms, execve 0.2 ms"
        );
        assert_eq!(summary(&[]), "total 0.0 ms: ");
    }
}
