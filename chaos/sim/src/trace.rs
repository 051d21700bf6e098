//! The run's trace: a running blake3 over every event the simulator processes (what
//! determinism is judged by), and optionally a human-readable line per event on stderr.

use crate::config::Micros;

pub struct Trace {
    hasher: blake3::Hasher,
    verbose: bool,
}

impl Trace {
    pub fn new(verbose: bool) -> Trace {
        Trace {
            hasher: blake3::Hasher::new(),
            verbose,
        }
    }

    pub fn verbose(&self) -> bool {
        self.verbose
    }

    /// Mixes numbers into the trace hash.
    pub fn mix(&mut self, values: &[u64]) {
        for v in values {
            self.hasher.update(&v.to_le_bytes());
        }
    }

    /// Mixes an event (tag, step, time, numbers) into the trace hash, and prints its
    /// line when verbose. Hashing never depends on verbosity.
    pub fn event(&mut self, step: u64, now: Micros, tag: u8, values: &[u64], line: Option<String>) {
        self.mix(&[u64::from(tag), step, now]);
        self.mix(values);
        if let (true, Some(line)) = (self.verbose, line) {
            eprintln!(
                "[{:>7}] t={:>6}.{:03}ms {}",
                step,
                now / 1000,
                now % 1000,
                line
            );
        }
    }

    /// A note that is part of the verbose output only (it is derived from events that
    /// are already hashed).
    pub fn note(&self, now: Micros, line: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!(
                "          t={:>6}.{:03}ms   {}",
                now / 1000,
                now % 1000,
                line()
            );
        }
    }

    pub fn finish(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }
}
