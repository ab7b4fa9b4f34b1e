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
}
