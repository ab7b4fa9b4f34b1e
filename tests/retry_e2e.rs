//! Over a real loopback socket: a hyper client and a tonic client, each behind the retry layer,
//! against a server that fails its first calls. Backoff is zero, so nothing sleeps.
#![cfg_attr(not(feature = "grpc"), allow(dead_code, unused_imports))]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::retry::{Backoff, ReplayBody, RetryLayer, RetryPolicy, IDEMPOTENCY_KEY};

/// The idempotency key and the body of each request the server saw.
type Requests = Vec<(Option<String>, Bytes)>;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Requests>>);

async fn flaky(
    State(seen): State<Seen>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut seen = seen.0.lock().unwrap();
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| v.to_str().unwrap().to_owned());
    seen.push((key, body.clone()));
    if seen.len() < 3 {
        // As this crate's `RejectionLayer` marks a shed: the request did not run, and a POST
        // with a key is sent again.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [("request-refused", "overloaded")],
            Bytes::new(),
        )
            .into_response()
    } else {
        (StatusCode::CREATED, body).into_response()
    }
}

#[tokio::test]
async fn a_hyper_client_retries_a_streamed_post_with_one_key() {
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", post(flaky))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    type Streamed = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
    >;
    let hyper_client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Streamed>>();
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new(
                RetryPolicy::http()
                    .add_idempotency_key()
                    .backoff(Backoff::none()),
            )
            .unwrap(),
        )
        .service(hyper_client);
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = ["{\"sku\":", "\"tea\"}"]
        .iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    let req = Request::post(format!("http://{addr}/orders"))
        .header("content-type", "application/json")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"sku\":\"tea\"}");
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let key = seen[0].0.clone().expect("a key");
    for (k, b) in &seen {
        assert_eq!(k.as_deref(), Some(key.as_str()));
        assert_eq!(b, "{\"sku\":\"tea\"}");
    }
}

async fn never<B>(_: Request<B>) -> Result<(), BoxError> {
    unreachable!("the breaker is open")
}

/// Fails the first `left` calls with a circuit-open rejection (UNAVAILABLE once answered as
/// gRPC).
#[derive(Clone)]
struct FailFirst<S> {
    inner: S,
    left: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

impl<S, B> Service<Request<B>> for FailFirst<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            // Refused by a real layer of this crate (an open breaker), so that the server's
            // `RejectionLayer` knows the refusal for this request's (a rejection made by hand
            // in a service is the service's own error, answered `UNKNOWN`).
            let breaker = tower_bulwark::CircuitBreakerLayer::new(
                tower_bulwark::BreakerConfig::consecutive_failures(1)
                    .open_time(std::time::Duration::from_millis(1)),
            )
            .unwrap();
            breaker.handle().force_open();
            let mut refuser = tower::Layer::layer(&breaker, tower::service_fn(never::<B>));
            let refused = refuser.call(req);
            return Box::pin(async move { Err(refused.await.expect_err("the breaker is open")) });
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

#[cfg(feature = "grpc")]
#[tokio::test]
async fn a_tonic_client_retries_unavailable() {
    use tonic::transport::{server::TcpIncoming, Channel, Server};
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let left = Arc::new(AtomicU32::new(2));
    let calls = Arc::new(AtomicU32::new(0));
    let layers = ServiceBuilder::new()
        .layer(tower_bulwark::RejectionLayer::grpc())
        .layer(tower::layer::layer_fn({
            let (left, calls) = (left.clone(), calls.clone());
            move |inner| FailFirst {
                inner,
                left: left.clone(),
                calls: calls.clone(),
            }
        }))
        .into_inner();
    tokio::spawn(async move {
        Server::builder()
            .layer(layers)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::grpc().backoff(Backoff::none())).unwrap())
        .map_request(|r: Request<ReplayBody<tonic::body::Body>>| r.map(tonic::body::Body::new))
        .service(channel);
    let mut client = HealthClient::new(svc);
    let res = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("served after two retries");
    assert_eq!(res.into_inner().status, 1, "SERVING");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(left.load(Ordering::SeqCst), 0);
}
