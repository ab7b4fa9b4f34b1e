//! The keyed limiter's lock-free table, through the public API: against a model (property
//! test), and under two OS threads racing on keys that share one group of slots.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use tower::{BoxError, Layer, Service};
use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::RateLimitConfig;
use tower_bulwark::{Quota, RateLimitLayer};

#[derive(Clone, Default)]
struct Ready;

impl<Req> Service<Req> for Ready {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

fn admitted<S: Service<u64, Response = (), Error = BoxError>>(svc: &mut S, key: u64) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let mut fut = std::pin::pin!(svc.call(key));
    match std::future::Future::poll(fut.as_mut(), &mut cx) {
        Poll::Ready(r) => r.is_ok(),
        Poll::Pending => panic!("pending"),
    }
}

/// The GCRA of one key, kept in a plain map: the model. A request conforms up to 10 µs early
/// (less than one interval), the limiter's slack for clocks read a little behind.
#[derive(Default)]
struct Model {
    tat: HashMap<u64, u64>,
}

impl Model {
    fn check(&mut self, key: u64, now: u64, interval: u64, burst: u64) -> bool {
        let tat = self.tat.get(&key).copied().unwrap_or(0).max(now);
        let slack = 10_000u64.min(interval - 1);
        if tat + interval <= now + burst * interval + slack {
            self.tat.insert(key, tat + interval);
            true
        } else {
            false
        }
    }
}

proptest! {
    /// While the table has room for every live key (no eviction happened), every decision is
    /// the model's, whatever the mix of keys, times and collisions into one group.
    #[test]
    fn table_agrees_with_the_model(
        burst in 1u32..5,
        ops in proptest::collection::vec((0u64..24, 0u64..3_000_000), 1..600),
    ) {
        let interval = Duration::from_millis(1);
        let quota = Quota::with_period(interval).unwrap().burst(burst).unwrap();
        let (clock, hand) = Clock::manual();
        // 64 slots for at most 24 keys: collisions into groups happen, evictions should not
        // (and if one does, the run says nothing and is skipped).
        let layer = RateLimitLayer::keyed(RateLimitConfig::new(quota).clock(clock).max_keys(64), |k: &u64| *k);
        let handle = layer.handle();
        let mut svc = layer.layer(Ready);
        let mut model = Model::default();
        let mut now = 0u64;
        for (key, step) in ops {
            now += step;
            hand.set_nanos(now);
            let got = admitted(&mut svc, key);
            let want = model.check(key, now, 1_000_000, u64::from(burst));
            if handle.evictions() > 0 {
                return Ok(());
            }
            prop_assert_eq!(got, want, "key {} at {}", key, now);
        }
    }
}

/// Eight keys in the smallest table (eight keys, two groups of eight slots), two threads
/// racing on all of them with a frozen clock: every key is admitted exactly its burst, no more (no race lets a key claim
/// two slots or lose its state), no less.
#[test]
fn two_threads_racing_claims_in_one_group() {
    for round in 0..50 {
        let (clock, _hand) = Clock::manual();
        let layer = RateLimitLayer::keyed(
            RateLimitConfig::new(Quota::per_minute(60).unwrap().burst(5).unwrap())
                .clock(clock)
                .max_keys(8),
            |k: &u64| *k,
        );
        let handle = layer.handle();
        let counts: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let mut svc = layer.layer(Ready);
                let counts = counts.clone();
                s.spawn(move || {
                    for i in 0..2_000u64 {
                        let key = (i + t * 3) % 8;
                        if admitted(&mut svc, key) {
                            counts[key as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(handle.evictions(), 0, "round {round}");
        for (k, c) in counts.iter().enumerate() {
            assert_eq!(c.load(Ordering::Relaxed), 5, "round {round}, key {k}");
        }
    }
}
