//! 10,000 response futures and bodies dropped at random points leave the budget whole.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio_test::task;
use tower::{Layer, Service};
use tower_bulwark::backpressure::{BackpressureLayer, PermitBody};
use tower_bulwark::{Rejection, RejectionKind};

/// A small deterministic generator (xorshift64*), seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Counts a request as in flight in the inner service from its call until its body is done
/// or dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A body of `frames` frames, one every millisecond.
struct SlowBody {
    frames: u32,
    sleep: Pin<Box<tokio::time::Sleep>>,
    _in_flight: InFlight,
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.frames == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.frames -= 1;
        let next = tokio::time::Instant::now() + Duration::from_millis(1);
        self.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk")))))
    }
}

#[derive(Clone)]
struct Inner {
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Service<Request<u64>> for Inner {
    type Response = Response<SlowBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<SlowBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<u64>) -> Self::Future {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let guard = InFlight(self.in_flight.clone());
        let seed = *req.body();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(seed % 4)).await;
            Ok(Response::new(SlowBody {
                frames: (seed % 5) as u32,
                sleep: Box::pin(tokio::time::sleep(Duration::from_millis(1))),
                _in_flight: guard,
            }))
        })
    }
}

enum Live<F> {
    Future(task::Spawn<F>),
    Body(Pin<Box<PermitBody<SlowBody>>>),
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_random_drops_leak_no_permit() {
    const LIMIT: usize = 8;
    const REQUESTS: u64 = 10_000;
    let inner = Inner {
        in_flight: Arc::new(AtomicUsize::new(0)),
        peak: Arc::new(AtomicUsize::new(0)),
    };
    let layer = BackpressureLayer::new(LIMIT)
        .max_wait(Duration::from_millis(3))
        .max_queue(12)
        .hold_until_body_end();
    let handle = layer.handle();
    let mut svc = layer.layer(inner.clone());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut live = Vec::new();
    let (mut made, mut finished, mut shed) = (0u64, 0u64, 0u64);
    let (mut dropped_waiting, mut dropped_running, mut dropped_mid_body) = (0u64, 0u64, 0u64);

    while made < REQUESTS || !live.is_empty() {
        let roll = rng.below(100);
        if made < REQUESTS && roll < 35 && live.len() < 48 {
            task::spawn(()).enter(|cx, _| assert!(svc.poll_ready(cx).is_ready()));
            live.push(Live::Future(task::spawn(
                svc.call(Request::new(rng.next())),
            )));
            made += 1;
        } else if roll < 70 && !live.is_empty() {
            let i = rng.below(live.len() as u64) as usize;
            let done = match &mut live[i] {
                Live::Future(f) => match f.poll() {
                    Poll::Pending => false,
                    Poll::Ready(Ok(res)) => {
                        live[i] = Live::Body(Box::pin(res.into_body()));
                        false
                    }
                    Poll::Ready(Err(e)) => {
                        let r = e.downcast_ref::<Rejection>().expect("only rejections");
                        assert_eq!(r.kind(), RejectionKind::Overloaded);
                        shed += 1;
                        true
                    }
                },
                Live::Body(b) => {
                    let polled = task::spawn(()).enter(|cx, _| b.as_mut().poll_frame(cx));
                    matches!(polled, Poll::Ready(None))
                }
            };
            if done {
                live.swap_remove(i);
                finished += 1;
            }
        } else if (roll < 85 || made >= REQUESTS) && !live.is_empty() {
            let i = rng.below(live.len() as u64) as usize;
            match live.swap_remove(i) {
                Live::Future(f) => {
                    let state = format!("{:?}", &*f);
                    if state.contains("waiting") {
                        dropped_waiting += 1;
                    } else if state.contains("running") {
                        dropped_running += 1;
                    } else {
                        // Shed in `call`, dropped before anyone read the rejection.
                        assert!(state.contains("shed"), "{state}");
                        shed += 1;
                    }
                }
                Live::Body(b) => {
                    if b.holds_permit() {
                        dropped_mid_body += 1;
                    }
                }
            }
        } else {
            tokio::time::advance(Duration::from_micros(rng.below(2_000))).await;
        }
        assert!(handle.in_flight() <= LIMIT);
        assert!(inner.in_flight.load(Ordering::SeqCst) <= LIMIT);
    }

    assert_eq!(handle.in_flight(), 0, "leaked permits");
    assert_eq!(handle.waiting(), 0, "leaked places in the queue");
    assert_eq!(handle.available(), LIMIT);
    assert_eq!(inner.in_flight.load(Ordering::SeqCst), 0);
    assert!(inner.peak.load(Ordering::SeqCst) <= LIMIT);
    assert_eq!(handle.shed(), shed);
    // Every kind of drop happened, many times.
    for (what, n) in [
        ("waiting", dropped_waiting),
        ("running", dropped_running),
        ("mid-body", dropped_mid_body),
        ("finished", finished),
        ("shed", shed),
    ] {
        assert!(n >= 100, "only {n} {what}");
    }
}
