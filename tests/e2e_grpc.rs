//! End to end over a real loopback socket: a tonic server (the standard gRPC health service)
//! behind tower-bulwark's layers, called by a real tonic client.
#![cfg(feature = "grpc")]

use std::net::SocketAddr;

use tonic::transport::{server::TcpIncoming, Channel, Server};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tower::ServiceBuilder;
use tower_bulwark::{Quota, RateLimitLayer, RejectionLayer};

async fn start(burst: u32) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let layers = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(RateLimitLayer::new(Quota::per_minute(burst).unwrap()))
        .into_inner();
    tokio::spawn(async move {
        Server::builder()
            .layer(layers)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
    });
    addr
}

async fn client(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

#[tokio::test]
async fn rate_limited_grpc_call_is_resource_exhausted_with_pushback() {
    let addr = start(2).await;
    let mut c = client(addr).await;
    for _ in 0..2 {
        let res = c
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("admitted");
        assert_eq!(res.into_inner().status, 1, "SERVING");
    }
    let status = c
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("rate limited");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().starts_with("rate limit exceeded"));
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // One token per 30 s: the next one is between 29 and 30 s away.
    assert!((29_000..=30_000).contains(&pushback), "{pushback}");
}
