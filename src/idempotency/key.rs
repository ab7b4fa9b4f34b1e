//! Reading the `Idempotency-Key` header: the draft's structured-field string or a bare token.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};

/// The longest key accepted, in characters.
pub(crate) const MAX_KEY_LEN: usize = 255;

/// Why a key was refused (the problem+json `detail`).
pub(crate) type KeyError = &'static str;

/// Reads the key from `headers`.
///
/// `Ok(None)`: no such header. A key is accepted as the draft's structured-field string
/// (`"abc"`, with `\"` and `\\` escapes) or as a bare token (`abc`); either way the key is 1 to
/// 255 visible ASCII characters (0x21 to 0x7E). More than one header is an error.
pub(crate) fn parse<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<Cow<'h, [u8]>>, KeyError> {
    let mut all = headers.get_all(name).iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err("more than one idempotency key header");
    }
    parse_value(value.as_bytes()).map(Some)
}

pub(crate) fn parse_value(raw: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    let raw = raw.trim_ascii();
    if raw.first() == Some(&b'"') {
        if raw.len() < 2 || raw.last() != Some(&b'"') {
            return Err("unterminated quoted key");
        }
        let inner = &raw[1..raw.len() - 1];
        if !inner.contains(&b'\\') {
            if inner.contains(&b'"') {
                return Err("unescaped quote in key");
            }
            return check(inner).map(|_| Cow::Borrowed(inner));
        }
        let mut out = Vec::with_capacity(inner.len());
        let mut it = inner.iter();
        while let Some(&c) = it.next() {
            match c {
                b'\\' => match it.next() {
                    Some(&e @ (b'"' | b'\\')) => out.push(e),
                    _ => return Err("bad escape in quoted key"),
                },
                b'"' => return Err("unescaped quote in key"),
                c => out.push(c),
            }
        }
        check(&out)?;
        Ok(Cow::Owned(out))
    } else {
        check(raw).map(|_| Cow::Borrowed(raw))
    }
}

fn check(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("key longer than 255 characters");
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err("key must be visible ASCII characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn one(v: &[u8]) -> Result<Option<Vec<u8>>, KeyError> {
        let mut h = HeaderMap::new();
        h.insert("idempotency-key", HeaderValue::from_bytes(v).unwrap());
        parse(&h, &HeaderName::from_static("idempotency-key")).map(|k| k.map(Cow::into_owned))
    }

    #[test]
    fn quoted_and_bare_are_the_same_key() {
        assert_eq!(one(b"\"abc-1\"").unwrap().unwrap(), b"abc-1");
        assert_eq!(one(b"abc-1").unwrap().unwrap(), b"abc-1");
        assert_eq!(one(b"\"a\\\"b\\\\c\"").unwrap().unwrap(), b"a\"b\\c");
    }

    #[test]
    fn bad_keys() {
        for bad in [
            &b"\"\""[..],
            b"\"abc",
            b"\"a\"b\"",
            b"\"a\\nb\"",
            b"a b",
            b"\"a b\"",
            b"caf\xc3\xa9",
            b"a\tb",
        ] {
            assert!(one(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(one(&[b'k'; 256]).is_err());
        assert!(one(&[b'k'; 255]).unwrap().is_some());
        assert!(parse_value(b"").is_err());
    }

    #[test]
    fn missing_and_repeated() {
        let name = HeaderName::from_static("idempotency-key");
        let mut h = HeaderMap::new();
        assert_eq!(parse(&h, &name), Ok(None));
        h.append(&name, HeaderValue::from_static("a"));
        h.append(&name, HeaderValue::from_static("a"));
        assert!(parse(&h, &name).is_err());
    }

    proptest! {
        #[test]
        fn accepts_exactly_visible_ascii_of_1_to_255(key in proptest::collection::vec(any::<u8>(), 0..300)) {
            let valid = (1..=255).contains(&key.len())
                && key.iter().all(|b| (0x21..=0x7e).contains(b))
                && key[0] != b'"';
            let got = parse_value(&key);
            if valid {
                prop_assert_eq!(got.unwrap().into_owned(), key);
            } else if key.first() != Some(&b'"') && !key.iter().any(u8::is_ascii_whitespace) {
                prop_assert!(got.is_err());
            }
        }

        #[test]
        fn quoting_round_trips(key in "[!-~]{1,255}") {
            let mut quoted = String::from("\"");
            for c in key.chars() {
                if c == '"' || c == '\\' { quoted.push('\\'); }
                quoted.push(c);
            }
            quoted.push('"');
            prop_assert_eq!(parse_value(quoted.as_bytes()).unwrap().into_owned(), key.into_bytes());
        }
    }

    proptest! {
        #[test]
        fn header_of_arbitrary_bytes_never_panics(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..3),
        ) {
            let name = HeaderName::from_static("idempotency-key");
            let mut h = HeaderMap::new();
            for v in &values {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    h.append(&name, v);
                }
            }
            match parse(&h, &name) {
                Ok(Some(key)) => {
                    prop_assert_eq!(h.len(), 1);
                    prop_assert!((1..=MAX_KEY_LEN).contains(&key.len()));
                    prop_assert!(key.iter().all(|b| (0x21..=0x7e).contains(b)));
                }
                Ok(None) => prop_assert!(h.is_empty()),
                Err(_) => prop_assert!(!h.is_empty()),
            }
        }
    }
}
