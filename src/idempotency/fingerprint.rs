//! The request fingerprint: a stable 128-bit hash of method, path and query, the body's
//! `Content-Type` and `Content-Encoding`, and body.

use std::fmt;

/// A 128-bit fingerprint of a request: its method, path and query, the `Content-Type` and
/// `Content-Encoding` of its body (as sent, first value of each), and its body.
///
/// The content type and encoding belong to the payload: the same bytes sent as another
/// media type (or encoding) are another request. A client that first forgot its
/// `Content-Type` (and was answered 415 before the handler ran) and retries with it is not
/// replayed the stored 415: its retry is another payload (422, or a new key runs).
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
///
/// // What the layer computes: the content type and encoding count.
/// let json = Fingerprint::of_request("POST", "/orders", b"application/json", b"", b"{}");
/// assert_ne!(json, Fingerprint::of("POST", "/orders", b"{}"));
/// assert_eq!(Fingerprint::of_request("POST", "/orders", b"", b"", b"{}"), Fingerprint::of("POST", "/orders", b"{}"));
/// ```
///
/// # Version
///
/// The function is part of the store format: replicas that share a store must compute the
/// same fingerprints. [`FINGERPRINT_VERSION`] names the function; it changes whenever the
/// function's output does. Version 2 (this one) added the content type and encoding: a
/// record or lease written by a version 1 replica does not match the fingerprint a version 2
/// replica computes for the same request, so its repeats get 422
/// ([`RejectionKind::IdempotencyKeyReused`]) until the record's time to live ends. Roll out
/// a new version when no keys you care about are in flight, or accept those 422s.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of a request made of `method`, `path_and_query` and `body`, with no
    /// `Content-Type` nor `Content-Encoding`: the same as
    /// [`of_request`](Fingerprint::of_request) with both empty.
    pub fn of(method: &str, path_and_query: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::of_request(method, path_and_query, b"", b"", body)
    }

    /// The fingerprint of a request made of `method`, `path_and_query`, the values of its
    /// `Content-Type` and `Content-Encoding` headers (empty when absent), and `body`: what
    /// the layer computes.
    pub fn of_request(
        method: &str,
        path_and_query: &str,
        content_type: &[u8],
        content_encoding: &[u8],
        body: &[u8],
    ) -> Fingerprint {
        let mut h = Hasher::new(FINGERPRINT_VERSION);
        h.segment(method.as_bytes());
        h.segment(path_and_query.as_bytes());
        h.segment(content_type);
        h.segment(content_encoding);
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

/// The version of [`Fingerprint`]'s function (see [its docs](Fingerprint#version)); the seed
/// of its hash. Version 1 hashed method, path and query, and body; version 2 adds the
/// content type and encoding.
pub const FINGERPRINT_VERSION: u64 = 2;

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

    const GOLDEN: u128 = 0xd896_d861_3c54_840c_a094_6608_cc68_7645;
    const GOLDEN_WITH_CONTENT: u128 = 0x980b_c5b4_3034_ed44_dc40_e2a6_3bc5_800b;

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
        // records): this value must never change silently. Changed deliberately with
        // `FINGERPRINT_VERSION` 2 (content type and encoding added); version 1's value was
        // 0x3367_b556_0a3c_3312_cfde_5fb0_9b10_9959.
        assert_eq!(FINGERPRINT_VERSION, 2);
        let f = Fingerprint::of("POST", "/orders", b"{}");
        assert_eq!(f.as_u128(), GOLDEN);
        let f = Fingerprint::of_request("POST", "/orders", b"application/json", b"gzip", b"{}");
        assert_eq!(f.as_u128(), GOLDEN_WITH_CONTENT);
    }

    #[test]
    fn content_type_and_encoding_count() {
        let of = |ct: &[u8], ce: &[u8]| Fingerprint::of_request("POST", "/o", ct, ce, b"{}");
        assert_ne!(of(b"", b""), of(b"application/json", b""));
        assert_ne!(of(b"application/json", b""), of(b"text/plain", b""));
        assert_ne!(of(b"", b""), of(b"", b"gzip"));
        // The segments are delimited: a content type is not mistaken for an encoding.
        assert_ne!(of(b"gzip", b""), of(b"", b"gzip"));
        assert_eq!(of(b"", b""), Fingerprint::of("POST", "/o", b"{}"));
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
