//! A tonic server behind the idempotency layer and `RejectionLayer::grpc()`: keys from
//! `idempotency-key` metadata, scoped by `authorization` metadata, trailers replayed,
//! rejections as gRPC statuses.
#![cfg(feature = "grpc")]

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::Endpoint;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};
use tower_bulwark::RejectionLayer;

fn check(service: &str, key: Option<&str>) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    if let Some(k) = key {
        req.metadata_mut()
            .insert("idempotency-key", k.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn tonic_server_replays_and_rejects_with_grpc_statuses() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;

    let idempotency = IdempotencyLayer::builder(MemoryStore::default())
        .rebuild_body(|b: Bytes| tonic::body::Body::new(Full::new(b)))
        .build()
        .unwrap();
    // The generated tonic server, layered, served by hyper over HTTP/2 on loopback.
    let stack = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(idempotency)
        .service(health);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let stack = stack.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let stack = stack.clone();
                    async move { stack.oneshot(req.map(tonic::body::Body::new)).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    let first = client.check(check("orders", Some("g-1"))).await.unwrap();
    assert_eq!(first.get_ref().status, ServingStatus::Serving as i32);
    assert!(first.metadata().get("idempotent-replayed").is_none());

    // The handler's answer would change now; a replay still gives the first one.
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::NotServing)
        .await;
    let again = client.check(check("orders", Some("g-1"))).await.unwrap();
    assert_eq!(again.get_ref().status, ServingStatus::Serving as i32);
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    let fresh = client.check(check("orders", Some("g-2"))).await.unwrap();
    assert_eq!(fresh.get_ref().status, ServingStatus::NotServing as i32);

    // A gRPC error status (NOT_FOUND, trailers-only) is the request's fault: replayed too.
    let missing = client.check(check("nope", Some("g-3"))).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing_again = client.check(check("nope", Some("g-3"))).await.unwrap_err();
    assert_eq!(missing_again.code(), Code::NotFound);
    assert_eq!(
        missing_again.metadata().get("idempotent-replayed").unwrap(),
        "true"
    );

    // Same key, another payload: FAILED_PRECONDITION.
    let reused = client.check(check("other", Some("g-1"))).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);

    // Another caller (other `authorization` metadata) with the same key and payload: keys are
    // scoped by credentials by default, so it runs and sees today's answer, not a replay; with
    // another payload it is not told the key is in use either.
    let as_other = |caller: &str, service: &str| {
        let mut req = check(service, Some("g-1"));
        req.metadata_mut()
            .insert("authorization", caller.parse().unwrap());
        req
    };
    let other = client.check(as_other("Bearer b", "orders")).await.unwrap();
    assert!(other.metadata().get("idempotent-replayed").is_none());
    assert_eq!(other.get_ref().status, ServingStatus::NotServing as i32);
    let other = client
        .check(as_other("Bearer c", "nope"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound, "not FAILED_PRECONDITION");
    assert!(other.metadata().get("idempotent-replayed").is_none());

    // Malformed key: INVALID_ARGUMENT.
    let bad = client
        .check(check("orders", Some("two words")))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // No key: passes through.
    let plain = client.check(check("orders", None)).await.unwrap();
    assert_eq!(plain.get_ref().status, ServingStatus::NotServing as i32);

    server.abort();
}
