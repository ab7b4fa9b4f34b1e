//! [`RejectionLayer`]: turns a [`Rejection`] into the HTTP response or gRPC status it stands for.
//!
//! Every layer of this crate that refuses a request returns a [`Rejection`] as its error. Put
//! `RejectionLayer` outermost and the stack's error type becomes [`Infallible`], so an Axum
//! `Router` or a tonic server accepts it with no `HandleErrorLayer`:
//!
//! | kind | HTTP | gRPC |
//! |---|---|---|
//! | rate limited | 429, `Retry-After`, `RateLimit`, `RateLimit-Policy` | `RESOURCE_EXHAUSTED`, `grpc-retry-pushback-ms` |
//! | overloaded | 503, `Retry-After` | `UNAVAILABLE` |
//! | circuit open | 503, `Retry-After` | `UNAVAILABLE` |
//! | idempotency key in flight | 409, `Retry-After`, `Idempotency-Key-In-Flight: true` | `ABORTED`, `grpc-retry-pushback-ms`, `idempotency-key-in-flight: true` |
//! | idempotency key reused with another payload | 422 | `FAILED_PRECONDITION` |
//! | idempotency key missing or malformed | 400 | `INVALID_ARGUMENT` |
//! | body too large | 413 | `RESOURCE_EXHAUSTED` |
//! | shared store down (fail closed) | 503 | `UNAVAILABLE` |
//! | idempotency store full | 503, `Retry-After` | `UNAVAILABLE`, `grpc-retry-pushback-ms` |
//!
//! HTTP bodies are `application/problem+json` (RFC 9457) with `type`, `title`, `status`,
//! `detail` and, where there is a wait, `retry_after` (seconds). An HTTP answer made of a
//! rejection for a request that a layer of this crate below refused (this layer stamps the
//! request; the refusing layer marks it), or that the inner service's `poll_ready` returned,
//! carries [`Request-Refused: <kind>`](crate::rejection::REQUEST_REFUSED):
//! the request did not reach the service, which a client's retry layer reads. A rejection
//! the service returns as its own error (one its own client got, forwarded after it may have
//! had its effect) gets its status without the mark; see the idempotency module's "Whose
//! refusal" for how the two are told apart. Only requests whose method is not idempotent (a
//! POST, a PATCH) are stamped for this: one with an idempotent method (GET, HEAD, OPTIONS,
//! TRACE, PUT, DELETE) may be sent again whatever the answer says, and any rejection that is
//! the error itself marks its answer. `Retry-After` is in whole
//! seconds, rounded up, and never 0 when there is a wait.
//!
//! # Errors that are not rejections
//!
//! An error from the inner service that is not a [`Rejection`] (anywhere in its `source()`
//! chain) becomes a **500** `application/problem+json` response (gRPC: `INTERNAL`) whose
//! detail does not reveal the error's text to the client, and a `tracing` event at `ERROR`
//! level with the error's text for the operator. If you want to handle such errors yourself,
//! put your own error handling inside `RejectionLayer`.
//!
//! # Errors from `poll_ready`
//!
//! The service's error type is [`Infallible`], so an error that the inner service returns
//! from `poll_ready` (a `Buffer` whose worker is gone, say) cannot be passed up: it is
//! answered, as a response, to the next request, and the inner service is polled again
//! afterwards. A service that stays failed keeps answering 500s (or its rejection); put
//! health checks or a breaker where such a failure must close connections.
//!
//! # Where to place this layer
//!
//! Outermost, above every layer that can reject:
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//! use tower_bulwark::{Rejection, RejectionLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RejectionLayer::http())
//!     .service_fn(|_req: Request<()>| async {
//!         // Stands for any layer below that refuses the request.
//!         Err::<Response<Full<Bytes>>, BoxError>(Rejection::overloaded(None).into())
//!     });
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::rejection::{Rejection, RejectionKind, IDEMPOTENCY_KEY_IN_FLIGHT, REQUEST_REFUSED};
use crate::util::stamp::Marks;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Http,
    #[cfg(feature = "grpc")]
    Grpc,
}

/// Turns [`Rejection`]s into responses; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct RejectionLayer {
    mode: Mode,
}

impl RejectionLayer {
    /// Rejections become HTTP responses with `application/problem+json` bodies.
    pub fn http() -> Self {
        RejectionLayer { mode: Mode::Http }
    }

    /// Rejections become trailers-only gRPC responses: HTTP 200 with `grpc-status`,
    /// `grpc-message` and, where there is a wait, `grpc-retry-pushback-ms`.
    #[cfg(feature = "grpc")]
    #[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
    pub fn grpc() -> Self {
        RejectionLayer { mode: Mode::Grpc }
    }
}

impl<S> Layer<S> for RejectionLayer {
    type Service = RejectionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RejectionService {
            inner,
            mode: self.mode,
            ready_error: None,
        }
    }
}

/// The service made by [`RejectionLayer`].
pub struct RejectionService<S> {
    inner: S,
    mode: Mode,
    // An error returned by the inner service's `poll_ready`, answered by the next `call`.
    ready_error: Option<BoxError>,
}

impl<S: Clone> Clone for RejectionService<S> {
    fn clone(&self) -> Self {
        RejectionService {
            inner: self.inner.clone(),
            mode: self.mode,
            ready_error: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RejectionService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectionService")
            .field("inner", &self.inner)
            .field("mode", &self.mode)
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RejectionService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<RejectionBody<ResB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready_error.is_some() {
            return Poll::Ready(Ok(()));
        }
        match ready!(self.inner.poll_ready(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                // The error is answered as a response by the next call.
                self.ready_error = Some(e.into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if let Some(err) = self.ready_error.take() {
            // Refused by readiness, before any call: this request never reached the service.
            return ResponseFuture {
                state: State::Failed { err: Some(err) },
                mode: self.mode,
                marks: None,
            };
        }
        // A request that is not idempotent (a POST, a PATCH, every gRPC call) is stamped
        // (`util::stamp`): a layer of this crate below that refuses it marks it so; a
        // rejection the service returns for another request does not, and its answer does
        // not say "refused" (HTTP: no `Request-Refused`; gRPC: `UNKNOWN`, not the refusal's
        // code), on which a client would send the request again. An idempotent request may
        // be sent again whatever the answer says: it pays for no stamp.
        let mut req = req;
        let marks = (!crate::retry::is_idempotent(req.method()))
            .then(|| crate::util::stamp::marks_of(req.extensions_mut()));
        ResponseFuture {
            state: State::Inner {
                fut: self.inner.call(req),
            },
            mode: self.mode,
            marks,
        }
    }
}

pin_project! {
    /// Response future of [`RejectionService`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        mode: Mode,
        // The request's marks; `None` for an error of readiness (no call was made) and for
        // a request that is not stamped (idempotent, or gRPC).
        marks: Option<Arc<Marks>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F },
        Failed { err: Option<BoxError> },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RejectionBody<ResB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let err = match this.state.project() {
            StateProj::Inner { fut } => match ready!(fut.poll(cx)) {
                Ok(mut res) => {
                    // The mark says a layer of this crate answered for a refusal of this
                    // request; an answer the service made (a handler forwarding an upstream's
                    // headers, whatever its status) must not carry it, or a client would take
                    // a request that ran for one that did not. (An answer a `RejectionLayer`
                    // below made for a refusal of this request keeps it: the request is
                    // marked refused. An idempotent request carries no stamp: an answer to it
                    // is never marked here, which costs its client nothing, as it may send it
                    // again whatever the answer says.)
                    let refused = this.marks.as_deref().is_some_and(Marks::refused);
                    if !refused {
                        res.headers_mut().remove(REQUEST_REFUSED);
                    }
                    return Poll::Ready(Ok(res.map(RejectionBody::inner)));
                }
                Err(e) => e.into(),
            },
            StateProj::Failed { err } => err.take().expect("polled after completion"),
        };
        Poll::Ready(Ok(error_response(*this.mode, err, this.marks.as_deref())))
    }
}

fn error_response<B>(
    mode: Mode,
    err: BoxError,
    marks: Option<&Marks>,
) -> Response<RejectionBody<B>> {
    match Rejection::find(&*err) {
        Some(rejection) => match mode {
            // Marked as a refusal only when the rejection is the error itself and a refusing
            // layer below marked the request refused (or the inner service's readiness
            // failed): one wrapped in another error, or for a request not so marked, is the
            // service's (a handler passing on what its own client was refused, after it may
            // have had its effect), answered with its status but unmarked.
            Mode::Http => http_response(
                rejection,
                err.is::<Rejection>() && marks.is_none_or(Marks::refused),
            ),
            // A gRPC answer has no mark: its code says it. A rejection that is not this
            // request's refusal is answered `UNKNOWN` (with its message), never with the
            // refusal's `UNAVAILABLE` or `RESOURCE_EXHAUSTED`, which a client takes for "not
            // processed" and sends again.
            #[cfg(feature = "grpc")]
            Mode::Grpc if err.is::<Rejection>() && marks.is_none_or(Marks::refused) => {
                grpc_response(rejection)
            }
            #[cfg(feature = "grpc")]
            Mode::Grpc => grpc_status_response(
                crate::classify::GrpcCode::Unknown,
                &rejection.to_string(),
                None,
            ),
        },
        None => {
            tracing::error!(error = %err, "inner service failed; answering with an internal error");
            match mode {
                Mode::Http => internal_http_response(),
                #[cfg(feature = "grpc")]
                Mode::Grpc => grpc_status_response(
                    crate::classify::GrpcCode::Internal,
                    "internal error",
                    None,
                ),
            }
        }
    }
}

/// `Retry-After` value: whole seconds, rounded up, never 0 when there is a wait.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

fn http_response<B>(rejection: &Rejection, refused: bool) -> Response<RejectionBody<B>> {
    let kind = rejection.kind();
    let status = kind.http_status();
    let mut body = String::with_capacity(192);
    body.push_str("{\"type\":\"tag:tower-bulwark,2026:");
    body.push_str(kind.slug());
    body.push_str("\",\"title\":");
    push_json_str(&mut body, kind.title());
    body.push_str(",\"status\":");
    body.push_str(itoa_u64(u64::from(status.as_u16())).as_str());
    body.push_str(",\"detail\":");
    let detail = rejection.to_string();
    push_json_str(&mut body, &detail);
    let mut headers = HeaderMap::new();
    if let Some(secs) = rejection.retry_after_secs() {
        body.push_str(",\"retry_after\":");
        body.push_str(itoa_u64(secs).as_str());
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    body.push('}');
    if let Some(info) = rejection.rate_limit() {
        info.write_headers(&mut headers);
    }
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if kind == RejectionKind::IdempotencyInFlight {
        headers.insert(IDEMPOTENCY_KEY_IN_FLIGHT, HeaderValue::from_static("true"));
    }
    if refused {
        headers.insert(REQUEST_REFUSED, HeaderValue::from_static(kind.slug()));
    }
    let mut res = Response::new(RejectionBody::full(Bytes::from(body)));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

fn internal_http_response<B>() -> Response<RejectionBody<B>> {
    let body = "{\"type\":\"about:blank\",\"title\":\"Internal Server Error\",\"status\":500,\
                \"detail\":\"the service failed to produce a response\"}";
    let mut res = Response::new(RejectionBody::full(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

#[cfg(feature = "grpc")]
fn grpc_response<B>(rejection: &Rejection) -> Response<RejectionBody<B>> {
    let msg = rejection.to_string();
    let mut res = grpc_status_response(rejection.kind().grpc_code(), &msg, rejection.retry_after());
    if rejection.kind() == RejectionKind::IdempotencyInFlight {
        res.headers_mut()
            .insert(IDEMPOTENCY_KEY_IN_FLIGHT, HeaderValue::from_static("true"));
    }
    res
}

#[cfg(feature = "grpc")]
fn grpc_status_response<B>(
    code: crate::classify::GrpcCode,
    message: &str,
    pushback: Option<Duration>,
) -> Response<RejectionBody<B>> {
    let mut res = Response::new(RejectionBody::full(Bytes::new()));
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code.as_i32()));
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc(message)) {
        h.insert("grpc-message", v);
    }
    if let Some(after) = pushback {
        let ms = after.as_millis() + u128::from(after.subsec_nanos() % 1_000_000 > 0);
        let ms = u64::try_from(ms).unwrap_or(u64::MAX).max(1);
        h.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
    }
    res
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol asks: bytes outside
/// 0x20..=0x7E, and `%`, become `%XX`.
#[cfg(feature = "grpc")]
fn percent_encode_grpc(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn push_json_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn itoa_u64(n: u64) -> String {
    n.to_string()
}

pin_project! {
    /// The body of a response from [`RejectionService`]: the inner service's body, or the
    /// problem+json body of a rejection.
    pub struct RejectionBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> RejectionBody<B> {
    fn inner(body: B) -> Self {
        RejectionBody {
            kind: BodyKind::Inner { body },
        }
    }

    fn full(data: Bytes) -> Self {
        RejectionBody {
            kind: BodyKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> fmt::Debug for RejectionBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BodyKind::Inner { .. } => f.write_str("RejectionBody::Inner"),
            BodyKind::Full { data } => f
                .debug_struct("RejectionBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

impl<B> Body for RejectionBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            BodyKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            BodyKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Inner { body } => body.is_end_stream(),
            BodyKind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Inner { body } => body.size_hint(),
            BodyKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rejection::{RateLimitInfo, RejectionKind};
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceBuilder, ServiceExt};

    /// The answer to `err` returned by a refusing layer below, which drops the request as
    /// refused, as this crate's layers do.
    async fn answer(err: BoxError) -> Response<RejectionBody<Full<Bytes>>> {
        answer_made(err, true).await
    }

    /// The answer to `err`, for a request the service refuses as a layer of this crate does
    /// (`in_call`), or returned as it is, as a handler forwards what its own client was
    /// refused.
    async fn answer_made(err: BoxError, in_call: bool) -> Response<RejectionBody<Full<Bytes>>> {
        let err = std::sync::Mutex::new(Some(err));
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .service_fn(move |_req: Request<()>| {
                let e = err.lock().unwrap().take().unwrap();
                if in_call {
                    // As a refusing layer of this crate drops what it refuses.
                    crate::util::stamp::refuse(_req);
                }
                async move { Err::<Response<Full<Bytes>>, BoxError>(e) }
            });
        // A POST: the request whose answer's mark matters (see `RejectionService::call`).
        let req = Request::post("http://svc/orders").body(()).unwrap();
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn an_idempotent_request_is_marked_refused_without_a_stamp() {
        // A GET may be sent again whatever the answer says: the mark is made as before, and
        // the request carries no stamp (nothing to pay for it).
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .service_fn(|req: Request<()>| async move {
                assert!(req.extensions().is_empty());
                Err::<Response<Full<Bytes>>, BoxError>(
                    Rejection::new(RejectionKind::Overloaded).into(),
                )
            });
        let res = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.headers()[REQUEST_REFUSED], "overloaded");
    }

    #[tokio::test]
    async fn a_rejection_not_made_for_the_request_is_not_marked_refused() {
        for kind in [RejectionKind::CircuitOpen, RejectionKind::RateLimited] {
            let res = answer_made(Rejection::new(kind).into(), false).await;
            // Its status, but not the mark that says the request never reached the service.
            assert_eq!(res.status(), kind.http_status());
            assert!(res.headers().get(REQUEST_REFUSED).is_none(), "{kind:?}");
            // Another request refused (the handler's own client's) is no better.
            let mut other = Request::new(());
            let _other_marks = crate::util::stamp::marks_of(other.extensions_mut());
            crate::util::stamp::refuse(other);
            let res = answer_made(Rejection::new(kind).into(), false).await;
            assert!(res.headers().get(REQUEST_REFUSED).is_none(), "{kind:?}");
            let res = answer_made(Rejection::new(kind).into(), true).await;
            assert_eq!(res.headers()[REQUEST_REFUSED], kind.slug());
        }
    }

    async fn body_json(res: Response<RejectionBody<Full<Bytes>>>) -> serde_json::Value {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn retry_after_rounds_up_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(999)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[tokio::test]
    async fn rate_limited_is_429_with_headers() {
        let info = RateLimitInfo {
            limit: 100,
            remaining: 0,
            reset: Duration::from_millis(30_500),
            window: Duration::from_secs(60),
        };
        let res = answer(Rejection::rate_limited(Duration::from_millis(600), info).into()).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=100;w=60");
        assert_eq!(res.headers()["ratelimit"], "\"default\";r=0;t=31");
        assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
        let v = body_json(res).await;
        assert_eq!(v["status"], 429);
        assert_eq!(v["title"], "rate limit exceeded");
        assert_eq!(v["type"], "tag:tower-bulwark,2026:rate-limited");
        assert_eq!(v["retry_after"], 1);
        assert!(v["detail"].as_str().unwrap().contains("retry after"));
    }

    #[tokio::test]
    async fn every_kind_maps_to_its_status() {
        let kinds = [
            RejectionKind::Overloaded,
            RejectionKind::CircuitOpen,
            RejectionKind::IdempotencyInFlight,
            RejectionKind::IdempotencyKeyReused,
            RejectionKind::IdempotencyKeyMissing,
            RejectionKind::IdempotencyKeyInvalid,
            RejectionKind::IdempotencyResponseNotStored,
            RejectionKind::PayloadTooLarge,
            RejectionKind::StoreUnavailable,
            RejectionKind::IdempotencyStoreFull,
            RejectionKind::RateLimitKeyMissing,
            RejectionKind::ClientAddressUnknown,
            RejectionKind::BadRequestBody,
        ];
        for kind in kinds {
            let res = answer(Rejection::new(kind).into()).await;
            assert_eq!(res.status(), kind.http_status());
            assert!(res.headers().get(RETRY_AFTER).is_none());
            assert_eq!(res.headers()[REQUEST_REFUSED], kind.slug());
            let v = body_json(res).await;
            assert_eq!(v["status"], kind.http_status().as_u16());
        }
        let res = answer(Rejection::circuit_open(Duration::from_millis(2500)).into()).await;
        assert_eq!(res.headers()[RETRY_AFTER], "3");
    }

    #[tokio::test]
    async fn other_errors_are_500_without_leaking() {
        let res = answer("database password is hunter2".into()).await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // Not a refusal: the service may have run.
        assert!(res.headers().get(REQUEST_REFUSED).is_none());
        assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(!text.contains("hunter2"));
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["status"], 500);
    }

    #[derive(Debug)]
    struct Wrapper(Rejection);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[tokio::test]
    async fn wrapped_rejection_is_found() {
        let res = answer(Box::new(Wrapper(Rejection::overloaded(None)))).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn success_passes_through() {
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .service_fn(|_req: Request<()>| async {
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"hello"))))
            });
        let res = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
    }

    #[derive(Clone)]
    struct FailsReady;
    impl Service<Request<()>> for FailsReady {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Err(
                Rejection::overloaded(Some(Duration::from_secs(2))).into()
            ))
        }
        fn call(&mut self, _req: Request<()>) -> Self::Future {
            unreachable!("never ready")
        }
    }

    #[tokio::test]
    async fn poll_ready_error_is_answered() {
        let svc = RejectionLayer::http().layer(FailsReady);
        let res = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[RETRY_AFTER], "2");
    }

    #[cfg(feature = "grpc")]
    #[tokio::test]
    async fn grpc_resource_exhausted_with_pushback() {
        let info = RateLimitInfo {
            limit: 1,
            remaining: 0,
            reset: Duration::from_secs(1),
            window: Duration::from_secs(1),
        };
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::grpc())
            .service_fn(move |_req: Request<()>| async move {
                Err::<Response<Full<Bytes>>, BoxError>(
                    Rejection::rate_limited(Duration::from_micros(1500), info).into(),
                )
            });
        let res = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-retry-pushback-ms"], "2");
        assert!(res.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("rate limit exceeded"));
        assert!(res.into_body().is_end_stream());
        assert_eq!(percent_encode_grpc("a%b\n"), "a%25b%0A");
    }
}
