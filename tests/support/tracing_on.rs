//! Reliable `tracing` capture in tests that run in parallel threads.
//!
//! A test that captures events with `tracing::subscriber::set_default` can miss them when
//! other threads of the same test binary register and drop their own subscribers: the
//! callsite interest and the global maximum level are process-wide caches. Installing one
//! global subscriber that is interested in everything (and writes nowhere) keeps every
//! callsite enabled, so the thread's scoped subscriber always sees its events.

#![allow(dead_code)]

use std::sync::Once;

/// Installs the global always-interested subscriber, once per process.
pub fn tracing_always_on() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let sink = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        // Another global subscriber already installed serves as well.
        let _ = tracing::subscriber::set_global_default(sink);
    });
}

/// Captures this thread's `tracing` events at `level` and above (without colours) until the
/// guard is dropped.
pub fn capture(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let out = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_max_level(level)
        .with_ansi(false)
        .finish();
    tracing_always_on();
    (out, tracing::subscriber::set_default(subscriber))
}

/// A `tracing` writer that keeps what it is given, for a test to read.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// How many times `needle` was written.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}
