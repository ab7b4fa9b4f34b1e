//! Attacks on the server-side layers (backpressure, rate limit, rejections), from the public
//! API and the docs only. Each `#[ignore]`d test asserts a promised (or plainly expected)
//! behaviour and fails on the current code because of the defect named on it.

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::backpressure::{Adaptive, Aimd, BackpressureLayer, Gradient};
use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::{key, KeyedConfig, MissingKey, RateLimitConfig};
use tower_bulwark::{Quota, RateLimitLayer, Rejection, RejectionKind, RejectionLayer};

/// An HTTP handler that answers 200 at once.
#[derive(Clone, Default)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }
}

/// A request from `peer` (the address a server records in the extensions).
fn from(peer: &str) -> Request<()> {
    let mut r = Request::get("/").body(()).unwrap();
    r.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    r
}

fn kind_of(err: &BoxError) -> Option<RejectionKind> {
    Rejection::find(&**err).map(Rejection::kind)
}

// ---------------------------------------------------------------------------------------------
// Defect (security, unsafe default): `key::ClientIp::new()` keys IPv6 clients by the whole
// 128-bit address. Any IPv6 subscriber holds at least a /64 (2^64 addresses) and its OS
// rotates privacy addresses by itself; a client that picks a fresh source address for each
// request gets a fresh burst each time, so the per-client limit of the README's server stack
// limits nothing for IPv6. (`ipv6_prefix(64)` exists, but the default, and the README's and
// module docs' examples, use 128.)
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn ipv6_client_rotating_addresses_in_its_subnet_stays_limited() {
    // The README's first limit: 100/s, burst 200, per client address.
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(100).unwrap().burst(200).unwrap())
            .clock(Clock::tokio()),
        key::ClientIp::new(),
    );
    let mut svc = layer.layer(Ok200);
    let mut admitted = 0;
    for i in 0..2_000u32 {
        // One subscriber's /64, a new interface identifier per request.
        let peer = format!("[2001:db8:1:2:{:x}:{:x}::1]:443", i >> 16, i & 0xffff);
        let res = svc.ready().await.unwrap().call(from(&peer)).await;
        admitted += usize::from(res.is_ok());
    }
    assert!(
        admitted <= 200,
        "one /64 got {admitted} of 2000 requests admitted at one instant against a burst of 200"
    );
}

// ---------------------------------------------------------------------------------------------
// Defect (security, docs): `key::Header` turns a request without the header into the key
// `None`, so every such request of every client shares ONE limit, silently (no count, no
// warning), and `KeyedConfig::when_key_missing` does nothing for it. The module docs say "an
// extractor that cannot find its key does not [share one limit]". In the README's server stack
// (per-address limit, then per-`x-api-key` limit, both 100/s burst 200) one client that sends
// its 200 requests without a key locks every other keyless client out with 429s.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn requests_without_the_key_header_do_not_share_one_limit() {
    let quota = || {
        RateLimitConfig::new(Quota::per_second(100).unwrap().burst(200).unwrap())
            .clock(Clock::tokio())
    };
    // The README's stack: behind the address limit, requests without a key are admitted by
    // the key limit (the address limit bounds them), each on its own.
    let header_limit = RateLimitLayer::keyed(
        KeyedConfig::from(quota()).when_key_missing(MissingKey::Admit),
        key::Header::new("x-api-key"),
    );
    let header_handle = header_limit.handle();
    let mut svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RateLimitLayer::keyed(quota(), key::ClientIp::new()))
        .layer(header_limit)
        .service(Ok200);
    // One client, within its own per-address burst, sends no key.
    for _ in 0..200 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(from("203.0.113.7:40000"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    // Another client, never seen before, sends one request without a key.
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(from("198.51.100.9:50000"))
        .await
        .unwrap();
    assert_ne!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a fresh client was refused because another client spent the keyless requests' shared \
         limit (missing_keys counted: {})",
        header_handle.missing_keys()
    );
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header_handle.missing_keys(),
        201,
        "every keyless request is counted"
    );
    // An empty value is no key either: admitted. The header twice is no key, but a
    // malformed one, refused whatever the policy (else a client could repeat its header to
    // step out of its own limit while the service behind reads the first value).
    for (values, status) in [
        (&[""][..], StatusCode::OK),
        (&["a", "b"][..], StatusCode::BAD_REQUEST),
    ] {
        let mut req = from("192.0.2.1:1");
        for v in values {
            req.headers_mut().append("x-api-key", v.parse().unwrap());
        }
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), status, "{values:?}");
    }
    assert_eq!(header_handle.missing_keys(), 203);

    // With the default policy, a request without the key is refused as keyless (never
    // rate limited by others' keyless requests), and counted.
    let strict = RateLimitLayer::keyed(quota(), key::Header::new("x-api-key"));
    let strict_handle = strict.handle();
    let mut svc = strict.layer(Ok200);
    for _ in 0..300 {
        let err = svc.ready().await.unwrap().call(from("203.0.113.7:1")).await;
        let kind = err.as_ref().err().and_then(kind_of);
        assert_eq!(kind, Some(RejectionKind::RateLimitKeyMissing));
    }
    assert_eq!(strict_handle.missing_keys(), 300);
    let mut keyed = from("203.0.113.7:1");
    keyed
        .headers_mut()
        .insert("x-api-key", "alice".parse().unwrap());
    assert!(svc.ready().await.unwrap().call(keyed).await.is_ok());
}

// ---------------------------------------------------------------------------------------------
// Defect (security, silent shared bucket): when the peer is a trusted proxy and the request
// carries no client address in the header `ClientIp` reads (the proxy writes `Forwarded` while
// the default reads `X-Forwarded-For`, or writes nothing), the key is the proxy's own address:
// every client behind it shares one limit, with no warning and no count. Issue 14's rule is
// "when no client address can be found, warn once and count it; never a silent shared bucket".
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn trusted_proxy_without_a_forwarded_address_is_not_one_silent_bucket() {
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_minute(1).unwrap()).clock(Clock::tokio()),
        key::ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap(),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Ok200);
    let via_proxy = |client: &str| {
        let mut r = from("10.0.0.1:443");
        r.headers_mut()
            .insert("forwarded", format!("for={client}").parse().unwrap());
        r
    };
    let a = svc
        .ready()
        .await
        .unwrap()
        .call(via_proxy("198.51.100.1"))
        .await;
    let b = svc
        .ready()
        .await
        .unwrap()
        .call(via_proxy("198.51.100.2"))
        .await;
    let b_kind = b.as_ref().err().and_then(kind_of);
    assert!(
        b_kind != Some(RejectionKind::RateLimited) && handle.missing_keys() > 0,
        "client b was refused for client a's request ({:?} then {:?}), and the requests with no \
         forwarded address were not counted (missing_keys = {})",
        a.as_ref().err().and_then(kind_of),
        b_kind,
        handle.missing_keys()
    );
}

// ---------------------------------------------------------------------------------------------
// Defect (docs claim not kept): "the `retry_after` of a rejection is the exact time until the
// next token plus a uniform random extra in [0, max(exact, 1 s)) ... spread over at least a
// second, so that the spread survives `Retry-After`'s rounding up to whole seconds". A span of
// one second does not survive rounding up: with the next token 999 ms away, every hint falls
// in [0.999 s, 1.999 s) and all but 0.1% of them round to `Retry-After: 2`. Clients refused
// together are told to come back together, the herd the jitter was made to break up.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn simultaneous_refusals_get_spread_retry_after_values() {
    let mut svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RateLimitLayer::new(
            RateLimitConfig::new(Quota::per_second(1).unwrap()).clock(Clock::tokio()),
        ))
        .service(Ok200);
    let first = svc.ready().await.unwrap().call(Request::new(())).await;
    assert_eq!(first.unwrap().status(), StatusCode::OK);
    tokio::time::advance(Duration::from_millis(1)).await;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let after = res.headers()["retry-after"].to_str().unwrap().to_owned();
        *counts.entry(after).or_default() += 1;
    }
    let most = counts.values().copied().max().unwrap();
    assert!(
        most <= 150,
        "200 clients refused at one instant were told {counts:?}: {most} of them come back at \
         the same second"
    );
    // Never before the next token (999 ms away, so 1 s at least), and no further than the
    // exact time plus a span of two seconds.
    assert!(
        counts
            .keys()
            .all(|s| (1..=3).contains(&s.parse::<u64>().unwrap())),
        "{counts:?}"
    );
}

// The same for gRPC's `grpc-retry-pushback-ms`, at its resolution: clients refused together
// are told values spread in proportion to the wait, never less than it.
#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn simultaneous_refusals_get_spread_grpc_pushback() {
    let mut svc = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(RateLimitLayer::new(
            RateLimitConfig::new(Quota::per_second(10).unwrap().burst(1).unwrap())
                .clock(Clock::tokio()),
        ))
        .service(Ok200);
    let first = svc.ready().await.unwrap().call(Request::new(())).await;
    assert_eq!(first.unwrap().status(), StatusCode::OK);
    tokio::time::advance(Duration::from_millis(1)).await;
    let mut values = Vec::new();
    for _ in 0..200 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.headers()["grpc-status"], "8");
        let ms: u64 = res.headers()["grpc-retry-pushback-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        values.push(ms);
    }
    values.sort_unstable();
    let (lo, hi) = (values[0], values[values.len() - 1]);
    // The next token is 99 ms away: the hints lie in [99, 198) ms, spread over it.
    assert!(lo >= 99 && hi <= 198, "{lo}..{hi}");
    assert!(
        hi - lo >= 50,
        "200 clients refused together told {lo}..{hi} ms"
    );
    let mut distinct = values.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 40,
        "only {} distinct values",
        distinct.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Defect (wrong figures on the wire): `RateLimit-Policy` is written as `q=<burst>;w=<window
// rounded up to whole seconds>`. For a quota whose burst window is under a second (or not a
// whole number of seconds) the policy states another rate: `Quota::per_second(1000)` with a
// burst of 1 is advertised as `q=1;w=1`, one request per second, a thousand times less than
// the limit; a client that paces itself by the policy is throttled for nothing.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn ratelimit_policy_header_states_the_quota_rate() {
    let mut svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(RateLimitLayer::new(
            RateLimitConfig::new(Quota::per_second(1000).unwrap().burst(1).unwrap())
                .clock(Clock::tokio()),
        ))
        .service(Ok200);
    let _ = svc.ready().await.unwrap().call(Request::new(())).await;
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let policy = res.headers()["ratelimit-policy"].to_str().unwrap();
    let field = |name: &str| -> f64 {
        policy
            .split(';')
            .find_map(|p| p.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {policy:?}"))
    };
    let rate = field("q=") / field("w=");
    assert!(
        (900.0..=1100.0).contains(&rate),
        "`RateLimit-Policy: {policy}` says {rate} requests per second for a limit of 1000/s"
    );
}

/// A dependency with no queue at all (any number of requests at once), whose latency varies
/// from request to request as real ones do: 5, 6, ... 14 ms, in turn.
#[derive(Clone, Default)]
struct Varying(Arc<AtomicU64>);

impl Service<()> for Varying {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: ()) -> Self::Future {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let latency = Duration::from_millis(5 + n % 10);
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok(())
        })
    }
}

/// `clients` closed-loop callers of `req` for `secs` seconds (a shed caller tries again 1 ms
/// later): the requests served.
async fn closed_loop<S, Req>(svc: S, req: Req, clients: usize, secs: u64) -> usize
where
    S: Service<Req, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    Req: Clone + Send + 'static,
{
    let served = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (svc, served, req) = (svc.clone(), served.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match svc.clone().oneshot(req.clone()).await {
                    Ok(_) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    served.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Defect (adaptive limit collapses): the gradient compares each window's MEAN latency with the
// LOWEST latency ever seen. Any dependency whose latency varies (here 5..14 ms, with no queue
// at all, so concurrency costs nothing) has a mean about twice its minimum, so the gradient
// sits at its 0.5 clamp and the limit falls to where `0.1·L = 0.2·√L`, about 4, whatever the
// capacity: slow start ends at once ("the mean doubled"), and 64 callers are served at a few
// percent of what a fixed limit serves. The docs promise the limit "settles just above the
// concurrency the dependency serves without queueing", which here is every concurrency.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn gradient_limit_holds_when_latency_varies_without_queueing() {
    let fixed = closed_loop(
        BackpressureLayer::new(64).layer(Varying::default()),
        (),
        64,
        3,
    )
    .await;
    let layer =
        BackpressureLayer::adaptive(Adaptive::gradient(Gradient::default()).clock(Clock::tokio()))
            .unwrap();
    let handle = layer.handle();
    let got = closed_loop(layer.layer(Varying::default()), (), 64, 3).await;
    eprintln!(
        "varying latency, no queue: gradient served {got}, fixed 64 served {fixed}; limit {}, shed {}",
        handle.limit(),
        handle.shed()
    );
    assert!(
        handle.limit() >= 48 && got * 10 >= fixed * 9,
        "no queueing anywhere, 64 callers: the gradient's limit fell to {} and served {got} \
         where a fixed limit of 64 served {fixed} (shed: {})",
        handle.limit(),
        handle.shed()
    );
}

/// A dependency with no queue and a steady latency of 1 s (a slow report endpoint, say).
#[derive(Clone)]
struct Slow;

impl Service<()> for Slow {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: ()) -> Self::Future {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Defect (docs claim not kept, periodic outage): the gradient's no-load probe "drops the limit
// to the floor for one window ... at the cost of one window of reduced concurrency". But a
// window closes only once it holds `min_samples` (10) samples, and at the floor (1 by default)
// they come one latency apart. With 4 callers of a 1 s dependency a window normally lasts
// 2.5 s (10 samples at 4/s); the probe's lasts about 7 s (the 4 in flight, then 6 more one at a
// time), and 3 of the 4 callers are shed throughout, at every probe. Here the probe comes
// every 4 windows so that the test reaches it quickly; the default, 500, only spaces the
// outages out.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn gradient_probe_lasts_about_one_window() {
    let layer = BackpressureLayer::adaptive(
        Adaptive::gradient(Gradient::default().probe_every(4))
            .slow_start(false)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let load = tokio::spawn(closed_loop(layer.layer(Slow), (), 4, 40));
    // Watch the limit: the longest stretch it spends at the floor.
    let (mut longest, mut since) = (Duration::ZERO, None::<Instant>);
    let end = Instant::now() + Duration::from_secs(40);
    while Instant::now() < end {
        match (handle.limit() == 1, since) {
            (true, None) => since = Some(Instant::now()),
            (false, Some(t)) => {
                longest = longest.max(t.elapsed());
                since = None;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(t) = since {
        longest = longest.max(t.elapsed());
    }
    let served = load.await.unwrap();
    eprintln!(
        "probe every 4 windows, 4 callers of a 1 s dependency: longest at the floor {longest:?}, \
         served {served}, shed {}",
        handle.shed()
    );
    assert!(
        longest > Duration::ZERO,
        "no probe seen in 40 s: the test does not reach what it attacks"
    );
    // A window of this load lasts 2.5 s; the probe may take one, and a little more.
    assert!(
        longest <= Duration::from_secs(3),
        "the probe held the limit at 1 for {longest:?}, where a window lasts 2.5 s; shed: {}",
        handle.shed()
    );
}

/// A gRPC handler whose responses stream one message, then fail in the trailers with
/// `grpc-status: 14` (UNAVAILABLE), as a streaming call does when the server fails midway.
#[derive(Clone)]
struct FailsInTrailers;

type Frames =
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;

impl Service<Request<()>> for FailsInTrailers {
    type Response = Response<http_body_util::StreamBody<Frames>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<()>) -> Self::Future {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut res = Response::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        res.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        std::future::ready(Ok(res))
    }
}

// ---------------------------------------------------------------------------------------------
// Defect (a setting that does nothing): with `hold_until_body_end`, the permit body streams the
// response to its end, trailers included, but only the *headers'* `grpc-status` is looked at.
// A gRPC failure arrives in the trailers (any call that sent a message first; the classify
// docs: "a layer that sees the trailers can call `classify_trailers`"), so for such services
// `.classify(GrpcStatus::default())` never counts a failure and the adaptive limit never comes
// down, however sick the dependency.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn grpc_failures_in_trailers_lower_the_adaptive_limit() {
    let layer = BackpressureLayer::adaptive(
        Adaptive::aimd(Aimd::default())
            .initial(64)
            .slow_start(false)
            .min_samples(1)
            .window(Duration::from_millis(1))
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(tower_bulwark::classify::GrpcStatus::default())
    .hold_until_body_end();
    let handle = layer.handle();
    let mut svc = layer.layer(FailsInTrailers);
    for _ in 0..50 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "14");
        tokio::time::advance(Duration::from_millis(2)).await;
    }
    assert!(
        handle.limit() < 64,
        "50 calls failed with UNAVAILABLE in their trailers; the limit stayed at {}",
        handle.limit()
    );
}

// ---------------------------------------------------------------------------------------------
// Defect (herd over many replicas): the in-process limiter jitters its refusal hints so that
// clients refused together do not come back together; the Redis-backed limiter (and its local
// fallback) hands out the exact time to the next token. With many replicas behind one limit
// (where the herds are largest), every client refused at one instant is told the same time.
// ---------------------------------------------------------------------------------------------
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_refusal_hints_are_jittered() {
    use tower_bulwark::rate_limit::store::{RedisRateLimitConfig, RedisRateLimitLayer};
    let Some(server) = redis_server::RedisServer::start("redis_refusal_hints_are_jittered") else {
        return;
    };
    let conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let layer = RedisRateLimitLayer::new(
        conn,
        RedisRateLimitConfig::new(Quota::per_second(1).unwrap())
            .prefix("attack2:jitter:")
            .unwrap(),
    )
    .unwrap();
    let mut svc = layer.layer(Ok200);
    let first = svc.ready().await.unwrap().call(Request::new(())).await;
    assert!(first.is_ok());
    let mut hints = Vec::new();
    for _ in 0..20 {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap_err();
        let r = Rejection::find(&*err).expect("a rejection");
        assert_eq!(r.kind(), RejectionKind::RateLimited);
        hints.push(r.retry_after().unwrap());
    }
    let (lo, hi) = (*hints.iter().min().unwrap(), *hints.iter().max().unwrap());
    assert!(
        hi - lo >= Duration::from_millis(200),
        "20 clients refused together were told {lo:?}..{hi:?}: all come back together"
    );
}

/// `slots` requests at once, each busy `latency` (the others queue for a slot); while
/// `sick` is set, every request fails at once.
#[derive(Clone)]
struct Flaky {
    slots: Arc<tokio::sync::Semaphore>,
    latency: Duration,
    sick: Arc<std::sync::atomic::AtomicBool>,
}

impl Service<()> for Flaky {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: ()) -> Self::Future {
        let (slots, latency) = (self.slots.clone(), self.latency);
        let sick = self.sick.load(Ordering::Relaxed);
        Box::pin(async move {
            if sick {
                return Err::<(), BoxError>("dependency down".into());
            }
            let _slot = slots.acquire_owned().await.unwrap();
            tokio::time::sleep(latency).await;
            Ok(())
        })
    }
}

/// An open-loop load of twice the capacity of 50 slots × 10 ms for 7 s, the dependency
/// failing at once from 2 s to 4 s: the requests answered within 100 ms, per second.
async fn goodput_around_an_outage(layer: BackpressureLayer) -> Vec<usize> {
    const SECONDS: usize = 7;
    let handle = layer.handle();
    let sick = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc = layer.layer(Flaky {
        slots: Arc::new(tokio::sync::Semaphore::new(50)),
        latency: Duration::from_millis(10),
        sick: sick.clone(),
    });
    let start = Instant::now();
    let served: Arc<Vec<AtomicUsize>> =
        Arc::new((0..=SECONDS).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    let mut limits = Vec::new();
    for ms in 0..SECONDS * 1000 {
        sick.store((2000..4000).contains(&ms), Ordering::Relaxed);
        if (1900..=4500).contains(&ms) && ms % 100 == 0 {
            limits.push((ms, handle.limit()));
        }
        for _ in 0..10 {
            let (svc, served) = (svc.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let arrived = Instant::now();
                if svc.oneshot(()).await.is_ok() && arrived.elapsed() <= Duration::from_millis(100)
                {
                    let second = (Instant::now() - start).as_secs() as usize;
                    served[second.min(SECONDS)].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("limit (ms, limit) around the outage: {limits:?}");
    served[..SECONDS]
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Defect (adaptive limit does not recover): "slow start ends for good at the first sign of
// congestion". A 2 s outage in which the dependency fails at once (no load problem at all)
// multiplies the AIMD limit by 0.9 every window, from about the capacity (50) to a handful;
// once it heals, the limit grows back by one per 100 ms window, so in the 2nd and 3rd seconds
// after healing a sudden return of load is served at well under half of what a fixed limit
// serves. Issue 14 asks that a sudden load reach ≥ 95% of capacity within 1 s; after an
// outage (TCP goes back to slow start after a timeout) the same load gets far less.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn aimd_limit_recovers_within_a_second_after_an_outage() {
    let fixed = goodput_around_an_outage(BackpressureLayer::new(50)).await;
    for (name, adaptive) in [
        ("AIMD", Adaptive::aimd(Aimd::default())),
        ("gradient", Adaptive::gradient(Gradient::default())),
    ] {
        let got = goodput_around_an_outage(
            BackpressureLayer::adaptive(adaptive.clock(Clock::tokio())).unwrap(),
        )
        .await;
        eprintln!("outage 2-4 s, per second: {name} {got:?}, fixed {fixed:?}");
        // Seconds 5 and 6: the 2nd and 3rd after the dependency healed at 4 s (issue 14:
        // within 1 s, at least 95%).
        for s in [5, 6] {
            assert!(
                got[s] * 100 >= fixed[s] * 95,
                "second {s} (healed at 4 s): {name} served {} where a fixed limit of 50 served {} \
                 (per second: {name} {got:?}, fixed {fixed:?})",
                got[s],
                fixed[s]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Defect (makes an outage worse): while Redis does not answer, EVERY check waits the whole
// timeout (50 ms by default) before the failure policy decides: nothing remembers that the
// store is down (`degraded()` is known), so each request of the service pays the timeout and
// a server at N requests/s holds N × timeout checks parked at once, for as long as the
// outage lasts. Once a check has timed out, the next ones should be decided by the policy
// at once for a while (probing the store now and then), not wait out the timeout each.
// ---------------------------------------------------------------------------------------------
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_hang_does_not_cost_every_request_the_timeout() {
    use tower_bulwark::rate_limit::store::{RedisRateLimitConfig, RedisRateLimitLayer};
    let Some(server) =
        redis_server::RedisServer::start("redis_hang_does_not_cost_every_request_the_timeout")
    else {
        return;
    };
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_connection_manager().await.unwrap();
    let layer = RedisRateLimitLayer::new(
        conn,
        RedisRateLimitConfig::new(Quota::per_second(1000).unwrap())
            .prefix("attack2:hang:")
            .unwrap(),
    )
    .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(Ok200);
    assert!(svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .is_ok());
    // Redis holds every client's commands for 3 s: the connection stays up, nothing answers.
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        // Decided by the default policy (the local fallback): admitted.
        assert!(svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .is_ok());
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(400),
        "20 requests during the hang took {took:?} ({} timeouts): each waited the 50 ms timeout",
        handle.timeouts()
    );
    // One check met the timeout; the others were decided at once, counted as skipped.
    assert_eq!((handle.timeouts(), handle.skipped()), (1, 19));
    assert_eq!(handle.local_fallbacks(), 20);
    assert!(handle.degraded());
}
