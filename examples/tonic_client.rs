//! A gRPC client with retry and a circuit breaker, honouring the server's
//! `grpc-retry-pushback-ms`.
//!
//! Run: `cargo run --example tonic_client --features grpc`. With `ADDR` set (e.g.
//! `ADDR=http://127.0.0.1:50051` and `tonic_server` running) it calls that server; without it,
//! it starts the same server in process on a free loopback port.
//!
//! It sends 15 health checks at once to a server that admits 5 per second (burst 5): the
//! rate-limited calls come back as `RESOURCE_EXHAUSTED` with a pushback, and the retry layer
//! waits that long before trying again, within its budget.

use std::time::{Duration, Instant};

use tonic::transport::{server::TcpIncoming, Channel, Server};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tower::ServiceBuilder;
use tower_bulwark::classify::GrpcStatus;
use tower_bulwark::retry::Backoff;
use tower_bulwark::{
    BreakerConfig, Budget, CircuitBreakerLayer, Quota, RateLimitLayer, RejectionLayer, RetryLayer,
    RetryPolicy,
};

async fn in_process_server() -> Result<String, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let layers = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(RateLimitLayer::new(Quota::per_second(5)?))
        .into_inner();
    tokio::spawn(async move {
        Server::builder()
            .layer(layers)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
    });
    Ok(format!("http://{addr}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = match std::env::var("ADDR") {
        Ok(a) => a,
        Err(_) => in_process_server().await?,
    };
    let channel = Channel::from_shared(addr.clone())?.connect().await?;

    let retry = RetryLayer::new(
        RetryPolicy::grpc()
            .max_attempts(4)
            .backoff(Backoff::exponential(
                Duration::from_millis(50),
                Duration::from_secs(2),
            ))
            .budget(Budget::ratio(0.5)?),
    )?;
    let retries = retry.handle();
    let breaker = CircuitBreakerLayer::new(BreakerConfig::consecutive_failures(5))?
        .classify(GrpcStatus::default());
    let breaker_handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .map_request(|r: http::Request<_>| r.map(tonic::body::Body::new))
        .service(channel);
    let client = HealthClient::new(svc);

    println!("tonic_client -> {addr}: 15 health checks at once (server: 5/s, burst 5)");
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..15 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            let r = c
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            (i, r, start.elapsed())
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for call in calls {
        let (i, r, at) = call.await?;
        match r {
            Ok(res) => {
                ok += 1;
                println!(
                    "  call {i:>2}: {:?} after {:>4} ms",
                    res.into_inner().status(),
                    at.as_millis()
                );
            }
            Err(status) => {
                failed += 1;
                println!(
                    "  call {i:>2}: {:?} ({}) after {:>4} ms, pushback {:?}",
                    status.code(),
                    status.message(),
                    at.as_millis(),
                    status.metadata().get("grpc-retry-pushback-ms")
                );
            }
        }
    }
    println!(
        "{ok} served, {failed} failed; {} retries (waiting the server's pushback), {} refused by the budget; breaker {:?}",
        retries.retries(),
        retries.budget_exhausted(),
        breaker_handle.state()
    );
    Ok(())
}
