//! Which request a refusal answers: the stamp that tells a refusal by one of this crate's
//! layers, for the request a layer above passed on, from the same [`Rejection`] coming out of
//! a handler that forwards what its own client was refused after it had its effect.
//!
//! The layers that act on "refused, so the request never ran" (the idempotency layer releases
//! the key; `RejectionLayer` marks the answer `Request-Refused`, on which a client's retry
//! re-sends even a POST) open a *window* around the `call` of their inner service: a
//! thread-local stamp, set for the length of that call. `Service::call` runs down a stack
//! synchronously, so every refusing layer below that decides in its `call` reads the stamp
//! when it refuses and puts it in its [`Rejection`]; one that decides later (a queue, a wait
//! for a turn, a store round trip) reads it in `call` and keeps it, and opens the window again
//! when it calls its own inner service. A handler works in its future's `poll`, outside any
//! window: what its own client stack refuses carries no stamp (or another request's), and the
//! layers above treat it as the handler's error, which may follow its effect.
//!
//! What this cannot see: a layer between that calls its inner service from a future (tower's
//! `Buffer`, an Axum `Router`'s routes, another retry) breaks the chain, and a refusal below
//! it carries no stamp: it is treated as an error that may follow an effect (the safe side:
//! the key is kept as run). A handler that calls its client synchronously in its own `call`,
//! forwarding the very request, shares the window.
//!
//! # Requests dropped while held
//!
//! A timeout between the idempotency layer and a layer that holds the request (a queue for a
//! permit, a wait for a turn, a Redis round trip) may fire before the request was passed on:
//! it never ran, and its key should be released, not kept as run. The idempotency layer
//! *watches* each poll of its inner future: a holder of this crate dropped while it still
//! holds a request of the watched stamp reports it, and any holder that passes a request on
//! during that poll says so too. An error in a poll in which the request was dropped while
//! held and nothing was passed on is one the handler never saw. (Requiring that nothing was
//! passed on in the same poll guards against a retry layer between the two: its later
//! attempts carry no stamp, and one of them may have reached the handler in that poll.)
//!
//! [`Rejection`]: crate::Rejection

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static CURRENT: Cell<u64> = const { Cell::new(0) };
    // This thread's stamps: its index in the high 24 bits, a count in the low 40.
    static NEXT: Cell<u64> = const { Cell::new(0) };
}

/// Threads that have made stamps, for the high bits of the next thread's.
static THREADS: AtomicU64 = AtomicU64::new(1);

/// The stamp of the window this code runs in, 0 outside any.
#[inline]
pub(crate) fn current() -> u64 {
    CURRENT.try_with(Cell::get).unwrap_or(0)
}

/// A stamp no other request has: never 0.
#[inline]
pub(crate) fn fresh() -> u64 {
    NEXT.try_with(|n| {
        let mut v = n.get();
        if v & ((1 << 40) - 1) == 0 {
            // First use on this thread, or its 2^40 stamps spent: a new thread index.
            v = THREADS.fetch_add(1, Ordering::Relaxed) << 40;
        }
        v += 1;
        n.set(v);
        v
    })
    .unwrap_or(u64::MAX)
}

/// The window a layer opens for its inner `call`: the stamp of the window around it if there
/// is one (a layer above opened it for the same request), else a fresh one.
#[inline]
pub(crate) fn adopt() -> u64 {
    match current() {
        0 => fresh(),
        s => s,
    }
}

/// Runs `f` (an inner service's `call`) inside the window of `stamp`; 0 runs it as is.
#[inline]
pub(crate) fn within<R>(stamp: u64, f: impl FnOnce() -> R) -> R {
    if stamp == 0 {
        return f();
    }
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = CURRENT.try_with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.try_with(|c| c.replace(stamp)).unwrap_or(0));
    f()
}

/// What a watched poll saw (see the module docs).
#[derive(Clone, Copy)]
struct Watch {
    stamp: u64,
    held_dropped: bool,
    passed: bool,
}

thread_local! {
    static WATCH: Cell<Watch> = const {
        Cell::new(Watch {
            stamp: 0,
            held_dropped: false,
            passed: false,
        })
    };
}

/// Runs `f` (one poll of the idempotency layer's inner future, for the request of `stamp`)
/// watched: see [`dropped_unrun`]. Nested watches restore the outer one, passes included.
#[inline]
pub(crate) fn watching<R>(stamp: u64, f: impl FnOnce() -> R) -> R {
    if stamp == 0 {
        return f();
    }
    struct Restore(Watch);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = WATCH.try_with(|w| {
                let mut outer = self.0;
                outer.passed |= w.get().passed;
                w.set(outer);
            });
        }
    }
    let fresh = Watch {
        stamp,
        held_dropped: false,
        passed: false,
    };
    let _restore = Restore(WATCH.try_with(|w| w.replace(fresh)).unwrap_or(fresh));
    f()
}

/// Whether, in the watched poll now running for `stamp`, a holder of this crate dropped that
/// request while it held it and no holder passed a request on.
pub(crate) fn dropped_unrun(stamp: u64) -> bool {
    stamp != 0
        && WATCH
            .try_with(|w| {
                let w = w.get();
                w.stamp == stamp && w.held_dropped && !w.passed
            })
            .unwrap_or(false)
}

/// A holder passes a request on to its inner service.
#[inline]
pub(crate) fn note_pass() {
    let _ = WATCH.try_with(|w| {
        let mut v = w.get();
        if v.stamp != 0 && !v.passed {
            v.passed = true;
            w.set(v);
        }
    });
}

/// A request held by a layer of this crate (queued, waiting for a turn or for a store): its
/// stamp, reported as dropped while held unless the holder passes it on ([`Held::pass`]) or
/// answers it ([`Held::done`]) first.
#[derive(Debug)]
pub(crate) struct Held(u64);

impl Held {
    /// A request held from now, with the stamp of the window this code runs in.
    #[inline]
    pub(crate) fn new() -> Held {
        Held(current())
    }

    /// A holder that has nothing to report (the request is not held).
    pub(crate) const fn none() -> Held {
        Held(0)
    }

    /// The request's stamp (0 once passed on or answered).
    #[inline]
    pub(crate) fn stamp(&self) -> u64 {
        self.0
    }

    /// The request is passed on: calls `f` (the inner `call`) in its window, and notes the pass.
    #[inline]
    pub(crate) fn pass<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let stamp = std::mem::take(&mut self.0);
        note_pass();
        within(stamp, f)
    }

    /// The request is answered (refused, or failed before it was passed on): nothing to
    /// report when the holder is dropped.
    #[inline]
    pub(crate) fn done(&mut self) {
        self.0 = 0;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.0 == 0 {
            return;
        }
        let stamp = self.0;
        let _ = WATCH.try_with(|w| {
            let mut v = w.get();
            if v.stamp == stamp {
                v.held_dropped = true;
                w.set(v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_nest_and_restore() {
        assert_eq!(current(), 0);
        let a = fresh();
        let b = fresh();
        assert!(a != 0 && b != 0 && a != b);
        within(a, || {
            assert_eq!(current(), a);
            assert_eq!(adopt(), a);
            within(b, || assert_eq!(current(), b));
            assert_eq!(current(), a);
        });
        assert_eq!(current(), 0);
        let other = std::thread::spawn(fresh).join().unwrap();
        assert!(other != a && other != b);
        // A panic inside still restores the window.
        let _ = std::panic::catch_unwind(|| within(a, || panic!("inner call panicked")));
        assert_eq!(current(), 0);
    }

    #[test]
    fn a_held_request_dropped_in_a_watched_poll_is_reported() {
        let s = fresh();
        let held = within(s, Held::new);
        assert!(watching(s, || {
            drop(held);
            dropped_unrun(s)
        }));
        // Another request's poll, or a pass in the same poll: not reported.
        let held = within(s, Held::new);
        assert!(!watching(fresh(), || {
            drop(held);
            dropped_unrun(s)
        }));
        let held = within(s, Held::new);
        assert!(!watching(s, || {
            drop(held);
            note_pass();
            dropped_unrun(s)
        }));
        // Passed on, or answered, then dropped: not reported.
        let mut held = within(s, Held::new);
        assert_eq!(held.pass(current), s);
        assert!(!watching(s, || {
            drop(held);
            dropped_unrun(s)
        }));
        let mut held = within(s, Held::new);
        held.done();
        assert!(!watching(s, || {
            drop(held);
            dropped_unrun(s)
        }));
        // Outside any window: nothing to report.
        let held = Held::new();
        assert_eq!(held.stamp(), 0);
        assert!(!dropped_unrun(0));
    }
}
