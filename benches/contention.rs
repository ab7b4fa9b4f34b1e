//! Two OS threads on one shared instance of each layer: aggregate cost per call.
//! Run: `cargo bench --bench contention`.

use criterion::{criterion_group, criterion_main, Criterion};

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

fn contention(c: &mut Criterion) {
    rate_limit::contention(c);
    backpressure::contention(c);
    circuit_breaker::contention(c);
    retry::contention(c);
    idempotency::contention(c);
    stack::contention(c);
}

criterion_group!(benches, contention);
criterion_main!(benches);
