//! A small, fast, lock-free random generator (wyrand over one atomic Weyl sequence): one
//! `fetch_add` per draw, shared by every clone of a layer. Not for cryptography: it spreads
//! retries and hints and makes idempotency keys unique.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// The Weyl sequence's increment.
const INCREMENT: u64 = 0xa076_1d64_78bd_642f;

/// wyrand's output step over one value of the sequence.
#[inline]
pub(crate) fn mix(s: u64) -> u64 {
    let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
    ((t >> 64) as u64) ^ (t as u64)
}

/// A uniform number in `[0, span)` from a uniform `u64` (no division, no float).
#[inline]
pub(crate) fn below(r: u64, span: u64) -> u64 {
    ((u128::from(r) * u128::from(span)) >> 64) as u64
}

/// A seed from the standard library's per-process random keys.
pub(crate) fn entropy() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x6a09_e667_f3bc_c909);
    h.finish()
}

/// The generator: its state is the Weyl sequence.
pub(crate) struct Rng {
    state: AtomicU64,
}

impl Rng {
    /// A generator seeded from the standard library's per-process random keys.
    pub(crate) fn from_entropy() -> Rng {
        Rng::seeded(entropy())
    }

    /// A generator with a fixed seed, for reproducible tests.
    pub(crate) fn seeded(seed: u64) -> Rng {
        Rng {
            state: AtomicU64::new(seed),
        }
    }

    /// Starts the sequence again from `seed` (a pooled state taken by a new layer).
    pub(crate) fn reseed(&self, seed: u64) {
        self.state.store(seed, Ordering::Relaxed);
    }

    /// A uniform `u64`; concurrent draws take different values of the sequence.
    #[inline]
    pub(crate) fn next_u64(&self) -> u64 {
        let s = self
            .state
            .fetch_add(INCREMENT, Ordering::Relaxed)
            .wrapping_add(INCREMENT);
        mix(s)
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub(crate) fn next_f64(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rng").finish_non_exhaustive()
    }
}
