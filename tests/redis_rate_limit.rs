//! The Redis-backed rate limiter against a real `redis-server` (skipped, with a message, when
//! the binary is absent; required when `BULWARK_REQUIRE_REDIS=1`).
//!
//! These tests run in real time: a paused runtime would advance its clock while waiting for
//! Redis's socket and fire the checks' timeouts. Nothing sleeps: each step waits only for
//! Redis's replies (or a check's own timeout).
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;

#[path = "support/tracing_on.rs"]
mod tracing_on;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::{body::Body, routing::get, Router};
use futures_util::future::join_all;
use http::{Request, StatusCode};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::store::{
    FailurePolicy, LocalFallback, RedisConfigError, RedisRateLimitConfig, RedisRateLimitHandle,
    RedisRateLimitLayer,
};
use tower_bulwark::{Quota, Rejection, RejectionKind, RejectionLayer};

use redis_server::{conn, RedisServer};

/// Checks in these tests may take long on a loaded machine without being failures: a stopped
/// server is seen at once (connection refused), not by the timeout.
const PATIENT: Duration = Duration::from_secs(2);

fn patient(quota: Quota) -> RedisRateLimitConfig {
    RedisRateLimitConfig::new(quota).timeout(PATIENT).unwrap()
}

/// A ready service that counts its calls.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicU64>);

impl Counting {
    fn calls(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<Req> Service<Req> for Counting {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

fn kind(err: &BoxError) -> RejectionKind {
    err.downcast_ref::<Rejection>()
        .unwrap_or_else(|| panic!("not a rejection: {err}"))
        .kind()
}

type Key = Vec<u8>;

fn by_request(req: &Key) -> Key {
    req.clone()
}

/// Two replicas: two layers, two connections, local clocks a day apart.
async fn replicas(
    url: &str,
    quota: Quota,
    prefix: &str,
) -> [(RedisRateLimitLayer<fn(&Key) -> Key>, RedisRateLimitHandle); 2] {
    let mut out = Vec::new();
    for skew in [0u64, 86_400_000_000_000] {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(skew);
        let layer = RedisRateLimitLayer::keyed(
            conn(url).await,
            patient(quota)
                .prefix(prefix)
                .unwrap()
                .local_fallback(LocalFallback::new().clock(clock)),
            by_request as fn(&Key) -> Key,
        )
        .unwrap();
        let handle = layer.handle();
        out.push((layer, handle));
    }
    out.try_into().ok().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_the_quota_over_a_window() {
    let server = server_or_skip!("two_replicas_admit_exactly_the_quota_over_a_window");
    // 25 per hour: the window (one hour) spans the whole test, so exactly 25 are admitted.
    let quota = Quota::per_hour(25).unwrap();
    let [(a, ha), (b, hb)] = replicas(&server.url(), quota, "t1:").await;
    let calls = Counting::default();
    let sa = ServiceBuilder::new().layer(a).service(calls.clone());
    let sb = ServiceBuilder::new().layer(b).service(calls.clone());
    // 64 concurrent requests for one key, split across the replicas, then 36 more in turn.
    let burst = (0..64).map(|i| {
        let svc = if i % 2 == 0 { sa.clone() } else { sb.clone() };
        svc.oneshot(b"tenant-1".to_vec())
    });
    let results = join_all(burst).await;
    let mut admitted = results.iter().filter(|r| r.is_ok()).count();
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(kind(r), RejectionKind::RateLimited);
        let rej = r.downcast_ref::<Rejection>().unwrap();
        let after = rej.retry_after().unwrap();
        // The next token comes one interval (144 s) after the first admit, give or take the
        // test's run time; the hint adds a jitter of less than that time again.
        assert!(
            after > Duration::from_secs(140) && after < Duration::from_secs(288),
            "{after:?}"
        );
        let info = rej.rate_limit().unwrap();
        assert_eq!(info.limit, 25);
        assert_eq!(info.remaining, 0);
        assert_eq!(info.window, Duration::from_secs(3600));
    }
    for i in 0..36 {
        let svc = if i % 2 == 0 { sa.clone() } else { sb.clone() };
        if svc.oneshot(b"tenant-1".to_vec()).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 25);
    assert_eq!(calls.calls(), 25);
    assert_eq!(ha.rejected() + hb.rejected(), 100 - 25);
    assert_eq!(ha.store_failures() + hb.store_failures(), 0);
    // Another key has its own limit.
    assert!(sa.clone().oneshot(b"tenant-2".to_vec()).await.is_ok());
}

#[tokio::test]
async fn global_limit_shared_by_two_layers() {
    let server = server_or_skip!("global_limit_shared_by_two_layers");
    let quota = Quota::per_minute(10).unwrap().burst(4).unwrap();
    let mk = |c| RedisRateLimitLayer::new(c, patient(quota).prefix("t2:").unwrap()).unwrap();
    let calls = Counting::default();
    let mut sa = ServiceBuilder::new()
        .layer(mk(conn(&server.url()).await))
        .service(calls.clone());
    let mut sb = ServiceBuilder::new()
        .layer(mk(conn(&server.url()).await))
        .service(calls.clone());
    for i in 0..10 {
        let svc = if i % 2 == 0 { &mut sa } else { &mut sb };
        let _ = ServiceExt::<()>::ready(svc).await.unwrap().call(()).await;
    }
    assert_eq!(calls.calls(), 4);
}

#[tokio::test]
async fn script_flush_mid_run_reloads_the_script() {
    let server = server_or_skip!("script_flush_mid_run_reloads_the_script");
    let c = conn(&server.url()).await;
    let layer =
        RedisRateLimitLayer::new(c.clone(), patient(Quota::per_second(1000).unwrap())).unwrap();
    let handle = layer.handle();
    let calls = Counting::default();
    let svc = ServiceBuilder::new().layer(layer).service(calls.clone());
    svc.clone().oneshot(()).await.unwrap();
    let mut admin = c.clone();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    let loaded: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(redis::Script::new(include_str!("../src/rate_limit/store/gcra.lua")).get_hash())
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(loaded, [false]);
    svc.clone().oneshot(()).await.unwrap();
    svc.clone().oneshot(()).await.unwrap();
    assert_eq!(calls.calls(), 3);
    assert_eq!(handle.store_failures(), 0);
}

/// Calls of a command since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
async fn calls(admin: &mut ConnectionManager, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn one_round_trip_per_check() {
    let server = server_or_skip!("one_round_trip_per_check");
    let c = conn(&server.url()).await;
    let layer = RedisRateLimitLayer::keyed(
        c.clone(),
        patient(Quota::per_second(2).unwrap()),
        by_request,
    )
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(Counting::default());
    // The first check ever loads the script.
    svc.clone().oneshot(b"warm".to_vec()).await.unwrap();
    let mut admin = c.clone();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Admitted or rejected, each check is one EVALSHA and nothing else.
    for _ in 0..5 {
        let _ = svc.clone().oneshot(b"k".to_vec()).await;
    }
    assert_eq!(calls(&mut admin, "evalsha").await, 5);
    assert_eq!(calls(&mut admin, "eval").await, 0);
    assert_eq!(calls(&mut admin, "script|load").await, 0);
    // Inside the script (Redis counts those too): one GET per check, a SET per admit only
    // (burst 2: two admitted, three rejected without a write).
    assert_eq!(calls(&mut admin, "get").await, 5);
    assert_eq!(calls(&mut admin, "set").await, 2);
}

#[tokio::test]
async fn hostile_keys_stay_under_the_prefix_and_expire() {
    let server = server_or_skip!("hostile_keys_stay_under_the_prefix_and_expire");
    let c = conn(&server.url()).await;
    let quota = Quota::per_second(2).unwrap().burst(3).unwrap(); // window 1.5 s
    let layer = RedisRateLimitLayer::keyed(
        c.clone(),
        patient(quota).prefix("app:rl:").unwrap(),
        by_request,
    )
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(Counting::default());
    let hostile: Vec<Key> = vec![
        b"}{".to_vec(),
        b"{other}".to_vec(),
        b"x}y{z".to_vec(),
        b"*".to_vec(),
        b"app:rl:{0123}".to_vec(),
        vec![0u8, 0xff, b'\n', b'{'],
        vec![b'{'; 1 << 20], // 1 MiB of braces
        Vec::new(),
    ];
    for k in &hostile {
        svc.clone().oneshot(k.clone()).await.unwrap();
    }
    let mut admin = c.clone();
    let keys: Vec<Vec<u8>> = admin.keys("*").await.unwrap();
    assert_eq!(keys.len(), hostile.len(), "one Redis key per user key");
    for k in &keys {
        let tag = k
            .strip_prefix(b"app:rl:{")
            .and_then(|r| r.strip_suffix(b"}"))
            .unwrap_or_else(|| panic!("key outside the prefix: {:?}", String::from_utf8_lossy(k)));
        assert_eq!(tag.len(), 32);
        assert!(tag.iter().all(u8::is_ascii_hexdigit));
        // Every key expires when its state is in the past: one interval (500 ms) ahead.
        let ttl: i64 = admin.pttl(k).await.unwrap();
        assert!(ttl > 0 && ttl <= 500, "ttl {ttl}");
    }
    // A third and fourth request of one key: the TTL follows the state (3 intervals ahead).
    for _ in 0..2 {
        svc.clone().oneshot(b"}{".to_vec()).await.unwrap();
    }
    let ttls: Vec<i64> = {
        let mut v = Vec::new();
        for k in &keys {
            v.push(admin.pttl(k).await.unwrap());
        }
        v
    };
    assert_eq!(ttls.iter().filter(|&&t| t > 1000 && t <= 1500).count(), 1);
}

#[tokio::test]
async fn redis_stopped_mid_run_each_policy_then_recovers() {
    let mut server = server_or_skip!("redis_stopped_mid_run_each_policy_then_recovers");
    let c = conn(&server.url()).await;
    let quota = Quota::per_hour(3).unwrap();
    let calls = Counting::default();
    // No cool-down: each check of this sequential run goes to Redis (as the probe), so each
    // policy meets five real failures (the cool-down has its own test below).
    let mk = |policy, prefix| {
        RedisRateLimitLayer::keyed(
            c.clone(),
            patient(quota)
                .prefix(prefix)
                .unwrap()
                .cool_down(Duration::ZERO)
                .failure_policy(policy),
            by_request,
        )
        .unwrap()
    };
    let open = mk(FailurePolicy::FailOpen, "open:");
    let closed = mk(FailurePolicy::FailClosed, "closed:");
    let local = mk(FailurePolicy::Local, "local:");
    let (ho, hc, hl) = (open.handle(), closed.handle(), local.handle());
    let so = ServiceBuilder::new().layer(open).service(calls.clone());
    let sc = ServiceBuilder::new().layer(closed).service(calls.clone());
    let sl = ServiceBuilder::new().layer(local).service(calls.clone());

    // Healthy: each layer admits one request of key "k".
    for s in [&so, &sc, &sl] {
        s.clone().oneshot(b"k".to_vec()).await.unwrap();
    }
    assert_eq!(calls.calls(), 3);

    server.stop();

    // FailOpen: everything admitted, counted.
    for _ in 0..5 {
        so.clone().oneshot(b"k".to_vec()).await.unwrap();
    }
    assert_eq!(ho.failed_open(), 5);
    assert_eq!(ho.store_failures(), 5);
    assert!(ho.degraded());
    assert_eq!(calls.calls(), 8);

    // FailClosed: refused with StoreUnavailable; the inner service never runs.
    for _ in 0..5 {
        let err = sc.clone().oneshot(b"k".to_vec()).await.unwrap_err();
        assert_eq!(kind(&err), RejectionKind::StoreUnavailable);
    }
    assert_eq!(hc.failed_closed(), 5);
    assert_eq!(calls.calls(), 8);

    // Local: an in-process limiter of the same quota (3 per hour) decides.
    let mut local_ok = 0;
    for _ in 0..5 {
        match sl.clone().oneshot(b"k".to_vec()).await {
            Ok(()) => local_ok += 1,
            Err(e) => assert_eq!(kind(&e), RejectionKind::RateLimited),
        }
    }
    assert_eq!(local_ok, 3);
    assert_eq!(hl.local_fallbacks(), 5);
    assert_eq!(hl.rejected(), 2);
    assert_eq!(calls.calls(), 11);

    // Redis back (empty): the same services recover with no restart. Reconnection happens in
    // the background; each failing attempt takes at most the 50 ms timeout.
    server.restart();
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 200, "no recovery");
        let before = hc.store_failures();
        let r = sc.clone().oneshot(b"k".to_vec()).await;
        if hc.store_failures() == before {
            r.unwrap();
            break;
        }
    }
    assert!(!hc.degraded());
    // Recovered for good: the limit counts in Redis again (the restarted Redis is empty, so
    // "k" has its whole quota: 2 more after the one above).
    let before = hc.store_failures();
    sc.clone().oneshot(b"k".to_vec()).await.unwrap();
    sc.clone().oneshot(b"k".to_vec()).await.unwrap();
    let err = sc.clone().oneshot(b"k".to_vec()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::RateLimited);
    assert_eq!(hc.store_failures(), before);
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_cut_off_by_the_timeout() {
    let server = server_or_skip!("a_redis_that_does_not_answer_is_cut_off_by_the_timeout");
    let c = conn(&server.url()).await;
    let layer = RedisRateLimitLayer::new(
        c.clone(),
        RedisRateLimitConfig::new(Quota::per_hour(100).unwrap())
            .timeout(Duration::from_millis(30))
            .unwrap()
            // Each sequential check is the probe: each meets the timeout.
            .cool_down(Duration::ZERO)
            .failure_policy(FailurePolicy::FailOpen),
    )
    .unwrap();
    let handle = layer.handle();
    let calls = Counting::default();
    let svc = ServiceBuilder::new().layer(layer).service(calls.clone());
    svc.clone().oneshot(()).await.unwrap();
    // Redis holds every client's commands for a second (the connection stays up, nothing
    // answers).
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    for _ in 0..3 {
        svc.clone().oneshot(()).await.unwrap();
    }
    assert_eq!(handle.timeouts(), 3);
    assert_eq!(handle.failed_open(), 3);
    assert_eq!(calls.calls(), 4);
    // When the pause ends, checks succeed again (each failed attempt takes the 30 ms timeout).
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 100, "no recovery");
        let before = handle.store_failures();
        svc.clone().oneshot(()).await.unwrap();
        if handle.store_failures() == before {
            break;
        }
    }
    assert!(!handle.degraded());
    assert!(handle.timeouts() >= 3);
}

#[tokio::test]
async fn failures_are_logged_once_a_second_and_the_recovery_once() {
    let mut server = server_or_skip!("failures_are_logged_once_a_second_and_the_recovery_once");
    let (logs, _guard) = tracing_on::capture(tracing::Level::INFO);
    // The log and the cool-down follow this clock; the default cool-down of 1 s.
    let (clock, hand) = Clock::manual();
    let layer = RedisRateLimitLayer::new(
        conn(&server.url()).await,
        patient(Quota::per_hour(100).unwrap()).local_fallback(LocalFallback::new().clock(clock)),
    )
    .unwrap();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(Counting::default());
    svc.clone().oneshot(()).await.unwrap();
    server.stop();
    for _ in 0..20 {
        svc.clone().oneshot(()).await.unwrap();
    }
    assert_eq!(handle.local_fallbacks(), 20);
    // One failure, then nineteen checks skipped in its cool-down, within a second: one line,
    // which names the policy.
    assert_eq!((handle.store_failures(), handle.skipped()), (1, 19));
    assert_eq!(logs.count("store unavailable"), 1);
    assert_eq!(logs.count("policy=Local"), 1);
    server.restart();
    let mut attempts = 0;
    while handle.degraded() || attempts == 0 {
        attempts += 1;
        assert!(attempts < 200, "no recovery");
        // Past the cool-down: this check is the probe.
        hand.advance(Duration::from_secs(1));
        svc.clone().oneshot(()).await.unwrap();
    }
    assert_eq!(logs.count("store reachable again"), 1);
}

/// An outage costs one check the timeout: the checks after it are decided by the policy at
/// once, without asking Redis, for the cool-down; then one check at a time probes Redis while
/// the others still skip it; the first answered probe ends the outage for every check.
#[tokio::test]
async fn after_a_timeout_checks_skip_redis_for_the_cool_down_and_one_probe_recovers() {
    let server = server_or_skip!(
        "after_a_timeout_checks_skip_redis_for_the_cool_down_and_one_probe_recovers"
    );
    let (clock, hand) = Clock::manual();
    let layer = RedisRateLimitLayer::new(
        conn(&server.url()).await,
        RedisRateLimitConfig::new(Quota::per_hour(5).unwrap())
            .prefix("cool:")
            .unwrap()
            .timeout(Duration::from_millis(200))
            .unwrap()
            .local_fallback(LocalFallback::new().clock(clock)),
    )
    .unwrap();
    let handle = layer.handle();
    let calls = Counting::default();
    let svc = ServiceBuilder::new().layer(layer).service(calls.clone());
    svc.clone().oneshot(()).await.unwrap();
    let mut admin = conn(&server.url()).await;
    let pause = |ms: u64| {
        let mut admin = admin.clone();
        async move {
            let () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(ms)
                .arg("ALL")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    pause(1_000).await;
    // The first check meets the timeout; the next ones do not wait for Redis at all.
    svc.clone().oneshot(()).await.unwrap();
    assert_eq!((handle.timeouts(), handle.skipped()), (1, 0));
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let _ = svc.clone().oneshot(()).await;
    }
    assert!(started.elapsed() < Duration::from_millis(150));
    assert_eq!((handle.timeouts(), handle.skipped()), (1, 10));
    assert!(handle.degraded());
    // Past the cool-down: one probe goes to Redis (and waits); the others still skip it.
    hand.advance(Duration::from_secs(1));
    let mut probe = std::pin::pin!(svc.clone().oneshot(()));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(probe.as_mut().poll(&mut cx).is_pending());
    for _ in 0..10 {
        let _ = svc.clone().oneshot(()).await;
    }
    assert_eq!((handle.timeouts(), handle.skipped()), (1, 20));
    let _ = probe.await;
    assert_eq!(handle.timeouts(), 2, "the probe met the timeout");
    assert_eq!(handle.local_fallbacks(), 22);
    // Wait for the pause to end (each PING is held until then, or cut by its own timeout):
    // then Redis answers again, and the next probe ends the outage.
    let mut pings = 0;
    while redis::cmd("PING")
        .query_async::<String>(&mut admin)
        .await
        .is_err()
    {
        pings += 1;
        assert!(pings < 50, "the pause did not end");
    }
    let _ = svc.clone().oneshot(()).await;
    assert_eq!(handle.skipped(), 21, "within the new cool-down: skipped");
    hand.advance(Duration::from_secs(1));
    svc.clone().oneshot(()).await.unwrap();
    assert!(!handle.degraded());
    let (failures, skipped) = (handle.store_failures(), handle.skipped());
    // Every check goes to Redis again. The quota (5 per hour) was spent there by the first
    // check, the two checks that timed out (Redis ran them once the pause was lifted) and the
    // probe that recovered: the next is admitted, the one after refused by Redis.
    svc.clone().oneshot(()).await.unwrap();
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::RateLimited);
    assert_eq!(
        (handle.store_failures(), handle.skipped()),
        (failures, skipped)
    );
}

#[tokio::test]
async fn a_dropped_future_releases_what_the_inner_service_reserved() {
    let server = server_or_skip!("a_dropped_future_releases_what_the_inner_service_reserved");
    let layer = RedisRateLimitLayer::new(
        conn(&server.url()).await,
        patient(Quota::per_second(100).unwrap()),
    )
    .unwrap();
    // ConcurrencyLimit(1) below: its permit is taken in poll_ready and moves into the future.
    let limited = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(Counting::default());
    let mut other = limited.clone();
    let mut svc = ServiceBuilder::new().layer(layer).service(limited);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(Service::<()>::poll_ready(&mut svc, &mut cx).is_ready());
    let mut fut = Box::pin(svc.call(()));
    // The check is in flight: the permit is held by the future, not by `svc`.
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert!(Service::<()>::poll_ready(&mut other, &mut cx).is_pending());
    drop(fut);
    assert!(
        Service::<()>::poll_ready(&mut other, &mut cx).is_ready(),
        "permit leaked"
    );
    drop(other);
    // A readiness reserved and never used is released with the service.
    assert!(Service::<()>::poll_ready(&mut svc, &mut cx).is_ready());
    svc.call(()).await.unwrap();
}

#[tokio::test]
async fn axum_answers_429_and_503() {
    let mut server = server_or_skip!("axum_answers_429_and_503");
    let layer = RedisRateLimitLayer::new(
        conn(&server.url()).await,
        patient(Quota::per_hour(2).unwrap()).failure_policy(FailurePolicy::FailClosed),
    )
    .unwrap();
    let handle = layer.handle();
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(layer),
    );
    let get = || Request::get("/").body(Body::empty()).unwrap();
    for _ in 0..2 {
        assert_eq!(
            app.clone().oneshot(get()).await.unwrap().status(),
            StatusCode::OK
        );
    }
    let res = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // The next token is 1800 s away; the hint adds a jitter of less than that again.
    let after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1800..=3600).contains(&after), "{after}");
    assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=2;w=3600");
    // A bigger burst at run time: admitted again at once.
    handle
        .set_quota(Quota::per_hour(2).unwrap().burst(3).unwrap())
        .unwrap();
    assert_eq!(
        app.clone().oneshot(get()).await.unwrap().status(),
        StatusCode::OK
    );
    server.stop();
    let res = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.failed_closed(), 1);
}

#[tokio::test]
async fn successful_responses_carry_the_limit_figures_when_asked() {
    let mut server = server_or_skip!("successful_responses_carry_the_limit_figures_when_asked");
    let layer = RedisRateLimitLayer::new(
        conn(&server.url()).await,
        patient(Quota::per_hour(4).unwrap()),
    )
    .unwrap()
    .response_headers();
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(layer),
    );
    let get = || Request::get("/").body(Body::empty()).unwrap();
    for remaining in [3, 2] {
        let res = app.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=4;w=3600");
        let state = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            state.starts_with(&format!("\"default\";r={remaining};t=")),
            "{state}"
        );
    }
    // The local fallback (the default policy) writes its own figures: a fresh limit.
    server.stop();
    let res = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["ratelimit"], "\"default\";r=3;t=900");
}

/// `wait_up_to` waits for real (the turn comes from Redis's clock): about half a second.
#[tokio::test]
async fn clients_of_two_replicas_wait_for_reserved_turns_in_order() {
    let server = server_or_skip!("clients_of_two_replicas_wait_for_reserved_turns_in_order");
    // One token every 250 ms, no burst; a client waits up to 600 ms for its turn.
    let quota = Quota::per_second(4).unwrap().burst(1).unwrap();
    let calls = Counting::default();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let layer = RedisRateLimitLayer::new(
            conn(&server.url()).await,
            patient(quota)
                .prefix("wait:")
                .unwrap()
                .wait_up_to(Duration::from_millis(600)),
        )
        .unwrap();
        replicas.push(ServiceBuilder::new().layer(layer).service(calls.clone()));
    }
    let start = std::time::Instant::now();
    let results = join_all((0..4).map(|i| {
        let svc = replicas[i % 2].clone();
        async move {
            let r = svc.oneshot(()).await;
            (r, start.elapsed())
        }
    }))
    .await;
    let mut waited: Vec<Duration> = results
        .iter()
        .filter(|(r, _)| r.is_ok())
        .map(|(_, t)| *t)
        .collect();
    waited.sort();
    assert_eq!(waited.len(), 3, "three turns within 600 ms");
    let refused: Vec<_> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().err())
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(kind(refused[0]), RejectionKind::RateLimited);
    // Turns at about 0, 250 and 500 ms (Redis's clock and tokio's timers agree to a few ms):
    // lower bounds only, as a timer never fires early but a loaded machine may be late.
    assert!(waited[1] >= Duration::from_millis(230), "{waited:?}");
    assert!(waited[2] >= Duration::from_millis(480), "{waited:?}");
    assert_eq!(calls.calls(), 3);
}

#[tokio::test]
async fn configuration_is_checked_at_construction() {
    let server = server_or_skip!("configuration_is_checked_at_construction");
    let c = conn(&server.url()).await;
    let q = Quota::per_second(1).unwrap();
    let l = || RedisRateLimitLayer::new(c.clone(), q).unwrap();
    let cfg = || RedisRateLimitConfig::new(q);
    assert_eq!(
        cfg().prefix("a{b").unwrap_err(),
        RedisConfigError::PrefixBraces
    );
    assert_eq!(
        cfg().prefix("}").unwrap_err(),
        RedisConfigError::PrefixBraces
    );
    assert_eq!(
        cfg().prefix(&"p".repeat(257)).unwrap_err(),
        RedisConfigError::PrefixTooLong
    );
    assert_eq!(
        cfg().timeout(Duration::ZERO).unwrap_err(),
        RedisConfigError::ZeroTimeout
    );
    // A global limit has no keys to bound: a key bound for its fallback is refused.
    assert_eq!(
        RedisRateLimitLayer::new(
            c.clone(),
            cfg().local_fallback(LocalFallback::new().max_keys(16))
        )
        .unwrap_err(),
        RedisConfigError::MaxKeysWithoutKeys
    );
    let long = Quota::per_hour(1).unwrap().burst(24 * 60).unwrap(); // 60 days
    assert_eq!(
        RedisRateLimitLayer::new(c.clone(), long).unwrap_err(),
        RedisConfigError::QuotaTooLong
    );
    assert_eq!(
        l().handle().set_quota(long).unwrap_err(),
        RedisConfigError::QuotaTooLong
    );
    assert_eq!(l().handle().quota(), q);
}

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RedisRateLimitLayer>();
    assert_send_sync::<RedisRateLimitHandle>();
    assert_send_sync::<tower_bulwark::rate_limit::store::RedisRateLimit<Counting>>();
    fn assert_send<T: Send>() {}
    assert_send::<
        tower_bulwark::rate_limit::store::RedisResponseFuture<
            Counting,
            (),
            tower_bulwark::rate_limit::NoHeaders,
        >,
    >();
}

/// A client-side limiter of `quota` under `prefix` that waits up to 600 ms for a reserved turn,
/// around a counting service.
async fn waiting_client(
    url: &str,
    quota: Quota,
    prefix: &str,
) -> (
    impl Service<(), Response = (), Error = BoxError, Future: Send + Unpin + std::fmt::Debug> + Clone,
    RedisRateLimitHandle,
    Counting,
) {
    let ran = Counting::default();
    let layer = RedisRateLimitLayer::new(
        conn(url).await,
        patient(quota)
            .prefix(prefix)
            .unwrap()
            .wait_up_to(Duration::from_millis(600)),
    )
    .unwrap();
    let handle = layer.handle();
    (
        ServiceBuilder::new().layer(layer).service(ran.clone()),
        handle,
        ran,
    )
}

/// Polls `fut` (yielding to the runtime in between, so its Redis reply can arrive) until its
/// `Debug` says it waits for its reserved turn.
async fn until_waiting<F: Future + Unpin + std::fmt::Debug>(fut: &mut F) {
    for _ in 0..1_000_000 {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            std::pin::Pin::new(&mut *fut).poll(&mut cx).is_pending(),
            "the turn is reserved ahead, not at once"
        );
        if format!("{fut:?}").contains("waiting") {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the check never came back");
}

/// C, sent after B gave its turn back (B having reserved the turn after A's, at `t0`), runs
/// at B's turn (about 250 ms after `t0`), not the next one (about 500 ms).
async fn c_takes_bs_turn<S>(svc: &S, t0: std::time::Instant)
where
    S: Service<(), Error = BoxError> + Clone,
{
    svc.clone().oneshot(()).await.unwrap();
    let c_done = t0.elapsed();
    assert!(
        c_done < Duration::from_millis(420),
        "C took B's turn at about 250 ms, not the next at 500 ms: {c_done:?}"
    );
}

/// Waits (yielding, bounded) until `handle` counts `n` turns given back.
async fn given_back(handle: &RedisRateLimitHandle, n: u64) {
    for _ in 0..1_000_000 {
        if handle.turns_given_back() == n {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// A call through a clone of `svc` that has reserved a turn ahead and waits for it.
async fn reserve<S>(svc: &S) -> S::Future
where
    S: Service<(), Error = BoxError> + Clone,
    S::Future: Unpin + std::fmt::Debug,
{
    let mut svc = svc.clone();
    ServiceExt::<()>::ready(&mut svc).await.unwrap();
    let mut fut = svc.call(());
    until_waiting(&mut fut).await;
    fut
}

/// A client that goes away while it waits for its reserved turn gives the turn back, unless a
/// later turn was reserved meanwhile (then giving it back would hand that later slot out
/// twice). Real time, as the other `wait_up_to` test: about a second.
#[tokio::test]
async fn a_client_that_goes_away_gives_its_reserved_turn_back() {
    let server = server_or_skip!("a_client_that_goes_away_gives_its_reserved_turn_back");
    // One token every 250 ms, no burst; a client waits up to 600 ms for its turn.
    let quota = Quota::per_second(4).unwrap().burst(1).unwrap();
    let mut admin = conn(&server.url()).await;

    // A takes the token; B reserves the turn at about 250 ms and goes away; C then gets B's
    // turn (about 250 ms), not the next one (about 500 ms).
    let (svc, handle, ran) = waiting_client(&server.url(), quota, "refund1:").await;
    svc.clone().oneshot(()).await.unwrap();
    let b = reserve(&svc).await;
    let bs_turn = stored_tat(&mut admin, "refund1:").await;
    drop(b);
    given_back(&handle, 1).await;
    assert_eq!(handle.turns_given_back(), 1, "the refund reached Redis");
    // C reserves B's turn again (the stored TAT is B's), not the next one (an interval on).
    let c = reserve(&svc).await;
    let cs_turn = stored_tat(&mut admin, "refund1:").await;
    assert!(
        cs_turn.abs_diff(bs_turn) < 1_000,
        "C holds B's turn: {bs_turn} then {cs_turn}"
    );
    c.await.unwrap();
    assert_eq!(ran.calls(), 2);

    // A takes the token; B and C reserve the turns at about 250 and 500 ms; B goes away. Its
    // turn is not given back (C's is the last reserved), so D, whose turn would come at about
    // 750 ms, past its 600 ms, is refused.
    let (svc, handle, ran) = waiting_client(&server.url(), quota, "refund2:").await;
    svc.clone().oneshot(()).await.unwrap();
    let b = reserve(&svc).await;
    let c = reserve(&svc).await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    drop(b);
    // The refund script runs (the script is loaded: one EVALSHA) and changes nothing.
    for _ in 0..1_000_000 {
        if calls(&mut admin, "evalsha").await >= 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(calls(&mut admin, "evalsha").await, 1);
    assert_eq!(handle.turns_given_back(), 0);
    let d = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(kind(&d), RejectionKind::RateLimited);
    c.await.unwrap();
    assert_eq!(ran.calls(), 2, "A and C ran; B went away; D was refused");
}

/// With Redis down, the `Local` policy reserves turns in the in-process limiter; a client
/// that goes away while it waits gives its turn back there too.
#[tokio::test]
async fn a_turn_reserved_by_the_local_fallback_is_given_back_too() {
    let mut server = server_or_skip!("a_turn_reserved_by_the_local_fallback_is_given_back_too");
    let quota = Quota::per_second(4).unwrap().burst(1).unwrap();
    let (svc, handle, ran) = waiting_client(&server.url(), quota, "refund3:").await;
    server.stop();
    let t0 = std::time::Instant::now();
    svc.clone().oneshot(()).await.unwrap();
    assert_eq!(handle.local_fallbacks(), 1);
    let b = reserve(&svc).await;
    drop(b);
    assert_eq!(
        handle.turns_given_back(),
        1,
        "given back at once, in process"
    );
    c_takes_bs_turn(&svc, t0).await;
    assert_eq!(handle.local_fallbacks(), 3);
    assert_eq!(ran.calls(), 2);
}

/// The stored TAT of the one key under `prefix`, in nanoseconds (the value is
/// "seconds:nanoseconds:reach:window").
async fn stored_tat(admin: &mut ConnectionManager, prefix: &str) -> u64 {
    let keys: Vec<String> = admin.keys(format!("{prefix}*")).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let value: String = admin.get(&keys[0]).await.unwrap();
    let mut parts = value.split(':').map(|p| p.parse::<u64>().unwrap());
    let (secs, nanos) = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(parts.count(), 2, "reach and window in {value}");
    secs * 1_000_000_000 + nanos
}

/// A turn is given back by the interval of the check that reserved it, even when the quota
/// changed meanwhile: a longer interval would hand out more than the turn took.
#[tokio::test]
async fn a_turn_is_given_back_by_the_interval_that_reserved_it() {
    let server = server_or_skip!("a_turn_is_given_back_by_the_interval_that_reserved_it");
    let quota = Quota::per_second(4).unwrap().burst(1).unwrap();
    let mut admin = conn(&server.url()).await;
    let (svc, handle, _ran) = waiting_client(&server.url(), quota, "refund4:").await;
    svc.clone().oneshot(()).await.unwrap();
    let after_a = stored_tat(&mut admin, "refund4:").await;
    let b = reserve(&svc).await;
    let after_b = stored_tat(&mut admin, "refund4:").await;
    assert_eq!(
        after_b - after_a,
        250_000_000,
        "B reserved one interval ahead"
    );
    // The limit tightens to one a second while B waits; then B goes away.
    handle
        .set_quota(Quota::per_second(1).unwrap().burst(1).unwrap())
        .unwrap();
    drop(b);
    given_back(&handle, 1).await;
    assert_eq!(handle.turns_given_back(), 1);
    let after_refund = stored_tat(&mut admin, "refund4:").await;
    assert!(
        after_refund.abs_diff(after_a) < 1_000,
        "back by B's 250 ms, not the new 1 s: {after_a} then {after_refund}"
    );
}

/// A refusal does not wait on the inner service's readiness (tower's `LoadShed` pattern):
/// with the service below not ready, `poll_ready` is ready at once, a request over the limit
/// is refused as soon as Redis answers, and an admitted one waits for the inner readiness.
#[tokio::test]
async fn a_refusal_does_not_wait_on_the_inner_readiness() {
    let server = server_or_skip!("a_refusal_does_not_wait_on_the_inner_readiness");
    let layer = RedisRateLimitLayer::keyed(
        conn(&server.url()).await,
        patient(Quota::per_hour(1).unwrap())
            .prefix("t-ready:")
            .unwrap(),
        |r: &u32| *r,
    )
    .unwrap();
    let (mock, mut inner) = tower_test::mock::pair::<u32, u32>();
    let mut svc = tower::Layer::layer(&layer, mock);
    let mut cx = Context::from_waker(Waker::noop());
    // Key 2 spends its quota while the inner service is ready.
    inner.allow(1);
    let first = tokio::spawn(svc.ready().await.unwrap().call(2));
    let (_, send) = inner.next_request().await.expect("the first request");
    send.send_response(20);
    assert_eq!(first.await.unwrap().unwrap(), 20);

    // The inner service is not ready now (its one allowance is spent).
    assert!(
        svc.poll_ready(&mut cx).is_ready(),
        "held back by the inner readiness"
    );
    let admitted = tokio::spawn(svc.call(1));
    assert!(svc.poll_ready(&mut cx).is_ready());
    let refused = tokio::time::timeout(PATIENT, svc.call(2))
        .await
        .expect("refused without waiting on the inner readiness");
    assert_eq!(kind(&refused.unwrap_err()), RejectionKind::RateLimited);
    // The admitted request goes on once the inner service is ready.
    inner.allow(1);
    let (req, send) = inner.next_request().await.expect("the admitted request");
    assert_eq!(req, 1);
    send.send_response(10);
    assert_eq!(admitted.await.unwrap().unwrap(), 10);
}

/// A key limited under the old quota is whole again within the new window once the quota is
/// raised: the state Redis keeps from the old, longer window is capped to the new one.
#[tokio::test]
async fn raising_the_quota_frees_a_limited_key_within_the_new_window() {
    let server = server_or_skip!("raising_the_quota_frees_a_limited_key_within_the_new_window");
    let layer = RedisRateLimitLayer::keyed(
        conn(&server.url()).await,
        patient(Quota::per_hour(1).unwrap())
            .prefix("raise:")
            .unwrap(),
        by_request,
    )
    .unwrap();
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(Counting::default());
    svc.ready()
        .await
        .unwrap()
        .call(b"k".to_vec())
        .await
        .unwrap();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(b"k".to_vec())
        .await
        .unwrap_err();
    let old = err
        .downcast_ref::<Rejection>()
        .unwrap()
        .retry_after()
        .unwrap();
    assert!(
        old > Duration::from_secs(3500),
        "limited for the old hour: {old:?}"
    );
    // The operator raises the limit to 10 a second: 100 ms a token, a 1 s window.
    handle.set_quota(Quota::per_second(10).unwrap()).unwrap();
    match svc.ready().await.unwrap().call(b"k".to_vec()).await {
        Ok(()) => {}
        Err(e) => {
            let after = e
                .downcast_ref::<Rejection>()
                .unwrap()
                .retry_after()
                .unwrap();
            // At most one new interval (100 ms) away, jittered by less than that again.
            assert!(
                after <= Duration::from_millis(200),
                "still limited for the old window after raising the quota: {after:?}"
            );
        }
    }
}

/// Admitted requests in a row for `key`, up to the first refusal, and that refusal's
/// `retry_after`.
async fn until_refused<S>(svc: &mut S, key: &[u8]) -> (usize, Duration)
where
    S: Service<Key, Response = (), Error = BoxError>,
{
    let mut admitted = 0;
    loop {
        match svc.ready().await.unwrap().call(key.to_vec()).await {
            Ok(()) => admitted += 1,
            Err(e) => {
                assert_eq!(kind(&e), RejectionKind::RateLimited);
                let retry = e.downcast_ref::<Rejection>().unwrap().retry_after();
                return (admitted, retry.unwrap());
            }
        }
        assert!(admitted <= 100, "no limit at all");
    }
}

/// Redis's `TIME` is the system's wall clock, which steps back (an NTP step, a failover to a
/// replica whose clock is behind). A state stored a day ahead of the clock (as an admit a day
/// before such a step leaves it) is beyond anything the quota can set: the limit is whole on
/// the new time line (one burst), as the in-process step takes it, instead of refused for the
/// day. A value without its reach (a TAT alone) is read alike.
#[tokio::test]
async fn a_clock_stepped_back_beyond_a_window_finds_the_limit_whole() {
    let server = server_or_skip!("a_clock_stepped_back_beyond_a_window_finds_the_limit_whole");
    let mut admin = conn(&server.url()).await;
    const DAY_S: u64 = 86_400;
    const INTERVAL_NS: u64 = 20_000_000_000;
    const WINDOW_NS: u64 = 3 * INTERVAL_NS;
    for (prefix, with_reach) in [("jump:", true), ("jump-old:", false)] {
        // 3 a minute: one token every 20 s, so the milliseconds this test takes refill
        // nothing.
        let layer = RedisRateLimitLayer::keyed(
            conn(&server.url()).await,
            patient(Quota::per_minute(3).unwrap())
                .prefix(prefix)
                .unwrap()
                .failure_policy(FailurePolicy::FailClosed),
            by_request,
        )
        .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(Counting::default());
        let (admitted, retry) = until_refused(&mut svc, b"k").await;
        assert_eq!(admitted, 3, "{prefix}: the burst");
        assert!(retry > Duration::from_secs(10), "{prefix}: {retry:?}");
        // The clock steps back by a day: the state is now a day (and one interval) ahead.
        let keys: Vec<String> = admin.keys(format!("{prefix}*")).await.unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut admin).await.unwrap();
        let tat_s = secs + DAY_S + INTERVAL_NS / 1_000_000_000;
        let value = if with_reach {
            format!("{tat_s}:{}:{INTERVAL_NS}:{WINDOW_NS}", micros * 1_000)
        } else {
            format!("{tat_s}:{}", micros * 1_000)
        };
        let () = admin.set_ex(&keys[0], value, DAY_S + 60).await.unwrap();
        let (admitted, retry) = until_refused(&mut svc, b"k").await;
        assert_eq!(
            admitted, 3,
            "{prefix}: one burst on the new time line, not refused for the day"
        );
        assert!(
            retry <= Duration::from_secs(40),
            "{prefix}: then one interval away (jittered), not a day: {retry:?}"
        );
    }
}
