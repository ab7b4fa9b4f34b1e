//! [`Rejection`]: the typed error a bulwark layer returns when it refuses a request.
//!
//! Every layer of this crate that can refuse a request (rate limit, backpressure, circuit
//! breaker, idempotency) returns a [`Rejection`] boxed in tower's
//! [`BoxError`](tower::BoxError). It knows its [`RejectionKind`], how long the caller should
//! wait before trying again ([`Rejection::retry_after`]) and, for rate limits, the figures of
//! the limit ([`RateLimitInfo`]).
//!
//! Callers find it with `downcast_ref`:
//!
//! ```
//! use std::time::Duration;
//! use tower::BoxError;
//! use tower_bulwark::{Rejection, RejectionKind};
//!
//! let err: BoxError = Rejection::overloaded(Some(Duration::from_millis(50))).into();
//! let rejection = err.downcast_ref::<Rejection>().expect("a rejection");
//! assert_eq!(rejection.kind(), RejectionKind::Overloaded);
//! assert_eq!(rejection.retry_after(), Some(Duration::from_millis(50)));
//! ```
//!
//! [`RejectionLayer`](crate::RejectionLayer) turns a rejection into the HTTP response or gRPC
//! status that the table in the crate docs gives, so Axum stacks need no `HandleErrorLayer`.

use std::fmt;
use std::time::Duration;

use http::HeaderName;

/// `Idempotency-Key-In-Flight: true`: the mark [`RejectionLayer`](crate::RejectionLayer) puts
/// on the answer to an [`IdempotencyInFlight`](RejectionKind::IdempotencyInFlight) rejection
/// (HTTP 409, gRPC `ABORTED`), so that a client tells "the request with this key is still
/// running: come back after `Retry-After`" from every other 409 (or `ABORTED`), such as
/// [`IdempotencyResponseNotStored`](RejectionKind::IdempotencyResponseNotStored), which
/// retrying cannot help. [`HttpStatus`](crate::classify::HttpStatus) and
/// [`GrpcStatus`](crate::classify::GrpcStatus) classify a response with it as
/// [`Outcome::Throttled`](crate::classify::Outcome::Throttled).
pub const IDEMPOTENCY_KEY_IN_FLIGHT: HeaderName =
    HeaderName::from_static("idempotency-key-in-flight");

/// `Request-Refused: <kind>`: the mark [`RejectionLayer::http`](crate::RejectionLayer::http)
/// puts on every answer it makes of a [`Rejection`], with the kind's
/// [`slug`](RejectionKind::slug) (`overloaded`, `circuit-open`, `rate-limited`...): the answer
/// is a refusal by one of this crate's layers, so the request did not reach the service behind
/// it. A client's [`RetryLayer`](crate::retry::RetryLayer) reads it to retry a 503 shed by a
/// server for a request that is safe to repeat only through its `Idempotency-Key`, where a
/// 503 without it (from a handler, which may have had its effect) is not retried.
pub const REQUEST_REFUSED: HeaderName = HeaderName::from_static("request-refused");

/// Why a request was refused.
///
/// The HTTP status and gRPC code of each kind are those of
/// [`RejectionLayer`](crate::RejectionLayer); see [`RejectionKind::http_status`] and
/// [`RejectionKind::grpc_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// The rate limit is spent (HTTP 429, gRPC `RESOURCE_EXHAUSTED`).
    RateLimited,
    /// Too many requests in flight: shed at once or after waiting too long (HTTP 503, gRPC
    /// `UNAVAILABLE`).
    Overloaded,
    /// The circuit breaker is open (HTTP 503, gRPC `UNAVAILABLE`).
    CircuitOpen,
    /// A request with the same idempotency key is still running (HTTP 409, gRPC `ABORTED`,
    /// both marked [`IDEMPOTENCY_KEY_IN_FLIGHT`], with a short, jittered wait): worth
    /// retrying after the wait, when the first request's stored response is replayed. The
    /// wait is drawn between half a second and a second; gRPC's `grpc-retry-pushback-ms` and
    /// in-process callers read it whole, while HTTP's `Retry-After` (whole seconds) says `1`,
    /// the least it can, so that a client that waits out hints of a second still retries. Over
    /// HTTP the spread is the client's: the crate's retry layer waits a hint plus a jittered
    /// share of it.
    IdempotencyInFlight,
    /// The idempotency key was used before with another payload (HTTP 422, gRPC
    /// `FAILED_PRECONDITION`).
    IdempotencyKeyReused,
    /// The idempotency key is required but missing (HTTP 400, gRPC `INVALID_ARGUMENT`).
    IdempotencyKeyMissing,
    /// The idempotency key is malformed, or sent more than once (HTTP 400, gRPC
    /// `INVALID_ARGUMENT`).
    IdempotencyKeyInvalid,
    /// The key completed before, but its response was too large to keep, so it cannot be
    /// replayed (HTTP 409, gRPC `ABORTED`). The request is not run a second time.
    IdempotencyResponseNotStored,
    /// The request body is larger than the layer accepts (HTTP 413, gRPC
    /// `RESOURCE_EXHAUSTED`).
    PayloadTooLarge,
    /// A shared store (such as Redis) is unreachable and the policy is to fail closed (HTTP 503,
    /// gRPC `UNAVAILABLE`).
    StoreUnavailable,
    /// The idempotency store has no room for a new key (it keeps every completed record until
    /// its time to live ends), or the key's scope holds its share of it: the request did not
    /// run (HTTP 503 with `Retry-After`, gRPC `UNAVAILABLE`).
    IdempotencyStoreFull,
    /// The request lacks what its rate-limit key is read from (for
    /// [`Header`](crate::rate_limit::key::Header): the header absent, empty or not valid), and
    /// the limiter refuses such requests rather than put them all under one limit: a client
    /// error (HTTP 400, gRPC `INVALID_ARGUMENT`).
    RateLimitKeyMissing,
    /// The rate limiter could not find the client's address (for
    /// [`ClientIp`](crate::rate_limit::key::ClientIp): no peer address in the request's
    /// extensions, or a trusted proxy that did not say whom it forwards): a setup error of
    /// the server, not of the client (HTTP 500, gRPC `INTERNAL`).
    ClientAddressUnknown,
    /// The request body could not be read (the client reset the stream, a malformed chunked
    /// encoding): the request did not run (HTTP 400, gRPC `INVALID_ARGUMENT`).
    BadRequestBody,
}

impl RejectionKind {
    /// The HTTP status code [`RejectionLayer::http`](crate::RejectionLayer::http) answers with.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            RejectionKind::RateLimited => S::TOO_MANY_REQUESTS,
            RejectionKind::Overloaded
            | RejectionKind::CircuitOpen
            | RejectionKind::StoreUnavailable
            | RejectionKind::IdempotencyStoreFull => S::SERVICE_UNAVAILABLE,
            RejectionKind::IdempotencyInFlight | RejectionKind::IdempotencyResponseNotStored => {
                S::CONFLICT
            }
            RejectionKind::IdempotencyKeyReused => S::UNPROCESSABLE_ENTITY,
            RejectionKind::IdempotencyKeyMissing
            | RejectionKind::IdempotencyKeyInvalid
            | RejectionKind::RateLimitKeyMissing
            | RejectionKind::BadRequestBody => S::BAD_REQUEST,
            RejectionKind::PayloadTooLarge => S::PAYLOAD_TOO_LARGE,
            RejectionKind::ClientAddressUnknown => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code [`RejectionLayer::grpc`](crate::RejectionLayer) answers with.
    pub fn grpc_code(self) -> crate::classify::GrpcCode {
        use crate::classify::GrpcCode as G;
        match self {
            RejectionKind::RateLimited | RejectionKind::PayloadTooLarge => G::ResourceExhausted,
            RejectionKind::Overloaded
            | RejectionKind::CircuitOpen
            | RejectionKind::StoreUnavailable
            | RejectionKind::IdempotencyStoreFull => G::Unavailable,
            RejectionKind::IdempotencyInFlight | RejectionKind::IdempotencyResponseNotStored => {
                G::Aborted
            }
            RejectionKind::IdempotencyKeyReused => G::FailedPrecondition,
            RejectionKind::IdempotencyKeyMissing
            | RejectionKind::IdempotencyKeyInvalid
            | RejectionKind::RateLimitKeyMissing
            | RejectionKind::BadRequestBody => G::InvalidArgument,
            RejectionKind::ClientAddressUnknown => G::Internal,
        }
    }

    /// A short, stable, lowercase slug for this kind, used in problem+json `type` URIs and in
    /// `tracing` fields.
    pub fn slug(self) -> &'static str {
        match self {
            RejectionKind::RateLimited => "rate-limited",
            RejectionKind::Overloaded => "overloaded",
            RejectionKind::CircuitOpen => "circuit-open",
            RejectionKind::IdempotencyInFlight => "idempotency-key-in-flight",
            RejectionKind::IdempotencyKeyReused => "idempotency-key-reused",
            RejectionKind::IdempotencyKeyMissing => "idempotency-key-missing",
            RejectionKind::IdempotencyKeyInvalid => "idempotency-key-invalid",
            RejectionKind::IdempotencyResponseNotStored => "idempotency-response-not-stored",
            RejectionKind::PayloadTooLarge => "payload-too-large",
            RejectionKind::StoreUnavailable => "store-unavailable",
            RejectionKind::IdempotencyStoreFull => "idempotency-store-full",
            RejectionKind::RateLimitKeyMissing => "rate-limit-key-missing",
            RejectionKind::ClientAddressUnknown => "client-address-unknown",
            RejectionKind::BadRequestBody => "bad-request-body",
        }
    }

    /// A short human-readable title (the problem+json `title`).
    pub fn title(self) -> &'static str {
        match self {
            RejectionKind::RateLimited => "rate limit exceeded",
            RejectionKind::Overloaded => "service overloaded",
            RejectionKind::CircuitOpen => "circuit open",
            RejectionKind::IdempotencyInFlight => "request with this idempotency key in flight",
            RejectionKind::IdempotencyKeyReused => "idempotency key reused with another payload",
            RejectionKind::IdempotencyKeyMissing => "idempotency key missing",
            RejectionKind::IdempotencyKeyInvalid => "idempotency key malformed",
            RejectionKind::IdempotencyResponseNotStored => {
                "idempotency key completed; response too large to replay"
            }
            RejectionKind::PayloadTooLarge => "payload too large",
            RejectionKind::StoreUnavailable => "shared store unavailable",
            RejectionKind::IdempotencyStoreFull => "idempotency store full",
            RejectionKind::RateLimitKeyMissing => "rate limit key missing",
            RejectionKind::ClientAddressUnknown => "client address unknown",
            RejectionKind::BadRequestBody => "request body could not be read",
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// The figures of a rate limit, carried by a [`Rejection`] of kind
/// [`RejectionKind::RateLimited`] and written as `RateLimit` / `RateLimit-Policy` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// The burst: how many requests may come at once (the window holds this many).
    pub limit: u64,
    /// Requests that could still be admitted now.
    pub remaining: u64,
    /// Time until the limit is whole again (all of its burst available); in a rejection,
    /// never less than its hints.
    pub reset: Duration,
    /// The window of the quota: the time in which `limit` requests are replenished (so the
    /// rate is `limit / window`).
    pub window: Duration,
}

impl RateLimitInfo {
    /// Writes the IETF draft `RateLimit-Policy` and `RateLimit` headers, for the policy named
    /// `"default"`: `RateLimit-Policy: "default";q=<quota>;w=<secs>` and
    /// `RateLimit: "default";r=<remaining>;t=<secs to reset>`.
    ///
    /// The policy states the quota's rate: `w` is the window in whole seconds (rounded up, at
    /// least 1) and `q` the requests the rate allows in `w` (`limit × w / window`, rounded
    /// down when not whole), so `q / w` is the rate, whatever the burst: a quota of 1000/s
    /// with a burst of 1 is `q=1000;w=1`, one of 100/s with a burst of 200 is `q=200;w=2`,
    /// one of 1 a minute is `q=1;w=60`. As `w` covers the window, `q` is never less than the
    /// burst, so `r` (the requests that could come now, at most the burst) never exceeds `q`;
    /// `t` is the time until the burst is whole again, in seconds rounded up.
    pub fn write_headers(&self, headers: &mut http::HeaderMap) {
        let ceil = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        let w = ceil(self.window).max(1);
        let q = (u128::from(w) * 1_000_000_000 * u128::from(self.limit))
            .checked_div(self.window.as_nanos())
            .map_or(self.limit, |q| u64::try_from(q).unwrap_or(u64::MAX));
        let policy = format!("\"default\";q={q};w={w}");
        let state = format!("\"default\";r={};t={}", self.remaining, ceil(self.reset));
        if let Ok(v) = http::HeaderValue::from_str(&policy) {
            headers.insert("ratelimit-policy", v);
        }
        if let Ok(v) = http::HeaderValue::from_str(&state) {
            headers.insert("ratelimit", v);
        }
    }
}

/// A request refused by one of this crate's layers.
///
/// Returned boxed in a [`BoxError`](tower::BoxError); find it with `downcast_ref`. Its
/// `Display` is lowercase, in the manner of tower's `Overloaded` and `Elapsed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    kind: RejectionKind,
    retry_after: Option<Duration>,
    // The hint spread for renderings in whole seconds (HTTP `Retry-After`), when the layer
    // made one: a spread narrower than a second would not survive rounding up.
    retry_after_whole: Option<Duration>,
    rate_limit: Option<RateLimitInfo>,
    detail: Option<&'static str>,
}

impl Rejection {
    /// A rejection of the given kind, with no wait hint.
    pub const fn new(kind: RejectionKind) -> Self {
        Rejection {
            kind,
            retry_after: None,
            retry_after_whole: None,
            rate_limit: None,
            detail: None,
        }
    }

    /// A rate-limit rejection: retry after `retry_after`, with the limit's figures.
    pub const fn rate_limited(retry_after: Duration, info: RateLimitInfo) -> Self {
        Rejection {
            kind: RejectionKind::RateLimited,
            retry_after: Some(retry_after),
            retry_after_whole: None,
            rate_limit: Some(info),
            detail: None,
        }
    }

    /// An overload rejection (shed), with an optional wait hint.
    pub const fn overloaded(retry_after: Option<Duration>) -> Self {
        Rejection {
            kind: RejectionKind::Overloaded,
            retry_after,
            retry_after_whole: None,
            rate_limit: None,
            detail: None,
        }
    }

    /// A circuit-open rejection: the breaker stays open for `retry_after`.
    pub const fn circuit_open(retry_after: Duration) -> Self {
        Rejection {
            kind: RejectionKind::CircuitOpen,
            retry_after: Some(retry_after),
            retry_after_whole: None,
            rate_limit: None,
            detail: None,
        }
    }

    /// The same rejection with a wait hint.
    pub const fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self.retry_after_whole = None;
        self
    }

    /// The same rejection with the hint to write in whole seconds (HTTP `Retry-After`),
    /// spread by the layer so that its spread survives rounding up.
    pub(crate) const fn with_whole_seconds_hint(mut self, hint: Duration) -> Self {
        self.retry_after_whole = Some(hint);
        self
    }

    /// The same rejection with a static detail message (the problem+json `detail`).
    pub const fn with_detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Why the request was refused.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// How long the caller should wait before trying again, when the layer knows (at a fine
    /// resolution: what gRPC's `grpc-retry-pushback-ms` and in-process callers wait).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The wait in whole seconds (rounded up, never 0), as HTTP's `Retry-After` writes it.
    /// A rate-limit rejection spreads this value apart from [`retry_after`](Self::retry_after)
    /// (over at least two seconds), since a spread below a second would be lost to the
    /// rounding; it is never less than the exact wait either way.
    pub fn retry_after_secs(&self) -> Option<u64> {
        let d = self.retry_after_whole.or(self.retry_after)?;
        Some(crate::respond::retry_after_secs(d))
    }

    /// The figures of the rate limit, for [`RejectionKind::RateLimited`].
    pub fn rate_limit(&self) -> Option<&RateLimitInfo> {
        self.rate_limit.as_ref()
    }

    /// A detail message, when the layer gave one.
    pub fn detail(&self) -> Option<&'static str> {
        self.detail
    }

    /// Finds a [`Rejection`] in an error, looking through its `source()` chain.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Rejection> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<Rejection>() {
                return Some(r);
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.title())?;
        if let Some(d) = self.detail {
            write!(f, ": {d}")?;
        }
        if let Some(after) = self.retry_after {
            write!(f, " (retry after {after:?})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::BoxError;

    #[test]
    fn found_in_box_error() {
        let info = RateLimitInfo {
            limit: 10,
            remaining: 0,
            reset: Duration::from_secs(1),
            window: Duration::from_secs(1),
        };
        let err: BoxError = Rejection::rate_limited(Duration::from_millis(100), info).into();
        let r = err.downcast_ref::<Rejection>().unwrap();
        assert_eq!(r.kind(), RejectionKind::RateLimited);
        assert_eq!(r.rate_limit(), Some(&info));
        assert_eq!(
            Rejection::find(&*err).map(Rejection::kind),
            Some(RejectionKind::RateLimited)
        );
    }

    #[test]
    fn policy_header_states_the_rate() {
        let policy = |limit: u64, window: Duration| {
            let mut h = http::HeaderMap::new();
            let info = RateLimitInfo {
                limit,
                remaining: limit,
                reset: Duration::ZERO,
                window,
            };
            info.write_headers(&mut h);
            h["ratelimit-policy"].to_str().unwrap().to_owned()
        };
        // 1000/s, burst 1: the window is 1 ms.
        assert_eq!(
            policy(1, Duration::from_millis(1)),
            "\"default\";q=1000;w=1"
        );
        // 100/s, burst 200.
        assert_eq!(policy(200, Duration::from_secs(2)), "\"default\";q=200;w=2");
        // 1 a minute.
        assert_eq!(policy(1, Duration::from_secs(60)), "\"default\";q=1;w=60");
        // 3 per 1.5 s: w rounds up to 2 s, q = 4 (2 / 0.5 s).
        assert_eq!(
            policy(3, Duration::from_millis(1500)),
            "\"default\";q=4;w=2"
        );
        // 7 every 3 s (a token each 428.57 ms, burst 1): q rounded down, never above the rate.
        assert_eq!(
            policy(1, Duration::from_nanos(428_571_429)),
            "\"default\";q=2;w=1"
        );
    }

    #[test]
    fn display_is_lowercase() {
        let r = Rejection::circuit_open(Duration::from_secs(2));
        let s = r.to_string();
        assert_eq!(s, "circuit open (retry after 2s)");
        assert_eq!(
            Rejection::new(RejectionKind::IdempotencyKeyInvalid)
                .with_detail("empty key")
                .to_string(),
            "idempotency key malformed: empty key"
        );
    }

    #[test]
    fn table_of_statuses() {
        use http::StatusCode as S;
        let table = [
            (RejectionKind::RateLimited, S::TOO_MANY_REQUESTS),
            (RejectionKind::Overloaded, S::SERVICE_UNAVAILABLE),
            (RejectionKind::CircuitOpen, S::SERVICE_UNAVAILABLE),
            (RejectionKind::IdempotencyInFlight, S::CONFLICT),
            (RejectionKind::IdempotencyKeyReused, S::UNPROCESSABLE_ENTITY),
            (RejectionKind::IdempotencyKeyMissing, S::BAD_REQUEST),
            (RejectionKind::IdempotencyKeyInvalid, S::BAD_REQUEST),
            (RejectionKind::StoreUnavailable, S::SERVICE_UNAVAILABLE),
            (RejectionKind::IdempotencyStoreFull, S::SERVICE_UNAVAILABLE),
            (RejectionKind::PayloadTooLarge, S::PAYLOAD_TOO_LARGE),
            (RejectionKind::BadRequestBody, S::BAD_REQUEST),
        ];
        for (kind, status) in table {
            assert_eq!(kind.http_status(), status, "{kind:?}");
        }
    }
}
