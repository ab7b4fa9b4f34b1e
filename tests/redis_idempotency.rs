//! `RedisStore` against a real `redis-server` (skipped, with a message, when the binary is
//! absent; required when `BULWARK_REQUIRE_REDIS=1`): the store contract, two layers sharing
//! one Redis, Redis stopped and started again under each policy, hostile keys.
//!
//! These tests run in real time (a paused runtime would fire the calls' timeouts while
//! waiting for Redis's socket); nothing sleeps: each step waits for replies or signals.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio::sync::{mpsc, Semaphore};
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::idempotency::{
    Claim, FailurePolicy, Fingerprint, IdempotencyLayer, Lease, Record, RedisStore,
    RedisStoreConfigError, Store, StoreErrorKind, StoreKey,
};
use tower_bulwark::RejectionLayer;

use redis_server::{conn, RedisServer};

/// Calls in these tests may take long on a loaded machine without being failures: a stopped
/// server is seen at once (connection refused), not by the timeout.
fn store(c: &ConnectionManager) -> RedisStore {
    RedisStore::new(c.clone())
        .timeout(Duration::from_secs(2))
        .unwrap()
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn fp(n: u128) -> Fingerprint {
    Fingerprint::from_u128(n)
}

fn key(k: &[u8]) -> StoreKey {
    StoreKey::new(Bytes::from_static(b"tenant"), Bytes::copy_from_slice(k))
}

fn record(f: Fingerprint, body: &'static str) -> Record {
    let mut h = HeaderMap::new();
    h.insert("content-type", "text/plain".parse().unwrap());
    Record::response(
        f,
        StatusCode::CREATED,
        h,
        Bytes::from_static(body.as_bytes()),
        None,
    )
}

fn lease(c: Claim) -> Lease {
    match c {
        Claim::Claimed(l) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

#[tokio::test]
async fn store_contract_claim_complete_replay_mismatch_release() {
    let server = server_or_skip!("store_contract_claim_complete_replay_mismatch_release");
    let c = conn(&server.url()).await;
    let store = store(&c).prefix("c:").unwrap();
    let k = key(b"order-1");

    let l1 = lease(store.claim(&k, fp(1), LEASE).await.unwrap());
    assert!(matches!(
        store.claim(&k, fp(1), LEASE).await.unwrap(),
        Claim::InFlight
    ));
    assert!(matches!(
        store.claim(&k, fp(2), LEASE).await.unwrap(),
        Claim::Mismatch
    ));
    assert!(store.get(&k).await.unwrap().is_none());
    // Every key has a TTL: the lease's.
    let mut admin = c.clone();
    let rkey = store.redis_key(&k);
    let ttl: i64 = admin.pttl(&rkey).await.unwrap();
    assert!(ttl > 29_000 && ttl <= 30_000, "lease ttl {ttl}");

    store
        .complete(&l1, record(fp(1), "made"), TTL)
        .await
        .unwrap();
    let ttl: i64 = admin.pttl(&rkey).await.unwrap();
    assert!(ttl > 3_599_000 && ttl <= 3_600_000, "record ttl {ttl}");
    match store.claim(&k, fp(1), LEASE).await.unwrap() {
        Claim::Completed(r) => {
            assert_eq!(r.status(), StatusCode::CREATED);
            assert_eq!(r.body(), "made");
            assert_eq!(r.headers()["content-type"], "text/plain");
            assert_eq!(r.fingerprint(), fp(1));
        }
        other => panic!("expected the record, got {other:?}"),
    }
    assert!(matches!(
        store.claim(&k, fp(2), LEASE).await.unwrap(),
        Claim::Mismatch
    ));
    assert_eq!(store.get(&k).await.unwrap().unwrap().body(), "made");
    // A completed key is not released by its old lease.
    store.release(&l1).await.unwrap();
    assert!(store.get(&k).await.unwrap().is_some());

    // Release: the key can run again.
    let k2 = key(b"order-2");
    let l2 = lease(store.claim(&k2, fp(1), LEASE).await.unwrap());
    store.release(&l2).await.unwrap();
    let l3 = lease(store.claim(&k2, fp(1), LEASE).await.unwrap());
    assert_ne!(l2.token(), l3.token());
    // Scopes are separate keys.
    let other_scope = StoreKey::new(Bytes::from_static(b"other"), Bytes::from_static(b"order-1"));
    assert!(matches!(
        store.claim(&other_scope, fp(1), LEASE).await.unwrap(),
        Claim::Claimed(_)
    ));
    assert_eq!(store.stats().failures, 0);
}

#[tokio::test]
async fn only_the_owner_completes_or_releases() {
    let server = server_or_skip!("only_the_owner_completes_or_releases");
    let c = conn(&server.url()).await;
    let store = store(&c);
    let k = key(b"slow");
    let old = lease(store.claim(&k, fp(1), LEASE).await.unwrap());
    // The old owner's lease is lost (as if it expired) and a retry claims the key.
    let mut admin = c.clone();
    let _: i64 = admin.del(store.redis_key(&k)).await.unwrap();
    let new = lease(store.claim(&k, fp(1), LEASE).await.unwrap());
    // The late owner can neither complete over the new lease nor release it.
    let err = store
        .complete(&old, record(fp(1), "late"), TTL)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    store.release(&old).await.unwrap();
    assert!(matches!(
        store.claim(&k, fp(1), LEASE).await.unwrap(),
        Claim::InFlight
    ));
    store
        .complete(&new, record(fp(1), "new"), TTL)
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap().unwrap().body(), "new");
    assert_eq!(store.stats().leases_lost, 1);
}

#[tokio::test]
async fn hostile_keys_stay_under_the_prefix() {
    let server = server_or_skip!("hostile_keys_stay_under_the_prefix");
    let c = conn(&server.url()).await;
    let store = store(&c).prefix("idem:").unwrap();
    let hostile: Vec<Vec<u8>> = vec![
        b"}{".to_vec(),
        b"{x}".to_vec(),
        b"idem:{0}".to_vec(),
        vec![0, 0xff, b'{', b'\r', b'\n'],
        vec![b'}'; 1 << 20],
    ];
    for k in &hostile {
        let _ = lease(store.claim(&key(k), fp(1), LEASE).await.unwrap());
    }
    let mut admin = c.clone();
    let keys: Vec<Vec<u8>> = admin.keys("*").await.unwrap();
    assert_eq!(keys.len(), hostile.len());
    for k in &keys {
        let tag = k
            .strip_prefix(b"idem:{")
            .and_then(|r| r.strip_suffix(b"}"))
            .unwrap_or_else(|| panic!("key outside the prefix: {:?}", String::from_utf8_lossy(k)));
        assert_eq!(tag.len(), 32);
        assert!(tag.iter().all(u8::is_ascii_hexdigit));
    }
    assert_eq!(
        RedisStore::new(c.clone()).prefix("a{").unwrap_err(),
        RedisStoreConfigError::PrefixBraces
    );
    assert_eq!(
        RedisStore::new(c.clone())
            .timeout(Duration::ZERO)
            .unwrap_err(),
        RedisStoreConfigError::ZeroTimeout
    );
}

fn post(k: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", format!("\"{k}\""))
        .body(Full::new(Bytes::from_static(b"{\"sku\":42}")))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layers_sharing_one_redis_run_a_key_once() {
    let server = server_or_skip!("two_layers_sharing_one_redis_run_a_key_once");
    let runs = Arc::new(AtomicU64::new(0));
    // The handler holds until the test lets it finish, so that every other request arrives
    // while the first is in flight.
    let gate = Arc::new(Semaphore::new(0));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let layer = IdempotencyLayer::builder(store(&conn(&server.url()).await))
            .build()
            .unwrap();
        let handle = layer.handle();
        let (runs, gate) = (runs.clone(), gate.clone());
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(layer)
            .service_fn(move |_req: Request<Full<Bytes>>| {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let gate = gate.clone();
                async move {
                    let _ = gate.acquire().await.unwrap();
                    let mut res = Response::new(Full::new(Bytes::from(format!("order {n}"))));
                    *res.status_mut() = StatusCode::CREATED;
                    Ok::<_, Infallible>(res)
                }
            });
        replicas.push((svc, handle));
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for i in 0..64 {
        let svc = replicas[i % 2].0.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let res = svc.oneshot(post("one-key")).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            done.send((status, body)).unwrap();
        });
    }
    // 63 answers come while the first request is held: all 409.
    for _ in 0..63 {
        let (status, _) = done_rx.recv().await.unwrap();
        assert_eq!(status, StatusCode::CONFLICT);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    gate.add_permits(1000);
    let (status, body) = done_rx.recv().await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, "order 1");
    // Repeats on either replica replay the one response.
    for (svc, _) in &replicas {
        let res = svc.clone().oneshot(post("one-key")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "order 1"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let executed: u64 = replicas.iter().map(|(_, h)| h.stats().executed).sum();
    let in_flight: u64 = replicas
        .iter()
        .map(|(_, h)| h.stats().in_flight_rejected)
        .sum();
    assert_eq!((executed, in_flight), (1, 63));
}

#[tokio::test]
async fn redis_stopped_mid_run_each_policy_then_recovers() {
    let mut server = server_or_skip!("idempotency_redis_stopped_mid_run_each_policy_then_recovers");
    let runs = Arc::new(AtomicU64::new(0));
    let mk = |store: RedisStore, policy| {
        let layer = IdempotencyLayer::builder(store)
            .on_store_error(policy)
            .build()
            .unwrap();
        let handle = layer.handle();
        let runs = runs.clone();
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(layer)
            .service_fn(move |_req: Request<Full<Bytes>>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
            });
        (svc, handle)
    };
    let c = conn(&server.url()).await;
    let closed_store = store(&c).prefix("closed:").unwrap();
    let (closed, hc) = mk(closed_store.clone(), FailurePolicy::FailClosed);
    let (open, ho) = mk(store(&c).prefix("open:").unwrap(), FailurePolicy::FailOpen);

    // Healthy: "a" runs once on each layer, then replays.
    for svc in [&closed, &open] {
        for _ in 0..2 {
            assert_eq!(
                svc.clone().oneshot(post("a")).await.unwrap().status(),
                StatusCode::OK
            );
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    server.stop();

    // FailClosed: 503 and nothing runs, for a new key or a completed one.
    for k in ["a", "b", "b"] {
        let res = closed.clone().oneshot(post(k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(hc.stats().store_errors >= 3);
    assert!(closed_store.stats().failures >= 3);

    // FailOpen: runs without deduplication (each repeat runs), counted.
    for _ in 0..2 {
        assert_eq!(
            open.clone().oneshot(post("c")).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert!(ho.stats().store_errors >= 2);

    // Redis back (empty, no persistence): the same layer recovers with no restart. Each
    // failing attempt takes at most the store's 50 ms timeout.
    server.restart();
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 200, "no recovery");
        let res = closed.clone().oneshot(post("d")).await.unwrap();
        if res.status() == StatusCode::OK {
            break;
        }
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let before = runs.load(Ordering::SeqCst);
    let res = closed.clone().oneshot(post("d")).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        before,
        "a key ran twice after recovery"
    );
}

#[derive(Clone, Debug)]
enum Op {
    Claim { key: u8, fp: u8 },
    Complete { lease: usize, body: u8 },
    Release { lease: usize },
    Get { key: u8 },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0u8..3, 0u8..2).prop_map(|(key, fp)| Op::Claim { key, fp }),
        2 => (0usize..8, 0u8..4).prop_map(|(lease, body)| Op::Complete { lease, body }),
        1 => (0usize..8).prop_map(|lease| Op::Release { lease }),
        1 => (0u8..3).prop_map(|key| Op::Get { key }),
    ]
}

/// What an operation answered, comparable across stores.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Claimed,
    InFlight,
    Completed(Bytes),
    Mismatch,
    Done(Result<(), StoreErrorKind>),
    Got(Option<Bytes>),
    NoLease,
}

fn seen_claim(c: Claim, leases: &mut Vec<Lease>) -> Seen {
    match c {
        Claim::Claimed(l) => {
            leases.push(l);
            Seen::Claimed
        }
        Claim::InFlight => Seen::InFlight,
        Claim::Completed(r) => Seen::Completed(r.body().clone()),
        Claim::Mismatch => Seen::Mismatch,
        other => panic!("unexpected claim {other:?}"),
    }
}

/// The Redis store and the in-process `MemoryStore` are two implementations of one contract:
/// driven by the same random operations (no expiry), they answer the same.
#[test]
fn redis_store_agrees_with_memory_store() {
    use proptest::test_runner::{Config, TestRunner};
    use tower_bulwark::idempotency::MemoryStore;

    let Some(server) = RedisServer::start("redis_store_agrees_with_memory_store") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = rt.block_on(conn(&server.url()));
    let case = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config::with_cases(64));
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            case.set(case.get() + 1);
            let redis = store(&c).prefix(&format!("m{}:", case.get())).unwrap();
            let memory = MemoryStore::default();
            let (mut rl, mut ml) = (Vec::new(), Vec::new());
            let bodies = ["zero", "one", "two", "three"];
            for op in ops {
                let (a, b) = rt.block_on(async {
                    match op {
                        Op::Claim { key: k, fp: f } => {
                            let k = key(&[k]);
                            let f = fp(u128::from(f) + 1);
                            (
                                seen_claim(redis.claim(&k, f, LEASE).await.unwrap(), &mut rl),
                                seen_claim(memory.claim(&k, f, LEASE).await.unwrap(), &mut ml),
                            )
                        }
                        Op::Complete { lease, body } if lease < rl.len() => {
                            let (l1, l2) = (&rl[lease], &ml[lease]);
                            let r = |l: &Lease| record(l.fingerprint(), bodies[usize::from(body)]);
                            (
                                Seen::Done(
                                    redis.complete(l1, r(l1), TTL).await.map_err(|e| e.kind()),
                                ),
                                Seen::Done(
                                    memory.complete(l2, r(l2), TTL).await.map_err(|e| e.kind()),
                                ),
                            )
                        }
                        Op::Release { lease } if lease < rl.len() => (
                            Seen::Done(redis.release(&rl[lease]).await.map_err(|e| e.kind())),
                            Seen::Done(memory.release(&ml[lease]).await.map_err(|e| e.kind())),
                        ),
                        Op::Get { key: k } => {
                            let k = key(&[k]);
                            (
                                Seen::Got(redis.get(&k).await.unwrap().map(|r| r.body().clone())),
                                Seen::Got(memory.get(&k).await.unwrap().map(|r| r.body().clone())),
                            )
                        }
                        _ => (Seen::NoLease, Seen::NoLease),
                    }
                });
                proptest::prop_assert_eq!(a, b);
            }
            Ok(())
        })
        .unwrap();
}
