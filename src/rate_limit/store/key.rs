//! The bytes by which a rate-limit key is named in Redis, fixed by this crate.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

/// A rate-limit key that a Redis-backed limiter can name in Redis.
///
/// Every replica must derive the same Redis key from the same user key, whatever compiler
/// built it: replicas of two builds (a rolling deploy) that named one user key two ways would
/// each give it a whole limit of its own. `std::hash::Hash` cannot promise that (the standard
/// library documents that the data its types feed a hasher may change between Rust releases
/// and differs across platforms), so the Redis key is derived from this encoding instead,
/// which this crate defines and keeps:
///
/// | type | encoding |
/// |---|---|
/// | `u8` … `u128`, `i8` … `i128` | big-endian, of the type's width |
/// | `usize`, `isize` | as `u64`, `i64` |
/// | `bool` | one byte, 0 or 1 |
/// | `char` | as `u32` |
/// | `str`, `String`, `[u8]`, `Vec<u8>`, `[u8; N]`, `Bytes`, `HeaderValue` | the length as a `u64`, then the bytes |
/// | `Ipv4Addr`, `Ipv6Addr` | the 4 or 16 octets |
/// | `IpAddr` | `4` then the 4 octets, or `6` then the 16 octets |
/// | `SocketAddr` | the `IpAddr`, then the port as `u16` |
/// | `()` | nothing |
/// | `Option<T>` | `0`, or `1` then `T` |
/// | tuples of up to 4 | each part in order |
/// | `&T`, `Box<T>`, `Rc<T>`, `Arc<T>`, `Cow<T>` | as `T` |
///
/// The Redis key is then `<prefix>{<hex>}`, the hex being the first 128 bits of the SHA-1
/// (FIPS 180-4) of the encoding. Text and bytes of the same content name the same key.
///
/// # Implementing it
///
/// Write an encoding that depends on the value alone (not on the platform, the build or
/// the process) and is prefix-free (of fixed width, or with its length first, as
/// [`KeyWriter::bytes`] writes), so that keys of several parts stay apart:
///
/// ```
/// use tower_bulwark::rate_limit::store::{KeyWriter, RedisKey};
///
/// #[derive(Hash)]
/// struct Tenant {
///     id: u64,
///     plan: String,
/// }
///
/// impl RedisKey for Tenant {
///     fn write_redis_key(&self, out: &mut KeyWriter) {
///         self.id.write_redis_key(out);
///         out.bytes(self.plan.as_bytes());
///     }
/// }
/// ```
///
/// Changing a type's encoding changes its Redis keys: every limit starts afresh.
pub trait RedisKey {
    /// Writes this key's encoding.
    fn write_redis_key(&self, out: &mut KeyWriter);
}

/// Where a [`RedisKey`] writes its encoding: the digest that names the key in Redis.
pub struct KeyWriter {
    digest: sha1_smol::Sha1,
}

impl KeyWriter {
    pub(crate) fn new() -> KeyWriter {
        KeyWriter {
            digest: sha1_smol::Sha1::new(),
        }
    }

    /// Writes `bytes` as they are: of fixed width, or delimited by what came before.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
    }

    /// Writes the length of `bytes` (as a big-endian `u64`), then `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.raw(&(bytes.len() as u64).to_be_bytes());
        self.raw(bytes);
    }

    /// The first 128 bits of the digest of what was written.
    pub(crate) fn finish(&self) -> [u8; 16] {
        let d = self.digest.digest().bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    }
}

impl std::fmt::Debug for KeyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWriter").finish_non_exhaustive()
    }
}

macro_rules! ints {
    ($($t:ty),*) => {$(
        impl RedisKey for $t {
            #[inline]
            fn write_redis_key(&self, out: &mut KeyWriter) {
                out.raw(&self.to_be_bytes());
            }
        }
    )*};
}

ints!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);

impl RedisKey for usize {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (*self as u64).write_redis_key(out);
    }
}

impl RedisKey for isize {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (*self as i64).write_redis_key(out);
    }
}

impl RedisKey for bool {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.raw(&[u8::from(*self)]);
    }
}

impl RedisKey for char {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        u32::from(*self).write_redis_key(out);
    }
}

impl RedisKey for str {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self.as_bytes());
    }
}

impl RedisKey for String {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self.as_bytes());
    }
}

impl RedisKey for [u8] {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self);
    }
}

impl<const N: usize> RedisKey for [u8; N] {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self);
    }
}

impl RedisKey for Vec<u8> {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self);
    }
}

impl RedisKey for bytes::Bytes {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self);
    }
}

impl RedisKey for http::HeaderValue {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.bytes(self.as_bytes());
    }
}

impl RedisKey for Ipv4Addr {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.raw(&self.octets());
    }
}

impl RedisKey for Ipv6Addr {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        out.raw(&self.octets());
    }
}

impl RedisKey for IpAddr {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        match self {
            IpAddr::V4(ip) => {
                out.raw(&[4]);
                ip.write_redis_key(out);
            }
            IpAddr::V6(ip) => {
                out.raw(&[6]);
                ip.write_redis_key(out);
            }
        }
    }
}

impl RedisKey for SocketAddr {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        self.ip().write_redis_key(out);
        self.port().write_redis_key(out);
    }
}

impl RedisKey for () {
    fn write_redis_key(&self, _out: &mut KeyWriter) {}
}

impl<T: RedisKey> RedisKey for Option<T> {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        match self {
            None => out.raw(&[0]),
            Some(t) => {
                out.raw(&[1]);
                t.write_redis_key(out);
            }
        }
    }
}

impl<T: RedisKey + ?Sized> RedisKey for &T {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (**self).write_redis_key(out);
    }
}

impl<T: RedisKey + ?Sized> RedisKey for Box<T> {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (**self).write_redis_key(out);
    }
}

impl<T: RedisKey + ?Sized> RedisKey for Rc<T> {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (**self).write_redis_key(out);
    }
}

impl<T: RedisKey + ?Sized> RedisKey for Arc<T> {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (**self).write_redis_key(out);
    }
}

impl<T: RedisKey + ToOwned + ?Sized> RedisKey for Cow<'_, T> {
    fn write_redis_key(&self, out: &mut KeyWriter) {
        (**self).write_redis_key(out);
    }
}

macro_rules! tuples {
    ($(($($t:ident),+)),*) => {$(
        impl<$($t: RedisKey),+> RedisKey for ($($t,)+) {
            #[allow(non_snake_case)]
            fn write_redis_key(&self, out: &mut KeyWriter) {
                let ($($t,)+) = self;
                $($t.write_redis_key(out);)+
            }
        }
    )*};
}

tuples!((A), (A, B), (A, B, C), (A, B, C, D));
