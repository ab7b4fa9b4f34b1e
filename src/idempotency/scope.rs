//! The scope of a key: whose key space a request's `Idempotency-Key` lives in.
//!
//! By default a request's scope is a digest of its credentials, the `Authorization` header
//! (where gRPC carries its `authorization` metadata too), so that two callers never share a
//! record: a stranger who sends another caller's key and payload gets neither that caller's
//! response, nor a 409, nor a 422. Named headers (an API key) and a named cookie (a session)
//! can be added to the credentials. A request that carries none of them (or only empty
//! values) has no scope of its own: all such requests share one anonymous key space.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, request::Parts, HeaderMap, HeaderName};

pub(crate) type ScopeFn = dyn Fn(&Parts) -> Bytes + Send + Sync;

/// How a layer scopes its keys.
#[derive(Clone)]
pub(crate) enum Scope {
    /// A digest of the `Authorization` header (the default), and of what `Credentials` adds.
    Credentials(Arc<Credentials>),
    /// A user function.
    Custom(Arc<ScopeFn>),
    /// One key space for every caller.
    Unscoped,
}

/// What a credential scope reads besides `Authorization`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Credentials {
    /// Headers that carry credentials (an API key), in the order they were added.
    headers: Vec<HeaderName>,
    /// A session cookie.
    cookie: Option<Box<str>>,
}

impl Scope {
    /// The default scope: a digest of the `Authorization` header.
    pub(crate) fn credentials() -> Scope {
        Scope::Credentials(Arc::default())
    }

    /// The credential scope, with `header` among its credentials too.
    pub(crate) fn with_header(self, header: HeaderName) -> Scope {
        let mut c = self.into_credentials();
        if !c.headers.contains(&header) {
            c.headers.push(header);
        }
        Scope::Credentials(Arc::new(c))
    }

    /// The credential scope, with the cookie `name` among its credentials too.
    pub(crate) fn with_cookie(self, name: String) -> Scope {
        let mut c = self.into_credentials();
        c.cookie = Some(name.into());
        Scope::Credentials(Arc::new(c))
    }

    /// What this scope reads if it is a credential scope, else (a function, unscoped) the
    /// default's.
    fn into_credentials(self) -> Credentials {
        match self {
            Scope::Credentials(c) => Arc::unwrap_or_clone(c),
            Scope::Custom(_) | Scope::Unscoped => Credentials::default(),
        }
    }

    /// Whether the layer has one key space for every caller.
    pub(crate) fn is_unscoped(&self) -> bool {
        matches!(self, Scope::Unscoped)
    }

    /// Whether the scope is made of the request's credentials (the default, with or without
    /// added headers and cookie): a request without any is anonymous.
    pub(crate) fn is_credentials(&self) -> bool {
        matches!(self, Scope::Credentials(_))
    }

    /// The scope of a request; empty for a request without credentials (all such requests
    /// share one anonymous key space) and for [`Scope::Unscoped`].
    pub(crate) fn of(&self, parts: &Parts) -> Bytes {
        match self {
            Scope::Credentials(c) => credentials(&parts.headers, c),
            Scope::Custom(f) => f(parts),
            Scope::Unscoped => Bytes::new(),
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Credentials(c) => {
                f.write_str("Credentials(authorization")?;
                for h in &c.headers {
                    write!(f, ", header {h:?}")?;
                }
                if let Some(name) = &c.cookie {
                    write!(f, ", cookie {name:?}")?;
                }
                f.write_str(")")
            }
            Scope::Custom(_) => f.write_str("Custom"),
            Scope::Unscoped => f.write_str("Unscoped"),
        }
    }
}

/// What the digest is of, so that it never equals a digest of the same bytes made for another
/// purpose.
const DOMAIN: &[u8] = b"tower-bulwark idempotency scope v1\0";

/// The digest of a request's credentials: every `Authorization` value, in order, every value
/// of each added header (after its name), and, when a cookie is named, every value of that
/// cookie, each length-prefixed and tagged with what it is; empty values (or values of spaces
/// only) carry no credentials and are left out. Empty when the request carries none of them. A stable digest (SHA-1, which resists preimages), the same in every process, so
/// replicas that share a store agree on a caller's scope; the store and the logs only ever see
/// the digest.
fn credentials(headers: &HeaderMap, c: &Credentials) -> Bytes {
    // Made on the first credential: a request without any costs no digest.
    let mut h: Option<sha1_smol::Sha1> = None;
    let mut feed = |tag: u8, value: &[u8]| {
        // An empty value (or one of spaces) carries no credentials: such a request is
        // anonymous, like one without the header.
        if value.trim_ascii().is_empty() {
            return;
        }
        let h = h.get_or_insert_with(|| sha1_smol::Sha1::from(DOMAIN));
        h.update(&[tag]);
        h.update(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
        h.update(value);
    };
    for v in headers.get_all(header::AUTHORIZATION) {
        feed(b'a', v.as_bytes());
    }
    for name in &c.headers {
        let mut values = headers
            .get_all(name)
            .iter()
            .filter(|v| !v.as_bytes().trim_ascii().is_empty())
            .peekable();
        if values.peek().is_some() {
            feed(b'h', name.as_str().as_bytes());
            for v in values {
                feed(b'v', v.as_bytes());
            }
        }
    }
    if let Some(name) = c.cookie.as_deref() {
        for v in cookie_values(headers, name) {
            feed(b'c', v);
        }
    }
    h.map_or_else(Bytes::new, |h| Bytes::copy_from_slice(&h.digest().bytes()))
}

/// The values of the cookie `name` in the request's `Cookie` headers (HTTP/2 may send several).
fn cookie_values<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::post("/orders");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn credentials_are_hashed_never_kept_in_clear() {
        let p = parts(&[("authorization", "Bearer s3cret-token")]);
        let scope = Scope::credentials().of(&p);
        assert_eq!(scope.len(), 20);
        assert!(!scope.windows(6).any(|w| w == b"s3cret"), "{scope:?}");
        // Stable: the same credentials give the same scope, in every process.
        assert_eq!(scope, Scope::credentials().of(&p));
    }

    /// The scope is part of the Redis key: replicas of different builds must derive the same
    /// scope from the same credentials. This value must never change.
    #[test]
    fn credential_scope_is_pinned() {
        let scope = Scope::credentials().of(&parts(&[("authorization", "Bearer abc")]));
        let hex: String = scope.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "021f6b29b6e2dc874ea05bb48e9b50bcf211384a");
    }

    #[test]
    fn other_credentials_or_none_are_other_scopes() {
        let a = Scope::credentials().of(&parts(&[("authorization", "Bearer a")]));
        let b = Scope::credentials().of(&parts(&[("authorization", "Bearer b")]));
        let none = Scope::credentials().of(&parts(&[]));
        let empty = Scope::credentials().of(&parts(&[("authorization", "")]));
        assert_ne!(a, b);
        assert!(none.is_empty());
        assert_ne!(a, none);
        // An empty value carries no credentials: anonymous, as without the header.
        assert!(empty.is_empty());
        let blank = Scope::credentials().of(&parts(&[("authorization", " ")]));
        assert!(blank.is_empty());
        let empty_key = Scope::credentials()
            .with_header(HeaderName::from_static("x-api-key"))
            .of(&parts(&[("x-api-key", "")]));
        assert!(empty_key.is_empty());
        let empty_cookie = Scope::credentials()
            .with_cookie("session".into())
            .of(&parts(&[("cookie", "session=; _ga=1")]));
        assert!(empty_cookie.is_empty());
        // Cookies, which change between a client's retries, are no part of the default scope.
        let with_cookie = Scope::credentials().of(&parts(&[
            ("authorization", "Bearer a"),
            ("cookie", "_ga=123"),
        ]));
        assert_eq!(a, with_cookie);
    }

    #[test]
    fn named_cookie_scope_reads_that_cookie_only() {
        let s = Scope::credentials().with_cookie("session".into());
        let one = s.of(&parts(&[("cookie", "_ga=1; session=abc; theme=dark")]));
        let same = s.of(&parts(&[("cookie", "session=abc"), ("cookie", "_ga=2")]));
        let other = s.of(&parts(&[("cookie", "_ga=1; session=abd")]));
        let prefix = s.of(&parts(&[("cookie", "xsession=abc")]));
        assert_eq!(one, same);
        assert_ne!(one, other);
        assert!(prefix.is_empty());
        assert!(!one.windows(3).any(|w| w == b"abc"));
        // The credentials still count.
        let with_auth = s.of(&parts(&[("cookie", "session=abc"), ("authorization", "x")]));
        assert_ne!(one, with_auth);
    }

    #[test]
    fn named_header_scope_hashes_that_header_with_the_credentials() {
        let s = Scope::credentials().with_header(HeaderName::from_static("x-api-key"));
        let alice = s.of(&parts(&[("x-api-key", "key-of-alice")]));
        let mallory = s.of(&parts(&[("x-api-key", "key-of-mallory")]));
        let none = s.of(&parts(&[("x-other", "key-of-alice")]));
        assert_eq!(alice.len(), 20);
        assert_ne!(alice, mallory);
        assert!(none.is_empty());
        assert!(!alice.windows(5).any(|w| w == b"alice"), "{alice:?}");
        assert_eq!(alice, s.of(&parts(&[("x-api-key", "key-of-alice")])));
        // Combined with `Authorization`, never confused with it.
        let as_auth = s.of(&parts(&[("authorization", "key-of-alice")]));
        assert_ne!(alice, as_auth);
        let both = s.of(&parts(&[
            ("x-api-key", "key-of-alice"),
            ("authorization", "x"),
        ]));
        assert_ne!(alice, both);
        // The default's digests are unchanged for requests without the added header.
        let auth = parts(&[("authorization", "Bearer a")]);
        assert_eq!(s.of(&auth), Scope::credentials().of(&auth));
        // And with a cookie too: both count.
        let sc = s.clone().with_cookie("session".into());
        let a1 = sc.of(&parts(&[("x-api-key", "k"), ("cookie", "session=1")]));
        let a2 = sc.of(&parts(&[("x-api-key", "k"), ("cookie", "session=2")]));
        assert_ne!(a1, a2);
        assert_eq!(
            format!("{sc:?}"),
            "Credentials(authorization, header \"x-api-key\", cookie \"session\")"
        );
    }
}
