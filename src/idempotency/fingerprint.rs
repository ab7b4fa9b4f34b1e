//! The request fingerprint: a stable 128-bit hash of method, path and query, and body.

use std::fmt;

/// A 128-bit fingerprint of a request: its method, path and query, and body.
///
/// Two requests with the same idempotency key must carry the same fingerprint, or the second
/// is refused with 422 ([`RejectionKind::IdempotencyKeyReused`]). The hash is this crate's
/// own, fixed function (not `std`'s, whose output may change between Rust releases), so
/// replicas built at different times agree on the fingerprints they put in a shared store.
/// It is not a cryptographic hash: it tells payloads apart, it does not authenticate them.
/// A collision could only ever replay a response to a request of the same scope and key.
///
/// [`RejectionKind::IdempotencyKeyReused`]: crate::RejectionKind::IdempotencyKeyReused
///
/// ```
/// use tower_bulwark::idempotency::Fingerprint;
///
/// let a = Fingerprint::of("POST", "/orders?x=1", b"{\"qty\":1}");
/// let b = Fingerprint::of("POST", "/orders?x=1", b"{\"qty\":2}");
/// assert_eq!(a, Fingerprint::of("POST", "/orders?x=1", b"{\"qty\":1}"));
/// assert_ne!(a, b);
/// assert_eq!(Fingerprint::from_u128(a.as_u128()), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of a request made of `method`, `path_and_query` and `body`.
    pub fn of(method: &str, path_and_query: &str, body: &[u8]) -> Fingerprint {
        let mut h = Hasher::new(0);
        h.segment(method.as_bytes());
        h.segment(path_and_query.as_bytes());
        h.segment(body);
        Fingerprint(h.finish128())
    }

    /// The fingerprint as a number, for stores that keep it.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// A fingerprint read back from a store.
    pub const fn from_u128(n: u128) -> Fingerprint {
        Fingerprint(n)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xC2B2_AE3D_27D4_EB4F;
const K2: u64 = 0x1656_67B1_9E37_79F9;
const K3: u64 = 0xD6E8_FEB8_6659_FD93;

/// Folded 64x64 -> 128 multiply.
#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a).wrapping_mul(u128::from(b));
    (r as u64) ^ ((r >> 64) as u64)
}

/// A small, fixed, two-lane multiply-fold hash. Each segment is length-prefixed, so the
/// segments `("ab", "c")` and `("a", "bc")` hash differently.
#[derive(Clone, Copy)]
pub(crate) struct Hasher {
    a: u64,
    b: u64,
}

impl Hasher {
    pub(crate) fn new(seed: u64) -> Hasher {
        Hasher {
            a: seed ^ K0,
            b: seed.rotate_left(32) ^ K1,
        }
    }

    #[inline(always)]
    pub(crate) fn word(&mut self, w: u64) {
        self.a = mix(self.a ^ w, K2);
        self.b = mix(self.b.rotate_left(23) ^ w, K3).wrapping_add(w);
    }

    pub(crate) fn segment(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64 ^ K1);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w));
        }
    }

    pub(crate) fn finish64(&self) -> u64 {
        mix(self.a ^ K1, self.b ^ K0) ^ self.a
    }

    pub(crate) fn finish128(&self) -> u128 {
        let hi = mix(self.a ^ K3, self.b.rotate_left(17) ^ K2);
        let lo = mix(self.b ^ K0, hi ^ self.a ^ K1);
        (u128::from(hi) << 64) | u128::from(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOLDEN: u128 = 0x3367_b556_0a3c_3312_cfde_5fb0_9b10_9959;

    #[test]
    fn segments_are_delimited() {
        let mut x = Hasher::new(0);
        x.segment(b"ab");
        x.segment(b"c");
        let mut y = Hasher::new(0);
        y.segment(b"a");
        y.segment(b"bc");
        assert_ne!(x.finish128(), y.finish128());
        // Trailing zero bytes are not the same as a shorter body.
        assert_ne!(
            Fingerprint::of("POST", "/", b"a"),
            Fingerprint::of("POST", "/", b"a\0")
        );
        assert_ne!(
            Fingerprint::of("POST", "/a", b""),
            Fingerprint::of("PATCH", "/a", b"")
        );
    }

    #[test]
    fn value_is_stable() {
        // The function is part of the store format (replicas of different builds share
        // records): this value must never change silently.
        let f = Fingerprint::of("POST", "/orders", b"{}");
        assert_eq!(f.as_u128(), GOLDEN);
    }

    proptest! {
        #[test]
        fn one_changed_byte_changes_the_fingerprint(
            body in proptest::collection::vec(any::<u8>(), 1..300),
            idx in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut other = body.clone();
            let i = idx.index(body.len());
            other[i] ^= flip;
            prop_assert_ne!(Fingerprint::of("POST", "/p", &body), Fingerprint::of("POST", "/p", &other));
            prop_assert_eq!(Fingerprint::of("POST", "/p", &body), Fingerprint::of("POST", "/p", &body.clone()));
        }

        #[test]
        fn appended_bytes_change_the_fingerprint(
            body in proptest::collection::vec(any::<u8>(), 0..100),
            extra in proptest::collection::vec(any::<u8>(), 1..9),
        ) {
            let mut longer = body.clone();
            longer.extend_from_slice(&extra);
            prop_assert_ne!(Fingerprint::of("POST", "/p", &body), Fingerprint::of("POST", "/p", &longer));
        }
    }
}
