//! Shared bench helpers: a ready no-op service, polled by hand with a no-op waker.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tower::Service;

/// A service that is always ready and answers at once with a clone of `res`.
#[derive(Clone, Debug, Default)]
pub struct Noop<Res: Clone = ()> {
    pub res: Res,
}

impl<Req, Res: Clone> Service<Req> for Noop<Res> {
    type Response = Res;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Res, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, _req: Req) -> Self::Future {
        std::future::ready(Ok(self.res.clone()))
    }
}

/// `poll_ready` then `call`, then polls the response future once; panics if anything is
/// pending. Returns whether the call succeeded.
#[inline]
pub fn call_ready<S, Req>(svc: &mut S, req: Req) -> bool
where
    S: Service<Req>,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(_)) => return false,
        Poll::Pending => panic!("service not ready in a bench"),
    }
    let fut = svc.call(req);
    poll_once(fut).is_ok()
}

/// `poll_ready`, `call`, then polls the response until it is ready, for a future that wakes
/// itself and yields once before going on (a retry with no wait yields to the runtime
/// between attempts).
#[inline]
pub fn call_until_ready<S: Service<Req>, Req>(svc: &mut S, req: Req) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(_)) => return false,
        Poll::Pending => panic!("service not ready in a bench"),
    }
    let mut fut = pin!(svc.call(req));
    for _ in 0..16 {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out.is_ok();
        }
    }
    panic!("response future still pending after 16 polls in a bench")
}

/// Polls a future once with a no-op waker; panics if it is pending.
#[inline]
pub fn poll_once<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    let fut = pin!(fut);
    match fut.poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("response future pending in a bench"),
    }
}

/// Runs `iters` calls split over 2 OS threads, each with its own closure from `make` (a
/// clone of one shared instance), and returns the wall time: criterion then reports the
/// aggregate cost per call.
pub fn two_threads<F>(iters: u64, make: impl Fn() -> F) -> std::time::Duration
where
    F: FnMut() + Send,
{
    let barrier = std::sync::Barrier::new(3);
    let per = iters.div_ceil(2);
    let mut workers: Vec<F> = (0..2).map(|_| make()).collect();
    std::thread::scope(|s| {
        for mut w in workers.drain(..) {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for _ in 0..per {
                    w();
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = std::time::Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

/// A current-thread tokio runtime with timers, for services that need one to be built or
/// called (enter it for the bench's duration).
pub fn timer_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}
