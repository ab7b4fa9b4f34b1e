//! Third round of attacks: failing (ignored) tests for defects found in the newest changes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tower::{BoxError, Layer, ServiceExt};
use tower_bulwark::backpressure::{Estimate, Gradient, Sample};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};

/// Was a defect: a dependency whose latency does not depend on concurrency at all (no
/// queueing): each window's mean latency varies by ±20% around 1 ms, as the mean of a
/// hundred-odd requests does. The gradient's docs promise such a dependency is never cut,
/// however much its latency varies; the no-load baseline, pulled halfway down by every lower
/// window and never up, sank to the lowest window mean, and every ordinary window then read
/// as queueing (the limit was cut from 1000 to 36).
#[test]
fn gradient_does_not_cut_a_dependency_without_queueing_whose_mean_varies() {
    let g = Gradient::default();
    let (floor, ceiling) = (1, 10_000);
    let mut est = Estimate::new(1_000.0);
    // 400 windows: fewer than the default probe_every (500), no probe in between.
    for i in 0..400u64 {
        let avg = if i % 2 == 0 { 1_200_000 } else { 800_000 };
        // Offered load above the limit: every window uses the whole limit.
        let peak = est.bounded(floor, ceiling);
        est = g.update(
            est,
            &Sample::new(500, 0, avg, avg / 2, peak),
            floor,
            ceiling,
        );
    }
    let limit = est.bounded(floor, ceiling);
    assert!(
        limit >= 1_000,
        "a dependency with no queueing was cut from 1000 to {limit} (baseline {} ns)",
        est.no_load_rtt_nanos
    );
}

/// Was a defect: a handler behind a request timeout answering 408 (as `tower_http::timeout::TimeoutLayer`
/// does, the usual way an axum app bounds its handlers): it wrote its row, then was cut off.
/// The idempotency layer counts 408 as a refusal of the caller and releases the key, so the
/// client's retry with the same key runs the handler again, though a request dropped
/// mid-handler keeps its lease by default precisely because its effect may have happened.
#[tokio::test(start_paused = true)]
async fn a_handler_cut_off_by_a_timeout_is_not_run_again_for_its_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = tower::service_fn(move |_req: Request<Body>| {
        let runs = counted.clone();
        async move {
            // The effect (a row written, a payment sent), then a slow answer.
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, BoxError>(Response::new(Body::from("created")))
        }
    });
    // A request timeout of 5 s answering 408, as tower-http's TimeoutLayer does.
    let timed = tower::service_fn(move |req: Request<Body>| {
        let call = handler.clone().oneshot(req);
        async move {
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(res) => res,
                Err(_) => {
                    let mut res = Response::new(Body::empty());
                    *res.status_mut() = StatusCode::REQUEST_TIMEOUT;
                    Ok(res)
                }
            }
        }
    });
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let svc = IdempotencyLayer::new(store).layer(timed);
    let req = || {
        Request::post("/payments")
            .header("idempotency-key", "pay-1")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(first.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The client retries the same key a moment later.
    tokio::time::advance(Duration::from_secs(1)).await;
    let second = svc.clone().oneshot(req()).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran again for a key whose first run was cut off after its effect \
         (second answer: {:?})",
        second.map(|r| r.status())
    );
}

/// Was a defect: behind a stateless IPv4/IPv6 translator (SIIT-DC, RFC 7755; NAT64 with the well-known
/// prefix `64:ff9b::/96` of RFC 6052), every IPv4 client of an IPv6-only server arrives as
/// `64:ff9b::a.b.c.d`. `ClientIp::new()` keys IPv6 by its /64, so all of them, the whole IPv4
/// internet, share one key: one client's burst refuses every other. Addresses that embed an
/// IPv4 address in their low 32 bits (as the IPv4-mapped ones, which are keyed whole) must
/// keep that address in the key.
#[test]
fn client_ip_keeps_translated_ipv4_clients_apart() {
    use std::net::SocketAddr;
    use tower_bulwark::rate_limit::key::ClientIp;
    let from = |peer: &str| {
        let mut r = Request::new(());
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        ClientIp::new().client_ip(&r)
    };
    let a = from("[64:ff9b::198.51.100.7]:40000");
    let b = from("[64:ff9b::203.0.113.9]:40000");
    assert!(a.is_some() && b.is_some());
    assert_ne!(
        a, b,
        "two IPv4 clients translated by NAT64 got the same rate-limit key"
    );
}

/// The in-flight 409's wait is drawn between half a second and a second, and HTTP's
/// `Retry-After` is written in whole seconds rounded up: over HTTP every repeat reads
/// `Retry-After: 1`. That is the least HTTP can say, and what a client whose maximum delay is
/// a second can still honour (a spread over whole seconds, as the rate limiter's, would tell
/// half of them `2` and make them give up on a request that is about to be replayed). The
/// spread comes from the clients instead: the retry layer waits a hint plus a jittered share
/// of it, so repeats told `Retry-After: 1` at one instant come back spread, never before the
/// second they were told.
#[tokio::test(start_paused = true)]
async fn in_flight_409_repeats_come_back_spread_over_http() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use tokio::time::Instant;
    use tower::ServiceBuilder;
    use tower_bulwark::retry::{ReplayBody, RetryLayer, RetryPolicy};
    use tower_bulwark::RejectionLayer;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let handler = tower::service_fn(move |_req: Request<Body>| {
        let gate = held.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            Ok::<_, BoxError>(Response::new(Body::from("created")))
        }
    });
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let server = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(store))
        .service(handler);
    let server = tower::util::BoxCloneService::new(server);
    let start = Instant::now();
    // When each request reaches the server, and the Retry-After of each 409.
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let hints = Arc::new(Mutex::new(BTreeSet::new()));
    let network = {
        let (arrivals, hints) = (arrivals.clone(), hints.clone());
        tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            let (server, arrivals, hints) = (server.clone(), arrivals.clone(), hints.clone());
            async move {
                arrivals.lock().unwrap().push(start.elapsed());
                let (parts, body) = http::Request::into_parts(req);
                let body: Bytes = BodyExt::collect(body).await?.to_bytes();
                let res = server
                    .oneshot(Request::from_parts(parts, Body::from(body)))
                    .await?;
                if res.status() == StatusCode::CONFLICT {
                    let hint = res.headers()[http::header::RETRY_AFTER].clone();
                    hints
                        .lock()
                        .unwrap()
                        .insert(hint.to_str().unwrap().to_owned());
                }
                let (parts, body) = res.into_parts();
                let body = BodyExt::collect(body).await?.to_bytes();
                Ok::<_, BoxError>(Response::from_parts(parts, Full::new(body)))
            }
        })
    };
    let req = || {
        Request::post("http://orders.example/orders")
            .header("idempotency-key", "order-1")
            .header("authorization", "Bearer alice")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let client = |seed| {
        RetryLayer::new(
            RetryPolicy::http()
                .max_attempts(2)
                .no_budget()
                .seed(seed)
                .clock(Clock::tokio()),
        )
        .unwrap()
        .layer(network.clone())
    };
    // The first request runs (held at the gate).
    let first = tokio::spawn(client(100).oneshot(req()));
    tokio::task::yield_now().await;
    // Twenty repeats at one instant, each through its own retrying client.
    let mut repeats = Vec::new();
    for seed in 0..20 {
        repeats.push(tokio::spawn(client(seed).oneshot(req())));
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    // Told to wait a second: nobody back yet.
    assert_eq!(arrivals.lock().unwrap().len(), 21);
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    for r in repeats {
        // Each repeat, retried after its wait, is replayed the first request's answer.
        assert_eq!(r.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        *hints.lock().unwrap(),
        BTreeSet::from(["1".to_owned()]),
        "the in-flight 409 over HTTP says the least HTTP can: one second"
    );
    let retries: Vec<Duration> = arrivals.lock().unwrap()[21..].to_vec();
    assert_eq!(retries.len(), 20);
    assert!(
        retries.iter().all(|t| *t >= Duration::from_secs(1)),
        "a retry came back before the second it was told: {retries:?}"
    );
    // Spread: no more than a quarter of them within any 100 ms.
    let mut sorted = retries.clone();
    sorted.sort();
    let crowded = sorted
        .windows(6)
        .filter(|w| w[5] - w[0] < Duration::from_millis(100))
        .count();
    assert_eq!(crowded, 0, "the repeats came back together: {sorted:?}");
}

/// Was a defect: `key::Header` with the default `MissingKey::Reject`: a client that sent no API key (its
/// own mistake, or any scanner) is answered 500 Internal Server Error (gRPC `INTERNAL`), the
/// status of a server fault. Error-rate alerts fire on client traffic, and the client's own
/// `HttpStatus`/`GrpcStatus` breaker counts the refusal as its dependency failing. A request
/// refused for what it lacks is a client error (4xx).
#[tokio::test(start_paused = true)]
async fn a_request_without_the_key_header_is_a_client_error() {
    use tower::ServiceBuilder;
    use tower_bulwark::rate_limit::{key, RateLimitConfig};
    use tower_bulwark::{Quota, RateLimitLayer, RejectionLayer};
    let quota = RateLimitConfig::new(Quota::per_second(5).unwrap()).clock(Clock::tokio());
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RateLimitLayer::keyed(quota, key::Header::new("x-api-key")))
        .service(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(Body::from("ok")))
        }));
    let with_key = Request::get("/")
        .header("x-api-key", "k-1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        svc.clone().oneshot(with_key).await.unwrap().status(),
        StatusCode::OK
    );
    let without = Request::get("/").body(Body::empty()).unwrap();
    let status = svc.clone().oneshot(without).await.unwrap().status();
    assert!(
        status.is_client_error(),
        "a request without the key header was answered {status}"
    );
    // A `ClientIp` that finds no address is the server's setup error, and says so.
    let by_ip = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RateLimitLayer::keyed(
            RateLimitConfig::new(Quota::per_second(5).unwrap()).clock(Clock::tokio()),
            key::ClientIp::new(),
        ))
        .service(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(Body::from("ok")))
        }));
    let no_address = Request::get("/").body(Body::empty()).unwrap();
    assert_eq!(
        by_ip.oneshot(no_address).await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

/// A network's own translator prefix can be named; the well-known one is then given again
/// to keep it, and addresses outside every translator prefix are keyed by their /64.
#[test]
fn client_ip_translator_prefixes_are_configurable() {
    use std::net::{IpAddr, SocketAddr};
    use tower_bulwark::rate_limit::key::ClientIp;
    let ip = ClientIp::new()
        .ipv4_translators(["2001:db8:64::/96"])
        .unwrap();
    let from = |ip: &ClientIp, peer: &str| {
        let mut r = Request::new(());
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        ip.client_ip(&r).unwrap()
    };
    assert_eq!(
        from(&ip, "[2001:db8:64::198.51.100.7]:1"),
        "198.51.100.7".parse::<IpAddr>().unwrap()
    );
    // The well-known prefix was replaced: keyed as any IPv6 address, by its /64.
    assert_eq!(
        from(&ip, "[64:ff9b::198.51.100.7]:1"),
        "64:ff9b::".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        from(&ClientIp::new(), "[64:ff9b::198.51.100.7]:1"),
        "198.51.100.7".parse::<IpAddr>().unwrap()
    );
    assert!(ClientIp::new().ipv4_translators(["10.0.0.0/8"]).is_err());
    assert!(ClientIp::new().ipv4_translators(["64:ff9b::/64"]).is_err());
}
