//! End to end over a real loopback socket: a tonic server (the standard gRPC health service)
//! behind tower-bulwark's layers, called by a real tonic client. Every row of the rejection
//! table as a gRPC status.
#![cfg(feature = "grpc")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tonic::metadata::MetadataValue;
use tonic::transport::{server::TcpIncoming, Channel, Server};
use tonic::{Code, Status};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tower::ServiceBuilder;
use tower_bulwark::{
    BackpressureLayer, BreakerConfig, CircuitBreakerLayer, IdempotencyLayer, MemoryStore, Quota,
    RateLimitLayer, RejectionLayer,
};

#[path = "support/gate.rs"]
mod gate;
use gate::Gate;
#[path = "support/down_store.rs"]
mod down_store;
use down_store::Down;
use tower_bulwark::idempotency::Store;

/// Serves the health service behind `layers` (below `RejectionLayer::grpc()`), every call
/// passing `gate` (which the test arms to hold one in flight); evaluates to the address.
macro_rules! start {
    ($layers:expr, $gate:expr) => {{
        let gate: Arc<Gate> = $gate;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let stack = ServiceBuilder::new()
            .layer(RejectionLayer::grpc())
            .layer($layers)
            .map_future(move |fut| {
                let gate = gate.clone();
                async move {
                    gate.pass().await;
                    fut.await
                }
            })
            .into_inner();
        tokio::spawn(async move {
            Server::builder()
                .layer(stack)
                .add_service(health)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
        });
        addr
    }};
}

async fn client(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

fn check(service: &str, key: Option<&str>) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    if let Some(k) = key {
        req.metadata_mut()
            .insert("idempotency-key", MetadataValue::try_from(k).unwrap());
    }
    req
}

async fn call(
    c: &HealthClient<Channel>,
    req: tonic::Request<HealthCheckRequest>,
) -> Result<i32, Status> {
    c.clone().check(req).await.map(|r| r.into_inner().status)
}

fn pushback(status: &Status) -> Option<u64> {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn rate_limited_is_resource_exhausted_with_pushback() {
    let addr = start!(
        RateLimitLayer::new(Quota::per_minute(2).unwrap()),
        Arc::default()
    );
    let c = client(addr).await;
    for _ in 0..2 {
        assert_eq!(call(&c, check("", None)).await.unwrap(), 1, "SERVING");
    }
    let status = call(&c, check("", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().starts_with("rate limit exceeded"));
    // One token per 30 s: the next one is between 29 and 30 s away, and the hint is that
    // jittered upwards by less than as much again.
    let ms = pushback(&status).expect("pushback");
    assert!((29_000..=60_000).contains(&ms), "{ms}");
}

#[tokio::test]
async fn overloaded_is_unavailable() {
    let gate = Arc::new(Gate::default());
    let addr = start!(BackpressureLayer::new(1), gate.clone());
    let c = client(addr).await;
    gate.arm();
    let first = tokio::spawn({
        let c = c.clone();
        async move { call(&c, check("", None)).await }
    });
    gate.entered().await;
    let status = call(&c, check("", None)).await.unwrap_err();
    gate.release();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().starts_with("service overloaded"));
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn circuit_open_is_unavailable_with_pushback() {
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1).open_time(Duration::from_secs(30)),
    )
    .unwrap();
    breaker.handle().force_open();
    let addr = start!(breaker, Arc::default());
    let c = client(addr).await;
    let status = call(&c, check("", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().starts_with("circuit open"),
        "{}",
        status.message()
    );
    // Forced open: the pushback is the configured open time, jittered (15 s to 45 s).
    let ms = pushback(&status).expect("a pushback");
    assert!((15_000..45_000).contains(&ms), "{ms}");
}

fn idempotency<St: Store>(
    store: St,
) -> IdempotencyLayer<St, impl Fn(Bytes) -> tonic::body::Body + Clone + Send + Sync + 'static> {
    IdempotencyLayer::builder(store)
        .rebuild_body(|b: Bytes| tonic::body::Body::new(Full::new(b)))
        .build()
        .unwrap()
}

#[tokio::test]
async fn idempotency_rows_are_aborted_failed_precondition_invalid_argument() {
    let gate = Arc::new(Gate::default());
    let addr = start!(idempotency(MemoryStore::default()), gate.clone());
    let c = client(addr).await;

    // In flight: ABORTED.
    gate.arm();
    let first = tokio::spawn({
        let c = c.clone();
        async move { call(&c, check("", Some("k1"))).await }
    });
    gate.entered().await;
    let status = call(&c, check("", Some("k1"))).await.unwrap_err();
    gate.release();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(first.await.unwrap().unwrap(), 1);

    // Completed: replayed, with its trailers' OK status.
    assert_eq!(call(&c, check("", Some("k1"))).await.unwrap(), 1);

    // Same key, another payload: FAILED_PRECONDITION.
    let status = call(&c, check("other", Some("k1"))).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Malformed key: INVALID_ARGUMENT.
    let long = "x".repeat(300);
    let status = call(&c, check("", Some(&long))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn store_down_fail_closed_is_unavailable() {
    let addr = start!(idempotency(Down), Arc::default());
    let c = client(addr).await;
    let status = call(&c, check("", Some("k"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().starts_with("shared store unavailable"));
}
