//! The retry layer around generic services: attempts, deadline, budget, jitter, hints,
//! cancellation, the poll_ready contract and configuration checks. Time is tokio's paused time.

#[path = "support/tracing_on.rs"]
mod tracing_on;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::retry::{Backoff, Budget, ConfigError, Jitter, RetryLayer, RetryPolicy};
use tower_bulwark::{Rejection, RejectionKind};

/// A service that fails its first `fail` calls with `err()` and then answers `n * 2`; it
/// records the paused-time instant of each call.
#[derive(Clone)]
struct Flaky {
    calls: Arc<Mutex<Vec<Instant>>>,
    fail: u32,
    err: fn() -> BoxError,
}

impl Flaky {
    fn new(fail: u32) -> Self {
        Flaky {
            calls: Arc::default(),
            fail,
            err: || "connection reset".into(),
        }
    }

    fn with_err(fail: u32, err: fn() -> BoxError) -> Self {
        Flaky {
            err,
            ..Flaky::new(fail)
        }
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn times(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

impl Service<u32> for Flaky {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u32) -> Self::Future {
        let mut calls = self.calls.lock().unwrap();
        calls.push(Instant::now());
        std::future::ready(if calls.len() as u32 <= self.fail {
            Err((self.err)())
        } else {
            Ok(n * 2)
        })
    }
}

fn fixed(ms: u64) -> Backoff {
    Backoff::exponential(Duration::from_millis(ms), Duration::from_millis(ms)).jitter(Jitter::None)
}

/// A budget of one retry in all: no ratio, a floor of one a second.
fn one_retry_budget() -> Budget {
    Budget::builder()
        .ratio(0.0)
        .min_per_second(1)
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

fn policy() -> RetryPolicy {
    RetryPolicy::errors().clock(Clock::tokio()).seed(7)
}

#[tokio::test(start_paused = true)]
async fn succeeds_after_transient_failures() {
    let inner = Flaky::new(2);
    let layer = RetryLayer::new(policy().backoff(fixed(10))).unwrap();
    let svc = layer.layer(inner.clone());
    assert_eq!(svc.oneshot(21).await.unwrap(), 42);
    assert_eq!(inner.count(), 3);
    assert_eq!(layer.handle().retries(), 2);
}

#[tokio::test(start_paused = true)]
async fn attempts_are_capped() {
    let inner = Flaky::new(u32::MAX);
    let layer = RetryLayer::new(policy().max_attempts(4).backoff(Backoff::none())).unwrap();
    let err = layer.layer(inner.clone()).oneshot(1).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "connection reset",
        "the last error, as it was"
    );
    assert_eq!(inner.count(), 4);

    let inner = Flaky::new(u32::MAX);
    let layer = RetryLayer::new(policy().max_attempts(1)).unwrap();
    assert!(layer.layer(inner.clone()).oneshot(1).await.is_err());
    assert_eq!(inner.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_stops_retries() {
    let inner = Flaky::new(u32::MAX);
    let layer = RetryLayer::new(
        policy()
            .max_attempts(10)
            .backoff(fixed(100))
            .deadline(Duration::from_millis(250)),
    )
    .unwrap();
    let start = Instant::now();
    assert!(layer.layer(inner.clone()).oneshot(1).await.is_err());
    // Attempts at 0, 100 and 200 ms; a fourth at 300 ms would start past the deadline.
    assert_eq!(inner.count(), 3);
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn full_jitter_delays_lie_within_bounds() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_millis(500);
    let mut ratios = Vec::new();
    for seed in 0..20 {
        let inner = Flaky::new(u32::MAX);
        let layer = RetryLayer::new(
            policy()
                .seed(seed)
                .max_attempts(6)
                .no_budget()
                .backoff(Backoff::exponential(base, cap)),
        )
        .unwrap();
        let _ = layer.layer(inner.clone()).oneshot(1).await;
        let times = inner.times();
        assert_eq!(times.len(), 6);
        for (n, w) in times.windows(2).enumerate() {
            let gap = w[1] - w[0];
            let ceiling = (base * 2u32.pow(n as u32)).min(cap);
            assert!(
                gap <= ceiling,
                "seed {seed} retry {n}: {gap:?} > {ceiling:?}"
            );
            ratios.push(gap.as_secs_f64() / ceiling.as_secs_f64());
        }
    }
    // Full jitter draws each delay uniformly below its ceiling: neither always the ceiling
    // (no jitter) nor always zero, spread over the whole range, about half on average.
    assert_eq!(ratios.len(), 100);
    assert!(ratios.iter().any(|&r| r < 0.25), "{ratios:?}");
    assert!(ratios.iter().any(|&r| r > 0.75), "{ratios:?}");
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    assert!((0.35..0.65).contains(&mean), "mean {mean}: {ratios:?}");
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_attempts_of_a_dependency_that_always_fails() {
    let ratio = 0.2;
    let floor = 10;
    let budget = Budget::builder()
        .ratio(ratio)
        .min_per_second(floor)
        .clock(Clock::tokio())
        .build()
        .unwrap();
    let inner = Flaky::new(u32::MAX);
    let layer = RetryLayer::new(
        policy()
            .max_attempts(3)
            .backoff(Backoff::none())
            .budget(budget.clone()),
    )
    .unwrap();
    let svc = layer.layer(inner.clone());
    let start = Instant::now();
    for i in 0..1000 {
        assert!(svc.clone().oneshot(i).await.is_err());
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64().max(1.0);
    let attempts = inner.count() as f64;
    let bound = 1000.0 * (1.0 + ratio) + f64::from(floor) * elapsed;
    assert!(attempts <= bound, "{attempts} attempts > {bound}");
    // Without a budget it would be 3,000; the budget did its work, and retried some.
    assert!(attempts > 1000.0 + 1000.0 * ratio * 0.9, "{attempts}");
    let handle = layer.handle();
    assert!(handle.budget_exhausted() > 0);
    assert_eq!(handle.retries() as f64, attempts - 1000.0);
    assert_eq!(budget.figures().requests, 1000);
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_every_service_of_the_layer() {
    let budget = one_retry_budget();
    let layer = RetryLayer::new(policy().backoff(Backoff::none()).budget(budget)).unwrap();
    let a = Flaky::new(u32::MAX);
    let b = Flaky::new(u32::MAX);
    let _ = layer.layer(a.clone()).oneshot(1).await;
    let _ = layer.clone().layer(b.clone()).oneshot(1).await;
    // One retry per second of floor, in all: the first service took it.
    assert_eq!(a.count() + b.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_waited_out_when_it_fits() {
    let inner = Flaky::with_err(1, || {
        Rejection::circuit_open(Duration::from_millis(300)).into()
    });
    let layer = RetryLayer::new(policy().backoff(Backoff::exponential(
        Duration::from_millis(10),
        Duration::from_secs(1),
    )))
    .unwrap();
    let start = Instant::now();
    assert_eq!(layer.layer(inner.clone()).oneshot(5).await.unwrap(), 10);
    assert_eq!(inner.count(), 2);
    // Never before the breaker's hint, and spread past it by at most twice as much.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited <= Duration::from_millis(900),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_longer_than_the_maximum_delay_stops_at_once() {
    let inner = Flaky::with_err(u32::MAX, || {
        Rejection::circuit_open(Duration::from_secs(30)).into()
    });
    let layer = RetryLayer::new(policy().backoff(Backoff::exponential(
        Duration::from_millis(10),
        Duration::from_secs(1),
    )))
    .unwrap();
    let start = Instant::now();
    let err = layer.layer(inner.clone()).oneshot(5).await.unwrap_err();
    assert_eq!(inner.count(), 1, "an open breaker is not hammered");
    assert_eq!(start.elapsed(), Duration::ZERO);
    let r = err
        .downcast_ref::<Rejection>()
        .expect("the breaker's rejection");
    assert_eq!(r.kind(), RejectionKind::CircuitOpen);
}

#[tokio::test(start_paused = true)]
async fn a_rejection_hint_longer_than_the_maximum_delay_stops_at_once() {
    let inner = Flaky::with_err(1, || {
        Rejection::overloaded(Some(Duration::from_secs(60))).into()
    });
    let layer = RetryLayer::new(policy().backoff(fixed(200))).unwrap();
    let start = Instant::now();
    let err = layer.layer(inner.clone()).oneshot(1).await.unwrap_err();
    assert_eq!(inner.count(), 1, "not retried before the layer below said");
    assert_eq!(start.elapsed(), Duration::ZERO);
    let r = err
        .downcast_ref::<Rejection>()
        .expect("the rejection itself");
    assert_eq!(r.retry_after(), Some(Duration::from_secs(60)));
}

#[tokio::test(start_paused = true)]
async fn a_hint_is_waited_out_with_jitter_and_never_less() {
    // Many callers refused with the same hint do not come back on one instant.
    let mut waits = Vec::new();
    for seed in 0..50 {
        let inner = Flaky::with_err(1, || {
            Rejection::overloaded(Some(Duration::from_millis(200))).into()
        });
        let layer = RetryLayer::new(policy().seed(seed).backoff(fixed(500))).unwrap();
        let start = Instant::now();
        assert_eq!(layer.layer(inner.clone()).oneshot(1).await.unwrap(), 2);
        waits.push(start.elapsed());
    }
    assert!(
        waits.iter().all(|w| *w >= Duration::from_millis(200)),
        "{waits:?}"
    );
    assert!(
        waits.iter().all(|w| *w <= Duration::from_millis(700)),
        "{waits:?}"
    );
    waits.sort();
    waits.dedup();
    assert!(waits.len() >= 45, "the waits are spread: {waits:?}");
}

#[tokio::test(start_paused = true)]
async fn rejections_retrying_cannot_help_are_not_retried() {
    let inner = Flaky::with_err(u32::MAX, || {
        Rejection::new(RejectionKind::IdempotencyKeyReused).into()
    });
    let layer = RetryLayer::new(policy()).unwrap();
    assert!(layer.layer(inner.clone()).oneshot(1).await.is_err());
    assert_eq!(inner.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_predicate_chooses_the_errors() {
    let layer = RetryLayer::new(
        RetryPolicy::errors_where(|e: &BoxError| e.to_string().contains("reset"))
            .clock(Clock::tokio())
            .backoff(Backoff::none()),
    )
    .unwrap();
    let reset = Flaky::new(1);
    assert_eq!(layer.layer(reset.clone()).oneshot(2).await.unwrap(), 4);
    assert_eq!(reset.count(), 2);
    let denied = Flaky::with_err(1, || "permission denied".into());
    assert!(layer.layer(denied.clone()).oneshot(2).await.is_err());
    assert_eq!(denied.count(), 1);
}

/// A request that counts its clones.
#[derive(Debug)]
struct Counted(Arc<AtomicU32>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn requests_are_never_cloned_for_the_last_attempt() {
    for (max, fail, want_calls, want_clones) in [
        (1, 5, 1, 0), // no retry possible: no clone at all
        (2, 5, 2, 1), // one clone kept; the last attempt takes it
        (3, 5, 3, 2),
        (3, 0, 1, 1), // the first succeeds: the one kept clone is dropped
    ] {
        let clones = Arc::new(AtomicU32::new(0));
        let calls = Arc::new(AtomicU32::new(0));
        let svc = {
            let calls = calls.clone();
            service_fn(move |_req: Counted| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < fail {
                        Err::<(), BoxError>("reset".into())
                    } else {
                        Ok(())
                    }
                }
            })
        };
        let layer = RetryLayer::new(
            policy()
                .max_attempts(max)
                .backoff(Backoff::none())
                .no_budget(),
        )
        .unwrap();
        let _ = layer.layer(svc).oneshot(Counted(clones.clone())).await;
        assert_eq!(calls.load(Ordering::SeqCst), want_calls, "max {max}");
        assert_eq!(clones.load(Ordering::SeqCst), want_clones, "max {max}");
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_during_backoff_nothing_more_reaches_the_service() {
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    let layer = RetryLayer::new(policy().backoff(fixed(1_000))).unwrap();
    let mut svc = layer.layer(mock);
    let fut = svc.ready().await.unwrap().call(1);
    let mut fut = tokio_test::task::spawn(fut);
    assert_pending!(fut.poll());
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 1);
    send.send_error("reset");
    assert_pending!(fut.poll(), "sleeping in the backoff");
    assert!(fut.enter(|_, f| format!("{f:?}")).contains("backoff"));
    drop(fut);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(handle.poll_request().is_pending(), "no later attempt");
    assert_eq!(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        0,
        "no task left behind"
    );
    drop(svc);
    drop(layer);
    assert!(matches!(handle.poll_request(), Poll::Ready(None)));
}

#[tokio::test(start_paused = true)]
async fn a_retry_given_up_during_its_backoff_gives_its_budget_back() {
    let budget = one_retry_budget();
    let layer = RetryLayer::new(policy().backoff(fixed(1_000)).budget(budget.clone())).unwrap();
    let handle = layer.handle();
    let inner = Flaky::new(u32::MAX);
    let mut svc = layer.layer(inner.clone());
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(1));
    assert_pending!(
        fut.poll(),
        "the first attempt failed: waiting out the backoff"
    );
    assert_eq!(budget.figures().retries, 1, "the retry is withdrawn");
    drop(fut);
    assert_eq!(
        budget.figures().retries,
        0,
        "a retry never made is given back"
    );
    assert_eq!(handle.retries(), 0, "and is not counted as made");
    assert_eq!(inner.count(), 1);
    // So the next request still has its retry.
    let _ = svc.ready().await.unwrap().call(2).await;
    assert_eq!(inner.count(), 3, "its first attempt and its one retry");
    assert_eq!(handle.retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_during_an_attempt_nothing_more_happens() {
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    let layer = RetryLayer::new(policy().backoff(Backoff::none())).unwrap();
    let mut svc = layer.layer(mock);
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(1));
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    drop(fut);
    send.send_error("reset");
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(handle.poll_request().is_pending());
    assert_eq!(layer.handle().retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_for_the_service_to_be_ready() {
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    let layer = RetryLayer::new(policy().backoff(Backoff::none())).unwrap();
    let mut svc = layer.layer(mock);
    handle.allow(1);
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(3));
    // The clone that makes retries starts unreserved: it must be polled ready itself.
    let mut clone = tokio_test::task::spawn(svc.clone());
    assert_pending!(clone.enter(|cx, mut s| s.poll_ready(cx)));
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("reset");
    assert_pending!(fut.poll(), "no capacity for the retry yet");
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 3);
    send.send_response(9);
    assert_eq!(assert_ready!(fut.poll()).unwrap(), 9);
}

/// A service that counts its clones and its live instances, failing its first `fail` calls.
struct CloneCounted {
    clones: Arc<AtomicU32>,
    live: Arc<AtomicU32>,
    inner: Flaky,
}

impl CloneCounted {
    fn new(fail: u32) -> Self {
        let live = Arc::new(AtomicU32::new(1));
        CloneCounted {
            clones: Arc::default(),
            live,
            inner: Flaky::new(fail),
        }
    }
}

impl Clone for CloneCounted {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
        CloneCounted {
            clones: self.clones.clone(),
            live: self.live.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl Drop for CloneCounted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Service<u32> for CloneCounted {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, n: u32) -> Self::Future {
        self.inner.call(n)
    }
}

#[tokio::test(start_paused = true)]
async fn the_service_is_cloned_for_retries_only() {
    let inner = CloneCounted::new(0);
    let (clones, live, calls) = (
        inner.clones.clone(),
        inner.live.clone(),
        inner.inner.clone(),
    );
    let layer = RetryLayer::new(policy().backoff(fixed(1))).unwrap();
    let mut svc = layer.layer(inner);
    for n in 0..100 {
        assert_eq!(svc.ready().await.unwrap().call(n).await.unwrap(), n * 2);
    }
    assert_eq!(calls.count(), 100);
    assert_eq!(
        clones.load(Ordering::Relaxed),
        1,
        "one clone is kept for retries; a request that succeeds costs no clone"
    );
    drop(svc);
    assert_eq!(
        live.load(Ordering::Relaxed),
        0,
        "the kept clone goes with the service"
    );

    // Two failures, then success: each retry is made on a fresh clone of the kept one, which
    // the future drops when it completes.
    let inner = CloneCounted::new(2);
    let (clones, live, calls) = (
        inner.clones.clone(),
        inner.live.clone(),
        inner.inner.clone(),
    );
    let mut svc = layer.layer(inner);
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 10);
    assert_eq!(calls.count(), 3);
    assert_eq!(
        clones.load(Ordering::Relaxed),
        2,
        "the kept clone, and one for the retries"
    );
    assert_eq!(
        live.load(Ordering::Relaxed),
        2,
        "the service and its kept clone"
    );
    let mut other = svc.clone();
    assert_eq!(other.ready().await.unwrap().call(6).await.unwrap(), 12);
    drop(svc);
    assert_eq!(
        live.load(Ordering::Relaxed),
        2,
        "a clone of the service keeps the kept one"
    );
    drop(other);
    assert_eq!(live.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_change_at_run_time() {
    let layer = RetryLayer::new(policy().backoff(Backoff::none()).no_budget()).unwrap();
    let handle = layer.handle();
    handle.set_max_attempts(5).unwrap();
    let inner = Flaky::new(u32::MAX);
    let _ = layer.layer(inner.clone()).oneshot(1).await;
    assert_eq!(inner.count(), 5);
    assert_eq!(handle.retries(), 4);
    assert_eq!(handle.set_max_attempts(0), Err(ConfigError::ZeroAttempts));
}

#[test]
fn bad_configuration_is_refused_at_construction() {
    let err = |p: RetryPolicy| RetryLayer::new(p).err();
    assert_eq!(
        err(RetryPolicy::errors().max_attempts(0)),
        Some(ConfigError::ZeroAttempts)
    );
    let b = Backoff::default();
    assert_eq!(
        err(RetryPolicy::errors().backoff(b.multiplier(0.9))),
        Some(ConfigError::Multiplier(0.9))
    );
    assert!(matches!(
        err(RetryPolicy::errors().backoff(b.multiplier(f64::NAN))),
        Some(ConfigError::Multiplier(_))
    ));
    assert!(matches!(
        err(RetryPolicy::errors().backoff(b.jitter(Jitter::Proportional(f64::NAN)))),
        Some(ConfigError::Jitter(_))
    ));
    assert_eq!(
        err(RetryPolicy::errors().backoff(b.jitter(Jitter::Proportional(-0.5)))),
        Some(ConfigError::Jitter(-0.5))
    );
    assert_eq!(
        err(RetryPolicy::errors().backoff(Backoff::exponential(
            Duration::from_secs(2),
            Duration::from_secs(1)
        ))),
        Some(ConfigError::MaxBelowBase)
    );
    assert_eq!(
        err(RetryPolicy::errors().deadline(Duration::ZERO)),
        Some(ConfigError::ZeroDeadline)
    );
    assert!(matches!(
        Budget::ratio(f64::NAN),
        Err(ConfigError::Ratio(_))
    ));
    assert!(matches!(Budget::ratio(-1.0), Err(ConfigError::Ratio(_))));
    assert!(RetryLayer::new(RetryPolicy::errors()).is_ok());
    assert!(ConfigError::ZeroAttempts.to_string().contains("at least 1"));
}

#[tokio::test(start_paused = true)]
async fn the_policy_clock_reaches_a_given_budget_in_either_order() {
    let budget = || {
        Budget::builder()
            .ratio(10.0)
            .min_per_second(1)
            .build()
            .unwrap()
    };
    let policy = || RetryPolicy::errors().max_attempts(10).backoff(fixed(500));
    let layers = [
        RetryLayer::new(policy().clock(Clock::tokio()).budget(budget())).unwrap(),
        RetryLayer::new(policy().budget(budget()).clock(Clock::tokio())).unwrap(),
    ];
    tokio::time::advance(Duration::from_secs(5)).await;
    for layer in &layers {
        // The floor accrues with the budget's age on tokio's paused time: 5 s, 5 retries.
        let figures = layer.handle().budget().unwrap().figures();
        assert_eq!(figures.allowed, 5.0, "{figures:?}");
    }
    // And the deadline follows the same time: attempts at 0, 0.5, 1, 1.5 and 2 s.
    let layer = RetryLayer::new(
        policy()
            .deadline(Duration::from_secs(2))
            .budget(budget())
            .clock(Clock::tokio()),
    )
    .unwrap();
    let inner = Flaky::new(u32::MAX);
    let start = Instant::now();
    assert!(layer.layer(inner.clone()).oneshot(1).await.is_err());
    assert_eq!(inner.count(), 5);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[test]
fn a_policy_clock_that_contradicts_its_budget_is_refused() {
    let (manual, _hand) = Clock::manual();
    let on_manual = Budget::builder().clock(manual.clone()).build().unwrap();
    assert_eq!(
        RetryLayer::new(
            RetryPolicy::errors()
                .budget(on_manual.clone())
                .clock(Clock::std())
        )
        .err(),
        Some(ConfigError::BudgetClock)
    );
    // The same clock in both places, or in one of them, is fine.
    assert!(RetryLayer::new(
        RetryPolicy::errors()
            .clock(manual)
            .budget(on_manual.clone())
    )
    .is_ok());
    assert!(RetryLayer::new(RetryPolicy::errors().budget(on_manual)).is_ok());
    // A budget without a clock takes the first policy's; a second layer must agree with it.
    let shared = Budget::builder().build().unwrap();
    let clock = Clock::std();
    assert!(RetryLayer::new(
        RetryPolicy::errors()
            .budget(shared.clone())
            .clock(clock.clone())
    )
    .is_ok());
    assert!(RetryLayer::new(RetryPolicy::errors().budget(shared.clone()).clock(clock)).is_ok());
    assert!(RetryLayer::new(RetryPolicy::errors().budget(shared.clone())).is_ok());
    let (other, _hand) = Clock::manual();
    assert_eq!(
        RetryLayer::new(RetryPolicy::errors().budget(shared).clock(other)).err(),
        Some(ConfigError::BudgetClock)
    );
    assert!(ConfigError::BudgetClock.to_string().contains("clock"));
}

#[test]
fn public_types_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<RetryLayer>();
    both::<tower_bulwark::retry::RetryHandle>();
    both::<Budget>();
    both::<tower_bulwark::retry::Retry<Flaky>>();
    both::<
        tower_bulwark::retry::future::ResponseFuture<
            Flaky,
            u32,
            tower_bulwark::classify::ErrorsOnly,
            tower_bulwark::retry::CloneRequest,
        >,
    >();
}

#[tokio::test(start_paused = true)]
async fn tracing_says_each_retry_and_why_the_budget_stopped() {
    let (out, _guard) = tracing_on::capture(tracing::Level::DEBUG);
    let budget = one_retry_budget();
    let layer = RetryLayer::new(policy().backoff(fixed(20)).budget(budget)).unwrap();
    let _ = layer.layer(Flaky::new(u32::MAX)).oneshot(1).await;
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("retrying"), "{text}");
    assert!(text.contains("attempt=2"), "{text}");
    assert!(text.contains("delay_ms=20"), "{text}");
    assert!(text.contains("connection reset"), "the reason: {text}");
    assert!(text.contains("retry budget exhausted"), "{text}");
    let (out, _guard2) = tracing_on::capture(tracing::Level::DEBUG);
    let capped = RetryLayer::new(policy().max_attempts(2).backoff(Backoff::none())).unwrap();
    let _ = capped.layer(Flaky::new(u32::MAX)).oneshot(1).await;
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("giving up: attempts exhausted"), "{text}");
    assert!(text.contains("attempts=2"), "{text}");
    assert_eq!(layer.handle().budget_exhausted(), 1);
}

/// Two OS threads racing to withdraw from one budget never take more than it allows.
#[test]
fn racing_withdrawals_never_overdraw_the_budget() {
    for round in 0..500 {
        let (clock, _hand) = Clock::manual();
        let budget = Budget::builder()
            .ratio(0.0)
            .min_per_second(64)
            .window(Duration::from_secs(10))
            .clock(clock)
            .build()
            .unwrap();
        let allowed = budget.figures().allowed;
        assert_eq!(allowed, 64.0);
        let taken = std::sync::atomic::AtomicU64::new(0);
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..200 {
                        if budget.try_withdraw() {
                            taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let taken = taken.into_inner();
        assert!(
            taken <= 64,
            "round {round}: {taken} withdrawals from an allowance of 64"
        );
        assert!(taken >= 1, "round {round}: the budget allowed none");
    }
}
