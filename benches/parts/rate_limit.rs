//! Benches for the rate limiter and its peers (tower's RateLimit, governor).
#![allow(dead_code, unused_imports)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion};
use tower::Layer;
use tower_bulwark::{Quota, RateLimitLayer};

use super::common::{call_ready, timer_runtime, two_threads, Noop};

/// A quota that a bench never exhausts: one token per nanosecond, a burst of 2^32 - 1.
fn generous() -> Quota {
    Quota::per_period(1_000_000_000, Duration::from_secs(1))
        .and_then(|q| q.burst(u32::MAX))
        .expect("valid quota")
}

fn governor_quota() -> governor::Quota {
    governor::Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX)
}

/// Entries of the `overhead` group (single thread).
pub fn overhead(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.bench_function("bulwark/rate_limit_global", |b| {
        let mut svc = RateLimitLayer::new(generous()).layer(Noop::<()>::default());
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
    g.bench_function("bulwark/rate_limit_keyed_1k", |b| {
        let mut svc = RateLimitLayer::keyed(generous(), |k: &u64| *k).layer(Noop::<()>::default());
        let mut k = 0u64;
        b.iter(|| {
            k = if k == 999 { 0 } else { k + 1 };
            assert!(call_ready(&mut svc, black_box(k)))
        })
    });
    g.bench_function("governor/direct", |b| {
        let limiter = governor::RateLimiter::direct(governor_quota());
        b.iter(|| assert!(black_box(&limiter).check().is_ok()))
    });
    g.bench_function("governor/keyed_1k", |b| {
        let limiter = governor::RateLimiter::keyed(governor_quota());
        let mut k = 0u64;
        b.iter(|| {
            k = if k == 999 { 0 } else { k + 1 };
            assert!(limiter.check_key(black_box(&k)).is_ok())
        })
    });
    g.bench_function("tower/rate_limit", |b| {
        let rt = timer_runtime();
        let _guard = rt.enter();
        let mut svc = tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1))
            .layer(Noop::<()>::default());
        b.iter(|| assert!(call_ready(&mut svc, black_box(7u64))))
    });
}

/// Entries of the `contention` bench (2 threads on one shared instance).
pub fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention");
    g.throughput(criterion::Throughput::Elements(1));
    g.bench_function("bulwark/rate_limit_global", |b| {
        let layer = RateLimitLayer::new(generous());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = layer.layer(Noop::<()>::default());
                move || assert!(call_ready(&mut svc, black_box(7u64)))
            })
        })
    });
    g.bench_function("bulwark/rate_limit_keyed_1k", |b| {
        let layer = RateLimitLayer::keyed(generous(), |k: &u64| *k);
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut svc = layer.layer(Noop::<()>::default());
                let mut k = 0u64;
                move || {
                    k = if k == 999 { 0 } else { k + 1 };
                    assert!(call_ready(&mut svc, black_box(k)))
                }
            })
        })
    });
    g.bench_function("governor/direct", |b| {
        let limiter = governor::RateLimiter::direct(governor_quota());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let limiter = &limiter;
                move || assert!(limiter.check().is_ok())
            })
        })
    });
    g.bench_function("governor/keyed_1k", |b| {
        let limiter = governor::RateLimiter::keyed(governor_quota());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let limiter = &limiter;
                let mut k = 0u64;
                move || {
                    k = if k == 999 { 0 } else { k + 1 };
                    assert!(limiter.check_key(&k).is_ok())
                }
            })
        })
    });
    g.finish();
}
