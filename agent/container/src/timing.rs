//! Where a container's creation, its start or an exec spends its time: named steps, each
//! the time since the step before it, on CLOCK_MONOTONIC (one clock for the agent and its
//! children, so the child's marks fall into the agent's timeline).
//!
//! The child records into a fixed array ([`ChildMarks`]): after fork it may take no lock
//! (see `init.rs`), and it sends its marks to the agent with its last setup message.

/// One step: what ran, and for how long (microseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub micros: u64,
}

/// Nanoseconds on CLOCK_MONOTONIC (async-signal-safe: usable after fork).
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The agent's timeline of one operation.
#[derive(Debug)]
pub struct Timeline {
    steps: Vec<Step>,
    last_ns: u64,
}

impl Timeline {
    pub fn start() -> Self {
        Self {
            steps: Vec::new(),
            last_ns: now_ns(),
        }
    }

    /// Ends step `name` now.
    pub fn mark(&mut self, name: &'static str) {
        self.mark_at(name, now_ns());
    }

    fn mark_at(&mut self, name: &'static str, at_ns: u64) {
        // A child's clock reading can precede the agent's last mark by a little (the child
        // marked before the agent got around to its own): such a step counts as 0.
        let micros = at_ns.saturating_sub(self.last_ns) / 1000;
        self.steps.push(Step { name, micros });
        self.last_ns = self.last_ns.max(at_ns);
    }

    /// Adds the child's steps, in the order it took them.
    pub(crate) fn add_child(&mut self, marks: &ChildMarks) {
        for (step, at_ns) in marks.iter() {
            self.mark_at(step.name(), at_ns);
        }
    }

    /// Ends a stretch in which another timeline's `steps` ran (the container library, on
    /// another thread): adds them, and what of the stretch they do not cover as `rest`,
    /// so that the steps still add up to the time since the start.
    pub fn include(&mut self, steps: Vec<Step>, rest: &'static str) {
        let now = now_ns();
        let stretch = now.saturating_sub(self.last_ns) / 1000;
        let covered: u64 = steps.iter().map(|s| s.micros).sum();
        self.steps.extend(steps);
        self.steps.push(Step {
            name: rest,
            micros: stretch.saturating_sub(covered),
        });
        self.last_ns = now;
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn into_steps(self) -> Vec<Step> {
        self.steps
    }
}

/// The steps a container process takes between the agent's Go and its execve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildStep {
    /// Go received; user and cgroup namespaces entered, session made.
    Namespaces = 1,
    /// Standard streams installed, hostname set.
    Stdio = 2,
    /// The rootfs mounts (`mounts` of the spec, devices) below the new root.
    Mounts = 3,
    /// pivot_root into the rootfs.
    PivotRoot = 4,
    /// Read-only remounts, masked and read-only paths.
    RootfsFinish = 5,
    /// rlimits, and the program looked up on PATH.
    Limits = 6,
    /// Ids, capabilities, no_new_privs (and the seccomp filter when installed early).
    Identity = 7,
}

impl ChildStep {
    const ALL: [ChildStep; 7] = [
        ChildStep::Namespaces,
        ChildStep::Stdio,
        ChildStep::Mounts,
        ChildStep::PivotRoot,
        ChildStep::RootfsFinish,
        ChildStep::Limits,
        ChildStep::Identity,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChildStep::Namespaces => "child: namespaces",
            ChildStep::Stdio => "child: stdio",
            ChildStep::Mounts => "child: mounts",
            ChildStep::PivotRoot => "child: pivot_root",
            ChildStep::RootfsFinish => "child: rootfs finish",
            ChildStep::Limits => "child: rlimits, program lookup",
            ChildStep::Identity => "child: ids, capabilities",
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == code)
    }
}

/// Marks recorded by a container process, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChildMarks {
    marks: [(u8, u64); Self::MAX],
    len: usize,
}

impl ChildMarks {
    const MAX: usize = 8;
    /// Encoded size of one mark: the step's code and its time.
    const ENCODED: usize = 9;

    /// Records `step` now (a mark beyond the capacity is dropped).
    pub(crate) fn mark(&mut self, step: ChildStep) {
        if self.len < Self::MAX {
            self.marks[self.len] = (step as u8, now_ns());
            self.len += 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = (ChildStep, u64)> + '_ {
        self.marks[..self.len]
            .iter()
            .filter_map(|&(code, at)| Some((ChildStep::from_code(code)?, at)))
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for &(code, at) in &self.marks[..self.len] {
            out.push(code);
            out.extend_from_slice(&at.to_le_bytes());
        }
    }

    /// `None` for anything but whole marks of known steps, at most [`Self::MAX`].
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(Self::ENCODED) || bytes.len() / Self::ENCODED > Self::MAX {
            return None;
        }
        let mut marks = ChildMarks::default();
        for chunk in bytes.chunks_exact(Self::ENCODED) {
            let step = ChildStep::from_code(chunk[0])?;
            let at = u64::from_le_bytes(chunk[1..].try_into().ok()?);
            marks.marks[marks.len] = (step as u8, at);
            marks.len += 1;
        }
        Some(marks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_marks_round_trip_and_bad_bytes_are_refused() {
        let mut m = ChildMarks::default();
        m.mark(ChildStep::Namespaces);
        m.mark(ChildStep::Mounts);
        let mut bytes = Vec::new();
        m.encode(&mut bytes);
        assert_eq!(bytes.len(), 18);
        assert_eq!(ChildMarks::decode(&bytes), Some(m));
        assert_eq!(ChildMarks::decode(&bytes[..17]), None, "a cut mark");
        let mut unknown = bytes.clone();
        unknown[9] = 0xee;
        assert_eq!(ChildMarks::decode(&unknown), None, "an unknown step");
        assert_eq!(ChildMarks::decode(&[1u8; 9 * 9]), None, "too many marks");
        assert_eq!(ChildMarks::decode(&[]), Some(ChildMarks::default()));
    }

    #[test]
    fn a_timeline_takes_the_childs_steps_in_order() {
        let mut t = Timeline::start();
        let base = t.last_ns;
        t.mark_at("spawn", base + 2_000_000);
        let mut child = ChildMarks::default();
        child.marks[0] = (ChildStep::Namespaces as u8, base + 3_000_000);
        // Before the agent's last mark: counts as 0, not as a huge number.
        child.marks[1] = (ChildStep::Stdio as u8, base + 1_000_000);
        child.marks[2] = (ChildStep::Mounts as u8, base + 7_500_000);
        child.len = 3;
        t.add_child(&child);
        t.mark_at("ready", base + 8_000_000);
        let got: Vec<(&str, u64)> = t.steps().iter().map(|s| (s.name, s.micros)).collect();
        assert_eq!(
            got,
            vec![
                ("spawn", 2000),
                ("child: namespaces", 1000),
                ("child: stdio", 0),
                ("child: mounts", 4500),
                ("ready", 500),
            ]
        );
    }
}
