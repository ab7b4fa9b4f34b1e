//! Whose refusal a rejection is, and whether a request was dropped before it ran: marks kept
//! on the request itself.
//!
//! The layers that act on "refused, so the request never ran" (the idempotency layer releases
//! the key; `RejectionLayer` marks the answer `Request-Refused`, on which a client's retry
//! re-sends even a POST) put a [`Stamp`] in the request's extensions and keep its [`Marks`].
//! A layer of this crate that refuses a request drops it inside [`refuse`]; one that holds a
//! request (a queue for a permit, a wait for a turn, a store round trip) keeps it in a
//! [`HeldReq`], which drops it as "dropped while held" unless it was passed on. The stamp sees
//! how the request it rides in was dropped (a thread-local says so for the length of the
//! drop) and marks it. Nothing is read on the admit path: only refusals and drops pay.
//!
//! What the marks prove is about the request object: a refusal a handler returns was made
//! for another request (its own client's), so the marks of the request the handler got are
//! not set, and the layers above treat it as the handler's error, which may follow its
//! effect. A layer between that sends copies of the request (a retry, a hedge) copies its
//! extensions with [`http::request::Parts`]' `Clone`: the copy's stamp is a new one, and the
//! original is marked *cloned*, after which its marks prove nothing (a copy may have run).
//! A copy made without the extensions cannot be seen; nor can a handler that forwards the
//! very request it got to a client of this crate's layers (then its refusal is taken for the
//! request's, as it is for a proxy).

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const REFUSED: u8 = 1;
const HELD_DROPPED: u8 = 2;
const CLONED: u8 = 4;

/// What happened to a stamped request (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Marks(AtomicU8);

impl Marks {
    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    /// A layer of this crate refused the request, and no copy of it was made.
    pub(crate) fn refused(&self) -> bool {
        self.get() & (REFUSED | CLONED) == REFUSED
    }

    /// A layer of this crate that held the request dropped it before passing it on, and no
    /// copy of it was made: it never reached the service behind.
    pub(crate) fn never_ran(&self) -> bool {
        self.get() & (HELD_DROPPED | CLONED) == HELD_DROPPED
    }

    /// The request was refused by the layer that keeps these marks.
    pub(crate) fn mark_refused(&self) {
        self.0.fetch_or(REFUSED, Ordering::Release);
    }
}

/// The extension: shares its request's [`Marks`] with the layer that put it there.
pub(crate) struct Stamp(Arc<Marks>);

impl Clone for Stamp {
    /// A copy of the request (a retry's, a hedge's): a stamp of its own, and the original's
    /// marks prove nothing from now on.
    fn clone(&self) -> Self {
        self.0 .0.fetch_or(CLONED, Ordering::Release);
        Stamp(Arc::default())
    }
}

impl Drop for Stamp {
    fn drop(&mut self) {
        let how = DROPPING.try_with(Cell::get).unwrap_or(0);
        if how != 0 {
            self.0 .0.fetch_or(how, Ordering::Release);
        }
    }
}

impl fmt::Debug for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stamp").field(&self.0.get()).finish()
    }
}

/// The marks of the request whose extensions these are: those of a stamp already there (a
/// layer above put it), or of a new one put there now.
pub(crate) fn marks_of(extensions: &mut http::Extensions) -> Arc<Marks> {
    if let Some(stamp) = extensions.get::<Stamp>() {
        return stamp.0.clone();
    }
    let marks = Arc::new(Marks::default());
    extensions.insert(Stamp(marks.clone()));
    marks
}

thread_local! {
    // How the value being dropped goes: 0 (not by a layer of this crate), `REFUSED` or
    // `HELD_DROPPED`.
    static DROPPING: Cell<u8> = const { Cell::new(0) };
}

fn drop_as<T>(how: u8, value: T) {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = DROPPING.try_with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DROPPING.try_with(|d| d.replace(how)).unwrap_or(0));
    drop(value);
}

/// Drops a request that a layer of this crate refuses.
#[cold]
pub(crate) fn refuse<T>(request: T) {
    drop_as(REFUSED, request);
}

/// A request held by a layer of this crate until it passes it on ([`HeldReq::take`]) or
/// refuses it ([`HeldReq::refuse`]); dropped otherwise, it is dropped as held (see the module
/// docs).
pub(crate) struct HeldReq<R>(Option<R>);

impl<R> HeldReq<R> {
    pub(crate) fn new(request: R) -> Self {
        HeldReq(Some(request))
    }

    /// The request, to pass on.
    pub(crate) fn take(&mut self) -> Option<R> {
        self.0.take()
    }

    /// The request is refused: dropped as such now.
    pub(crate) fn refuse(&mut self) {
        if let Some(request) = self.0.take() {
            refuse(request);
        }
    }
}

impl<R> Drop for HeldReq<R> {
    fn drop(&mut self) {
        if let Some(request) = self.0.take() {
            drop_as(HELD_DROPPED, request);
        }
    }
}

impl<R> fmt::Debug for HeldReq<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HeldReq").field(&self.0.is_some()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped() -> (http::Request<()>, Arc<Marks>) {
        let mut req = http::Request::new(());
        let marks = marks_of(req.extensions_mut());
        (req, marks)
    }

    #[test]
    fn a_request_knows_how_it_was_dropped() {
        let (req, marks) = stamped();
        refuse(req);
        assert!(marks.refused() && !marks.never_ran());

        let (req, marks) = stamped();
        drop(HeldReq::new(req));
        assert!(marks.never_ran() && !marks.refused());

        // Passed on, then dropped by the service behind: no mark.
        let (req, marks) = stamped();
        let mut held = HeldReq::new(req);
        drop(held.take());
        drop(held);
        assert!(!marks.refused() && !marks.never_ran());

        let (req, marks) = stamped();
        HeldReq::new(req).refuse();
        assert!(marks.refused());

        // A second layer finds the first one's stamp.
        let (mut req, marks) = stamped();
        let again = marks_of(req.extensions_mut());
        assert!(Arc::ptr_eq(&marks, &again));
        refuse(req);
        assert!(again.refused());
    }

    #[test]
    fn a_copy_of_the_request_voids_the_marks() {
        let (req, marks) = stamped();
        let (parts, ()) = req.into_parts();
        let copy = http::Request::from_parts(parts.clone(), ());
        refuse(http::Request::from_parts(parts, ()));
        assert!(!marks.refused());
        // The copy's stamp is its own.
        let mut copy = copy;
        let copy_marks = marks_of(copy.extensions_mut());
        assert!(!Arc::ptr_eq(&marks, &copy_marks));
        drop(HeldReq::new(copy));
        assert!(copy_marks.never_ran() && !marks.never_ran());
    }

    #[test]
    fn other_drops_inside_a_refusal_are_not_mistaken() {
        let (req, marks) = stamped();
        drop(req);
        assert!(!marks.refused() && !marks.never_ran());
        // A panic while dropping still restores the thread-local.
        struct Boom;
        impl Drop for Boom {
            fn drop(&mut self) {
                panic!("drop panicked");
            }
        }
        let _ = std::panic::catch_unwind(|| refuse(Boom));
        let (req, marks) = stamped();
        drop(req);
        assert!(!marks.refused());
    }
}
