//! A minimal `tracing` subscriber: one line per event on stderr, no spans, no timestamps.
//!
//! tracing-subscriber's fmt layer would add size to a binary the guest kernel unpacks
//! under emulation, and the agent needs none of its features. In the guest, stderr is
//! /dev/console (each character costs ~100 µs on a serial console) or /dev/null.

use std::fmt::{self, Write as _};
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

struct StderrLogger {
    max: LevelFilter,
}

/// Installs the logger as the global default. Errors if one is already installed.
pub fn init(max: LevelFilter) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    tracing::subscriber::set_global_default(StderrLogger { max })
}

impl Subscriber for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    // Spans carry no output here; every span gets the same id.
    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let line = format_event(event.metadata().level(), |v| event.record(v));
        // One write per line so concurrent writers do not interleave mid-line. A missing
        // or broken stderr must never take the agent down: ignore write errors.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

fn format_event(level: &Level, record: impl FnOnce(&mut LineVisitor)) -> String {
    let mut visitor = LineVisitor {
        message: String::new(),
        fields: String::new(),
    };
    record(&mut visitor);
    let mut line = String::with_capacity(16 + visitor.message.len() + visitor.fields.len());
    let _ = writeln!(
        line,
        "husk-agent: {level} {}{}",
        visitor.message, visitor.fields
    );
    line
}

struct LineVisitor {
    message: String,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_message_then_fields() {
        // Drive the visitor the way tracing does, through a real event.
        struct Capture(std::sync::Mutex<Vec<String>>);
        impl Subscriber for Capture {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &Attributes<'_>) -> Id {
                Id::from_u64(1)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, event: &Event<'_>) {
                let line = format_event(event.metadata().level(), |v| event.record(v));
                self.0.lock().expect("capture lock").push(line);
            }
            fn enter(&self, _: &Id) {}
            fn exit(&self, _: &Id) {}
        }
        let capture = std::sync::Arc::new(Capture(std::sync::Mutex::new(Vec::new())));
        let dispatch = tracing::Dispatch::from(capture.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::warn!(path = "/run", code = 5, "mount failed: {}", "EBUSY");
        });
        let lines = capture.0.lock().expect("capture lock").clone();
        assert_eq!(
            lines,
            vec!["husk-agent: WARN mount failed: EBUSY path=/run code=5\n".to_owned()]
        );
    }
}
