//! Attacks on the rate limiter, from its public API only. Each `#[ignore]`d test asserts a
//! promised behaviour and fails on the current code because of the defect named on it.

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;
#[cfg(feature = "redis")]
use redis_server::RedisServer;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Request;
use tower::{BoxError, Layer, Service};
use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::{key, RateLimitConfig};
use tower_bulwark::{Quota, RateLimitLayer, Rejection, RejectionKind, RejectionLayer};

/// A ready service that counts its calls.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicU64>);

impl<Req> Service<Req> for Counting {
    type Response = http::Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<String>, Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(http::Response::new(String::new())))
    }
}

fn noop_cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// Polls ready and calls; returns the response future (not yet polled).
fn start<S: Service<Req>, Req>(svc: &mut S, req: Req) -> S::Future {
    let mut cx = noop_cx();
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    svc.call(req)
}

/// Polls a future once: `Some(result)` if it finished.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
    let mut cx = noop_cx();
    match Pin::new(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn rejection(err: &BoxError) -> &Rejection {
    err.downcast_ref::<Rejection>()
        .unwrap_or_else(|| panic!("not a rejection: {err}"))
}

fn get() -> Request<()> {
    Request::get("/").body(()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Defect: raising the quota at run time leaves an already-limited client locked out for the
// *old* quota's period. `RateLimitHandle::set_quota` promises "a key that spent its burst
// under the old quota is whole again as soon as the new quota says so"; the TAT (set under
// 1 per hour) is kept as is, so after `set_quota(per_second(10))` the client is refused for
// about an hour, with `retry_after` ≈ 3599 s, although the new quota refills in 1 s.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn raising_the_quota_frees_a_limited_client_within_the_new_window() {
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_hour(1).unwrap()).clock(Clock::tokio()),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    assert!(poll_once(&mut start(&mut svc, get())).unwrap().is_ok());
    // Spent: refused for an hour under the old quota.
    assert!(poll_once(&mut start(&mut svc, get())).unwrap().is_err());

    // The operator raises the limit to 10 a second during an incident.
    handle.set_quota(Quota::per_second(10).unwrap());
    // The new quota's whole window (1 s) later, the client must be whole again.
    tokio::time::advance(Duration::from_secs(1)).await;
    let res = poll_once(&mut start(&mut svc, get())).unwrap();
    if let Err(e) = &res {
        panic!(
            "still refused 1 s after raising the quota to 10/s: retry_after {:?}",
            rejection(e).retry_after()
        );
    }
    assert_eq!(
        handle.remaining(),
        9,
        "a whole 10/s bucket after one request"
    );
}

// Same for a keyed limiter: the limited key stays locked out for the old period.
#[tokio::test(start_paused = true)]
async fn raising_the_quota_frees_a_limited_key_within_the_new_window() {
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_hour(1).unwrap()).clock(Clock::tokio()),
        |r: &Request<()>| r.uri().path().to_owned(),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(Counting::default());
    assert!(poll_once(&mut start(&mut svc, get())).unwrap().is_ok());
    assert!(poll_once(&mut start(&mut svc, get())).unwrap().is_err());
    handle.set_quota(Quota::per_second(10).unwrap());
    tokio::time::advance(Duration::from_secs(1)).await;
    let res = poll_once(&mut start(&mut svc, get())).unwrap();
    if let Err(e) = &res {
        panic!(
            "key still refused 1 s after raising the quota to 10/s: retry_after {:?}",
            rejection(e).retry_after()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Defect: waiters that go away in the order they came (the usual case: client timeouts fire
// in order) give back no turn but the last one. With `wait_up_to`, a client that queues N
// requests and drops them keeps the limit spent for N intervals: every other caller is
// refused (or waits) for turns nobody uses. The promise: a waiting client that goes away
// gives its turn back. (`ResponseFuture`'s docs admit "unless a later turn was reserved
// meanwhile"; `RateLimitLayer::wait_up_to`'s docs say nothing of it.)
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn waiters_dropped_in_order_give_their_turns_back() {
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(1).unwrap().burst(1).unwrap()).clock(Clock::tokio()),
    )
    .wait_up_to(Duration::from_secs(60));
    let handle = layer.handle();
    let calls = Counting::default();
    let mut svc = layer.layer(calls.clone());
    // The burst, at once.
    assert!(poll_once(&mut start(&mut svc, get())).unwrap().is_ok());
    // An attacker (or a client whose callers time out) queues 30 waiters...
    let mut waiters: Vec<_> = (0..30).map(|_| start(&mut svc, get())).collect();
    for w in &mut waiters {
        assert!(poll_once(w).is_none(), "waits for its reserved turn");
    }
    // ...and drops them, first come first gone.
    for w in waiters.drain(..) {
        drop(w);
    }
    // One interval later the next token is due: the 30 turns were given back.
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut f = start(&mut svc, get());
    let got = poll_once(&mut f);
    assert!(
        matches!(got, Some(Ok(_))),
        "a fresh request 1 s later must be admitted at once; remaining {} (turns still held by \
         dropped waiters)",
        handle.remaining()
    );
}

// ---------------------------------------------------------------------------------------------
// Defect: the hints clients wait out are not jittered. Every client refused at one instant
// gets the same `retry_after` (and the same `Retry-After` header), so a herd refused
// together comes back together, in lock step, at the next token. Promised: every hint a
// client waits out is jittered.
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn retry_after_hints_are_jittered() {
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(1).unwrap()).clock(Clock::tokio()),
    );
    let mut svc = layer.layer(Counting::default());
    assert!(poll_once(&mut start(&mut svc, get())).unwrap().is_ok());
    let mut hints = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let err = poll_once(&mut start(&mut svc, get())).unwrap().unwrap_err();
        hints.insert(rejection(&err).retry_after().unwrap());
    }
    assert!(
        hints.len() > 1,
        "64 clients refused at one instant all told to retry after exactly {:?}",
        hints.iter().next().unwrap()
    );
}

// The same at the HTTP level: 64 clients, one `Retry-After`, and its sub-second wait
// (the next token is 100 ms away) rounded up to one second for everyone.
#[tokio::test(start_paused = true)]
async fn http_retry_after_is_jittered() {
    let layer = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_second(10).unwrap()).clock(Clock::tokio()),
    );
    let mut svc = RejectionLayer::http().layer(layer.layer(Counting::default()));
    for _ in 0..10 {
        let res = poll_once(&mut start(&mut svc, get())).unwrap().unwrap();
        assert_eq!(res.status(), 200);
    }
    let mut values = std::collections::BTreeSet::new();
    let mut ratelimit = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let res = poll_once(&mut start(&mut svc, get())).unwrap().unwrap();
        assert_eq!(res.status(), 429);
        values.insert(res.headers()["retry-after"].to_str().unwrap().to_owned());
        ratelimit.insert(res.headers()["ratelimit"].to_str().unwrap().to_owned());
    }
    assert!(
        values.len() > 1,
        "every 429 says Retry-After {values:?} (RateLimit {ratelimit:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// ClientIp: a spoofed forwarding header from an untrusted peer. (Held up: kept as a guard.)
// ---------------------------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn spoofed_forwarding_headers_from_untrusted_peers_do_not_pick_the_key() {
    let ip = key::ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(1).unwrap()).clock(Clock::tokio()),
        ip,
    );
    let mut svc = layer.layer(Counting::default());
    let mut admitted = 0;
    for i in 0..20 {
        let mut r = Request::get("/")
            .header("x-forwarded-for", format!("10.0.0.{i}, 203.0.113.{i}"))
            .header("forwarded", format!("for=198.51.100.{i}"))
            .body(())
            .unwrap();
        r.extensions_mut()
            .insert("[::ffff:192.0.2.1]:4000".parse::<SocketAddr>().unwrap());
        if poll_once(&mut start(&mut svc, r)).unwrap().is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 1);
}

// A request with no peer address is refused and counted, never put in one bucket. (Held up.)
#[tokio::test(start_paused = true)]
async fn no_peer_address_is_refused_and_counted() {
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_second(100).unwrap()).clock(Clock::tokio()),
        key::ClientIp::new(),
    );
    let h = layer.handle();
    let mut svc = layer.layer(Counting::default());
    let err = poll_once(&mut start(&mut svc, get())).unwrap().unwrap_err();
    assert_eq!(rejection(&err).kind(), RejectionKind::ClientAddressUnknown);
    assert_eq!(h.missing_keys(), 1);
}

// ---------------------------------------------------------------------------------------------
// Defect: every setter of `RedisRateLimitLayer` (prefix, timeout, wait_up_to, failure_policy,
// clock, max_keys) rebuilds the layer's shared state, so a handle taken earlier is orphaned:
// its `set_quota` changes a state no service uses, and its counters stay at zero while the
// layer refuses requests. Promised: no setting orphans a handle taken earlier; handles change
// the quota at run time.
// ---------------------------------------------------------------------------------------------
//
// The settings are now part of the configuration the layer is made from
// (`RedisRateLimitConfig`), so none can be written after a handle is taken; the one call left
// on the layer (`response_headers`) keeps its state.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_handle_taken_before_a_setter_still_drives_the_layer() {
    use tower_bulwark::rate_limit::store::{
        FailurePolicy, RedisRateLimitConfig, RedisRateLimitLayer,
    };
    let server = server_or_skip!("redis_handle_taken_before_a_setter_still_drives_the_layer");
    let c = redis_server::conn(&server.url()).await;
    let layer = RedisRateLimitLayer::keyed(
        c,
        RedisRateLimitConfig::new(Quota::per_minute(2).unwrap())
            .prefix("att3-orphan:")
            .unwrap()
            .timeout(Duration::from_secs(2))
            .unwrap()
            .failure_policy(FailurePolicy::FailClosed),
        |r: &Vec<u8>| r.clone(),
    )
    .unwrap();
    let early = layer.handle();
    let layer = layer.response_headers();
    let late = layer.handle();
    let mut svc = layer.layer(Counting::default());
    let mut refused = 0;
    for _ in 0..3 {
        let mut cx = noop_cx();
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        if svc.call(b"k".to_vec()).await.is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 1);
    assert_eq!(late.rejected(), 1);
    // The handle taken first must see the same layer...
    assert_eq!(
        early.rejected(),
        1,
        "the early handle's counters never move"
    );
    // ...and drive it.
    early.set_quota(Quota::per_minute(1000).unwrap()).unwrap();
    assert_eq!(late.quota(), Quota::per_minute(1000).unwrap());
}

// The other face: a quota changed through a handle is silently undone by a later setter,
// which rebuilds the state from the quota given at construction.
// (The failure policy is given before the layer exists; the call left on the layer,
// `response_headers`, must keep the quota.)
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_setter_keeps_a_quota_set_at_run_time() {
    use tower_bulwark::rate_limit::store::{
        FailurePolicy, RedisRateLimitConfig, RedisRateLimitLayer,
    };
    let server = server_or_skip!("redis_setter_keeps_a_quota_set_at_run_time");
    let c = redis_server::conn(&server.url()).await;
    let layer = RedisRateLimitLayer::new(
        c,
        RedisRateLimitConfig::new(Quota::per_minute(2).unwrap())
            .failure_policy(FailurePolicy::FailOpen),
    )
    .unwrap();
    layer
        .handle()
        .set_quota(Quota::per_minute(1000).unwrap())
        .unwrap();
    let layer = layer.response_headers();
    assert_eq!(layer.handle().quota(), Quota::per_minute(1000).unwrap());
    assert_eq!(layer.handle().policy(), FailurePolicy::FailOpen);
}

fn from_peer(peer: &str, xff: &[&[u8]]) -> Request<()> {
    let mut r = Request::get("/").body(()).unwrap();
    for v in xff {
        r.headers_mut()
            .append("x-forwarded-for", http::HeaderValue::from_bytes(v).unwrap());
    }
    r.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    r
}

// ---------------------------------------------------------------------------------------------
// Defect (security): one non-UTF-8 byte that the *client* writes in the left part of
// `X-Forwarded-For` makes `ClientIp` give up on the whole header value, even though the
// trusted proxy appended the real client address on the right of the same value (what
// nginx's `$proxy_add_x_forwarded_for` does). The key becomes the proxy's own address: the
// attacker escapes its per-client limit (it draws on the proxy's bucket, shared with everyone
// who does the same, in addition to its own), and can drain that shared bucket. The docs:
// entries are read right to left and the first address that is not a trusted proxy is the
// client; only an entry that cannot be parsed *before* a client address is found stops it.
// ---------------------------------------------------------------------------------------------
#[test]
fn client_bytes_left_of_the_proxy_entry_do_not_rekey_the_client_as_the_proxy() {
    let ip = key::ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
    // The proxy (10.0.0.1) appended the real peer 203.0.113.7 to what the client sent.
    let r = from_peer("10.0.0.1:443", &[b"\xff\xfe, 203.0.113.7"]);
    assert_eq!(
        ip.client_ip(&r),
        Some("203.0.113.7".parse().unwrap()),
        "the client is the rightmost untrusted entry, whatever the client wrote on its left"
    );
}

// The limit itself: two clients (behind one trusted proxy) that each send the trick share the
// proxy's bucket, and each also keeps its own: double quota, and a bucket an attacker can drain.
#[tokio::test(start_paused = true)]
async fn non_utf8_forwarding_header_does_not_escape_the_per_client_limit() {
    let ip = key::ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_minute(1).unwrap()).clock(Clock::tokio()),
        ip,
    );
    let mut svc = layer.layer(Counting::default());
    let mut admitted = 0;
    for v in [&b"198.51.100.1, 203.0.113.7"[..], b"\xff, 203.0.113.7"] {
        if poll_once(&mut start(&mut svc, from_peer("10.0.0.1:443", &[v])))
            .unwrap()
            .is_ok()
        {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 1, "one client, one request a minute");
}

// ---------------------------------------------------------------------------------------------
// Defect: a trusted proxy network written in IPv4-mapped IPv6 form (`::ffff:10.0.0.0/104`,
// how a dual-stack listener reports IPv4 peers) is accepted by `trust_proxies` but never
// matches: `IpNet::contains` canonicalises the address but not the network. The setting
// silently does nothing: the forwarding header is ignored and every client behind the proxy
// is keyed as the proxy: one bucket for all of them.
// ---------------------------------------------------------------------------------------------
#[test]
fn trusted_network_in_mapped_form_is_trusted() {
    let ip = key::ClientIp::new()
        .trust_proxies(["::ffff:10.0.0.0/104"])
        .unwrap();
    let r = from_peer("[::ffff:10.0.0.1]:443", &[b"203.0.113.7"]);
    assert_eq!(ip.client_ip(&r), Some("203.0.113.7".parse().unwrap()));
}

// Held up: many XFF lines, mapped IPv4, bracketed IPv6 with ports, trusted hops skipped.
#[test]
fn forwarding_chain_forms_hold_up() {
    let ip = key::ClientIp::new()
        .trust_proxies(["10.0.0.0/8", "fd00::/8"])
        .unwrap()
        .ipv6_prefix(64)
        .unwrap();
    let r = from_peer(
        "[::ffff:10.0.0.1]:443",
        &[
            b"6.6.6.6",
            b"1.1.1.1, [2001:db8:1:2::99]:4711",
            b"::ffff:10.2.2.2, [fd00::1]",
        ],
    );
    assert_eq!(ip.client_ip(&r), Some("2001:db8:1:2::".parse().unwrap()));
    let r = from_peer("[::ffff:10.0.0.1]:443", &[b"::ffff:203.0.113.9"]);
    assert_eq!(ip.client_ip(&r), Some("203.0.113.9".parse().unwrap()));
}

// Held up: a flood of distinct keys far beyond `max_keys` does not reset a drained victim's
// limit (the key closest to whole is the one evicted), and evictions are counted.
#[tokio::test(start_paused = true)]
async fn a_key_flood_does_not_reset_a_drained_key() {
    let layer = RateLimitLayer::keyed(
        RateLimitConfig::new(Quota::per_minute(3).unwrap())
            .clock(Clock::tokio())
            .max_keys(8),
        |r: &u64| *r,
    );
    let h = layer.handle();
    let mut svc = layer.layer(Counting::default());
    for _ in 0..3 {
        assert!(poll_once(&mut start(&mut svc, 0u64)).unwrap().is_ok());
    }
    for k in 1..50_000u64 {
        let _ = poll_once(&mut start(&mut svc, k));
    }
    assert!(h.evictions() > 0);
    assert!(poll_once(&mut start(&mut svc, 0u64)).unwrap().is_err());
}

// Held up: under Axum, `route_layer` and `layer` (one `Layer::layer` call per route) draw on
// one limit, and the 429 carries Retry-After, RateLimit headers and problem+json.
#[tokio::test(start_paused = true)]
async fn axum_routes_share_one_limit() {
    use axum::{body::Body, routing::get, Router};
    use tower::{ServiceBuilder, ServiceExt};
    let rl = RateLimitLayer::new(
        RateLimitConfig::new(Quota::per_minute(2).unwrap()).clock(Clock::tokio()),
    );
    for per_route in [false, true] {
        let layer = rl.clone();
        let routes = Router::new()
            .route("/a", get(|| async { "a" }))
            .route("/b", get(|| async { "b" }));
        let app = if per_route {
            routes.route_layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(layer),
            )
        } else {
            routes.layer(
                ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(layer),
            )
        };
        let req = |p: &str| Request::get(p).body(Body::empty()).unwrap();
        let mut statuses = vec![];
        for p in ["/a", "/b", "/a", "/b"] {
            let res = app.clone().oneshot(req(p)).await.unwrap();
            statuses.push(res.status().as_u16());
            if res.status() == 429 {
                assert!(res.headers().contains_key("retry-after"));
                assert!(res.headers().contains_key("ratelimit"));
                assert!(res.headers().contains_key("ratelimit-policy"));
                assert_eq!(res.headers()["content-type"], "application/problem+json");
            }
        }
        let ok = statuses.iter().filter(|&&s| s == 200).count();
        // The second pass uses a clone of the same layer: its limit is already spent.
        assert_eq!(ok, if per_route { 0 } else { 2 }, "{statuses:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Defect (docs, security-relevant): the README's server stack keys the limit by
// `key::Header::new("x-api-key")`, a value the client writes, with nothing authenticating it
// first and no warning. One attacker that puts a fresh `x-api-key` on each request gets a
// fresh burst (200) each time: the limit never refuses it, and its flood fills the
// backpressure permits (256) that every caller shares, so a well-behaved key is shed (503).
// (A flood from ONE key held up: it is refused past its burst and others keep their service.)
// ---------------------------------------------------------------------------------------------
//
// The README's stack now limits per client address (`key::ClientIp`) in front of the per-key
// limit: the flood, from one address, is refused past that address's burst whatever keys it
// rotates through.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn readme_stack_a_flood_with_rotating_keys_does_not_starve_other_keys() {
    readme_stack_flood(|i| format!("attacker-{i}")).await;
}

// Held up: the same flood from one key is refused past its burst; the victim is served.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn readme_stack_a_flood_from_one_key_does_not_starve_other_keys() {
    readme_stack_flood(|_| "attacker".to_owned()).await;
}

/// The README's server stack (tokio's clock, a handler that takes 1 s), a flood of 400
/// concurrent requests with `attacker_key(i)` from one client address, then one request of
/// another key from another address (as Axum records them, `ConnectInfo`): it must be served.
#[cfg(feature = "axum")]
async fn readme_stack_flood(attacker_key: fn(usize) -> String) {
    use axum::extract::ConnectInfo;
    use axum::{body::Body, routing::get, Router};
    use tower::{ServiceBuilder, ServiceExt};
    use tower_bulwark::{BackpressureLayer, IdempotencyLayer, MemoryStore};
    let app: Router = Router::new()
        .route(
            "/orders",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                "ok"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(RateLimitLayer::keyed(
                    RateLimitConfig::new(Quota::per_second(100).unwrap().burst(200).unwrap())
                        .clock(Clock::tokio()),
                    key::ClientIp::new(),
                ))
                .layer(RateLimitLayer::keyed(
                    RateLimitConfig::new(Quota::per_second(100).unwrap().burst(200).unwrap())
                        .clock(Clock::tokio()),
                    key::Header::new("x-api-key"),
                ))
                .layer(BackpressureLayer::new(256).max_wait(Duration::from_millis(50)))
                .layer(
                    IdempotencyLayer::builder(MemoryStore::default())
                        .scope_by_header("x-api-key")
                        .build()
                        .unwrap(),
                ),
        );
    let req = |k: String, peer: &str| {
        let mut r = Request::get("/orders")
            .header("x-api-key", k)
            .body(Body::empty())
            .unwrap();
        r.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        r
    };
    let mut flood = Vec::new();
    for i in 0..400 {
        flood.push(tokio::spawn(
            app.clone()
                .oneshot(req(attacker_key(i), "203.0.113.66:40000")),
        ));
    }
    // Let the flood reach the handler (all of it is in flight, sleeping).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let victim = app
        .clone()
        .oneshot(req("victim".into(), "198.51.100.7:50000"))
        .await
        .unwrap();
    let mut statuses = std::collections::BTreeMap::new();
    for f in flood {
        *statuses
            .entry(f.await.unwrap().unwrap().status().as_u16())
            .or_insert(0) += 1;
    }
    assert_eq!(
        victim.status(),
        200,
        "the victim's key was shed; the attacker's 400 requests got {statuses:?}"
    );
}
