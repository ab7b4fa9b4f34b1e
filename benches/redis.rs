//! The Redis-backed rate limit check beside a plain Redis `PING` round trip, in one criterion
//! group named `redis`, against a `redis-server` this bench starts on a loopback port.
//! Run: `cargo bench --features redis --bench redis`.
//!
//! - `redis/ping` and `redis/bulwark/rate_limit_check`: one request at a time.
//! - `redis/script` and `redis/script_64_in_flight`: the limiter's Lua script invoked bare,
//!   the floor of a check (Redis's own cost).
//! - `redis/bulwark/idempotency_replay` (one claim that returns the record) and
//!   `redis/bulwark/idempotency_first` (claim and complete: two round trips), on `RedisStore`.
//! - `redis/ping_64_in_flight` and `redis/bulwark/rate_limit_check_64_in_flight`: 64 requests
//!   in flight over one multiplexed connection (throughput is per request).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use tower::{Service, ServiceExt};
use tower_bulwark::idempotency::{Claim, Fingerprint, Record, RedisStore, Store, StoreKey};
use tower_bulwark::rate_limit::store::{RedisRateLimitConfig, RedisRateLimitLayer};
use tower_bulwark::Quota;

#[path = "parts/common.rs"]
mod common;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

/// The limiter's script, invoked bare (no layer, no timeout, fixed key): the floor a check
/// can reach, to tell Redis's own cost from the layer's.
async fn script(conn: &mut ConnectionManager, script: &redis::Script) {
    let (admitted, _, _, _): (i64, i64, i64, Vec<u8>) = script
        .key("bench:{script}")
        .arg(1u64)
        .arg(1_000_000_000u64)
        .arg(0u64)
        .invoke_async(conn)
        .await
        .unwrap();
    assert_eq!(admitted, 1);
}

fn record(fp: Fingerprint) -> Record {
    let mut h = http::HeaderMap::new();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Record::response(
        fp,
        http::StatusCode::CREATED,
        h,
        bytes::Bytes::from_static(b"{\"id\":42,\"status\":\"created\"}"),
        None,
    )
}

async fn ping(conn: &mut ConnectionManager) {
    let pong: String = redis::cmd("PING").query_async(conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

fn redis(c: &mut Criterion) {
    let Some(server) = redis_server::RedisServer::start("bench redis") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(async {
        redis::Client::open(server.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap()
    });
    // A quota no bench reaches, so that every check admits (the script's write path).
    let layer = RedisRateLimitLayer::new(
        conn.clone(),
        RedisRateLimitConfig::new(Quota::per_second(1_000_000_000).unwrap())
            .timeout(Duration::from_secs(1))
            .unwrap(),
    )
    .unwrap();
    let handle = layer.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(common::Noop::<()>::default());

    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ping", |b| {
        let mut conn = conn.clone();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    ping(&mut conn).await;
                }
                start.elapsed()
            })
        })
    });
    let gcra = redis::Script::new(include_str!("../src/rate_limit/store/gcra.lua"));
    g.bench_function("script", |b| {
        let mut conn = conn.clone();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    script(&mut conn, &gcra).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("bulwark/rate_limit_check", |b| {
        let mut svc = svc.clone();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    ServiceExt::<()>::ready(&mut svc)
                        .await
                        .unwrap()
                        .call(())
                        .await
                        .unwrap();
                }
                start.elapsed()
            })
        })
    });
    // The idempotency store: a replay is one claim (one round trip, the record comes back
    // with the answer); a first request is a claim and a complete (two).
    let store = RedisStore::new(conn.clone())
        .timeout(Duration::from_secs(1))
        .unwrap();
    let fp = Fingerprint::from_u128(7);
    let replayed = StoreKey::new("bench", "replayed");
    rt.block_on(async {
        match store
            .claim(&replayed, fp, Duration::from_secs(60))
            .await
            .unwrap()
        {
            Claim::Claimed(lease) => store
                .complete(&lease, record(fp), Duration::from_secs(3600))
                .await
                .unwrap(),
            other => panic!("{other:?}"),
        }
    });
    g.bench_function("bulwark/idempotency_replay", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let c = store.claim(&replayed, fp, Duration::from_secs(60)).await;
                    assert!(matches!(c, Ok(Claim::Completed(_))));
                }
                start.elapsed()
            })
        })
    });
    let mut n = 0u64;
    g.bench_function("bulwark/idempotency_first", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    let key = StoreKey::new("bench", n.to_string());
                    let Ok(Claim::Claimed(lease)) =
                        store.claim(&key, fp, Duration::from_secs(60)).await
                    else {
                        panic!("a fresh key is claimed");
                    };
                    store
                        .complete(&lease, record(fp), Duration::from_secs(60))
                        .await
                        .unwrap();
                }
                start.elapsed()
            })
        })
    });

    g.throughput(Throughput::Elements(64));
    g.bench_function("ping_64_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..64).map(|_| {
                        let mut conn = conn.clone();
                        async move { ping(&mut conn).await }
                    }))
                    .await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("script_64_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..64).map(|_| {
                        let mut conn = conn.clone();
                        let gcra = &gcra;
                        async move { script(&mut conn, gcra).await }
                    }))
                    .await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("bulwark/rate_limit_check_64_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for r in join_all((0..64).map(|_| svc.clone().oneshot(()))).await {
                        r.unwrap();
                    }
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    assert_eq!(
        handle.store_failures(),
        0,
        "a check failed during the bench"
    );
}

criterion_group!(benches, redis);
criterion_main!(benches);
