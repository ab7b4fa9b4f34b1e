//! Benches for the `backpressure` layer and its peers.
#![allow(dead_code, unused_imports)]

use std::hint::black_box;

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion, Throughput};
use tower::Layer;
use tower_bulwark::backpressure::BackpressureLayer;

use crate::common::{call_ready, two_threads, Noop};

/// A limit no bench reaches: the admit path, never the shed path.
const LIMIT: usize = 1024;

/// Entries of the `overhead` group (single thread).
pub fn overhead(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.bench_function("bulwark/backpressure", |b| {
        let mut svc = BackpressureLayer::new(LIMIT).layer(Noop::<()>::default());
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
    g.bench_function("tower/concurrency_limit", |b| {
        let mut svc = tower::limit::ConcurrencyLimit::new(Noop::<()>::default(), LIMIT);
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
    g.bench_function("tower_resilience/bulkhead", |b| {
        let layer = tower_resilience::bulkhead::BulkheadLayer::builder()
            .max_concurrent_calls(LIMIT)
            .build()
            .expect("bulkhead config");
        let mut svc = layer.layer(Noop::<()>::default());
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bulwark/backpressure", |b| {
        let svc = BackpressureLayer::new(LIMIT).layer(Noop::<()>::default());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || assert!(call_ready(&mut svc, black_box(7u64)))
            })
        })
    });
    g.bench_function("tower/concurrency_limit", |b| {
        // tower's layer shares one semaphore between the services it makes and their clones.
        let svc = tower::limit::ConcurrencyLimit::new(Noop::<()>::default(), LIMIT);
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = svc.clone();
                move || assert!(call_ready(&mut svc, black_box(7u64)))
            })
        })
    });
    g.finish();
}
