//! [`Record`]: a stored response, and its compact binary encoding for remote stores.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::fingerprint::Fingerprint;

/// The outcome of a completed idempotent request, as a store keeps it.
///
/// Either the response itself (status, headers, body and, for gRPC, trailers) or, when the
/// response was larger than the layer keeps, a marker that the key completed with a response
/// too large to replay ([`Record::is_kept`] is `false`). Both carry the request's
/// [`Fingerprint`].
///
/// # Encoding
///
/// [`Record::encode`] writes, and [`Record::decode`] reads, this layout (all integers
/// big-endian), so a remote store needs no serde:
///
/// | bytes | field |
/// |---|---|
/// | 1 | format version, `1` |
/// | 1 | flags: bit 0 = response kept, bit 1 = trailers present |
/// | 16 | fingerprint |
/// | 2 | status code |
/// | 4 + … | headers: count, then per header: name length (4), name, value length (4), value |
/// | 4 + … | body: length, bytes |
/// | 4 + … | trailers, as headers, only when flag bit 1 is set |
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_bulwark::idempotency::{Fingerprint, Record};
///
/// let fp = Fingerprint::of("POST", "/orders", b"{}");
/// let mut headers = HeaderMap::new();
/// headers.insert("content-type", "application/json".parse().unwrap());
/// let record = Record::response(fp, StatusCode::CREATED, headers, Bytes::from_static(b"{\"id\":7}"), None);
/// let bytes = record.encode();
/// assert_eq!(bytes.len(), record.encoded_len());
/// assert_eq!(Record::decode(&bytes).unwrap(), record);
/// ```
#[derive(Clone, PartialEq)]
pub struct Record {
    fingerprint: Fingerprint,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
    kept: bool,
}

const VERSION: u8 = 1;
const FLAG_KEPT: u8 = 1;
const FLAG_TRAILERS: u8 = 2;

impl Record {
    /// A record of a whole response.
    pub fn response(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Record {
        Record {
            fingerprint,
            status,
            headers,
            body,
            trailers,
            kept: true,
        }
    }

    /// A record that the request completed with `status` but its response was too large to
    /// keep: repeats are refused with
    /// [`RejectionKind::IdempotencyResponseNotStored`](crate::RejectionKind::IdempotencyResponseNotStored)
    /// and never run again.
    pub fn not_kept(fingerprint: Fingerprint, status: StatusCode) -> Record {
        Record {
            fingerprint,
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            trailers: None,
            kept: false,
        }
    }

    /// The fingerprint of the request that produced this record.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's stored headers (without those the layer leaves out).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The response's body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The response's trailers, if it had any (gRPC puts `grpc-status` there).
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// Whether the response is kept; `false` for a response that was too large.
    pub fn is_kept(&self) -> bool {
        self.kept
    }

    /// The length of [`Record::encode`]'s output, also the size a store charges for it.
    pub fn encoded_len(&self) -> usize {
        let map_len = |m: &HeaderMap| {
            4 + m
                .iter()
                .map(|(k, v)| 8 + k.as_str().len() + v.len())
                .sum::<usize>()
        };
        1 + 1
            + 16
            + 2
            + map_len(&self.headers)
            + 4
            + self.body.len()
            + self.trailers.as_ref().map_or(0, map_len)
    }

    /// Encodes the record (see the type docs for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.kept {
            flags |= FLAG_KEPT;
        }
        if self.trailers.is_some() {
            flags |= FLAG_TRAILERS;
        }
        out.push(VERSION);
        out.push(flags);
        out.extend_from_slice(&self.fingerprint.as_u128().to_be_bytes());
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        put_map(out, &self.headers);
        put_u32(out, self.body.len());
        out.extend_from_slice(&self.body);
        if let Some(t) = &self.trailers {
            put_map(out, t);
        }
    }

    /// Decodes a record written by [`Record::encode`].
    ///
    /// # Errors
    ///
    /// [`DecodeError`] when the bytes are truncated, of an unknown version, or hold an invalid
    /// status, header name or header value, or more headers than a [`HeaderMap`] holds. It never
    /// panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { b: bytes };
        if r.u8()? != VERSION {
            return Err(DecodeError("unknown record version"));
        }
        let flags = r.u8()?;
        let fp = u128::from_be_bytes(r.take(16)?.try_into().expect("16 bytes"));
        let status = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes"));
        let status =
            StatusCode::from_u16(status).map_err(|_| DecodeError("invalid status code"))?;
        let headers = r.map()?;
        let len = r.u32()?;
        let body = Bytes::copy_from_slice(r.take(len)?);
        let trailers = if flags & FLAG_TRAILERS != 0 {
            Some(r.map()?)
        } else {
            None
        };
        if !r.b.is_empty() {
            return Err(DecodeError("trailing bytes after record"));
        }
        Ok(Record {
            fingerprint: Fingerprint::from_u128(fp),
            status,
            headers,
            body,
            trailers,
            kept: flags & FLAG_KEPT != 0,
        })
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("fingerprint", &self.fingerprint)
            .field("status", &self.status)
            .field("kept", &self.kept)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.len())
            .field("trailers", &self.trailers.as_ref().map(HeaderMap::len))
            .finish()
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_map(out: &mut Vec<u8>, m: &HeaderMap) {
    put_u32(out, m.len());
    for (k, v) in m {
        put_u32(out, k.as_str().len());
        out.extend_from_slice(k.as_str().as_bytes());
        put_u32(out, v.len());
        out.extend_from_slice(v.as_bytes());
    }
}

/// A record's bytes could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot decode idempotency record: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// The most headers a [`HeaderMap`] holds.
const MAX_HEADERS: usize = 1 << 15;

/// How many headers a decoded map reserves room for before it has read them.
const PREALLOCATED_HEADERS: usize = 32;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError("truncated record"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
    }

    fn map(&mut self) -> Result<HeaderMap, DecodeError> {
        let n = self.u32()?;
        // Every header takes at least 8 bytes: a count larger than that is corrupt.
        if n > self.b.len() / 8 {
            return Err(DecodeError("truncated record"));
        }
        // A `HeaderMap` holds at most 2^15 headers and panics past that: the count and every
        // append are checked, and nothing is reserved beyond a few headers on the word of the
        // bytes alone.
        if n > MAX_HEADERS {
            return Err(DecodeError("too many headers"));
        }
        let mut m = HeaderMap::try_with_capacity(n.min(PREALLOCATED_HEADERS))
            .map_err(|_| DecodeError("too many headers"))?;
        for _ in 0..n {
            let len = self.u32()?;
            let name = HeaderName::from_bytes(self.take(len)?)
                .map_err(|_| DecodeError("invalid header name"))?;
            let len = self.u32()?;
            let value = HeaderValue::from_bytes(self.take(len)?)
                .map_err(|_| DecodeError("invalid header value"))?;
            m.try_append(name, value)
                .map_err(|_| DecodeError("too many headers"))?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header_map() -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,20}"), 0..6).prop_map(|v| {
            let mut m = HeaderMap::new();
            for (k, val) in v {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(&val).unwrap(),
                );
            }
            m
        })
    }

    proptest! {
        #[test]
        fn round_trip(
            fp in any::<u128>(),
            status in 100u16..600,
            headers in header_map(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
            trailers in proptest::option::of(header_map()),
            kept in any::<bool>(),
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let fp = Fingerprint::from_u128(fp);
            let rec = if kept {
                Record::response(fp, status, headers, Bytes::from(body), trailers)
            } else {
                Record::not_kept(fp, status)
            };
            let enc = rec.encode();
            prop_assert_eq!(enc.len(), rec.encoded_len());
            let back = Record::decode(&enc).unwrap();
            prop_assert_eq!(&back, &rec);
            // Every strict prefix is refused, never misread.
            for cut in 0..enc.len() {
                prop_assert!(Record::decode(&enc[..cut]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // An error or a record, never a panic; a record it reads encodes to one it reads
            // back the same.
            if let Ok(rec) = Record::decode(&bytes) {
                prop_assert_eq!(Record::decode(&rec.encode()), Ok(rec));
            }
        }

        #[test]
        fn any_header_count_after_a_valid_prefix_never_panics(
            count in any::<u32>(),
            rest in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut b = prefix();
            b.extend_from_slice(&count.to_be_bytes());
            b.extend_from_slice(&rest);
            if let Ok(rec) = Record::decode(&b) {
                prop_assert_eq!(Record::decode(&rec.encode()), Ok(rec));
            }
        }

        #[test]
        fn corrupted_records_never_panic(
            headers in header_map(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            trailers in proptest::option::of(header_map()),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let rec = Record::response(
                Fingerprint::from_u128(7),
                StatusCode::OK,
                headers,
                Bytes::from(body),
                trailers,
            );
            let mut b = rec.encode();
            for (at, byte) in edits {
                let i = at.index(b.len());
                b[i] = byte;
            }
            b.truncate(cut.index(b.len() + 1));
            if let Ok(rec) = Record::decode(&b) {
                prop_assert_eq!(Record::decode(&rec.encode()), Ok(rec));
            }
        }
    }

    /// The fixed part of an encoded record (version, flags, fingerprint, status 200), to which a
    /// test appends a header count of its own.
    fn prefix() -> Vec<u8> {
        let mut b = vec![VERSION, FLAG_KEPT];
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&200u16.to_be_bytes());
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Header counts around and above what a `HeaderMap` holds, backed by as many header
        /// entries as the count says (empty ones, or distinct valid ones): arbitrary bytes
        /// alone are never long enough to reach them.
        #[test]
        fn large_header_counts_never_panic(count in 0u32..70_000, valid in any::<bool>()) {
            let mut b = prefix();
            b.extend_from_slice(&count.to_be_bytes());
            for i in 0..count {
                if valid {
                    let name = format!("h{i}");
                    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    b.extend_from_slice(name.as_bytes());
                } else {
                    b.extend_from_slice(&0u32.to_be_bytes());
                }
                b.extend_from_slice(&0u32.to_be_bytes());
            }
            b.extend_from_slice(&0u32.to_be_bytes());
            match Record::decode(&b) {
                Ok(rec) => prop_assert_eq!(rec.headers().len(), count as usize),
                Err(DecodeError("too many headers")) => prop_assert!(count >= 1 << 14),
                Err(e) => prop_assert!(!valid, "{}", e),
            }
        }
    }

    #[test]
    fn header_count_above_header_map_limit_is_an_error() {
        // A count above what a `HeaderMap` can hold (2^15), with enough bytes after it that the
        // count looks plausible, used to reach `HeaderMap::with_capacity` and panic.
        let n: u32 = (1 << 15) + 1;
        let mut b = prefix();
        b.extend_from_slice(&n.to_be_bytes());
        b.resize(b.len() + 8 * n as usize, 0);
        assert_eq!(Record::decode(&b), Err(DecodeError("too many headers")));
    }

    #[test]
    fn more_distinct_headers_than_a_header_map_holds_is_an_error() {
        // Valid, distinct headers, as many as the count allows: an error, not a panic.
        let n: u32 = 1 << 15;
        let mut b = prefix();
        b.extend_from_slice(&n.to_be_bytes());
        for i in 0..n {
            let name = format!("h{i}");
            b.extend_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
        }
        b.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(Record::decode(&b), Err(DecodeError("too many headers")));
    }

    #[test]
    fn unknown_version_refused() {
        let rec = Record::not_kept(Fingerprint::from_u128(1), StatusCode::OK);
        let mut enc = rec.encode();
        enc[0] = 9;
        assert_eq!(
            Record::decode(&enc),
            Err(DecodeError("unknown record version"))
        );
    }
}
