//! A tour of tower-bulwark: starts a real Axum server on 127.0.0.1 (a free port), drives real
//! HTTP traffic through every layer with a hyper client, and prints what each layer did.
//!
//! Run: `cargo run --example tour`. It finishes by itself in a few seconds and exits 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::{extract::ConnectInfo, routing::get, Router};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::ServiceBuilder;
use tower_bulwark::rate_limit::key::ClientIp;
use tower_bulwark::rate_limit::{key, RateLimitHandle};
use tower_bulwark::{Quota, RateLimitLayer, RejectionLayer};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Server {
    addr: SocketAddr,
    limited: RateLimitHandle,
}

async fn start_server() -> Result<Server, Box<dyn std::error::Error>> {
    // GET /limited: 5 requests per second, burst 5, per API key (else per client address).
    let by_key = RateLimitLayer::keyed(Quota::per_second(5)?, key::Header::new("x-api-key"))
        .response_headers();
    let limited = by_key.handle();
    let by_ip = RateLimitLayer::keyed(
        Quota::per_second(50)?,
        ClientIp::new().peer_addr(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())),
    );

    let app = Router::new()
        .route(
            "/limited",
            get(|| async { "limited ok\n" }).layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(by_ip)
                    .layer(by_key),
            ),
        )
        .route("/health", get(|| async { "ok\n" }));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Ok(Server { addr, limited })
}

async fn fetch(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, http::HeaderMap, Bytes), Box<dyn std::error::Error>> {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client.request(req.body(Full::new(Bytes::new()))?).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// Rate limiting: two API keys send 12 requests each at once; each key gets its burst of 5.
async fn tour_rate_limit(
    server: &Server,
    client: &HttpClient,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("== rate limit: GET /limited, 5/s burst 5 per x-api-key");
    let url = format!("http://{}/limited", server.addr);
    let start = Instant::now();
    for api_key in ["alice", "bob"] {
        let mut counts: BTreeMap<u16, u32> = BTreeMap::new();
        let mut first_reject = None;
        for _ in 0..12 {
            let (status, headers, body) = fetch(client, &url, &[("x-api-key", api_key)]).await?;
            *counts.entry(status.as_u16()).or_default() += 1;
            if status == StatusCode::TOO_MANY_REQUESTS && first_reject.is_none() {
                first_reject = Some((headers, body));
            }
        }
        println!("   {api_key:>5}: {counts:?} (status: count)");
        if let Some((h, body)) = first_reject {
            println!(
                "          first 429: Retry-After {:?}, RateLimit {:?}, body {}",
                h.get("retry-after").map(|v| v.to_str().unwrap_or("?")),
                h.get("ratelimit").map(|v| v.to_str().unwrap_or("?")),
                String::from_utf8_lossy(&body)
            );
        }
    }
    println!(
        "   handle: {} rejected, alice has {} left",
        server.limited.rejected(),
        server
            .limited
            .remaining_for(&Some(http::HeaderValue::from_static("alice")))
    );
    // A token comes back every 200 ms.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut admitted = 0;
    for _ in 0..5 {
        let (status, _, _) = fetch(client, &url, &[("x-api-key", "alice")]).await?;
        admitted += u32::from(status == StatusCode::OK);
    }
    println!(
        "   {} ms later: alice admitted {admitted} of 5 (one token comes back every 200 ms)",
        start.elapsed().as_millis()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let server = start_server().await?;
    println!(
        "tower-bulwark tour: Axum server on http://{}\n",
        server.addr
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    tour_rate_limit(&server, &client).await?;

    println!(
        "\ntour finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
