//! The core's ERROR logs fail the run: by the project's rule an ERROR means a person
//! must look, so a simulated cluster that makes the core log one has found something.
//!
//! While a simulation runs, a minimal `tracing` subscriber is the thread's default;
//! it records ERROR events (everything else is disabled, so it costs nothing) and the
//! simulator reports the first one after the event that caused it. Being
//! thread-local, it is as deterministic as the run.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};

/// ERROR lines logged so far, shared between the subscriber and the simulator.
#[derive(Clone, Default)]
pub struct CoreErrors(Arc<Mutex<Vec<String>>>);

impl CoreErrors {
    /// The first ERROR logged since the last call, if any.
    pub fn take_first(&self) -> Option<String> {
        let mut v = self.0.lock().expect("error log poisoned");
        let first = v.first().cloned();
        v.clear();
        first
    }

    /// Runs `f` with a subscriber that records ERROR events into `self`.
    pub fn capture<T>(&self, f: impl FnOnce() -> T) -> T {
        tracing::subscriber::with_default(ErrorSubscriber(self.clone()), f)
    }
}

struct ErrorSubscriber(CoreErrors);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Subscriber for ErrorSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() == Level::ERROR
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(format!("{}:", event.metadata().target()));
        event.record(&mut line);
        self.0 .0.lock().expect("error log poisoned").push(line.0);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_errors_only() {
        let errors = CoreErrors::default();
        errors.capture(|| {
            tracing::warn!("not this");
            tracing::error!(group = 3, "this");
        });
        let line = errors.take_first().expect("an error was recorded");
        assert!(line.contains("this") && line.contains("group=3"), "{line}");
        assert!(errors.take_first().is_none());
    }
}
