//! Reliable `tracing` capture in tests that run in parallel threads.
//!
//! A test that captures events with `tracing::subscriber::set_default` can miss them when
//! other threads of the same test binary register and drop their own subscribers: the
//! callsite interest and the global maximum level are process-wide caches. Installing one
//! global subscriber that is interested in everything (and writes nowhere) keeps every
//! callsite enabled, so the thread's scoped subscriber always sees its events.

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
