//! `RedisStore` leases under time and faults, against a real `redis-server` (skipped, with a
//! message, when the binary is absent; required when `BULWARK_REQUIRE_REDIS=1`): a handler
//! that outlives its lease, the `complete` command lost on a cut connection, a claim answered
//! after its timeout, a request dropped while its claim is on the way.
//!
//! Faults come from a TCP forwarder of the tests' own (`support/proxy.rs`) that cuts or holds
//! back the one command that carries a pattern. Redis keeps time itself, so these tests run
//! in real time; every wait is short and bounded.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;
#[path = "support/proxy.rs"]
mod proxy;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::idempotency::{
    Claim, Fingerprint, IdempotencyLayer, Lease, Record, RedisStore, Store, StoreErrorKind,
    StoreKey,
};
use tower_bulwark::RejectionLayer;

use proxy::{Fault, Proxy};

/// The stack under test.
type Svc = BoxCloneService<Request<Full<Bytes>>, Response<Body>, Infallible>;

/// The body of the stack's responses.
type Body =
    tower_bulwark::respond::RejectionBody<tower_bulwark::idempotency::ReplayBody<Full<Bytes>>>;
use redis_server::{conn, RedisServer};

fn store(c: &ConnectionManager, timeout: Duration) -> RedisStore {
    RedisStore::new(c.clone()).timeout(timeout).unwrap()
}

fn post(k: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", format!("\"{k}\""))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A stack over `store` whose handler counts its runs, takes `work`, and answers 201 with
/// `answer` and the run's number.
fn app(
    store: RedisStore,
    lease_ttl: Duration,
    work: Duration,
    answer: &'static str,
) -> (Svc, Arc<AtomicU64>) {
    let runs = Arc::new(AtomicU64::new(0));
    let counter = runs.clone();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(
            IdempotencyLayer::builder(store)
                .lease_ttl(lease_ttl)
                .build()
                .unwrap(),
        )
        .service_fn(move |_req: Request<Full<Bytes>>| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(work).await;
                let mut res = Response::new(Full::new(Bytes::from(format!("{answer} {n}"))));
                *res.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(res)
            }
        });
    (BoxCloneService::new(svc), runs)
}

/// What the Redis key of `k` holds now: its first byte (`L` lease, `R` record), or `None`.
async fn held(admin: &mut ConnectionManager, store: &RedisStore, k: &str) -> Option<u8> {
    let rkey = store.redis_key(&StoreKey::new([], k));
    let v: Option<Vec<u8>> = admin.get(rkey).await.unwrap();
    v.and_then(|v| v.first().copied())
}

/// Waits (at most a second) while the key of `k` holds `now`; what it holds then.
async fn while_held(
    admin: &mut ConnectionManager,
    store: &RedisStore,
    k: &str,
    now: Option<u8>,
) -> Option<u8> {
    let mut seen = held(admin, store, k).await;
    for _ in 0..100 {
        if seen != now {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        seen = held(admin, store, k).await;
    }
    seen
}

/// A handler that runs three times its lease keeps its key on Redis: the layer renews
/// the lease, every repeat meanwhile gets 409, and the handler runs once.
#[tokio::test]
async fn a_handler_three_times_longer_than_its_lease_keeps_the_key() {
    let server = server_or_skip!("a_handler_three_times_longer_than_its_lease_keeps_the_key");
    let c = conn(&server.url()).await;
    let lease = Duration::from_millis(200);
    let (svc, runs) = app(store(&c, Duration::from_secs(2)), lease, 3 * lease, "order");
    let first = tokio::spawn(svc.clone().oneshot(post("long", "{}")));
    let start = std::time::Instant::now();
    let mut repeats = 0;
    while !first.is_finished() {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let res = svc.clone().oneshot(post("long", "{}")).await.unwrap();
        let at = start.elapsed();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "ran again, {at:?} into a {lease:?} lease"
        );
        if first.is_finished() && res.status() == StatusCode::CREATED {
            break; // the first completed meanwhile: a replay
        }
        assert_eq!(
            res.status(),
            StatusCode::CONFLICT,
            "a repeat {at:?} into the lease"
        );
        repeats += 1;
    }
    assert!(repeats >= 5, "{repeats} repeats");
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let again = svc.clone().oneshot(post("long", "{}")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes(),
        "order 1"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `renew` acts only for the lease's owner, and only while it is a lease.
#[tokio::test]
async fn renewal_is_the_owners_only() {
    let server = server_or_skip!("renewal_is_the_owners_only");
    let c = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    let mut admin = c.clone();
    let k = StoreKey::new("tenant", "order");
    let fp = Fingerprint::from_u128(9);
    let lease = match store.claim(&k, fp, Duration::from_secs(1)).await.unwrap() {
        Claim::Claimed(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    };
    let rkey = store.redis_key(&k);
    let forged = Lease::new(k.clone(), lease.token() ^ 1, fp);
    let err = store
        .renew(&forged, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    let ttl: i64 = admin.pttl(&rkey).await.unwrap();
    assert!(
        ttl <= 1_000,
        "a stranger's renewal extended the lease: {ttl} ms"
    );
    store.renew(&lease, Duration::from_secs(60)).await.unwrap();
    let ttl: i64 = admin.pttl(&rkey).await.unwrap();
    assert!(ttl > 59_000, "the owner's renewal: {ttl} ms");

    let record = Record::not_kept(fp, StatusCode::CREATED);
    let day = Duration::from_secs(86_400);
    store.complete(&lease, record, day).await.unwrap();
    let err = store.renew(&lease, day).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    assert_eq!(
        store.get(&k).await.unwrap().unwrap().status(),
        StatusCode::CREATED
    );
}

/// `FailClosed` on Redis, the `complete` command lost as the connection is cut: the
/// client has its 201, the key is never released, the record is written once the store is
/// reachable again, and a repeat replays it instead of running the handler a second time.
#[tokio::test]
async fn a_lost_complete_never_runs_the_handler_twice() {
    let server = server_or_skip!("a_lost_complete_never_runs_the_handler_twice");
    let proxy = Proxy::start(server.port()).await;
    let c = conn(&proxy.url()).await;
    let mut admin = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    let (svc, runs) = app(
        store.clone(),
        Duration::from_secs(30),
        Duration::ZERO,
        "order made by run",
    );
    // Scripts loaded, connection warm: the fault below hits the command itself.
    let res = svc.clone().oneshot(post("warm", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    // Only `complete` carries the response body.
    proxy.on(&b"order made by run 2"[..], Fault::Cut);
    let res = svc.clone().oneshot(post("cut", "{}")).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "the client has its answer"
    );
    assert_eq!(proxy.pending(), 0, "the connection was cut at `complete`");
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // Whatever the layer does next happens within the lease; wait (bounded) until the key
    // holds something other than the lease.
    let seen = while_held(&mut admin, &store, "cut", Some(b'L')).await;
    let res = svc.clone().oneshot(post("cut", "{}")).await.unwrap();
    let status = res.status();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler ran a second time ({status}, {body:?}; key held {:?})",
        seen.map(char::from)
    );
    assert_eq!(seen, Some(b'R'), "the record was written");
    assert!(
        replayed && status == StatusCode::CREATED,
        "{status} {body:?}"
    );
    assert_eq!(body, "order made by run 2");
}

/// Repeats `post(k)` while the store times out (503), at most `n` times; the last answer.
async fn until_not_503(svc: &Svc, k: &str, body: &'static str, n: usize) -> StatusCode {
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..n {
        status = svc.clone().oneshot(post(k, body)).await.unwrap().status();
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
    }
    status
}

/// The bytes by which the proxy knows a claim for `body` on `/orders`: its fingerprint, sent
/// as a 16-byte argument.
fn claim_pattern(body: &[u8]) -> Vec<u8> {
    let fp = Fingerprint::of("POST", "/orders", body)
        .as_u128()
        .to_be_bytes();
    [&b"$16\r\n"[..], &fp[..]].concat()
}

/// A claim that Redis runs after the store's timeout gave up on it: the lease it takes
/// late is released with its owner token, so a repeat runs at once instead of getting 409
/// for the lease's whole life.
#[tokio::test]
async fn a_claim_answered_after_its_timeout_leaves_no_orphan_lease() {
    let server = server_or_skip!("a_claim_answered_after_its_timeout_leaves_no_orphan_lease");
    let proxy = Proxy::start(server.port()).await;
    let c = conn(&proxy.url()).await;
    let mut admin = conn(&server.url()).await;
    let store = store(&c, Duration::from_millis(100));
    let (svc, runs) = app(
        store.clone(),
        Duration::from_secs(30),
        Duration::ZERO,
        "order",
    );
    assert_eq!(
        until_not_503(&svc, "warm", "{}", 20).await,
        StatusCode::CREATED
    );
    let before = runs.load(Ordering::SeqCst);

    proxy.on(
        claim_pattern(b"{\"late\":1}"),
        Fault::Delay(Duration::from_millis(400)),
    );
    let res = svc
        .clone()
        .oneshot(post("late", "{\"late\":1}"))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the claim timed out"
    );
    assert_eq!(runs.load(Ordering::SeqCst), before, "nothing ran");
    // The claim reaches Redis now, late, and takes its lease; the release the store sent
    // after it follows on the same connection (and is tried again if Redis could not run it).
    proxy.fired().await;
    let seen = while_held(&mut admin, &store, "late", Some(b'L')).await;
    assert_eq!(seen, None, "the late lease is released");
    let status = until_not_503(&svc, "late", "{\"late\":1}", 20).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a repeat after the late claim (key holds {:?})",
        held(&mut admin, &store, "late").await.map(char::from)
    );
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
}

/// A request dropped while its claim is on the way to Redis (client gone) leaves no lease
/// behind when the claim lands afterwards.
#[tokio::test]
async fn dropped_while_claiming_leaves_no_orphan_lease() {
    let server = server_or_skip!("dropped_while_claiming_leaves_no_orphan_lease");
    let proxy = Proxy::start(server.port()).await;
    let c = conn(&proxy.url()).await;
    let mut admin = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    let (svc, runs) = app(
        store.clone(),
        Duration::from_secs(30),
        Duration::ZERO,
        "order",
    );
    assert_eq!(
        until_not_503(&svc, "warm", "{}", 20).await,
        StatusCode::CREATED
    );
    let before = runs.load(Ordering::SeqCst);

    proxy.on(
        claim_pattern(b"{\"gone\":1}"),
        Fault::Delay(Duration::from_millis(200)),
    );
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        svc.clone().oneshot(post("gone", "{\"gone\":1}")),
    )
    .await;
    assert!(dropped.is_err(), "still claiming when dropped");
    proxy.fired().await;
    let seen = while_held(&mut admin, &store, "gone", Some(b'L')).await;
    assert_eq!(seen, None, "the late lease is released");
    let status = until_not_503(&svc, "gone", "{\"gone\":1}", 20).await;
    assert_eq!(status, StatusCode::CREATED, "a repeat after the late claim");
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
}

fn fp() -> Fingerprint {
    Fingerprint::of("POST", "/orders", b"{}")
}

fn skey(k: &str) -> StoreKey {
    StoreKey::new([], k)
}

fn until_far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(30)
}

/// Makes the Redis key of `k` hold a list: every script on it then fails with `WRONGTYPE`,
/// an error that no retry can mend.
async fn wrong_type(admin: &mut ConnectionManager, store: &RedisStore, k: &str) {
    let rkey = store.redis_key(&skey(k));
    let _: () = admin.del(&rkey).await.unwrap();
    let _: () = admin.rpush(&rkey, "x").await.unwrap();
}

/// A release that Redis refuses for good (the key holds another type) is dropped after its
/// first answer, counted, and not sent again until its lease would have expired.
#[tokio::test]
async fn a_release_redis_refuses_is_dropped_not_retried() {
    let server = server_or_skip!("a_release_redis_refuses_is_dropped_not_retried");
    let c = conn(&server.url()).await;
    let mut admin = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    wrong_type(&mut admin, &store, "list").await;
    store.release_detached(Lease::new(skey("list"), 7, fp()), until_far());
    for _ in 0..100 {
        if store.stats().releases_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = store.stats();
    assert_eq!(
        (
            stats.releases_pending,
            stats.releases_dropped,
            stats.failures
        ),
        (0, 1, 1),
        "a release Redis refuses for good is still retried: {stats:?}"
    );
}

/// The background write of a record that Redis refuses for good (the key holds another
/// type) is not sent again and again until the lease would expire.
#[tokio::test]
async fn a_record_write_redis_refuses_is_not_retried() {
    let server = server_or_skip!("a_record_write_redis_refuses_is_not_retried");
    let c = conn(&server.url()).await;
    let mut admin = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    wrong_type(&mut admin, &store, "list").await;
    let record = Record::response(
        fp(),
        StatusCode::CREATED,
        http::HeaderMap::new(),
        Bytes::from_static(b"done"),
        None,
    );
    store.complete_detached(
        Lease::new(skey("list"), 7, fp()),
        record,
        Duration::from_secs(60),
        Duration::from_secs(60),
        tower_bulwark::idempotency::DetachedWrite::new(),
    );
    for _ in 0..100 {
        if store.stats().failures > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.stats().failures, 1);
    // Retries would come after 10, 20, 40, 80 and 160 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.stats().failures,
        1,
        "a write Redis refuses for good is sent again"
    );
}

/// The releases of requests that failed (given back for the client to retry) and those of
/// claims Redis did not answer are queued apart: a full queue of the first kind, even on
/// one key, leaves room for the second.
#[tokio::test]
async fn releases_of_unanswered_claims_are_not_crowded_out() {
    let mut server = server_or_skip!("releases_of_unanswered_claims_are_not_crowded_out");
    let c = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    // Redis's policy read, the connection warm.
    assert!(matches!(
        store
            .claim(&skey("warm"), fp(), Duration::from_secs(30))
            .await,
        Ok(Claim::Claimed(_))
    ));
    server.stop();
    let max = tower_bulwark::idempotency::store::redis::MAX_PENDING_RELEASES;
    let per_key = tower_bulwark::idempotency::store::redis::MAX_PENDING_RELEASES_PER_KEY;
    for i in 0..max {
        // The first key holds its whole share of given-back releases.
        let k = if i < per_key {
            "k0".to_owned()
        } else {
            format!("k{i}")
        };
        store.release_detached(Lease::new(skey(&k), i as u128 + 1, fp()), until_far());
    }
    assert_eq!(store.stats().releases_pending, max as u64);
    assert_eq!(store.stats().releases_dropped, 0);
    // A claim Redis does not answer queues the release of the lease it may have taken.
    for k in ["k0", "fresh"] {
        assert!(store
            .claim(&skey(k), fp(), Duration::from_secs(30))
            .await
            .is_err());
    }
    let stats = store.stats();
    assert_eq!(
        (stats.releases_pending, stats.releases_dropped),
        (max as u64 + 2, 0),
        "the releases of unanswered claims were crowded out: {stats:?}"
    );
}

/// How many `CONFIG GET` Redis has run.
async fn config_gets(admin: &mut ConnectionManager) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_config|get:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("calls=")))
        .map_or(0, |n| n.parse().unwrap())
}

async fn config_set(admin: &mut ConnectionManager, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(admin)
        .await
        .unwrap();
}

async fn claim(
    store: &RedisStore,
    k: &str,
) -> Result<Claim, tower_bulwark::idempotency::StoreError> {
    store.claim(&skey(k), fp(), Duration::from_secs(30)).await
}

/// Claims fresh keys until one is refused for the eviction policy (`want_refused`) or
/// claimed (at most a second); whether one was.
async fn until(store: &RedisStore, tag: &str, want_refused: bool) -> bool {
    for i in 0..100 {
        match claim(store, &format!("{tag}{i}")).await {
            Err(e) if e.kind() == StoreErrorKind::Unavailable => {
                if want_refused {
                    return true;
                }
            }
            Ok(Claim::Claimed(_)) => {
                if !want_refused {
                    return true;
                }
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// An evicting policy set while the store runs is noticed at the next read of the policy
/// (at most a minute later, one read at a time, off the claims' path), and so is the fix.
#[tokio::test]
async fn the_eviction_policy_is_read_again() {
    let server = server_or_skip!("the_eviction_policy_is_read_again");
    let c = conn(&server.url()).await;
    let mut admin = conn(&server.url()).await;
    let (clock, hand) = tower_bulwark::clock::Clock::manual();
    let store = store(&c, Duration::from_secs(2)).clock(clock);
    assert!(matches!(claim(&store, "a").await, Ok(Claim::Claimed(_))));
    config_set(&mut admin, "maxmemory", "64mb").await;
    config_set(&mut admin, "maxmemory-policy", "allkeys-lru").await;
    // Read at most once a minute: not seen yet.
    assert!(matches!(claim(&store, "b").await, Ok(Claim::Claimed(_))));
    hand.advance(Duration::from_secs(61));
    let before = config_gets(&mut admin).await;
    // Many claims at once: one read of the policy goes out.
    let claims: Vec<_> = (0..16)
        .map(|i| tokio::spawn(store.claim(&skey(&format!("c{i}")), fp(), Duration::from_secs(30))))
        .collect();
    for c in claims {
        assert!(c.await.unwrap().is_ok());
    }
    assert!(
        until(&store, "d", true).await,
        "an evicting policy set at run time is never noticed"
    );
    assert_eq!(
        config_gets(&mut admin).await - before,
        1,
        "one read at a time"
    );
    assert!(store.stats().eviction_refusals >= 1);
    // Fixed: taken up at the next read, every 10 s while claims are refused.
    config_set(&mut admin, "maxmemory-policy", "noeviction").await;
    assert!(matches!(claim(&store, "e").await, Err(e) if e.kind() == StoreErrorKind::Unavailable));
    hand.advance(Duration::from_secs(11));
    assert!(
        until(&store, "f", false).await,
        "the fixed policy is never taken up"
    );
}

/// A server that refused `CONFIG` (renamed or not allowed, as on some managed services) is
/// trusted, but not for ever: its policy is read again, and an evicting one refused.
#[tokio::test]
async fn a_server_that_refused_config_is_read_again() {
    let server = server_or_skip!("a_server_that_refused_config_is_read_again");
    let c = conn(&server.url()).await;
    let mut admin = conn(&server.url()).await;
    let (clock, hand) = tower_bulwark::clock::Clock::manual();
    let store = store(&c, Duration::from_secs(2)).clock(clock);
    config_set(&mut admin, "maxmemory", "64mb").await;
    config_set(&mut admin, "maxmemory-policy", "volatile-lru").await;
    let acl = |rule: &'static str| {
        let mut admin = admin.clone();
        async move {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg(rule)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    acl("-config").await;
    assert!(matches!(claim(&store, "a").await, Ok(Claim::Claimed(_))));
    acl("+config").await;
    assert!(matches!(claim(&store, "b").await, Ok(Claim::Claimed(_))));
    hand.advance(Duration::from_secs(61));
    assert!(
        until(&store, "c", true).await,
        "a server that once refused CONFIG is trusted for ever"
    );
}

/// A stack over `store` whose handler answers `first` with the run's number to a request
/// marked `x-gate`, once `gate` opens, and 201 at once to the others.
fn gated_app(
    store: RedisStore,
    first: StatusCode,
) -> (Svc, Arc<AtomicU64>, Arc<tokio::sync::Notify>) {
    let runs = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (counter, g) = (runs.clone(), gate.clone());
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(
            IdempotencyLayer::builder(store)
                .lease_ttl(Duration::from_secs(30))
                .build()
                .unwrap(),
        )
        .service_fn(move |req: Request<Full<Bytes>>| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let gated = req.headers().contains_key("x-gate");
            let g = g.clone();
            async move {
                let status = if gated {
                    g.notified().await;
                    first
                } else {
                    StatusCode::CREATED
                };
                let mut res = Response::new(Full::new(Bytes::from(format!("run {n}"))));
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        });
    (BoxCloneService::new(svc), runs, gate)
}

/// Runs a request marked `x-gate` for `k`, and stalls Redis (`SIGSTOP`) once its handler
/// runs, before it answers; its response.
async fn answered_while_paused(
    svc: &Svc,
    runs: &AtomicU64,
    gate: &tokio::sync::Notify,
    server: &RedisServer,
    k: &str,
) -> Response<Body> {
    let mut req = post(k, "{}");
    req.headers_mut().insert("x-gate", "1".parse().unwrap());
    let before = runs.load(Ordering::SeqCst);
    let first = tokio::spawn(svc.clone().oneshot(req));
    for _ in 0..200 {
        if runs.load(Ordering::SeqCst) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), before + 1, "the handler runs");
    server.pause();
    gate.notify_one();
    first.await.unwrap().unwrap()
}

/// Repeats `post(k)` while the answer is 503 (store down) or 409 (in flight), at most two
/// seconds; the last answer.
async fn until_settled(svc: &Svc, k: &str) -> Response<Body> {
    let mut res = svc.clone().oneshot(post(k, "{}")).await.unwrap();
    for _ in 0..200 {
        if !matches!(
            res.status(),
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        res = svc.clone().oneshot(post(k, "{}")).await.unwrap();
    }
    res
}

/// Redis stalled when a request fails (500): the failure goes to the client; repeats are
/// refused (503) while Redis does not answer, and nothing runs; once it answers, the key's
/// release goes through and the key runs again, once.
#[tokio::test]
async fn redis_stalled_at_release_the_key_runs_again_once_it_answers() {
    let server = server_or_skip!("redis_stalled_at_release_the_key_runs_again_once_it_answers");
    let c = conn(&server.url()).await;
    let store = store(&c, Duration::from_millis(50));
    let (svc, runs, gate) = gated_app(store.clone(), StatusCode::INTERNAL_SERVER_ERROR);
    let res = svc.clone().oneshot(post("warm", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    let res = answered_while_paused(&svc, &runs, &gate, &server, "k").await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let res = svc.clone().oneshot(post("k", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "nothing ran while Redis was stalled"
    );

    server.resume();
    let res = until_settled(&svc, "k").await;
    assert_eq!(res.status(), StatusCode::CREATED, "the key was given back");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let res = svc.clone().oneshot(post("k", "{}")).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "run 3");
    assert_eq!(runs.load(Ordering::SeqCst), 3, "the key ran twice");
}

/// Redis stalled when a request succeeds: the client has its 201; repeats get 409 while the
/// layer writes the record in the background (Redis is not asked), and nothing runs; once it answers, the record is there and
/// a repeat replays it: the handler never runs twice.
#[tokio::test]
async fn redis_stalled_at_complete_the_handler_never_runs_twice() {
    let server = server_or_skip!("redis_stalled_at_complete_the_handler_never_runs_twice");
    let c = conn(&server.url()).await;
    let store = store(&c, Duration::from_millis(50));
    let (svc, runs, gate) = gated_app(store.clone(), StatusCode::CREATED);
    let res = svc.clone().oneshot(post("warm", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    let res = answered_while_paused(&svc, &runs, &gate, &server, "k").await;
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "the client has its answer"
    );
    // This layer is still writing the key's record: in flight, without asking Redis.
    let res = svc.clone().oneshot(post("k", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    server.resume();
    let res = until_settled(&svc, "k").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "run 2");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the handler ran twice");
}

async fn maxmemory(admin: &mut ConnectionManager, bytes: u64) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(admin)
        .await
        .unwrap();
}

fn done_record() -> Record {
    Record::response(
        fp(),
        StatusCode::CREATED,
        http::HeaderMap::new(),
        Bytes::from_static(b"done"),
        None,
    )
}

async fn claimed(store: &RedisStore, k: &str, lease_ttl: Duration) -> Lease {
    match store.claim(&skey(k), fp(), lease_ttl).await.unwrap() {
        Claim::Claimed(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// A record written after its lease expired (the key holds nothing) lands; never over
/// another owner's lease or over a record (the `Store::complete` contract).
#[tokio::test]
async fn a_late_record_lands_on_a_free_key_only() {
    let server = server_or_skip!("a_late_record_lands_on_a_free_key_only");
    let c = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    let ttl = Duration::from_secs(60);
    let late = claimed(&store, "late", Duration::from_millis(50)).await;
    let lost = claimed(&store, "taken", Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _other = claimed(&store, "taken", Duration::from_secs(30)).await;

    store.complete(&late, done_record(), ttl).await.unwrap();
    let got = store
        .get(&skey("late"))
        .await
        .unwrap()
        .expect("the late record");
    assert_eq!(&got.body()[..], b"done");
    let err = store.complete(&lost, done_record(), ttl).await.unwrap_err();
    assert_eq!(
        err.kind(),
        StoreErrorKind::LeaseLost,
        "over another's lease"
    );
    assert!(matches!(
        store.claim(&skey("taken"), fp(), ttl).await.unwrap(),
        Claim::InFlight
    ));
    let err = store.complete(&late, done_record(), ttl).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost, "over a record");
}

/// A full Redis (`noeviction`, `maxmemory` reached) refuses the record but still renews the
/// lease (the renewal script is flagged `allow-oom`): the key stays held until the record
/// can be written.
#[tokio::test]
async fn a_full_redis_refuses_the_record_but_renews_its_lease() {
    let server = server_or_skip!("a_full_redis_refuses_the_record_but_renews_its_lease");
    let c = conn(&server.url()).await;
    let mut admin = conn(&server.url()).await;
    let store = store(&c, Duration::from_secs(2));
    let lease = claimed(&store, "full", Duration::from_secs(1)).await;
    maxmemory(&mut admin, 1).await;
    let err = store
        .complete(&lease, done_record(), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "OOM: {err}");
    store.renew(&lease, Duration::from_secs(30)).await.unwrap();
    let pttl: i64 = admin.pttl(store.redis_key(&skey("full"))).await.unwrap();
    assert!(pttl > 20_000, "renewed to 30 s, has {pttl} ms");
    maxmemory(&mut admin, 0).await;
    store
        .complete(&lease, done_record(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(held(&mut admin, &store, "full").await, Some(b'R'));
}

/// Two replicas on one Redis. Redis fills up (`noeviction`) as replica A's handler answers,
/// and stays full for three times the lease's time to live: A's record is refused, and its
/// background write renews the lease meanwhile. Replica B's repeat gets 409 while Redis is
/// full and once it has room again (the lease is still A's), never a second run; the record
/// lands and B replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_never_runs_a_key_whose_record_a_full_redis_refuses() {
    let server =
        server_or_skip!("another_replica_never_runs_a_key_whose_record_a_full_redis_refuses");
    let c = conn(&server.url()).await;
    let mut admin = conn(&server.url()).await;
    let lease_ttl = Duration::from_secs(1);
    let runs = Arc::new(AtomicU64::new(0));
    let (counter, fill) = (runs.clone(), admin.clone());
    let a = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(
            IdempotencyLayer::builder(store(&c, Duration::from_secs(2)))
                .lease_ttl(lease_ttl)
                .build()
                .unwrap(),
        )
        .service_fn(move |_req: Request<Full<Bytes>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut fill = fill.clone();
            async move {
                maxmemory(&mut fill, 1).await;
                let mut res = Response::new(Full::new(Bytes::from_static(b"order")));
                *res.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(res)
            }
        });
    let (b, b_runs) = app(
        store(&c, Duration::from_secs(2)),
        lease_ttl,
        Duration::ZERO,
        "order",
    );
    let first = a.clone().oneshot(post("shared", "{}")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    tokio::time::sleep(3 * lease_ttl).await;
    // B's claim meets A's lease, renewed while Redis was full (a lapsed lease would leave
    // B's claim to write, which a full Redis refuses: 503).
    let repeat = b.clone().oneshot(post("shared", "{}")).await.unwrap();
    assert_eq!(repeat.status(), StatusCode::CONFLICT);
    maxmemory(&mut admin, 0).await;
    // Room again: before A's write lands, B's claim meets A's lease (renewed while Redis
    // was full, not lapsed after its 1 s).
    let repeat = b.clone().oneshot(post("shared", "{}")).await.unwrap();
    assert!(
        repeat.status() == StatusCode::CONFLICT
            || repeat.headers().contains_key("idempotent-replayed"),
        "B's repeat answered {}",
        repeat.status()
    );
    let mut replayed = None;
    for _ in 0..50 {
        let res = b.clone().oneshot(post("shared", "{}")).await.unwrap();
        if res.headers().contains_key("idempotent-replayed") {
            replayed = Some(res.status());
            break;
        }
        assert_eq!(res.status(), StatusCode::CONFLICT);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        replayed,
        Some(StatusCode::CREATED),
        "the record never landed"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(b_runs.load(Ordering::SeqCst), 0, "replica B ran the key");
}
