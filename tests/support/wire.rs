//! What the hostile reviews' tests share: a request, a store on tokio's clock, one hop over
//! the network in process, and the README's client.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::{Backoff, Jitter, RetryLayer, RetryPolicy};
use tower_bulwark::{MemoryStore, Rejection, RejectionKind};

pub type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;
pub type Res = Response<Full<Bytes>>;

pub fn fixed(ms: u64) -> Backoff {
    Backoff::exponential(Duration::from_millis(ms), Duration::from_millis(ms)).jitter(Jitter::None)
}

pub fn post() -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("http://svc/orders")
        .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
        .unwrap()
}

pub fn store() -> MemoryStore {
    MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

pub fn kind(e: &BoxError) -> Option<RejectionKind> {
    e.downcast_ref::<Rejection>().map(Rejection::kind)
}

pub fn ok() -> Res {
    Response::new(Full::new(Bytes::from_static(b"ok")))
}

/// One hop over the network, in process: the client's request body collected (its
/// extensions are not sent: a new request on the server side), the server's response
/// collected.
pub fn hop<S, B>(
    server: S,
) -> impl Service<
    Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>,
    Response = Res,
    Error = BoxError,
    Future = BoxFut<Res>,
> + Clone
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    tower::service_fn(
        move |req: Request<tower_bulwark::retry::ReplayBody<Full<Bytes>>>| {
            let server = server.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| -> BoxError { e })?
                    .to_bytes();
                let mut wire = Request::new(Full::new(bytes));
                *wire.method_mut() = parts.method;
                *wire.uri_mut() = parts.uri;
                *wire.headers_mut() = parts.headers;
                let res = server.oneshot(wire).await.unwrap();
                let (parts, body) = res.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                Ok::<_, BoxError>(Response::from_parts(parts, Full::new(bytes)))
            }) as BoxFut<Res>
        },
    )
}

/// The README's client: `RetryPolicy::http().add_idempotency_key()`, three attempts.
pub fn readme_client<S, B>(
    server: S,
) -> impl Service<Request<Full<Bytes>>, Response = Res, Error = BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    RetryLayer::new(
        RetryPolicy::http()
            .add_idempotency_key()
            .max_attempts(3)
            .clock(Clock::tokio())
            .backoff(fixed(10)),
    )
    .unwrap()
    .layer(hop(server))
}
