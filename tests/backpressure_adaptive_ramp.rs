//! Adaptive limits under a sudden load, and with requests their callers abandon, in paused
//! time: a dependency of fixed capacity (N slots, each busy a fixed latency per request).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_bulwark::backpressure::{Adaptive, Aimd, BackpressureLayer, Dropped, Gradient};
use tower_bulwark::clock::Clock;

/// `slots` requests at once, each for `latency`; the others queue for a slot.
#[derive(Clone)]
struct Slots {
    slots: Arc<Semaphore>,
    latency: Duration,
}

impl Service<()> for Slots {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let (slots, latency) = (self.slots.clone(), self.latency);
        Box::pin(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            tokio::time::sleep(latency).await;
            Ok(())
        })
    }
}

/// A request answered later than this after it arrived is of no use to its caller.
const DEADLINE: Duration = Duration::from_millis(100);
const SECONDS: usize = 3;

/// An open-loop load of twice the capacity of a dependency of `slots` × `latency`, from an
/// idle start: the requests answered within the deadline, per second.
async fn goodput(layer: BackpressureLayer, slots: usize, latency: Duration) -> Vec<usize> {
    let svc = layer.layer(Slots {
        slots: Arc::new(Semaphore::new(slots)),
        latency,
    });
    let per_ms = 2 * slots / latency.as_millis() as usize;
    let start = Instant::now();
    let served: Arc<Vec<AtomicUsize>> =
        Arc::new((0..SECONDS + 1).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for _ in 0..SECONDS * 1000 {
        for _ in 0..per_ms {
            let (svc, served) = (svc.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let arrived = Instant::now();
                if svc.oneshot(()).await.is_ok() && arrived.elapsed() <= DEADLINE {
                    let second = (Instant::now() - start).as_secs() as usize;
                    served[second.min(SECONDS)].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    served[..SECONDS]
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect()
}

fn adaptive(a: Adaptive) -> BackpressureLayer {
    BackpressureLayer::adaptive(a.clock(Clock::tokio())).unwrap()
}

/// From the defaults (an initial limit of 64, a ceiling of 1024), a sudden load of twice the
/// capacity of a dependency is served at 95% or more of what a fixed limit set at that
/// capacity serves, from the first second on: 100 slots of 10 ms, and 400 slots of 20 ms.
#[tokio::test(start_paused = true)]
async fn a_sudden_load_reaches_capacity_within_a_second() {
    for (slots, ms) in [(100usize, 10u64), (400, 20)] {
        let latency = Duration::from_millis(ms);
        let fixed = goodput(BackpressureLayer::new(slots), slots, latency).await;
        let capacity = 1000 * slots / ms as usize;
        for (i, &n) in fixed.iter().enumerate() {
            assert!(n * 100 >= capacity * 98, "fixed limit, second {i}: {n}");
        }
        for (name, layer) in [
            (
                "gradient",
                adaptive(Adaptive::gradient(Gradient::default())),
            ),
            ("aimd", adaptive(Adaptive::aimd(Aimd::default()))),
        ] {
            let got = goodput(layer, slots, latency).await;
            let share: Vec<f64> = got
                .iter()
                .zip(&fixed)
                .map(|(&a, &f)| a as f64 / f as f64)
                .collect();
            eprintln!("{slots} × {ms} ms, {name}: {got:?} of {fixed:?}: {share:.3?}");
            for (i, &s) in share.iter().enumerate() {
                assert!(
                    s >= 0.95,
                    "{slots} × {ms} ms, {name}, second {i}: {:.1}% of a fixed limit's goodput \
                     ({got:?} of {fixed:?})",
                    s * 100.0
                );
            }
        }
    }
}

/// A dependency that hangs, while its callers give up after 200 ms: the dropped requests are
/// failures (by default, after 100 ms), so the limit comes down to its floor; told to ignore
/// them, it stays where it was.
#[tokio::test(start_paused = true)]
async fn abandoned_requests_lower_the_limit() {
    for (dropped, expect_floor) in [(None, true), (Some(Dropped::Ignore), false)] {
        let mut a = Adaptive::aimd(Aimd::default()).floor(2).initial(32);
        if let Some(d) = dropped {
            a = a.dropped(d);
        }
        let layer = adaptive(a);
        let handle = layer.handle();
        let svc = layer.layer(tower::service_fn(|()| async {
            std::future::pending::<()>().await;
            Ok::<(), Infallible>(())
        }));
        let end = Instant::now() + Duration::from_secs(10);
        let callers: Vec<_> = (0..64)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    while Instant::now() < end {
                        let call = svc.clone().oneshot(());
                        match tokio::time::timeout(Duration::from_millis(200), call).await {
                            Err(_) => {}
                            // Shed: try again a little later.
                            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        assert_eq!(handle.in_flight(), 0);
        if expect_floor {
            assert_eq!(handle.limit(), 2, "abandoned requests drive the limit down");
        } else {
            assert_eq!(handle.limit(), 32, "ignored, they leave it alone");
        }
    }
}

/// A client that hangs up sooner than the policy's time says nothing about the dependency.
#[tokio::test(start_paused = true)]
async fn early_hang_ups_give_no_sample() {
    let layer = adaptive(Adaptive::aimd(Aimd::default()).floor(2).initial(32));
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|()| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<(), Infallible>(())
    }));
    for _ in 0..200 {
        let call = svc.clone().oneshot(());
        assert!(tokio::time::timeout(Duration::from_millis(5), call)
            .await
            .is_err());
    }
    assert_eq!(handle.limit(), 32);
}
