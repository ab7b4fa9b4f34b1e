//! The client stack (retry over a circuit breaker) through a dependency fault and its heal,
//! under tokio's paused time: callers refused by the breaker must not come back on one
//! instant when it half-opens, a herd that would re-trip it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer};
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::{Budget, RetryLayer, RetryPolicy};

/// Counts per millisecond since `start`.
#[derive(Clone)]
struct PerMs {
    start: Instant,
    counts: Arc<Mutex<BTreeMap<u64, u32>>>,
}

impl PerMs {
    fn new() -> Self {
        PerMs {
            start: Instant::now(),
            counts: Arc::default(),
        }
    }

    fn tick(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        *self.counts.lock().unwrap().entry(ms).or_default() += 1;
    }

    /// The busiest millisecond from `from` on, and its count.
    fn peak(&self, from: u64) -> (u64, u32) {
        self.counts
            .lock()
            .unwrap()
            .range(from..)
            .map(|(ms, n)| (*ms, *n))
            .max_by_key(|&(ms, n)| (n, u64::MAX - ms))
            .unwrap_or_default()
    }
}

/// A dependency that answers in 10 ms, fails everything while sick, and fails the calls
/// beyond `capacity` in flight (three times the normal load: a service just healed has
/// little headroom).
#[derive(Clone)]
struct Dependency {
    sick: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
}

impl Service<u32> for Dependency {
    type Response = u32;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u32) -> Self::Future {
        let over = self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.capacity;
        let sick = self.sick.load(Ordering::SeqCst);
        let in_flight = self.in_flight.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if sick || over {
                Err("unavailable".into())
            } else {
                Ok(n)
            }
        })
    }
}

const FAULT_AT_MS: u64 = 1_000;
const HEAL_AT_MS: u64 = 4_000;
const END_MS: u64 = 14_000;
/// 2,000 requests a second.
const PER_MS: u32 = 2;

#[tokio::test(start_paused = true)]
async fn retries_refused_by_a_breaker_come_back_spread_after_it_half_opens() {
    let dep = Dependency {
        sick: Arc::default(),
        in_flight: Arc::default(),
        capacity: 60,
    };
    // The README's client stack, on tokio's paused time.
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::failure_rate(0.5)
            .window(100)
            .open_time(Duration::from_secs(2))
            .clock(Clock::tokio())
            .seed(11),
    )
    .unwrap();
    let handle = breaker.handle();
    let budget = Budget::builder()
        .ratio(0.2)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let retry =
        RetryLayer::new(RetryPolicy::errors().max_attempts(3).budget(budget).seed(5)).unwrap();
    // Every attempt the retry layer makes, counted on its way into the breaker.
    let attempts = PerMs::new();
    let svc = {
        let attempts = attempts.clone();
        ServiceBuilder::new()
            .layer(retry)
            .map_request(move |n: u32| {
                attempts.tick();
                n
            })
            .layer(breaker)
            .service(dep.clone())
    };

    let mut first_half_open = None;
    let mut last_not_closed = 0;
    for ms in 0..END_MS {
        dep.sick
            .store((FAULT_AT_MS..HEAL_AT_MS).contains(&ms), Ordering::SeqCst);
        for _ in 0..PER_MS {
            let svc = svc.clone();
            tokio::spawn(async move {
                let _ = svc.oneshot(1).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let state = handle.state();
        if state == BreakerState::HalfOpen && first_half_open.is_none() {
            first_half_open = Some(ms);
        }
        if state != BreakerState::Closed {
            last_not_closed = ms;
        }
    }
    let first_half_open = first_half_open.expect("the breaker half-opened");
    let (peak_ms, peak) = attempts.peak(first_half_open);
    let recovery = last_not_closed.saturating_sub(HEAL_AT_MS);
    eprintln!(
        "first half-open at {first_half_open} ms; peak {peak} attempts in the ms at {peak_ms}; \
         closed for good {recovery} ms after the heal"
    );
    // The normal rate is 2 a millisecond, and retries add at most a fifth over the window.
    // Callers that waited the time left open exactly all landed on the half-open instant,
    // and those it refused, waiting its one second exactly, on another: over a thousand in
    // one millisecond.
    assert!(
        peak <= 30,
        "{peak} attempts in the millisecond at {peak_ms}, the first half-open at \
         {first_half_open}"
    );
    // The breaker's own schedule: a probe round during the fault reopened it for 4 s ± 10%,
    // so it closes for good about 3 s after the heal, unless a herd of retries re-trips it.
    assert!(
        recovery < 3_600,
        "closed for good {recovery} ms after the heal"
    );
}

/// Fails its first call and never answers the others (probes that stay out).
#[derive(Clone, Default)]
struct FailsThenHangs(Arc<AtomicUsize>);

impl Service<u32> for FailsThenHangs {
    type Response = u32;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _n: u32) -> Self::Future {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            Box::pin(async { Err("unavailable".into()) })
        } else {
            Box::pin(std::future::pending())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn callers_refused_while_half_open_are_told_different_honest_waits() {
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(2))
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio())
            .seed(3),
    )
    .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(breaker)
        .service(FailsThenHangs::default());
    assert!(svc.clone().oneshot(1).await.is_err());
    assert_eq!(handle.state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(2)).await;
    // The probe goes out and stays out.
    let probe = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    let mut hints = Vec::new();
    for _ in 0..100 {
        let err = svc.clone().oneshot(1).await.unwrap_err();
        let r = err
            .downcast_ref::<tower_bulwark::Rejection>()
            .expect("a rejection");
        hints.push(r.retry_after().expect("a wait hint"));
    }
    // A failed probe would open the breaker for 4 s (2 s doubled): no hint says more, none
    // is zero, and callers refused together are not all told to come back together.
    assert!(
        hints
            .iter()
            .all(|h| !h.is_zero() && *h <= Duration::from_secs(4)),
        "{hints:?}"
    );
    let mut distinct = hints.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 95,
        "{} distinct hints: {distinct:?}",
        distinct.len()
    );
    probe.abort();
}
