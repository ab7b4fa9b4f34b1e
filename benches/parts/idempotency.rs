//! Benches for the `idempotency` layer and its peers.
#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{measurement::WallTime, BatchSize, BenchmarkGroup, Criterion, Throughput};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};

use crate::common;

/// A ready handler answering a 1 KiB JSON response.
#[derive(Clone)]
struct Handler1k {
    body: Bytes,
}

impl Handler1k {
    fn new() -> Self {
        Handler1k {
            body: Bytes::from(vec![b'x'; 1024]),
        }
    }
}

impl Service<Request<Full<Bytes>>> for Handler1k {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let mut res = Response::new(Full::new(self.body.clone()));
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        std::future::ready(Ok(res))
    }
}

const PAYLOAD: &[u8] = b"{\"sku\":\"A-1\",\"qty\":2}";

fn request(key: HeaderValue) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(PAYLOAD)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/orders");
    req.headers_mut().insert("idempotency-key", key);
    req
}

fn key(i: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("key-{i:016x}")).expect("visible ASCII")
}

fn store() -> MemoryStore {
    MemoryStore::builder()
        .max_entries(1 << 16)
        .max_bytes(256 << 20)
        // Every bench key has the one (empty) scope.
        .scope_share(1.0)
        .build()
        .expect("valid bounds")
}

/// A layer for first runs: a full store refuses new keys rather than forget completed ones,
/// so records live 20 ms here, and the steady state (a record completed, an expired one
/// swept, on every call) is what is measured, never the refusal of a full store.
fn first_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::builder(store())
        .ttl(Duration::from_millis(20))
        .build()
        .expect("valid configuration")
}

/// Entries of the `overhead` group (single thread).
pub fn overhead(g: &mut BenchmarkGroup<'_, WallTime>) {
    // Requests are built outside the timed section (`iter_batched`): what is measured is the
    // layer, the store and the handler.
    g.bench_function("bulwark/idempotency_replay_1k", |b| {
        let mut svc = IdempotencyLayer::new(store()).layer(Handler1k::new());
        let k = key(1);
        assert!(common::call_ready(&mut svc, request(k.clone())));
        b.iter_batched(
            || request(k.clone()),
            |req| common::call_ready(&mut svc, req),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("bulwark/idempotency_first_1k", |b| {
        let mut svc = first_layer().layer(Handler1k::new());
        let mut i = 0u64;
        b.iter_batched(
            || {
                i += 1;
                request(key(i))
            },
            |req| common::call_ready(&mut svc, req),
            BatchSize::SmallInput,
        )
    });
    // Peer floor: the handler alone, with the same request building outside the timing.
    g.bench_function("handler_1k", |b| {
        let mut svc = Handler1k::new();
        b.iter_batched(
            || request(key(1)),
            |req| common::call_ready(&mut svc, req),
            BatchSize::SmallInput,
        )
    });
    // Peer floor: a plain `HashMap` insert of a 1 KiB value under a fresh key, then a get.
    g.bench_function("std/hashmap_insert_get_1k", |b| {
        let mut map: HashMap<Box<[u8]>, Bytes> = HashMap::new();
        let value = Bytes::from(vec![b'x'; 1024]);
        let mut i = 0u64;
        b.iter_batched(
            || {
                i += 1;
                format!("key-{:016x}", i % (1 << 16))
                    .into_bytes()
                    .into_boxed_slice()
            },
            |k| {
                map.insert(k.clone(), value.clone());
                std::hint::black_box(map.get(&k).map(Bytes::len))
            },
            BatchSize::SmallInput,
        )
    });
}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(Throughput::Elements(1));
    // Here the request is built inside the timed loop (one thread and two alike), so compare
    // the two entries of each pair with each other.
    let replay_svc = || {
        let svc = IdempotencyLayer::new(store()).layer(Handler1k::new());
        let mut first = svc.clone();
        assert!(common::call_ready(&mut first, request(key(1))));
        svc
    };
    g.bench_function("bulwark/idempotency_replay_1k/1_thread", |b| {
        let mut svc = replay_svc();
        let k = key(1);
        b.iter(|| common::call_ready(&mut svc, request(k.clone())))
    });
    g.bench_function("bulwark/idempotency_replay_1k/2_threads", |b| {
        let svc = replay_svc();
        b.iter_custom(|iters| {
            common::two_threads(iters, || {
                let mut svc = svc.clone();
                let k = key(1);
                move || {
                    common::call_ready(&mut svc, request(k.clone()));
                }
            })
        })
    });
    g.bench_function("bulwark/idempotency_first_1k/1_thread", |b| {
        let mut svc = first_layer().layer(Handler1k::new());
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            common::call_ready(&mut svc, request(key(i)))
        })
    });
    g.bench_function("bulwark/idempotency_first_1k/2_threads", |b| {
        let svc = first_layer().layer(Handler1k::new());
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        b.iter_custom(|iters| {
            common::two_threads(iters, || {
                let mut svc = svc.clone();
                let thread = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut i = thread << 48;
                move || {
                    i += 1;
                    common::call_ready(&mut svc, request(key(i)));
                }
            })
        })
    });
    g.finish();
}
