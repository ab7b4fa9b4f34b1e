//! A gRPC server (the standard `grpc.health.v1.Health` service, no protoc needed) behind
//! tower-bulwark's layers: rejections as gRPC statuses, a rate limit and backpressure.
//!
//! Run: `cargo run --example tonic_server --features grpc` (address from `BIND`, default
//! `127.0.0.1:50051`), then `cargo run --example tonic_client --features grpc` with
//! `ADDR=http://127.0.0.1:50051`.
//!
//! - Over 5 calls per second (burst 5): `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`.
//! - Over 16 calls in flight, after waiting 20 ms: `UNAVAILABLE`.

use std::time::Duration;

use tonic::transport::Server;
use tower::ServiceBuilder;
use tower_bulwark::{BackpressureLayer, Quota, RateLimitLayer, RejectionLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let addr = bind.parse()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let layers = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(RateLimitLayer::new(Quota::per_second(5)?))
        .layer(BackpressureLayer::new(16).max_wait(Duration::from_millis(20)))
        .into_inner();
    println!("tonic_server listening on {addr} (grpc.health.v1.Health)");
    Server::builder()
        .layer(layers)
        .add_service(health)
        .serve(addr)
        .await?;
    Ok(())
}
