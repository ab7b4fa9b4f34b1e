//! The bound on the bytes the layer buffers in flight, shared by everything one layer makes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes the layer's requests may buffer at once: request bodies read for their fingerprint
/// and room for the responses they may keep.
pub(crate) struct BufferBudget {
    used: AtomicUsize,
    max: usize,
}

impl BufferBudget {
    pub(crate) fn new(max: usize) -> Arc<BufferBudget> {
        Arc::new(BufferBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes reserved now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes reserved from a [`BufferBudget`], given back when dropped (or earlier).
#[derive(Default)]
pub(crate) struct Reservation {
    budget: Option<Arc<BufferBudget>>,
    bytes: usize,
}

impl Reservation {
    /// Reserves `n` more bytes, unless that takes the budget past its bound.
    pub(crate) fn grow(&mut self, budget: &Arc<BufferBudget>, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let ok = budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|&v| v <= budget.max)
            })
            .is_ok();
        if ok {
            self.budget.get_or_insert_with(|| budget.clone());
            self.bytes += n;
        }
        ok
    }

    /// Gives back all but `n` bytes.
    pub(crate) fn shrink_to(&mut self, n: usize) {
        if n < self.bytes {
            if let Some(b) = &self.budget {
                b.used.fetch_sub(self.bytes - n, Ordering::Relaxed);
            }
            self.bytes = n;
        }
    }

    /// Gives every byte back.
    pub(crate) fn release(&mut self) {
        self.shrink_to(0);
    }

    /// This reservation, moved out: `self` is left empty.
    pub(crate) fn take(&mut self) -> Reservation {
        std::mem::take(self)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_bound_and_give_back_on_drop() {
        let budget = BufferBudget::new(100);
        let mut a = Reservation::default();
        assert!(a.grow(&budget, 60));
        let mut b = Reservation::default();
        assert!(!b.grow(&budget, 41), "over the bound");
        assert!(b.grow(&budget, 40));
        assert_eq!(budget.used(), 100);
        a.shrink_to(10);
        assert_eq!(budget.used(), 50);
        let moved = a.take();
        drop(a);
        assert_eq!(budget.used(), 50, "the moved reservation still holds");
        drop(moved);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
