//! Per-request overhead of each layer around a ready no-op service, beside the peers, in one
//! criterion group named `overhead`. Run: `cargo bench --bench overhead`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "parts/backpressure.rs"]
mod backpressure;
#[path = "parts/circuit_breaker.rs"]
mod circuit_breaker;
#[path = "parts/common.rs"]
mod common;
#[path = "parts/idempotency.rs"]
mod idempotency;
#[path = "parts/rate_limit.rs"]
mod rate_limit;
#[path = "parts/retry.rs"]
mod retry;
#[path = "parts/stack.rs"]
mod stack;

fn overhead(c: &mut Criterion) {
    let mut g = c.benchmark_group("overhead");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bare", |b| {
        let mut svc = common::Noop::<()>::default();
        b.iter(|| common::call_ready(&mut svc, std::hint::black_box(7u64)))
    });
    // One reading of each clock the layers can use (README's `fast-clock` figures).
    g.bench_function("clock/fast", |b| {
        let clock = tower_bulwark::clock::Clock::fast();
        b.iter(|| std::hint::black_box(clock.now_nanos()))
    });
    g.bench_function("clock/std", |b| {
        let clock = tower_bulwark::clock::Clock::std();
        b.iter(|| std::hint::black_box(clock.now_nanos()))
    });
    rate_limit::overhead(&mut g);
    backpressure::overhead(&mut g);
    circuit_breaker::overhead(&mut g);
    retry::overhead(&mut g);
    idempotency::overhead(&mut g);
    stack::overhead(&mut g);
    g.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
