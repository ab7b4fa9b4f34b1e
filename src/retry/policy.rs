//! What to retry, how often, how to replay a request, and what the server's hints say.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response};
use http_body::Body;
use tower::BoxError;

use crate::classify::{Classify, ErrorsOnly, GrpcStatus, HttpStatus, Outcome};
use crate::clock::Clock;
use crate::rejection::REQUEST_REFUSED;

use super::backoff::Backoff;
use super::budget::Budget;
use super::replay::{Head, HttpSaved, ReplayBody};

/// The `Idempotency-Key` header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

const GRPC_PUSHBACK: &str = "grpc-retry-pushback-ms";
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A configuration refused when a [`RetryLayer`](super::RetryLayer) or [`Budget`] is built.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_attempts` was zero: at least the first attempt must be allowed.
    ZeroAttempts,
    /// The backoff multiplier was below 1, NaN or infinite.
    Multiplier(f64),
    /// The proportional jitter was NaN or outside `[0, 1]`.
    Jitter(f64),
    /// The backoff's maximum delay was below its base.
    MaxBelowBase,
    /// The backoff's base was zero with a maximum that is not: every delay would be zero
    /// (`base × multiplier^n`), whatever the maximum says. [`Backoff::none`] is the way to
    /// say "no wait".
    ZeroBase,
    /// The overall deadline was zero.
    ZeroDeadline,
    /// The budget ratio was NaN, negative or above 1000.
    Ratio(f64),
    /// The budget window was under 16 ms.
    Window(Duration),
    /// The policy's clock is not the one its [`Budget`] runs on (given to the budget's
    /// builder, or taken from another layer or a first use): give one clock to both, or to
    /// one of them.
    BudgetClock,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroAttempts => f.write_str("max attempts must be at least 1"),
            ConfigError::Multiplier(m) => {
                write!(
                    f,
                    "backoff multiplier must be finite and at least 1, got {m}"
                )
            }
            ConfigError::Jitter(j) => write!(f, "jitter must lie in [0, 1], got {j}"),
            ConfigError::MaxBelowBase => f.write_str("maximum backoff is below the base"),
            ConfigError::ZeroBase => f.write_str(
                "backoff base must not be zero when its maximum is not (every delay would be \
                 zero); use Backoff::none() for no wait",
            ),
            ConfigError::ZeroDeadline => f.write_str("the retry deadline must not be zero"),
            ConfigError::Ratio(r) => write!(f, "budget ratio must lie in [0, 1000], got {r}"),
            ConfigError::Window(w) => write!(f, "budget window must be at least 16ms, got {w:?}"),
            ConfigError::BudgetClock => {
                f.write_str("the retry budget runs on another clock than the policy's")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the retry layer does with a response's or an error's hint about when to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hint {
    /// No hint: the backoff decides.
    None,
    /// Wait at least this long (plus a jitter). A hint longer than the policy's
    /// [`max_hint`](RetryPolicy::max_hint), or than the deadline leaves, stops the retries:
    /// the answer is returned.
    After(Duration),
    /// Do not retry (a negative or malformed `grpc-retry-pushback-ms`).
    Stop,
}

/// How a request is sent to each attempt and kept for the next one.
///
/// Implemented by [`CloneRequest`] (any `Clone` request) and [`HttpReplay`] (HTTP requests
/// with any body, made replayable by a bounded buffer).
pub trait Replay<Req> {
    /// The request the inner service receives.
    type Request;
    /// What is kept for another attempt.
    type Saved;

    /// Prepares the first attempt. `retry` says whether another attempt may follow; `key`
    /// draws a fresh 128-bit value (for an idempotency key). Returns the request to send and,
    /// if the request may be retried, puts what is kept for the next attempt in `saved`
    /// (which is `None` on entry; an out-parameter, so that the kept request is written once
    /// rather than moved through a return value).
    fn prepare(
        &self,
        req: Req,
        retry: bool,
        key: &dyn Fn() -> u128,
        saved: &mut Option<Self::Saved>,
    ) -> Self::Request;

    /// Whether the kept request can be sent again now.
    fn can_replay(&self, saved: &Self::Saved) -> bool;

    /// The next attempt's request. On the `last` attempt the kept request is moved, not
    /// cloned. `None` only if `saved` is `None`.
    fn replay(&self, saved: &mut Option<Self::Saved>, last: bool) -> Option<Self::Request>;

    /// Whether the kept request may be sent again after an error (other than a
    /// [`Rejection`](crate::Rejection) from a layer below, which says the call was not sent):
    /// an error such as a timeout says nothing of whether the server ran the call. `true` by
    /// default; [`HttpReplay`] answers `false` for a gRPC call not marked idempotent.
    fn may_retry_error(&self, _saved: &Self::Saved) -> bool {
        true
    }

    /// Whether the kept request may be sent again after a response that may follow a run of
    /// it ([`Hints::may_have_run`]). `true` by default; [`HttpReplay`] answers `false` for a
    /// request that is safe to repeat only through its `Idempotency-Key` (HTTP) and for a gRPC
    /// call not marked idempotent.
    fn may_retry_response(&self, _saved: &Self::Saved) -> bool {
        true
    }

    /// A deadline the request carries itself, from the call (gRPC's `grpc-timeout` for
    /// [`RetryPolicy::grpc`]): no attempt starts past it, and each retry is told the time
    /// left ([`set_time_left`](Self::set_time_left)). `None` by default.
    fn deadline(&self, _saved: &Self::Saved) -> Option<Duration> {
        None
    }

    /// Writes the time left before the request's own [`deadline`](Self::deadline) into a
    /// retry's request. Called only for a request that has one.
    fn set_time_left(&self, _req: &mut Self::Request, _left: Duration) {}
}

/// Marks a request as idempotent, as a request extension: the retry layer may then send it
/// again after an error that leaves unknown whether the server ran it (a timeout, a reset
/// after sending), and [`RetryPolicy::http`] retries it whatever its method.
///
/// For gRPC (where every call is a POST), mark the calls that are safe to repeat, for example
/// with tonic: `request.extensions_mut().insert(Idempotent)` (tonic passes extensions on to
/// the `http::Request`). An `Idempotency-Key` metadata header marks a call as well.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Idempotent;

/// Reads a response's hint about when to retry.
pub trait Hints<Res> {
    /// The hint carried by `res`.
    fn hint(&self, res: &Res) -> Hint;

    /// A short description of `res` for `tracing` events (such as `status 503`); called only
    /// when the event is enabled.
    fn describe(&self, _res: &Res) -> Option<String> {
        None
    }

    /// Whether `res`, a retryable answer, may follow a run of the request (a 5xx from the
    /// handler, a gateway's timeout), rather than say that it was not processed (a 429, a
    /// refusal of this crate's layers, gRPC `UNAVAILABLE` from the server): such an answer
    /// is retried only if [`Replay::may_retry_response`] allows. `false` by default.
    fn may_have_run(&self, _res: &Res) -> bool {
        false
    }
}

/// Replays any `Clone` request by cloning it (only while another attempt can still happen);
/// reads no hints from responses. For generic services.
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneRequest;

impl<Req: Clone> Replay<Req> for CloneRequest {
    type Request = Req;
    type Saved = Req;

    #[inline]
    fn prepare(
        &self,
        req: Req,
        retry: bool,
        _key: &dyn Fn() -> u128,
        saved: &mut Option<Req>,
    ) -> Req {
        if retry {
            *saved = Some(req.clone());
        }
        req
    }

    fn can_replay(&self, _saved: &Req) -> bool {
        true
    }

    fn replay(&self, saved: &mut Option<Req>, last: bool) -> Option<Req> {
        if last {
            saved.take()
        } else {
            saved.clone()
        }
    }
}

impl<Res> Hints<Res> for CloneRequest {
    #[inline]
    fn hint(&self, _res: &Res) -> Hint {
        Hint::None
    }
}

/// Replays HTTP requests with any body, and reads `Retry-After` and `grpc-retry-pushback-ms`.
///
/// - Only safe requests are retried: idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE,
///   TRACE), requests that carry an `Idempotency-Key` (which
///   [`RetryPolicy::add_idempotency_key`] adds to the others) and requests marked
///   [`Idempotent`]. A request safe only through its key is not sent again after a 5xx
///   without the [`REQUEST_REFUSED`](crate::rejection::REQUEST_REFUSED) mark, which may be
///   its handler's answer after its effect. gRPC calls are all POST: [`RetryPolicy::grpc`]
///   leaves the method out for responses, as gRPC's own retry policy does, because the codes
///   it retries by default say the call was not processed; but an error (a per-attempt
///   timeout, a transport error after sending) and a proxy's 502 or 504 say nothing of that,
///   so after one a gRPC call is retried only if it carries an `Idempotency-Key` or is marked
///   [`Idempotent`]. A [`Rejection`](crate::Rejection) from a layer below (the call was not
///   sent) is retried either way.
/// - For gRPC, the call's `grpc-timeout` is its deadline across attempts; each retry is sent
///   the time left ([`Replay::deadline`], [`Replay::set_time_left`]).
/// - The body streams to the first attempt while its bytes are kept, up to a cap (64 KiB by
///   default); a body over the cap is sent once and not retried. The inner service receives a
///   [`ReplayBody`].
/// - The request head (method, URI, headers, extensions) is cloned only while another attempt
///   can still happen.
///
/// Costs: a request that cannot be retried, or has an empty body, pays nothing more than the
/// head's clone. A retryable request with a body allocates its replay state once; the body's
/// frames are shared by reference count (`Bytes`), not copied. The replay state sits behind a
/// `std::sync::Mutex` taken once per attempt's body and at the retry decision, never held
/// across an await and never on the admit path.
#[derive(Clone, Copy, Debug)]
pub struct HttpReplay {
    check_method: bool,
    add_key: bool,
    body_limit: usize,
}

impl HttpReplay {
    fn http() -> Self {
        HttpReplay {
            check_method: true,
            add_key: false,
            body_limit: 64 * 1024,
        }
    }
}

/// Whether a method is idempotent (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A key from 128 random bits: a UUID (version 4 form) written as a structured-field string,
/// `"8e03978e-40d5-43e8-bc93-6894a57f9324"`, as the IETF `Idempotency-Key` draft shows it.
pub(crate) fn format_key(bits: u128) -> HeaderValue {
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    let s = format!(
        "\"{}-{}-{}-{}-{}\"",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    HeaderValue::from_str(&s).expect("hex digits, dashes and quotes are a valid header value")
}

impl<B> Replay<Request<B>> for HttpReplay
where
    B: Body,
{
    type Request = Request<ReplayBody<B>>;
    type Saved = HttpSaved<B>;

    #[inline]
    fn prepare(
        &self,
        req: Request<B>,
        retry: bool,
        key: &dyn Fn() -> u128,
        saved: &mut Option<HttpSaved<B>>,
    ) -> Self::Request {
        let (mut parts, body) = req.into_parts();
        if !retry {
            return Request::from_parts(parts, ReplayBody::once(body));
        }
        if !is_idempotent(&parts.method)
            && !parts.headers.contains_key(IDEMPOTENCY_KEY)
            && parts.extensions.get::<Idempotent>().is_none()
        {
            if self.add_key {
                parts.headers.insert(IDEMPOTENCY_KEY, format_key(key()));
            } else if self.check_method {
                return Request::from_parts(parts, ReplayBody::once(body));
            }
        }
        if body.size_hint().lower() > self.body_limit as u64 {
            return Request::from_parts(parts, ReplayBody::once(body));
        }
        let marked = parts.extensions.get::<Idempotent>().is_some();
        let keyed = parts.headers.contains_key(IDEMPOTENCY_KEY);
        // Past the method check, an HTTP request is safe to repeat after an error; a gRPC
        // call only if keyed or marked. After a 5xx that may follow a run of the handler, an
        // HTTP request whose key alone makes it safe is not: a server's `IdempotencyLayer`
        // releases the key of a 5xx answer, so a retry would run the handler again.
        let (errors_safe, responses_safe) = if self.check_method {
            (true, marked || is_idempotent(&parts.method))
        } else {
            (keyed || marked, keyed || marked)
        };
        let (body, kept) = ReplayBody::record(body, self.body_limit);
        *saved = Some(HttpSaved {
            head: Head::copy_of(&parts),
            body: kept,
            errors_safe,
            responses_safe,
        });
        Request::from_parts(parts, body)
    }

    fn can_replay(&self, saved: &HttpSaved<B>) -> bool {
        saved.body.can_replay()
    }

    fn may_retry_error(&self, saved: &HttpSaved<B>) -> bool {
        saved.errors_safe
    }

    fn may_retry_response(&self, saved: &HttpSaved<B>) -> bool {
        saved.responses_safe
    }

    fn deadline(&self, saved: &HttpSaved<B>) -> Option<Duration> {
        if self.check_method {
            return None;
        }
        saved
            .head
            .header(&GRPC_TIMEOUT)
            .and_then(parse_grpc_timeout)
    }

    fn set_time_left(&self, req: &mut Request<ReplayBody<B>>, left: Duration) {
        req.headers_mut()
            .insert(GRPC_TIMEOUT, format_grpc_timeout(left));
    }

    fn replay(
        &self,
        saved: &mut Option<HttpSaved<B>>,
        last: bool,
    ) -> Option<Request<ReplayBody<B>>> {
        if last {
            let s = saved.take()?;
            let body = s.body.replay();
            Some(s.head.into_request(body))
        } else {
            let s = saved.as_ref()?;
            Some(s.head.clone().into_request(s.body.replay()))
        }
    }
}

impl<B> Hints<Response<B>> for HttpReplay {
    fn hint(&self, res: &Response<B>) -> Hint {
        let headers = res.headers();
        // Every hint present counts, each field of a header sent more than once too, and the
        // latest wins: never retry before any of them.
        let pushback = headers
            .get_all(GRPC_PUSHBACK)
            .iter()
            .map(parse_pushback)
            .fold(Hint::None, later);
        if pushback == Hint::Stop {
            return Hint::Stop;
        }
        let mut values = headers.get_all(RETRY_AFTER).iter().peekable();
        if values.peek().is_none() {
            return pushback;
        }
        let now = SystemTime::now();
        values
            .map(|v| parse_retry_after(v, now))
            .fold(pushback, later)
    }

    fn may_have_run(&self, res: &Response<B>) -> bool {
        let status = res.status().as_u16();
        if !(500..600).contains(&status) || res.headers().contains_key(REQUEST_REFUSED) {
            return false;
        }
        // HTTP: a 5xx may be the handler's own answer after its effect. gRPC: a server always
        // sends `grpc-status`, and its `UNAVAILABLE` says the call was not processed; without
        // one, a proxy answered: its 503 says no upstream was reached, its 502 or 504 (or
        // another 5xx) that the call may have reached one.
        self.check_method || (!res.headers().contains_key(GRPC_STATUS) && status != 503)
    }

    fn describe(&self, res: &Response<B>) -> Option<String> {
        Some(
            match crate::classify::GrpcCode::from_headers(res.headers()) {
                Some(code) => format!("status {}, grpc-status {code}", res.status().as_u16()),
                None => format!("status {}", res.status().as_u16()),
            },
        )
    }
}

/// The later of two hints: `Stop` over any wait, the longer wait over the shorter, any wait
/// over none.
pub(crate) fn later(a: Hint, b: Hint) -> Hint {
    match (a, b) {
        (Hint::Stop, _) | (_, Hint::Stop) => Hint::Stop,
        (Hint::After(x), Hint::After(y)) => Hint::After(x.max(y)),
        (Hint::After(x), Hint::None) | (Hint::None, Hint::After(x)) => Hint::After(x),
        (Hint::None, Hint::None) => Hint::None,
    }
}

/// `grpc-timeout` (gRPC over HTTP/2): 1 to 8 ASCII digits and a unit, `H`, `M`, `S`, `m`,
/// `u` or `n`. `None` for anything else.
pub(crate) fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (&unit, digits) = b.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`, rounded down, in the finest unit whose value fits in 8
/// digits (at most 99999999 hours).
pub(crate) fn format_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let (n, unit) = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
    ]
    .into_iter()
    .map(|(per, unit)| (nanos / per, unit))
    .find(|(n, _)| *n <= MAX)
    .unwrap_or(((nanos / 3_600_000_000_000).min(MAX), 'H'));
    HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter are a header value")
}

/// `grpc-retry-pushback-ms`: a non-negative integer of milliseconds; anything else (negative,
/// malformed) means "do not retry", as the gRPC retry design says.
pub(crate) fn parse_pushback(v: &HeaderValue) -> Hint {
    match std::str::from_utf8(v.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    {
        Some(ms) if ms >= 0 => Hint::After(Duration::from_millis(ms.unsigned_abs())),
        _ => Hint::Stop,
    }
}

/// `Retry-After`: delta-seconds or an HTTP-date in any of its three forms (RFC 9110
/// §10.2.3). A malformed value is ignored (the backoff decides); a date in the past means
/// "now".
pub(crate) fn parse_retry_after(v: &HeaderValue, now: SystemTime) -> Hint {
    let Ok(s) = std::str::from_utf8(v.as_bytes()) else {
        return Hint::None;
    };
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u64>() {
            Ok(secs) => Hint::After(Duration::from_secs(secs)),
            Err(_) => Hint::After(Duration::MAX),
        };
    }
    match parse_http_date(s) {
        Some(at) => Hint::After(at.duration_since(now).unwrap_or(Duration::ZERO)),
        None => Hint::None,
    }
}

/// Parses an HTTP-date in any of the three forms a recipient must accept (RFC 9110 §5.6.7):
/// IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, the obsolete RFC 850 form
/// `Sunday, 06-Nov-94 08:49:37 GMT` (a two-digit year from 70 is 19xx, below 70 is 20xx) and
/// asctime `Sun Nov  6 08:49:37 1994`.
pub(crate) fn parse_http_date(s: &str) -> Option<SystemTime> {
    // Every valid form is ASCII; slicing below relies on it (a multi-byte character could
    // otherwise put a byte index inside a character).
    if !s.is_ascii() {
        return None;
    }
    let digits = |d: &str| -> Option<u64> {
        if !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()) {
            d.parse().ok()
        } else {
            None
        }
    };
    let clock = |t: &str| -> Option<(u64, u64, u64)> {
        let b = t.as_bytes();
        if b.len() != 8 || b[2] != b':' || b[5] != b':' {
            return None;
        }
        Some((digits(&t[0..2])?, digits(&t[3..5])?, digits(&t[6..8])?))
    };
    let mut parts = [""; 7];
    let mut n = 0;
    for p in s.split(' ') {
        *parts.get_mut(n)? = p;
        n += 1;
    }
    let (day, month, year, time) = match &parts[..n] {
        // IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`
        [wd, d, mo, y, t, "GMT"]
            if wd.len() == 4 && wd.ends_with(',') && d.len() == 2 && y.len() == 4 =>
        {
            (digits(d)?, *mo, digits(y)?, clock(t)?)
        }
        // RFC 850: `Sunday, 06-Nov-94 08:49:37 GMT`
        [wd, dmy, t, "GMT"] if wd.ends_with(',') && dmy.len() == 9 => {
            let (d, rest) = dmy.split_at(2);
            let (mo, yy) = rest.strip_prefix('-')?.split_once('-')?;
            if yy.len() != 2 {
                return None;
            }
            let yy = digits(yy)?;
            let year = if yy >= 70 { 1900 + yy } else { 2000 + yy };
            (digits(d)?, mo, year, clock(t)?)
        }
        // asctime: `Sun Nov  6 08:49:37 1994` (a one-digit day is padded with a space)
        [_, mo, "", d, t, y] if d.len() == 1 && y.len() == 4 => {
            (digits(d)?, *mo, digits(y)?, clock(t)?)
        }
        [_, mo, d, t, y] if d.len() == 2 && y.len() == 4 => {
            (digits(d)?, *mo, digits(y)?, clock(t)?)
        }
        _ => return None,
    };
    let month = match month {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let (h, m, sec) = time;
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), for years from 1970.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Classifies with a predicate on errors: an error for which it returns `true` is retryable,
/// any other error a failure; every response is a success. See [`RetryPolicy::errors_where`].
pub struct ErrorPredicate<F> {
    f: Arc<F>,
}

impl<F> Clone for ErrorPredicate<F> {
    fn clone(&self) -> Self {
        ErrorPredicate { f: self.f.clone() }
    }
}

impl<F> fmt::Debug for ErrorPredicate<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorPredicate").finish_non_exhaustive()
    }
}

impl<Res, F> Classify<Res> for ErrorPredicate<F>
where
    F: Fn(&BoxError) -> bool + Send + Sync + 'static,
{
    fn classify_response(&self, _res: &Res) -> Outcome {
        Outcome::Success
    }

    fn classify_error(&self, err: &BoxError) -> Outcome {
        if (self.f)(err) {
            Outcome::Retryable
        } else {
            Outcome::Failure
        }
    }
}

/// The longest server hint a policy waits out by default ([`RetryPolicy::max_hint`]): 4 s,
/// above the `Retry-After` of 1 to 3 s with which this crate's servers shed (so that the
/// default client and server compose), and below the default circuit breaker's open time of
/// 5 s (±10%), which a default client returns at once rather than sit out.
pub const DEFAULT_MAX_HINT: Duration = Duration::from_secs(4);

#[derive(Clone, Debug)]
pub(crate) enum BudgetChoice {
    Default,
    Given(Budget),
    Off,
}

/// What a [`RetryLayer`](super::RetryLayer) retries and how: a classifier `C` decides what is
/// retryable, a replay strategy `R` ([`CloneRequest`] or [`HttpReplay`]) resends the request.
///
/// | constructor | retries | request |
/// |---|---|---|
/// | [`RetryPolicy::errors`] | every error except a rejection retrying cannot help | any `Clone` request |
/// | [`RetryPolicy::errors_where`] | errors your predicate accepts | any `Clone` request |
/// | [`RetryPolicy::http`] | errors, 502, 503, 504, 429, the in-flight 409 | `http::Request<B>`, any body |
/// | [`RetryPolicy::grpc`] | `UNAVAILABLE`, `RESOURCE_EXHAUSTED`; errors only for calls marked idempotent | `http::Request<B>`, any body |
///
/// Defaults: 3 attempts, [`Backoff::default`] (25 ms doubling to 1 s, full jitter), server
/// hints waited out up to 4 s ([`max_hint`](RetryPolicy::max_hint)), no overall deadline, the default [`Budget`] (20% of requests plus 10 per second over 10 s),
/// [`Clock::new`].
#[derive(Clone, Debug)]
pub struct RetryPolicy<C = ErrorsOnly, R = CloneRequest> {
    pub(crate) classify: C,
    pub(crate) replay: R,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_hint: Duration,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: BudgetChoice,
    pub(crate) clock: Option<Clock>,
    pub(crate) seed: Option<u64>,
}

impl RetryPolicy {
    /// Retries errors of a generic service (with [`ErrorsOnly`]: every error, except a
    /// [`Rejection`](crate::Rejection) that retrying cannot help); requests are cloned.
    pub fn errors() -> RetryPolicy<ErrorsOnly, CloneRequest> {
        RetryPolicy::with(ErrorsOnly, CloneRequest)
    }

    /// Retries the errors for which `predicate` returns `true`; requests are cloned.
    pub fn errors_where<F>(predicate: F) -> RetryPolicy<ErrorPredicate<F>, CloneRequest>
    where
        F: Fn(&BoxError) -> bool + Send + Sync + 'static,
    {
        RetryPolicy::with(
            ErrorPredicate {
                f: Arc::new(predicate),
            },
            CloneRequest,
        )
    }

    /// Retries HTTP requests: errors (connection errors), 502, 503, 504, 429 and the 409 of
    /// an `IdempotencyLayer` whose key is still in flight by default ([`HttpStatus`]; change
    /// with [`RetryPolicy::classify`]), only when the request is safe to repeat, honouring
    /// `Retry-After`. A POST or PATCH that is safe only through its `Idempotency-Key` is not
    /// sent again after a 5xx that may be its handler's (one not marked
    /// [`REQUEST_REFUSED`](crate::rejection::REQUEST_REFUSED)); see the
    /// [module docs](super#safety).
    pub fn http() -> RetryPolicy<HttpStatus, HttpReplay> {
        RetryPolicy::with(HttpStatus::default(), HttpReplay::http())
    }

    /// Retries gRPC calls: `UNAVAILABLE` and `RESOURCE_EXHAUSTED` by default ([`GrpcStatus`]),
    /// which say the call was not processed, honouring `grpc-retry-pushback-ms`; a response
    /// without `grpc-status` (a proxy's) is read by its HTTP status as gRPC maps it, so a
    /// 429, 502, 503 or 504 is `UNAVAILABLE`; an `ABORTED` marked
    /// [`IDEMPOTENCY_KEY_IN_FLIGHT`](crate::rejection::IDEMPOTENCY_KEY_IN_FLIGHT) is retried
    /// after its pushback. An error (a
    /// timeout, a transport error after sending) and a proxy's 502 or 504 (a bad gateway or a
    /// gateway timeout, which say nothing of whether the upstream ran the call), which may
    /// follow a call the server ran, are retried only for a call with an `Idempotency-Key`
    /// metadata header or marked [`Idempotent`] (a rejection from a layer below, which never
    /// sent it, always; a proxy's 503, which reached no upstream, and a server's
    /// `UNAVAILABLE`, always). gRPC calls are all POST; the method is not checked (see
    /// [`HttpReplay`]). A call's `grpc-timeout` is its deadline across attempts: see the
    /// [module docs](super#grpc-deadlines).
    pub fn grpc() -> RetryPolicy<GrpcStatus, HttpReplay> {
        RetryPolicy::with(
            GrpcStatus::default(),
            HttpReplay {
                check_method: false,
                ..HttpReplay::http()
            },
        )
    }
}

impl<C, R> RetryPolicy<C, R> {
    /// A policy with any classifier and replay strategy.
    pub fn with(classify: C, replay: R) -> Self {
        RetryPolicy {
            classify,
            replay,
            max_attempts: 3,
            backoff: Backoff::default(),
            max_hint: DEFAULT_MAX_HINT,
            deadline: None,
            budget: BudgetChoice::Default,
            clock: None,
            seed: None,
        }
    }

    /// Replaces the classifier (for example [`HttpStatus::retryable_statuses`]).
    pub fn classify<C2>(self, classify: C2) -> RetryPolicy<C2, R> {
        RetryPolicy {
            classify,
            replay: self.replay,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            max_hint: self.max_hint,
            deadline: self.deadline,
            budget: self.budget,
            clock: self.clock,
            seed: self.seed,
        }
    }

    /// Attempts in all, the first included (3 by default; 0 is refused).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The backoff between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest server hint waited out ([`DEFAULT_MAX_HINT`], 4 s, by default): a
    /// `Retry-After`, a `grpc-retry-pushback-ms` or a rejection's `retry_after` up to this
    /// long is waited out (plus a jitter); a longer one stops the retries and the answer is
    /// returned at once, hint included, for the caller to act on. Separate from the
    /// backoff's maximum delay ([`Backoff::max`]), which bounds the layer's own waits: a
    /// server that sheds with `Retry-After: 3` is retried by a client whose backoff tops out
    /// at a second. `Duration::ZERO` waits out no hint but `0`.
    pub fn max_hint(mut self, max_hint: Duration) -> Self {
        self.max_hint = max_hint;
        self
    }

    /// An overall deadline across attempts, from the call: no backoff and no new attempt
    /// starts past it (for [`RetryPolicy::grpc`], a call's `grpc-timeout` is one too, and the
    /// stricter holds). A retry still waiting for the inner service's readiness when it passes
    /// is not made: the last response or error is returned. An attempt in flight is not cut
    /// (put a timeout below this layer for that).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Uses `budget` (which may be shared with other layers) instead of a budget of the
    /// layer's own. A budget built without a clock takes the policy's [`clock`](Self::clock)
    /// (in whichever order the two are set); one that already runs on a clock gives it to the
    /// layer, and a policy clock that differs is refused when the layer is built.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = BudgetChoice::Given(budget);
        self
    }

    /// No retry budget: only `max_attempts` bounds retries. Not advised for clients of a
    /// shared dependency.
    pub fn no_budget(mut self) -> Self {
        self.budget = BudgetChoice::Off;
        self
    }

    /// The time source of the deadline and of the budget ([`Clock::new`] by default): the
    /// layer's own budget, or a given one that has no clock yet. Tests under tokio's paused
    /// time use `.clock(Clock::tokio())`.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Seeds the generator of the backoff's and the hints' jitter, for reproducible tests.
    ///
    /// The keys that [`add_idempotency_key`](RetryPolicy::add_idempotency_key) generates are
    /// drawn from the same generator but always mixed with random bits of the process's own:
    /// replicas built with one seed (from one configuration file) never send the same key, so
    /// a server never replays one replica's response to another's request. Keys are not
    /// reproducible from the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

impl<C> RetryPolicy<C, HttpReplay> {
    /// Gives requests that are not idempotent (POST, PATCH) and carry no `Idempotency-Key` a
    /// fresh key (a random UUID, as a structured-field string: `"…"`), the same on every
    /// attempt, so they may be retried when that is safe: after a connection error or a
    /// timeout, and after an answer that says the request did not run (a 429, the in-flight
    /// 409, a 503 marked [`REQUEST_REFUSED`](crate::rejection::REQUEST_REFUSED) by a server's
    /// `RejectionLayer`), but not after another 5xx, which may be the handler's after its
    /// effect. A server with `IdempotencyLayer` then runs the request to a stored answer
    /// once however many attempts reach it, and replays that answer to the others; it keeps
    /// no 5xx (so that the client may retry one), so a handler that had its effect and
    /// answered a 5xx can still run again on a retry that followed a timeout. See the
    /// [module docs](super#safety).
    pub fn add_idempotency_key(mut self) -> Self {
        self.replay.add_key = true;
        self
    }

    /// The largest request body kept for replay (64 KiB by default). A larger body is sent
    /// once and not retried.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.replay.body_limit = bytes;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let h = |s: &str| parse_retry_after(&HeaderValue::from_str(s).unwrap(), now);
        assert_eq!(h("120"), Hint::After(Duration::from_secs(120)));
        assert_eq!(h(" 0 "), Hint::After(Duration::ZERO));
        assert_eq!(
            h("Sun, 06 Nov 1994 08:50:07 GMT"),
            Hint::After(Duration::from_secs(30))
        );
        assert_eq!(
            h("Sun, 06 Nov 1994 08:00:00 GMT"),
            Hint::After(Duration::ZERO)
        );
        assert_eq!(h("99999999999999999999999"), Hint::After(Duration::MAX));
        assert_eq!(
            h("Sunday, 06-Nov-94 08:50:07 GMT"),
            Hint::After(Duration::from_secs(30)),
            "RFC 850"
        );
        assert_eq!(
            h("Sun Nov  6 08:50:37 1994"),
            Hint::After(Duration::from_secs(60)),
            "asctime"
        );
        assert_eq!(
            h("Sun Nov 16 08:49:37 1994"),
            Hint::After(Duration::from_secs(10 * 86_400)),
            "asctime, two-digit day"
        );
        for bad in [
            "",
            "-1",
            "soon",
            "1.5",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra words",
        ] {
            assert_eq!(h(bad), Hint::None, "{bad:?}");
        }
    }

    #[test]
    fn http_date_known_values() {
        let d = parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT").unwrap();
        assert_eq!(d, UNIX_EPOCH);
        let d = parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT").unwrap();
        assert_eq!(d.duration_since(UNIX_EPOCH).unwrap().as_secs(), 951_825_600);
    }

    #[test]
    fn pushback_forms() {
        let p = |s: &str| parse_pushback(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("250"), Hint::After(Duration::from_millis(250)));
        assert_eq!(p("0"), Hint::After(Duration::ZERO));
        assert_eq!(p("-1"), Hint::Stop);
        assert_eq!(p("abc"), Hint::Stop);
        assert_eq!(p(""), Hint::Stop);
    }

    #[test]
    fn the_latest_hint_wins() {
        let res = |headers: &[(&str, &str)]| {
            let mut b = Response::builder().status(503);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            HttpReplay::http().hint(&b.body(()).unwrap())
        };
        let s = Duration::from_secs;
        assert_eq!(
            res(&[("retry-after", "30"), (GRPC_PUSHBACK, "0")]),
            Hint::After(s(30))
        );
        assert_eq!(
            res(&[("retry-after", "1"), (GRPC_PUSHBACK, "2000")]),
            Hint::After(s(2))
        );
        assert_eq!(
            res(&[("retry-after", "1"), (GRPC_PUSHBACK, "-1")]),
            Hint::Stop
        );
        assert_eq!(
            res(&[("retry-after", "soon"), (GRPC_PUSHBACK, "5")]),
            Hint::After(Duration::from_millis(5))
        );
        assert_eq!(res(&[("retry-after", "3")]), Hint::After(s(3)));
        assert_eq!(res(&[]), Hint::None);
    }

    #[test]
    fn grpc_timeout_forms() {
        let p = |s: &str| parse_grpc_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("1000000u"), Some(Duration::from_secs(1)));
        assert_eq!(p("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(p("3M"), Some(Duration::from_secs(180)));
        assert_eq!(p("99999999S"), Some(Duration::from_secs(99_999_999)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("0n"), Some(Duration::ZERO));
        for bad in [
            "",
            "m",
            "123456789m",
            "10x",
            "-5S",
            "1.5S",
            " 5S",
            "5 S",
            "5s",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        let f = |d: Duration| format_grpc_timeout(d).to_str().unwrap().to_owned();
        assert_eq!(f(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(f(Duration::from_nanos(100_000_000)), "100000u");
        assert_eq!(f(Duration::from_nanos(1_900_000_999)), "1900000u");
        assert_eq!(f(Duration::from_secs(100_000)), "100000S");
        assert_eq!(f(Duration::from_secs(99_999_999 * 60)), "99999999M");
        assert_eq!(f(Duration::from_secs(100_000_000 * 60)), "1666666H");
        assert_eq!(f(Duration::MAX), "99999999H");
        // Written values read back as at most the time given, in 8 digits or fewer.
        for nanos in [0u64, 1, 999, 123_456_789, 98_765_432_101, u64::MAX] {
            let d = Duration::from_nanos(nanos);
            let v = format_grpc_timeout(d);
            assert!(v.len() <= 9, "{v:?}");
            assert!(parse_grpc_timeout(&v).unwrap() <= d, "{v:?}");
        }
    }

    #[test]
    fn answers_that_may_follow_a_run() {
        let res = |status: u16, headers: &[(&str, &str)]| {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        let http = HttpReplay::http();
        let grpc = HttpReplay {
            check_method: false,
            ..HttpReplay::http()
        };
        for s in [500, 502, 503, 504] {
            assert!(http.may_have_run(&res(s, &[])), "{s}");
            assert!(!http.may_have_run(&res(s, &[("request-refused", "overloaded")])));
        }
        assert!(!http.may_have_run(&res(429, &[])));
        assert!(!http.may_have_run(&res(409, &[("idempotency-key-in-flight", "true")])));
        assert!(grpc.may_have_run(&res(502, &[])));
        assert!(grpc.may_have_run(&res(504, &[])));
        assert!(!grpc.may_have_run(&res(503, &[])));
        assert!(!grpc.may_have_run(&res(429, &[])));
        assert!(!grpc.may_have_run(&res(504, &[("grpc-status", "14")])));
        assert!(!grpc.may_have_run(&res(200, &[("grpc-status", "14")])));
    }

    #[test]
    fn keys_are_uuid_v4() {
        let k = format_key(u128::MAX);
        let s = k.to_str().unwrap();
        assert_eq!(s.len(), 38);
        assert!(s.starts_with('"') && s.ends_with('"'));
        let s = &s[1..37];
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(s.matches('-').count(), 4);
        assert_ne!(format_key(1), format_key(2));
    }

    #[test]
    fn methods() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ] {
            assert!(is_idempotent(&m));
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m));
        }
    }

    proptest! {
        #[test]
        fn http_date_round_trips(secs in 0u64..8_000_000_000) {
            // Format with the same calendar the other way, then parse back.
            let days = secs / 86_400;
            let rem = secs % 86_400;
            let z = days + 719_468;
            let era = z / 146_097;
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = doy - (153 * mp + 2) / 5 + 1;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            let y = yoe + era * 400 + u64::from(m <= 2);
            let months = ["Jan","Feb","Mar","Apr","May","Jun","Jul","Aug","Sep","Oct","Nov","Dec"];
            let s = format!("Mon, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
                d, months[(m - 1) as usize], y, rem / 3600, rem / 60 % 60, rem % 60);
            let want = UNIX_EPOCH + Duration::from_secs(secs);
            prop_assert_eq!(parse_http_date(&s).unwrap(), want);
            let asctime = format!("Mon {} {:>2} {:02}:{:02}:{:02} {:04}",
                months[(m - 1) as usize], d, rem / 3600, rem / 60 % 60, rem % 60, y);
            prop_assert_eq!(parse_http_date(&asctime).unwrap(), want, "{}", asctime);
            if y < 2070 {
                let rfc850 = format!("Monday, {:02}-{}-{:02} {:02}:{:02}:{:02} GMT",
                    d, months[(m - 1) as usize], y % 100, rem / 3600, rem / 60 % 60, rem % 60);
                prop_assert_eq!(parse_http_date(&rfc850).unwrap(), want, "{}", rfc850);
            }
        }

        /// Date-shaped values with arbitrary characters in every field (multi-byte ones
        /// included), which a plain random string almost never produces.
        #[test]
        fn date_shaped_values_never_panic(
            parts in proptest::collection::vec("[a-zA-Z0-9:é\u{80}-\u{10ffff}-]{0,11}", 4..7),
        ) {
            let s = parts.join(" ");
            let _ = parse_http_date(&s);
            let rfc850 = format!("x, {}", parts.join(" "));
            let _ = parse_http_date(&rfc850);
            if let Ok(v) = HeaderValue::from_bytes(s.as_bytes()) {
                let _ = parse_retry_after(&v, SystemTime::now());
            }
        }

        #[test]
        fn rfc850_with_a_multibyte_day_is_refused(_x in 0u8..1) {
            prop_assert_eq!(parse_http_date("x, aé-Nov-9 08:49:37 GMT"), None);
            let v = HeaderValue::from_bytes("x, aé-Nov-9 08:49:37 GMT".as_bytes()).unwrap();
            prop_assert_eq!(parse_retry_after(&v, SystemTime::now()), Hint::None);
        }

        #[test]
        fn pushback_never_panics(s in "\\PC*") {
            if let Ok(v) = HeaderValue::from_str(&s) {
                let _ = parse_pushback(&v);
                let _ = parse_retry_after(&v, SystemTime::now());
            }
        }
    }

    proptest! {
        #[test]
        fn hints_of_arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..48),
            now in 0u64..(1 << 40),
        ) {
            let Ok(v) = HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            let now = UNIX_EPOCH + Duration::from_secs(now);
            let _ = parse_retry_after(&v, now);
            // A pushback is a wait only for a non-negative integer; anything else stops.
            let ms = std::str::from_utf8(&bytes).ok().and_then(|s| s.trim().parse::<i64>().ok());
            match (parse_pushback(&v), ms) {
                (Hint::After(d), Some(ms)) => prop_assert_eq!(d, Duration::from_millis(ms.unsigned_abs())),
                (Hint::Stop, None) => {}
                (Hint::Stop, Some(ms)) => prop_assert!(ms < 0),
                (hint, ms) => prop_assert!(false, "{:?} for {:?}", hint, ms),
            }
        }
    }
}
