//! The one place that decides what an outcome was: success, failure, or worth retrying.
//!
//! The circuit breaker, retry and idempotency layers must agree on what a 503, a timeout or a
//! gRPC `UNAVAILABLE` means, so they all ask a [`Classify`] implementation:
//!
//! | classifier | success | failure (counts against health) | retryable |
//! |---|---|---|---|
//! | [`ErrorsOnly`] | every response | every error | every error except a non-retryable [`Rejection`] |
//! | [`HttpStatus`] | 1xx-4xx except 429 and the in-flight 409 | 5xx (but a 503 marked [`REQUEST_REFUSED`]), errors | 502, 503, 504, 429, the in-flight 409 and a marked 503 (throttled), errors |
//! | [`GrpcStatus`] | `OK`, client-side codes, HTTP 200 without `grpc-status` (the trailers decide) | `UNAVAILABLE`, `INTERNAL`, `DEADLINE_EXCEEDED`, `UNKNOWN`, `DATA_LOSS`, errors | `UNAVAILABLE`, `RESOURCE_EXHAUSTED` and the in-flight `ABORTED` (throttled), errors |
//! | [`ClassifyFn`] | whatever your closure says | | |
//!
//! Why 4xx is not a failure: a 404 or a 422 says the *request* was wrong, not that the
//! dependency is sick; counting it would let one bad client open a breaker for everybody.
//! 429 and gRPC `RESOURCE_EXHAUSTED` are [`Outcome::Throttled`]: worth retrying later (honouring
//! the server's hint) but not a sign of ill health.
//!
//! So is the answer to a request whose `Idempotency-Key` is still being run by an earlier
//! attempt (this crate's [`IdempotencyInFlight`](RejectionKind::IdempotencyInFlight): 409 or
//! `ABORTED`, marked with the header [`IDEMPOTENCY_KEY_IN_FLIGHT`] and a short, jittered
//! `Retry-After`): a retry after the wait is replayed the first attempt's response. A 409 or
//! `ABORTED` without the mark (a conflict of the application's, or a key whose response was
//! too large to keep) stays a success: retrying it cannot help.
//!
//! # gRPC responses without `grpc-status`
//!
//! A gRPC call answered by something other than a gRPC server (a proxy or load balancer whose
//! upstream is down, an HTTP/1 endpoint) has an HTTP status and no `grpc-status`.
//! [`GrpcStatus`] then maps the HTTP status as gRPC does (its
//! `http-grpc-status-mapping`, which tonic follows too): 400 is `INTERNAL`, 401
//! `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 404 `UNIMPLEMENTED`, 429, 502, 503 and 504
//! `UNAVAILABLE`, any other status but 200 `UNKNOWN` ([`GrpcCode::from_http_status`]). A 200
//! without `grpc-status` in its headers is a success here: its status comes in the trailers.
//!
//! Errors are classified as [`BoxError`] because every layer of this crate that can fail
//! returns one. A [`Rejection`] from a layer below (such as an open breaker) is classified by
//! its kind: `CircuitOpen`, `Overloaded`, `RateLimited` and `StoreUnavailable` are
//! [`Outcome::Throttled`], and so is `IdempotencyInFlight` (the key's first request is still
//! running); the other idempotency rejections are [`Outcome::Failure`] (retrying would not
//! help).
//!
//! # gRPC status in trailers
//!
//! A gRPC error is usually sent "trailers-only": the `grpc-status` sits in the response
//! headers, where [`GrpcStatus`] reads it. A status that arrives in the trailers of a streamed
//! body is known only when the body ends; [`GrpcStatus::classify_trailers`] classifies it, and
//! a layer that sees the trailers calls it through [`Classify::classify_body_trailers`] (the
//! backpressure layer does, with `hold_until_body_end`, for its adaptive samples). The breaker
//! and retry layers decide when the response head arrives, so they see header statuses only.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use tower::BoxError;

use crate::rejection::{Rejection, RejectionKind, IDEMPOTENCY_KEY_IN_FLIGHT, REQUEST_REFUSED};

/// What an attempt's outcome was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The call succeeded (for the breaker: healthy).
    Success,
    /// The call failed and retrying would not help (counts against health).
    Failure,
    /// The call failed and may succeed if retried (counts against health).
    Retryable,
    /// The dependency asked the caller to slow down (429, `RESOURCE_EXHAUSTED`, a rejection
    /// from a layer below): worth retrying later, but not a failure of health.
    Throttled,
}

impl Outcome {
    /// Whether this outcome counts against the dependency's health.
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure | Outcome::Retryable)
    }

    /// Whether a retry may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Outcome::Retryable | Outcome::Throttled)
    }
}

/// Decides the [`Outcome`] of a response or an error.
///
/// Implemented by [`ErrorsOnly`], [`HttpStatus`], [`GrpcStatus`] and [`ClassifyFn`].
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// The outcome of a response.
    fn classify_response(&self, res: &Res) -> Outcome;

    /// The outcome of an error.
    fn classify_error(&self, err: &BoxError) -> Outcome {
        classify_error_default(err)
    }

    /// The outcome of the trailers that end a streamed response body, for a layer that sees
    /// the body to its end (the backpressure layer with
    /// [`hold_until_body_end`](crate::backpressure::BackpressureLayer::hold_until_body_end)):
    /// a failure here makes the response a failure. The default says nothing
    /// ([`Outcome::Success`]); [`GrpcStatus`] reads their `grpc-status`.
    fn classify_body_trailers(&self, trailers: &HeaderMap) -> Outcome {
        let _ = trailers;
        Outcome::Success
    }
}

/// The default classification of an error: a [`Rejection`] by its kind (a refusal to slow
/// down is [`Outcome::Throttled`]; a refusal of what the caller sent, answered with a 4xx, is
/// the caller's fault and says nothing of the dependency's health: [`Outcome::Success`], as a
/// 4xx response is), tower's own `load_shed` refusal [`Outcome::Throttled`], anything else
/// [`Outcome::Retryable`].
pub fn classify_error_default(err: &BoxError) -> Outcome {
    match Rejection::find(&**err).map(Rejection::kind) {
        Some(
            RejectionKind::CircuitOpen
            | RejectionKind::Overloaded
            | RejectionKind::RateLimited
            | RejectionKind::StoreUnavailable
            | RejectionKind::IdempotencyStoreFull
            | RejectionKind::IdempotencyInFlight,
        ) => Outcome::Throttled,
        Some(kind) if kind.http_status().is_client_error() => Outcome::Success,
        Some(_) => Outcome::Failure,
        None if is_tower_overloaded(&**err) => Outcome::Throttled,
        None => Outcome::Retryable,
    }
}

/// Whether `err` (or an error in its `source()` chain) is tower's `load_shed` refusal: a
/// request shed in this process before it was sent, not a failure of the dependency.
fn is_tower_overloaded(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<tower::load_shed::error::Overloaded>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Every response is a success; every error is a failure (retryable, unless it is a
/// rejection that retrying cannot help). For generic, non-HTTP services.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsOnly;

impl<Res> Classify<Res> for ErrorsOnly {
    fn classify_response(&self, _res: &Res) -> Outcome {
        Outcome::Success
    }
}

/// Classifies HTTP responses by status code.
///
/// By default 5xx are failures, of which 502, 503 and 504 are retryable; 429 is
/// [`Outcome::Throttled`], and so is a 409 marked [`IDEMPOTENCY_KEY_IN_FLIGHT`] (an
/// `IdempotencyLayer` still runs the first request with this key: a retry after its
/// `Retry-After` is replayed that request's response) and a 503 marked
/// [`REQUEST_REFUSED`] (a server's shed or open breaker, answered by this crate's
/// `RejectionLayer`: the same refusal in process is a throttled [`Rejection`]); everything
/// else is a success. Each can be changed.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_bulwark::classify::{Classify, HttpStatus, Outcome};
///
/// let c = HttpStatus::default();
/// let res = Response::builder().status(503).body(()).unwrap();
/// assert_eq!(c.classify_response(&res), Outcome::Retryable);
/// let res = Response::builder().status(404).body(()).unwrap();
/// assert_eq!(c.classify_response(&res), Outcome::Success);
/// let res = Response::builder()
///     .status(409)
///     .header("idempotency-key-in-flight", "true")
///     .body(())
///     .unwrap();
/// assert_eq!(c.classify_response(&res), Outcome::Throttled);
/// ```
#[derive(Clone, Copy)]
pub struct HttpStatus {
    // Bit i set: status 500 + i is retryable (500..=599).
    retryable_5xx: u128,
    throttled_429: bool,
    failure_5xx: bool,
    throttled_in_flight: bool,
}

impl Default for HttpStatus {
    fn default() -> Self {
        HttpStatus {
            retryable_5xx: (1 << 2) | (1 << 3) | (1 << 4),
            throttled_429: true,
            failure_5xx: true,
            throttled_in_flight: true,
        }
    }
}

impl fmt::Debug for HttpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes: Vec<u16> = (0..100u16)
            .filter(|i| self.retryable_5xx & (1u128 << i) != 0)
            .map(|i| 500 + i)
            .collect();
        f.debug_struct("HttpStatus")
            .field("retryable_5xx", &codes)
            .field("throttled_429", &self.throttled_429)
            .field("throttled_in_flight", &self.throttled_in_flight)
            .finish()
    }
}

impl HttpStatus {
    /// The default classification (see the type docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets which 5xx statuses are retryable (others in 500..=599 are ignored).
    pub fn retryable_statuses(mut self, statuses: &[StatusCode]) -> Self {
        self.retryable_5xx = 0;
        for s in statuses {
            let c = s.as_u16();
            if (500..600).contains(&c) {
                self.retryable_5xx |= 1 << (c - 500);
            }
        }
        self
    }

    /// Whether 429 is retried later ([`Outcome::Throttled`], the default) or a plain success.
    pub fn retry_too_many_requests(mut self, yes: bool) -> Self {
        self.throttled_429 = yes;
        self
    }

    /// Whether a 409 marked [`IDEMPOTENCY_KEY_IN_FLIGHT`] is retried later
    /// ([`Outcome::Throttled`], the default) or a plain success.
    pub fn retry_idempotency_in_flight(mut self, yes: bool) -> Self {
        self.throttled_in_flight = yes;
        self
    }

    /// The outcome of a response head: its status, and the in-flight mark of a 409.
    pub fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        if status == StatusCode::CONFLICT && self.throttled_in_flight && in_flight_mark(headers) {
            return Outcome::Throttled;
        }
        let outcome = self.classify_status(status);
        // A 503 marked `Request-Refused` is a refusal of this crate's layers on the server (a
        // shed, an open breaker there): throttled, as the same refusal is in process, not a
        // failure of health.
        if status == StatusCode::SERVICE_UNAVAILABLE
            && outcome == Outcome::Retryable
            && headers.contains_key(REQUEST_REFUSED)
        {
            return Outcome::Throttled;
        }
        outcome
    }

    /// The outcome of a status code alone (a 409 is a success here: its in-flight mark is in
    /// the headers, see [`classify_head`](Self::classify_head)).
    pub fn classify_status(&self, status: StatusCode) -> Outcome {
        let c = status.as_u16();
        if (500..600).contains(&c) {
            if self.retryable_5xx & (1 << (c - 500)) != 0 {
                Outcome::Retryable
            } else if self.failure_5xx {
                Outcome::Failure
            } else {
                Outcome::Success
            }
        } else if c == 429 && self.throttled_429 {
            Outcome::Throttled
        } else {
            Outcome::Success
        }
    }
}

impl<B> Classify<http::Response<B>> for HttpStatus {
    fn classify_response(&self, res: &http::Response<B>) -> Outcome {
        self.classify_head(res.status(), res.headers())
    }
}

/// Whether a response carries [`IDEMPOTENCY_KEY_IN_FLIGHT`]`: true`.
fn in_flight_mark(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENCY_KEY_IN_FLIGHT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// gRPC status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The code for a number; numbers outside 0..=16 are `Unknown`, as the gRPC spec says.
    pub fn from_i32(n: i32) -> GrpcCode {
        usize::try_from(n)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .unwrap_or(GrpcCode::Unknown)
    }

    /// The code's number.
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// Reads `grpc-status` from headers or trailers. `None` when absent; a malformed value is
    /// `Unknown`.
    pub fn from_headers(headers: &HeaderMap) -> Option<GrpcCode> {
        // A constant name: `get("grpc-status")` would parse and hash the name on every call.
        const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
        let v = headers.get(&GRPC_STATUS)?;
        Some(
            std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .map(GrpcCode::from_i32)
                .unwrap_or(GrpcCode::Unknown),
        )
    }

    /// The code gRPC gives a response that has an HTTP status but no `grpc-status` (gRPC's
    /// `http-grpc-status-mapping`, as tonic applies it): 400 `INTERNAL`, 401
    /// `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 404 `UNIMPLEMENTED`, 429, 502, 503 and 504
    /// `UNAVAILABLE`, any other status `UNKNOWN`; `None` for 200, whose status comes in the
    /// trailers.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_bulwark::classify::GrpcCode;
    ///
    /// assert_eq!(GrpcCode::from_http_status(StatusCode::SERVICE_UNAVAILABLE), Some(GrpcCode::Unavailable));
    /// assert_eq!(GrpcCode::from_http_status(StatusCode::OK), None);
    /// ```
    pub fn from_http_status(status: StatusCode) -> Option<GrpcCode> {
        Some(match status.as_u16() {
            200 => return None,
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        })
    }

    /// The canonical upper-case name (`"UNAVAILABLE"`).
    pub fn name(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Classifies gRPC responses by the `grpc-status` header (trailers-only responses), or, when
/// there is none, by the HTTP status.
///
/// Failures: `UNAVAILABLE`, `INTERNAL`, `DEADLINE_EXCEEDED`, `UNKNOWN` and `DATA_LOSS` (the
/// server or the network is at fault). Retryable: `UNAVAILABLE` by default (the gRPC retry
/// design's only safe default), and `RESOURCE_EXHAUSTED` as [`Outcome::Throttled`], as is an
/// `ABORTED` marked [`IDEMPOTENCY_KEY_IN_FLIGHT`] (the key's first call still runs). Codes that
/// say the request was wrong (`INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`...) are
/// successes for health.
///
/// A response without `grpc-status` in its headers and an HTTP status other than 200 was not
/// answered by a gRPC server (a proxy whose upstream is down): its status is mapped as gRPC
/// does ([`GrpcCode::from_http_status`]), so a proxy's 503 is `UNAVAILABLE`. A 200 without
/// `grpc-status` is a success: its status comes in the trailers (see the module docs).
///
/// ```
/// use tower_bulwark::classify::{Classify, GrpcStatus, Outcome};
///
/// let c = GrpcStatus::default();
/// let res = http::Response::builder().header("grpc-status", "14").body(()).unwrap();
/// assert_eq!(c.classify_response(&res), Outcome::Retryable);
/// // A load balancer's 503, no gRPC server behind it.
/// let res = http::Response::builder().status(503).body(()).unwrap();
/// assert_eq!(c.classify_response(&res), Outcome::Retryable);
/// ```
#[derive(Clone, Copy)]
pub struct GrpcStatus {
    failures: u32,
    retryable: u32,
    throttled: u32,
}

impl Default for GrpcStatus {
    fn default() -> Self {
        let bit = |c: GrpcCode| 1u32 << c.as_i32();
        GrpcStatus {
            failures: bit(GrpcCode::Unavailable)
                | bit(GrpcCode::Internal)
                | bit(GrpcCode::DeadlineExceeded)
                | bit(GrpcCode::Unknown)
                | bit(GrpcCode::DataLoss),
            retryable: bit(GrpcCode::Unavailable),
            throttled: bit(GrpcCode::ResourceExhausted),
        }
    }
}

impl fmt::Debug for GrpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |mask: u32| -> Vec<GrpcCode> {
            GrpcCode::ALL
                .iter()
                .copied()
                .filter(|c| mask & (1 << c.as_i32()) != 0)
                .collect()
        };
        f.debug_struct("GrpcStatus")
            .field("failures", &list(self.failures))
            .field("retryable", &list(self.retryable))
            .field("throttled", &list(self.throttled))
            .finish()
    }
}

impl GrpcStatus {
    /// The default classification (see the type docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the codes that are retryable failures (they also count against health).
    pub fn retryable_codes(mut self, codes: &[GrpcCode]) -> Self {
        self.retryable = codes.iter().fold(0, |m, c| m | (1 << c.as_i32()));
        self.failures |= self.retryable;
        self
    }

    /// Sets the codes that count as failures of health.
    pub fn failure_codes(mut self, codes: &[GrpcCode]) -> Self {
        self.failures = codes.iter().fold(0, |m, c| m | (1 << c.as_i32()));
        self
    }

    /// The outcome of a code.
    pub fn classify_code(&self, code: GrpcCode) -> Outcome {
        let bit = 1u32 << code.as_i32();
        if self.retryable & bit != 0 {
            Outcome::Retryable
        } else if self.throttled & bit != 0 {
            Outcome::Throttled
        } else if self.failures & bit != 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// The outcome given by trailers (or headers) at the end of a streamed body.
    pub fn classify_trailers(&self, trailers: &HeaderMap) -> Outcome {
        GrpcCode::from_headers(trailers)
            .map(|c| self.classify_marked(c, trailers))
            .unwrap_or(Outcome::Success)
    }

    /// The outcome of a response head: the `grpc-status` header if there is one, else the
    /// HTTP status mapped as gRPC does ([`GrpcCode::from_http_status`]); a 200 without
    /// `grpc-status` is a success (its trailers decide).
    pub fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        match GrpcCode::from_headers(headers).or_else(|| GrpcCode::from_http_status(status)) {
            Some(code) => self.classify_marked(code, headers),
            None => Outcome::Success,
        }
    }

    /// A code's outcome, with the in-flight `ABORTED` retried later.
    fn classify_marked(&self, code: GrpcCode, headers: &HeaderMap) -> Outcome {
        if code == GrpcCode::Aborted && in_flight_mark(headers) {
            return Outcome::Throttled;
        }
        self.classify_code(code)
    }
}

impl<B> Classify<http::Response<B>> for GrpcStatus {
    fn classify_response(&self, res: &http::Response<B>) -> Outcome {
        self.classify_head(res.status(), res.headers())
    }

    fn classify_body_trailers(&self, trailers: &HeaderMap) -> Outcome {
        self.classify_trailers(trailers)
    }
}

/// Classifies with a closure over the response (errors keep the default classification, or
/// use [`ClassifyFn::with_errors`]).
///
/// ```
/// use tower_bulwark::classify::{Classify, ClassifyFn, Outcome};
///
/// let c = ClassifyFn::new(|res: &Result<u32, ()>| match res {
///     Ok(_) => Outcome::Success,
///     Err(_) => Outcome::Retryable,
/// });
/// assert_eq!(c.classify_response(&Err(())), Outcome::Retryable);
/// ```
pub struct ClassifyFn<F, G = fn(&BoxError) -> Outcome> {
    on_response: Arc<F>,
    on_error: G,
}

impl<F, G: Clone> Clone for ClassifyFn<F, G> {
    fn clone(&self) -> Self {
        ClassifyFn {
            on_response: self.on_response.clone(),
            on_error: self.on_error.clone(),
        }
    }
}

impl<F, G> fmt::Debug for ClassifyFn<F, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn").finish_non_exhaustive()
    }
}

impl<F> ClassifyFn<F> {
    /// Classifies responses with `f`.
    pub fn new(f: F) -> Self {
        ClassifyFn {
            on_response: Arc::new(f),
            on_error: classify_error_default,
        }
    }
}

impl<F, G> ClassifyFn<F, G> {
    /// Classifies errors with `g` too.
    pub fn with_errors<G2>(self, g: G2) -> ClassifyFn<F, G2>
    where
        G2: Fn(&BoxError) -> Outcome + Clone + Send + Sync + 'static,
    {
        ClassifyFn {
            on_response: self.on_response,
            on_error: g,
        }
    }
}

impl<Res, F, G> Classify<Res> for ClassifyFn<F, G>
where
    F: Fn(&Res) -> Outcome + Send + Sync + 'static,
    G: Fn(&BoxError) -> Outcome + Clone + Send + Sync + 'static,
{
    fn classify_response(&self, res: &Res) -> Outcome {
        (self.on_response)(res)
    }

    fn classify_error(&self, err: &BoxError) -> Outcome {
        (self.on_error)(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn res(status: u16) -> http::Response<()> {
        http::Response::builder().status(status).body(()).unwrap()
    }

    #[test]
    fn http_each_status_class() {
        let c = HttpStatus::default();
        for s in 100..=199 {
            assert_eq!(c.classify_response(&res(s)), Outcome::Success, "{s}");
        }
        for s in 200..=399 {
            assert_eq!(c.classify_response(&res(s)), Outcome::Success, "{s}");
        }
        for s in 400..=499 {
            let want = if s == 429 {
                Outcome::Throttled
            } else {
                Outcome::Success
            };
            assert_eq!(c.classify_response(&res(s)), want, "{s}");
        }
        for s in 500..=599 {
            let want = if matches!(s, 502..=504) {
                Outcome::Retryable
            } else {
                Outcome::Failure
            };
            assert_eq!(c.classify_response(&res(s)), want, "{s}");
        }
    }

    #[test]
    fn http_configurable() {
        let c = HttpStatus::new()
            .retryable_statuses(&[StatusCode::INTERNAL_SERVER_ERROR])
            .retry_too_many_requests(false);
        assert_eq!(c.classify_response(&res(500)), Outcome::Retryable);
        assert_eq!(c.classify_response(&res(503)), Outcome::Failure);
        assert_eq!(c.classify_response(&res(429)), Outcome::Success);
    }

    #[test]
    fn errors_default() {
        let c = ErrorsOnly;
        let io: BoxError = "connection reset".into();
        assert_eq!(
            <ErrorsOnly as Classify<()>>::classify_error(&c, &io),
            Outcome::Retryable
        );
        assert_eq!(c.classify_response(&()), Outcome::Success);
        let open: BoxError = Rejection::circuit_open(Duration::from_secs(1)).into();
        assert_eq!(
            <ErrorsOnly as Classify<()>>::classify_error(&c, &open),
            Outcome::Throttled
        );
        // A refusal of what the caller sent (a 4xx) is the caller's, not the dependency's:
        // neither a failure of health nor worth retrying.
        let reused: BoxError = Rejection::new(RejectionKind::IdempotencyKeyReused).into();
        assert_eq!(
            <ErrorsOnly as Classify<()>>::classify_error(&c, &reused),
            Outcome::Success
        );
        // A setup error of the server (a 500) is a failure.
        let unknown: BoxError = Rejection::new(RejectionKind::ClientAddressUnknown).into();
        assert_eq!(
            <ErrorsOnly as Classify<()>>::classify_error(&c, &unknown),
            Outcome::Failure
        );
        // tower's own shed, wrapped or not, is a refusal to slow down.
        let shed: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(
            <ErrorsOnly as Classify<()>>::classify_error(&c, &shed),
            Outcome::Throttled
        );
    }

    #[test]
    fn grpc_each_code() {
        let c = GrpcStatus::default();
        let expect = |code: GrpcCode| match code {
            GrpcCode::Unavailable => Outcome::Retryable,
            GrpcCode::ResourceExhausted => Outcome::Throttled,
            GrpcCode::Internal
            | GrpcCode::DeadlineExceeded
            | GrpcCode::Unknown
            | GrpcCode::DataLoss => Outcome::Failure,
            _ => Outcome::Success,
        };
        for n in 0..=16 {
            let code = GrpcCode::from_i32(n);
            assert_eq!(code.as_i32(), n);
            let r = http::Response::builder()
                .header("grpc-status", n.to_string())
                .body(())
                .unwrap();
            assert_eq!(c.classify_response(&r), expect(code), "{code}");
        }
        // absent with 200: success (status will come in trailers)
        assert_eq!(c.classify_response(&res(200)), Outcome::Success);
        // malformed and out of range: UNKNOWN, a failure
        let r = http::Response::builder()
            .header("grpc-status", "banana")
            .body(())
            .unwrap();
        assert_eq!(c.classify_response(&r), Outcome::Failure);
        assert_eq!(GrpcCode::from_i32(99), GrpcCode::Unknown);
        assert_eq!(GrpcCode::from_i32(-1), GrpcCode::Unknown);
    }

    #[test]
    fn grpc_without_grpc_status_maps_the_http_status() {
        let c = GrpcStatus::default();
        let want = |s: u16| match s {
            200 => None,
            400 => Some(GrpcCode::Internal),
            401 => Some(GrpcCode::Unauthenticated),
            403 => Some(GrpcCode::PermissionDenied),
            404 => Some(GrpcCode::Unimplemented),
            429 | 502 | 503 | 504 => Some(GrpcCode::Unavailable),
            _ => Some(GrpcCode::Unknown),
        };
        for s in 100..=599u16 {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(GrpcCode::from_http_status(status), want(s), "{s}");
            let outcome = want(s).map_or(Outcome::Success, |code| c.classify_code(code));
            assert_eq!(c.classify_response(&res(s)), outcome, "{s}");
        }
        assert_eq!(c.classify_response(&res(503)), Outcome::Retryable);
        assert_eq!(c.classify_response(&res(500)), Outcome::Failure);
        assert_eq!(c.classify_response(&res(404)), Outcome::Success);
        // The header wins over the HTTP status, as in tonic.
        let r = http::Response::builder()
            .status(503)
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        assert_eq!(c.classify_response(&r), Outcome::Success);
    }

    #[test]
    fn in_flight_conflicts_are_retried_later() {
        let marked = |status: u16, grpc: Option<&str>| {
            let mut b = http::Response::builder()
                .status(status)
                .header(IDEMPOTENCY_KEY_IN_FLIGHT, "true");
            if let Some(g) = grpc {
                b = b.header("grpc-status", g);
            }
            b.body(()).unwrap()
        };
        let h = HttpStatus::default();
        assert_eq!(h.classify_response(&marked(409, None)), Outcome::Throttled);
        // Not marked: an application's conflict, or a response not kept.
        assert_eq!(h.classify_response(&res(409)), Outcome::Success);
        // The mark on another status changes nothing.
        assert_eq!(h.classify_response(&marked(200, None)), Outcome::Success);
        let refused = http::Response::builder()
            .status(503)
            .header(REQUEST_REFUSED, "overloaded")
            .body(())
            .unwrap();
        assert_eq!(h.classify_response(&refused), Outcome::Throttled);
        assert_eq!(h.classify_response(&res(503)), Outcome::Retryable);
        let off = h.retry_idempotency_in_flight(false);
        assert_eq!(off.classify_response(&marked(409, None)), Outcome::Success);
        let g = GrpcStatus::default();
        assert_eq!(
            g.classify_response(&marked(200, Some("10"))),
            Outcome::Throttled
        );
        let aborted = http::Response::builder()
            .header("grpc-status", "10")
            .body(())
            .unwrap();
        assert_eq!(g.classify_response(&aborted), Outcome::Success);
        let err: BoxError = Rejection::new(RejectionKind::IdempotencyInFlight).into();
        assert_eq!(classify_error_default(&err), Outcome::Throttled);
    }

    #[test]
    fn grpc_trailers_and_config() {
        let c = GrpcStatus::new().retryable_codes(&[GrpcCode::Unavailable, GrpcCode::Aborted]);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "10".parse().unwrap());
        assert_eq!(c.classify_trailers(&t), Outcome::Retryable);
        assert!(Outcome::Retryable.is_failure());
        assert!(!Outcome::Throttled.is_failure());
        assert!(Outcome::Throttled.is_retryable());
    }

    #[test]
    fn closure() {
        let c = ClassifyFn::new(|r: &http::Response<()>| {
            if r.status() == 418 {
                Outcome::Failure
            } else {
                Outcome::Success
            }
        })
        .with_errors(|_e: &BoxError| Outcome::Failure);
        assert_eq!(c.classify_response(&res(418)), Outcome::Failure);
        let e: BoxError = "x".into();
        assert_eq!(c.classify_error(&e), Outcome::Failure);
    }

    /// Outside input, as arbitrary bytes: an answer, never a panic.
    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn grpc_status_of_arbitrary_bytes_is_a_code_never_a_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..24),
            ) {
                let Ok(v) = http::HeaderValue::from_bytes(&bytes) else {
                    return Ok(());
                };
                let mut h = HeaderMap::new();
                h.insert("grpc-status", v);
                let code = GrpcCode::from_headers(&h).expect("a grpc-status header is a code");
                // A number from 0 to 16 is its code; anything else is UNKNOWN.
                let n = std::str::from_utf8(&bytes).ok().and_then(|s| s.trim().parse::<i32>().ok());
                match n {
                    Some(n @ 0..=16) => prop_assert_eq!(code.as_i32(), n),
                    _ => prop_assert_eq!(code, GrpcCode::Unknown),
                }
                let _ = GrpcStatus::default().classify_trailers(&h);
            }
        }
    }
}
