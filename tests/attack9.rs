//! Ninth hostile review: the rate limiter's newest changes (`set_quota` against reserved
//! turns, the stale clock read, the horizon of a clock jump). The promise under attack: a
//! spent limit becomes whole again only by the passage of time (`burst + elapsed /
//! interval`), or by the documented exceptions (one burst per clock jump back larger than
//! the window, one fresh burst per evicted key). Tests marked `#[ignore = "defect: ..."]`
//! fail on the current code because of the defect they name; the others guard a promise that
//! held.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tower::{BoxError, Layer, Service, ServiceExt};

use tower_bulwark::clock::Clock;
use tower_bulwark::rate_limit::{RateLimitConfig, RateLimitHandle};
use tower_bulwark::{Quota, RateLimitLayer, Rejection};

const SEC: u64 = 1_000_000_000;

/// An inner service that counts the requests that reach it.
#[derive(Clone)]
struct Count(Arc<AtomicU32>);

impl<R> Service<R> for Count {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        self.0.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

/// Requests `req()` admitted at once, until one is not (its future is then dropped).
fn drain<S, R>(svc: &mut S, req: impl Fn() -> R) -> u32
where
    S: Service<R, Response = (), Error = BoxError>,
{
    let mut n = 0;
    for _ in 0..10_000 {
        let _ = svc.ready().now_or_never();
        match svc.call(req()).now_or_never() {
            Some(Ok(())) => n += 1,
            _ => return n,
        }
    }
    panic!("the limit never ran out");
}

/// One call at once: `Ok(())` admitted, `Err(retry_after)` refused.
fn try_once<S, R>(svc: &mut S, req: R) -> Result<(), Option<Duration>>
where
    S: Service<R, Response = (), Error = BoxError>,
{
    let _ = svc.ready().now_or_never();
    match svc.call(req).now_or_never() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(e
            .downcast_ref::<Rejection>()
            .and_then(Rejection::retry_after)),
        None => Err(None),
    }
}

fn global(quota: Quota, clock: Clock) -> RateLimitLayer {
    RateLimitLayer::new(RateLimitConfig::new(quota).clock(clock))
}

type KeyOf = fn(&u64) -> u64;

fn key_of(k: &u64) -> u64 {
    *k
}

fn keyed(quota: Quota, clock: Clock, max_keys: usize) -> RateLimitLayer<KeyOf> {
    RateLimitLayer::keyed(
        RateLimitConfig::new(quota).clock(clock).max_keys(max_keys),
        key_of as KeyOf,
    )
}

// ---------------------------------------------------------------------------------------
// 1. set_quota against turns waiters reserved (and that they then use)
// ---------------------------------------------------------------------------------------

/// A client limit of 1/s (burst 1) whose callers wait up to 20 s: one call goes at t = 0 and
/// ten more reserve the turns at 1 s, 2 s, ... 10 s. The operator then re-applies the *same*
/// quota (`set_quota`, as a config reload does). Meanwhile, one caller that does not wait
/// tries once a second.
///
/// Promise (`set_quota`): "Turns that waiters reserved before the change keep their times";
/// "a limit spent under the old quota is spent under the new one at most" (the change's own
/// comment); GCRA: over [0, 10 s] at most `burst + 10 s / interval` = 11 requests.
///
/// What happens: the cap (`now + tolerance`) erases the reservations from the state, while the
/// waiters keep their times and run: the limit admits a whole new quota on top of them, 21
/// requests in 10 s (and as many again at each further `set_quota`). Global and keyed alike.
#[tokio::test(start_paused = true)]
async fn set_quota_forgets_the_turns_waiters_reserved_and_admits_them_twice() {
    let quota = Quota::per_second(1).unwrap();
    let mut results = Vec::new();
    for is_keyed in [false, true] {
        let count = Arc::new(AtomicU32::new(0));
        let admitted = if is_keyed {
            let base = keyed(quota, Clock::tokio(), 64);
            let handle = base.handle();
            let waiting = base.clone().wait_up_to(Duration::from_secs(20));
            reserve_then_set_quota(
                waiting.layer(Count(count.clone())),
                base.layer(Count(count.clone())),
                handle,
                quota,
                || 7u64,
            )
            .await;
            count.load(Ordering::Relaxed)
        } else {
            let base = global(quota, Clock::tokio());
            let handle = base.handle();
            let waiting = base.clone().wait_up_to(Duration::from_secs(20));
            reserve_then_set_quota(
                waiting.layer(Count(count.clone())),
                base.layer(Count(count.clone())),
                handle,
                quota,
                || 7u64,
            )
            .await;
            count.load(Ordering::Relaxed)
        };
        results.push((is_keyed, admitted));
    }
    assert!(
        results.iter().all(|&(_, n)| n <= 11),
        "admitted over [0, 10 s] with a 1/s limit (at most 11): {results:?} (keyed, count)"
    );
}

async fn reserve_then_set_quota<S>(
    mut waiting: S,
    mut now_only: S,
    handle: RateLimitHandle,
    quota: Quota,
    req: impl Fn() -> u64,
) where
    S: Service<u64, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    waiting.ready().await.unwrap().call(req()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        // The turn is reserved in `call`.
        let fut = waiting.call(req());
        tasks.push(tokio::spawn(fut));
    }
    handle.set_quota(quota);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = try_once(&mut now_only, req());
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// A 10/s limit (burst 10) is spent at one instant; the clock does not move. The operator
/// shrinks the burst to 1 and grows it back to 10, five times (an adaptive controller, or a
/// flapping config).
///
/// Promise (the brief's invariant, and `set_quota`'s comment "a limit spent under the old
/// quota is spent under the new one at most"): with the clock frozen, nothing more is
/// admitted under either quota.
///
/// What happens: each shrink caps the state to the small window (1 interval ahead), each
/// growth then finds 9 of the 10 requests free: 45 requests more at one instant. (Each step
/// follows the doc's "keeps what it spent, up to the new burst"; the two together refill a
/// spent limit without time passing, as often as the quota is toggled.)
#[ignore = "known limitation (set_quota docs): shrinking then growing the quota back refills a spent limit (burst - 1 per cycle) without time passing"]
#[test]
fn shrinking_then_growing_the_quota_back_refills_a_spent_limit() {
    let big = Quota::per_second(10).unwrap();
    let small = big.burst(1).unwrap();
    let mut results = Vec::new();
    // Global.
    {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(100 * SEC);
        let layer = global(big, clock);
        let handle = layer.handle();
        let mut svc = layer.layer(Count(Arc::new(AtomicU32::new(0))));
        assert_eq!(drain(&mut svc, || 0u64), 10);
        let mut more = 0;
        for _ in 0..5 {
            handle.set_quota(small);
            more += drain(&mut svc, || 0u64);
            handle.set_quota(big);
            more += drain(&mut svc, || 0u64);
        }
        results.push(("global", more));
    }
    // Keyed.
    {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(100 * SEC);
        let layer = keyed(big, clock, 64);
        let handle = layer.handle();
        let mut svc = layer.layer(Count(Arc::new(AtomicU32::new(0))));
        assert_eq!(drain(&mut svc, || 7u64), 10);
        let mut more = 0;
        for _ in 0..5 {
            handle.set_quota(small);
            more += drain(&mut svc, || 7u64);
            handle.set_quota(big);
            more += drain(&mut svc, || 7u64);
        }
        results.push(("keyed", more));
    }
    assert!(
        results.iter().all(|&(_, n)| n == 0),
        "admitted on a frozen clock after the limit was spent: {results:?}"
    );
}

/// Guard: growing the quota (burst 10 to 20, same interval) on a frozen clock gives exactly
/// the new burst's difference, once, and repeating the same growth gives nothing more; a
/// shrink alone gives nothing. Under threads too: two threads check a spent keyed limit
/// while a third grows and re-applies the quota; the limit shows at most the difference.
#[test]
fn growing_the_quota_gives_the_difference_once() {
    let small = Quota::per_second(10).unwrap();
    let big = small.burst(20).unwrap();
    let (clock, hand) = Clock::manual();
    hand.set_nanos(100 * SEC);
    let layer = global(small, clock);
    let handle = layer.handle();
    let mut svc = layer.layer(Count(Arc::new(AtomicU32::new(0))));
    assert_eq!(drain(&mut svc, || 0u64), 10);
    handle.set_quota(small.burst(5).unwrap());
    assert_eq!(drain(&mut svc, || 0u64), 0, "a shrink alone");
    // (The shrink capped the state to 5 intervals: growing now gives 15, the doc's "keeps
    // what it spent, up to the new burst".)
    handle.set_quota(big);
    let first = drain(&mut svc, || 0u64);
    assert_eq!(first, 15);
    for _ in 0..5 {
        handle.set_quota(big);
        assert_eq!(drain(&mut svc, || 0u64), 0, "the same quota again");
    }

    // Threads: a keyed limit, spent, grown from 10 to 20 and re-applied while two threads
    // check it: at most 10 more in all (the frozen clock gives nothing).
    let (clock, hand) = Clock::manual();
    hand.set_nanos(100 * SEC);
    let layer = keyed(small, clock, 8);
    let handle = layer.handle();
    let count = Arc::new(AtomicU32::new(0));
    let svc = layer.layer(Count(count.clone()));
    assert_eq!(drain(&mut svc.clone(), || 7u64), 10);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let joins: Vec<_> = (0..2)
        .map(|_| {
            let (stop, mut s) = (stop.clone(), svc.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = try_once(&mut s, 7u64);
                }
            })
        })
        .collect();
    let until = std::time::Instant::now() + Duration::from_millis(500);
    handle.set_quota(big);
    while std::time::Instant::now() < until {
        handle.set_quota(big);
    }
    stop.store(true, Ordering::Relaxed);
    for j in joins {
        j.join().unwrap();
    }
    assert!(
        count.load(Ordering::Relaxed) <= 20,
        "admitted {} on a frozen clock (burst 10 grown to 20)",
        count.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------------------
// 2. Dropped waiters whose turns the state no longer holds
// ---------------------------------------------------------------------------------------

/// A 10/s limit (burst 10) on a manual clock, shared by a layer that does not wait and one
/// whose callers wait up to 2 s. At 100 s the burst is spent and ten waiters reserve the next
/// second's turns. The clock then jumps back by 10 s (beyond the horizon: a jump). The limit
/// is whole on the new time line, and its burst is spent there. Then the ten waiters go away.
///
/// Promise (CHANGELOG: a jump back "beyond that finds the limit whole on the new time line
/// (at most one burst more per jump)"; `wait_up_to`: a waiter that goes away gives back
/// *its* turn, and "with no waiter going away ahead of one still waiting" nothing more).
///
/// What happens: the jump already wiped the waiters' turns from the state, yet each dropped
/// waiter (its wake time on the old line is still "ahead") takes one interval off the new
/// line's state: the spent limit is whole again, a second burst more for one jump. Global
/// and keyed alike.
#[tokio::test(start_paused = true)]
async fn waiters_dropped_after_a_jump_back_refill_the_new_time_line() {
    let quota = Quota::per_second(10).unwrap();
    let mut results = Vec::new();
    for is_keyed in [false, true] {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(100 * SEC);
        let count = Arc::new(AtomicU32::new(0));
        let more = if is_keyed {
            let base = keyed(quota, clock, 64);
            let waiting = base.clone().wait_up_to(Duration::from_secs(2));
            jump_then_drop(
                &mut base.layer(Count(count.clone())),
                &mut waiting.layer(Count(count.clone())),
                &hand,
            )
        } else {
            let base = global(quota, clock);
            let waiting = base.clone().wait_up_to(Duration::from_secs(2));
            jump_then_drop(
                &mut base.layer(Count(count.clone())),
                &mut waiting.layer(Count(count.clone())),
                &hand,
            )
        };
        results.push((is_keyed, more));
    }
    assert!(
        results.iter().all(|&(_, n)| n == 0),
        "admitted after the new line's burst was spent and the old waiters left: {results:?} \
         (keyed, count)"
    );
}

fn jump_then_drop<S>(base: &mut S, waiting: &mut S, hand: &tower_bulwark::clock::ManualClock) -> u32
where
    S: Service<u64, Response = (), Error = BoxError>,
{
    assert_eq!(drain(base, || 7u64), 10);
    let waiters: Vec<_> = (0..10).map(|_| waiting.call(7u64)).collect();
    // Back 10 s: far beyond the horizon (1 s window + 0.1 s + 2 s of reach).
    hand.set_nanos(90 * SEC);
    assert_eq!(drain(base, || 7u64), 10, "one burst on the new time line");
    drop(waiters);
    drain(base, || 7u64)
}

/// A keyed limit of 10/s (burst 10) with `max_keys(8)` (16 slots), whose callers may wait up
/// to 10 s. Key 0 spends its burst and five waiters reserve its next turns. Sixteen other
/// keys then spend theirs and more (each further from whole than key 0), so key 0 is evicted
/// (the table is full of live keys). Key 0 comes back: it starts afresh and spends one fresh
/// burst (documented). Then its five waiters go away.
///
/// Promise (module docs: an evicted key "starts afresh, so it may get at most one burst more
/// than its limit"; `wait_up_to`: a dropped waiter gives back its own turn).
///
/// What happens: the refund finds key 0 by its hash in its new slot (the generation it
/// checks is the new slot's own) and takes five intervals off the fresh state, whose turns it
/// never reserved: five requests more than the one burst the eviction allows.
#[tokio::test(start_paused = true)]
async fn an_evicted_keys_dropped_waiters_refill_its_fresh_state() {
    let quota = Quota::per_second(10).unwrap();
    let (clock, hand) = Clock::manual();
    hand.set_nanos(100 * SEC);
    let base = keyed(quota, clock, 8);
    let handle = base.handle();
    let count = Arc::new(AtomicU32::new(0));
    let mut now_only = base.layer(Count(count.clone()));
    let mut waiting = base
        .clone()
        .wait_up_to(Duration::from_secs(10))
        .layer(Count(count.clone()));
    assert_eq!(drain(&mut now_only, || 0u64), 10);
    let zero_waiters: Vec<_> = (0..5).map(|_| waiting.call(0u64)).collect();
    // Sixteen keys, each ten turns ahead of key 0's five.
    let mut others = Vec::new();
    for k in 1..=16u64 {
        assert_eq!(drain(&mut now_only, || k), 10);
        others.extend((0..10).map(|_| waiting.call(k)));
    }
    assert!(
        handle.evictions() >= 1,
        "the table is full: key 0 was evicted"
    );
    assert_eq!(handle.remaining_for(&0u64), 10, "key 0 starts afresh");
    assert_eq!(
        drain(&mut now_only, || 0u64),
        10,
        "the one burst the eviction allows"
    );
    drop(zero_waiters);
    let more = drain(&mut now_only, || 0u64);
    drop(others);
    assert_eq!(
        more, 0,
        "key 0 spent its fresh burst; its old waiters gave back {more} turns it never reserved"
    );
}

/// Guard: waiters dropped before their turn, after a quota change, after their turn came,
/// in any order, never leave a spent limit with more than it had before they reserved
/// (global and keyed, several layers with different wait bounds sharing the limit).
#[tokio::test(start_paused = true)]
async fn dropped_waiters_never_give_back_more_than_they_took() {
    let quota = Quota::per_second(10).unwrap();
    for is_keyed in [false, true] {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(100 * SEC);
        let count = Arc::new(AtomicU32::new(0));
        let remaining: Box<dyn Fn() -> u64>;
        macro_rules! run {
            ($base:expr) => {{
                let base = $base;
                let handle = base.handle();
                remaining = if is_keyed {
                    Box::new(move || handle.remaining_for(&7u64))
                } else {
                    Box::new(move || handle.remaining())
                };
                let handle = base.handle();
                let mut now_only = base.layer(Count(count.clone()));
                let mut short = base
                    .clone()
                    .wait_up_to(Duration::from_millis(300))
                    .layer(Count(count.clone()));
                let mut long = base
                    .clone()
                    .wait_up_to(Duration::from_secs(5))
                    .layer(Count(count.clone()));
                assert_eq!(drain(&mut now_only, || 7u64), 10);
                // Reserve: 3 short ones (100, 200, 300 ms), then the short bound is out.
                let s: Vec<_> = (0..3).map(|_| short.call(7u64)).collect();
                assert!(try_once(&mut short, 7u64).is_err());
                let l: Vec<_> = (0..5).map(|_| long.call(7u64)).collect();
                // Dropped out of order, before their turns: back to spent, not beyond.
                let mut l = l.into_iter();
                let l0 = l.next();
                drop(s);
                drop(l0);
                assert_eq!(remaining(), 0, "spent again, not refilled");
                assert_eq!(drain(&mut now_only, || 7u64), 0);
                // A quota change, then the rest dropped: nothing given back.
                handle.set_quota(Quota::per_second(20).unwrap());
                let after_change = drain(&mut now_only, || 7u64);
                drop(l);
                assert_eq!(
                    drain(&mut now_only, || 7u64),
                    0,
                    "after the change's own gain ({after_change})"
                );
                // Time moves one second: at most 20 (the new rate) more.
                hand.set_nanos(101 * SEC);
                let later = drain(&mut now_only, || 7u64);
                assert!(later <= 20, "one second at 20/s gave {later}");
            }};
        }
        if is_keyed {
            run!(keyed(quota, clock, 64));
        } else {
            run!(global(quota, clock));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Clock jumps back: how long a limit stays spent
// ---------------------------------------------------------------------------------------

/// A 10/s limit (window 1 s, the largest it ever had) shared by a server layer that does not
/// wait and a client layer whose callers wait long (`wait_up_to(60 s)`, or
/// `wait_up_to(Duration::MAX)`: "wait as long as it takes"). The limit is spent; the manual
/// clock then goes back 30 s (resp. one hour).
///
/// Promise (`set_quota`): "A clock that goes back by less than the largest window the limit
/// has had is taken for a stale reading, not for a jump (the limit stays spent until the old
/// time comes again, at most that window)"; CHANGELOG: a jump back "no longer refuses every
/// request for the length of the jump".
///
/// What happens: the horizon also counts the longest wait bound of any layer sharing the
/// limit, whether or not anyone waits that long: a jump back of 30 s (or, with
/// `Duration::MAX`, of any length) is never taken for a jump, and the server layer refuses
/// every request for the length of the jump (`retry_after` 30 s, one hour), not at most the
/// 1 s window.
#[ignore = "known limitation (set_quota docs): a long wait_up_to bound on any layer sharing the limit keeps a spent limit refused for the whole length of a clock jump back, beyond the largest window"]
#[test]
fn a_long_wait_bound_makes_a_jump_back_refuse_for_its_whole_length() {
    let quota = Quota::per_second(10).unwrap();
    let mut failures = Vec::new();
    for (reach, back) in [
        (Duration::from_secs(60), 30 * SEC),
        (Duration::MAX, 3600 * SEC),
    ] {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(4000 * SEC);
        let base = global(quota, clock);
        let _client = base.clone().wait_up_to(reach);
        let mut server = base.layer(Count(Arc::new(AtomicU32::new(0))));
        assert_eq!(drain(&mut server, || 0u64), 10);
        hand.set_nanos(4000 * SEC - back);
        match try_once(&mut server, 0u64) {
            Ok(()) => {}
            Err(Some(hint)) if hint <= Duration::from_secs(3) => {}
            Err(hint) => failures.push(format!(
                "reach {reach:?}, back {} s: refused, retry_after {hint:?}",
                back / SEC
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Guard: a limit that once had a one-hour window (1/h) and now has 10/s. A jump back of
/// 30 min (less than that window) keeps it refused (documented), with a hint no longer than
/// the jump plus the window, and no caller hangs: a layer that waits up to 1 s is refused at
/// once; 30 min and a second later the limit admits again. A jump back of three hours (beyond
/// every horizon) finds it whole: one burst, not more.
#[tokio::test(start_paused = true)]
async fn a_jump_back_within_the_largest_window_refuses_no_longer_than_the_jump() {
    let (clock, hand) = Clock::manual();
    let t0 = 10 * 3600 * SEC;
    hand.set_nanos(t0);
    let base = global(Quota::per_hour(1).unwrap(), clock);
    let handle = base.handle();
    handle.set_quota(Quota::per_second(10).unwrap());
    let count = Arc::new(AtomicU32::new(0));
    let mut server = base.layer(Count(count.clone()));
    let mut client = base
        .clone()
        .wait_up_to(Duration::from_secs(1))
        .layer(Count(count.clone()));
    assert_eq!(drain(&mut server, || 0u64), 10);
    hand.set_nanos(t0 - 1800 * SEC);
    match try_once(&mut server, 0u64) {
        Err(Some(hint)) => assert!(
            hint <= Duration::from_secs(2 * 1801),
            "hint {hint:?} beyond twice (jitter) the jump plus the window"
        ),
        other => panic!("within the largest window: refused with a hint, got {other:?}"),
    }
    // The waiting layer does not hang: its turn is beyond its bound, refused at once.
    let fut = client.call(0u64);
    let res = tokio::time::timeout(Duration::from_millis(10), fut).await;
    assert!(matches!(res, Ok(Err(_))), "refused at once, not waiting");
    // The old time comes again (plus the window): admitted.
    hand.set_nanos(t0 + SEC + 100_000_000);
    assert!(try_once(&mut server, 0u64).is_ok());
    // Far back: whole, one burst.
    let before = count.load(Ordering::Relaxed);
    hand.set_nanos(t0 - 3 * 3600 * SEC);
    let burst = drain(&mut server, || 0u64);
    assert_eq!(burst, 10, "one burst on the new time line");
    assert_eq!(count.load(Ordering::Relaxed) - before, 10);
}

/// Guard: the stale-read re-check under threads. Two threads check a global (and a keyed)
/// limit while the manual clock moves forward in steps of one interval and the same quota is
/// re-applied at each step; admissions never exceed `burst + elapsed / interval` (+1 for the
/// slack). Bounded: 200 steps of 0.5 ms.
#[test]
fn a_moving_clock_under_threads_and_reapplied_quotas_stays_within_the_quota() {
    for is_keyed in [false, true] {
        let (clock, hand) = Clock::manual();
        hand.set_nanos(100 * SEC);
        let quota = Quota::per_second(1000).unwrap().burst(20).unwrap();
        let count = Arc::new(AtomicU32::new(0));
        type Boxed = tower::util::BoxCloneSyncService<u64, (), BoxError>;
        let (svc, handle): (Boxed, RateLimitHandle) = if is_keyed {
            let l = keyed(quota, clock, 8);
            (Boxed::new(l.layer(Count(count.clone()))), l.handle())
        } else {
            let l = global(quota, clock);
            (Boxed::new(l.layer(Count(count.clone()))), l.handle())
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let joins: Vec<_> = (0..2)
            .map(|_| {
                let (stop, mut s) = (stop.clone(), svc.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = try_once(&mut s, 7u64);
                    }
                })
            })
            .collect();
        // 200 steps of one interval (1 ms), the same quota re-applied at each (no waiter:
        // the cap never touches the state).
        for _ in 0..200u64 {
            std::thread::sleep(Duration::from_micros(500));
            hand.advance(Duration::from_millis(1));
            handle.set_quota(quota);
        }
        stop.store(true, Ordering::Relaxed);
        for j in joins {
            j.join().unwrap();
        }
        // The burst, one per interval, and less than one more for the slack.
        let n = u64::from(count.load(Ordering::Relaxed));
        assert!(n <= 20 + 200 + 1, "keyed {is_keyed}: admitted {n}");
    }
}
