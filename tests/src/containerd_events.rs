//! containerd's event stream as `ctr events` prints it, recorded in the background so a
//! test can check which task events a shim published and in what order.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::containerd::Containerd;

/// One event: its topic (`/tasks/exit`) and its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub topic: String,
    pub body: Value,
}

impl Event {
    /// The container the event is about (`container_id`), if any.
    pub fn container(&self) -> Option<&str> {
        self.body.get("container_id").and_then(Value::as_str)
    }

    /// The topic, followed for exec and exit events by the process they name (the
    /// exec id, or the container id for its init): `/tasks/exit e1`.
    pub fn label(&self) -> String {
        let process = match self.topic.as_str() {
            "/tasks/exec-added" | "/tasks/exec-started" => self.body.get("exec_id"),
            "/tasks/exit" => self.body.get("id"),
            _ => None,
        };
        match process.and_then(Value::as_str) {
            Some(p) => format!("{} {p}", self.topic),
            None => self.topic.clone(),
        }
    }
}

/// Parses one line of `ctr events`: a timestamp, the namespace, the topic and the event
/// as JSON (Go's `fmt.Fprintln` of the four). The topic is the first word that starts
/// with '/'; neither the timestamp nor a namespace has one.
pub fn parse_line(line: &str) -> Option<Event> {
    let start = line
        .char_indices()
        .find(|&(i, c)| c == '/' && (i == 0 || line[..i].ends_with(' ')))?
        .0;
    let rest = &line[start..];
    let (topic, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let body = body.trim();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()))
    };
    Some(Event {
        topic: topic.to_owned(),
        body,
    })
}

/// `ctr events` running against a private containerd; killed on drop.
pub struct EventLog {
    child: Child,
    path: PathBuf,
}

impl EventLog {
    /// Starts recording into `<containerd dir>/events.log`.
    pub fn start(ctrd: &Containerd) -> Result<Self> {
        let path = ctrd.dir().join("events.log");
        let out =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let child = Command::new("ctr")
            .arg("-a")
            .arg(ctrd.socket())
            .arg("events")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .context("starting ctr events")?;
        Ok(Self { child, path })
    }

    /// Every event recorded so far.
    pub fn events(&self) -> Vec<Event> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_line)
            .collect()
    }

    /// The task events (`/tasks/...`) of `container`, as labels, in order.
    pub fn task_labels(&self, container: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e.topic.starts_with("/tasks/") && e.container() == Some(container))
            .map(Event::label)
            .collect()
    }

    /// Waits until an event matches `pred`; false after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.events().iter().any(&pred) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The raw log, for failure messages.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ctr_events_lines() {
        let e = parse_line(
            r#"2026-11-28 22:10:00.123456789 +0000 UTC husk-test /tasks/exit {"container_id":"d1","id":"e1","pid":42,"exit_status":5}"#,
        )
        .expect("an event");
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.container(), Some("d1"));
        assert_eq!(e.label(), "/tasks/exit e1");
        assert_eq!(e.body["exit_status"], 5);

        let e = parse_line(
            "2026-11-28 22:10:00 +0000 UTC husk-test /tasks/paused {\"container_id\":\"d1\"}",
        )
        .expect("an event");
        assert_eq!(e.label(), "/tasks/paused");

        let e = parse_line("2026-11-28 22:10:00 +0000 UTC husk-test /snapshot/prepare")
            .expect("an event without a body");
        assert_eq!(
            (e.topic.as_str(), &e.body),
            ("/snapshot/prepare", &Value::Null)
        );

        assert_eq!(parse_line("no topic here"), None);
        assert_eq!(parse_line(""), None);
    }
}
