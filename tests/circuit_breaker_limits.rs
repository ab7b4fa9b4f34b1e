//! Open times the breaker cannot hold are refused when the layer is built; the ones it
//! accepts, and the open time grown by repeated trips, are held exactly.

use std::time::Duration;

use tokio::time::advance;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{
    BreakerConfig, BreakerConfigError, BreakerState, CircuitBreakerLayer, MAX_OPEN_TIME,
};
use tower_bulwark::clock::Clock;
use tower_bulwark::Rejection;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn field(config: BreakerConfig) -> &'static str {
    match CircuitBreakerLayer::new(config) {
        Err(BreakerConfigError::OpenTimeTooLong { field, .. }) => field,
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("an open time the breaker cannot hold was accepted"),
    }
}

#[test]
fn open_times_past_the_limit_are_refused_naming_the_setting() {
    let ten_years = 3650 * DAY;
    let config = BreakerConfig::consecutive_failures(1)
        .open_time(ten_years)
        .max_open_time(ten_years);
    assert_eq!(field(config), "open_time");
    // Just above 2^48 µs, the value that used to half-open after 6 ms.
    let wraps = Duration::from_micros(1 << 48) + Duration::from_millis(6);
    let config = BreakerConfig::consecutive_failures(1)
        .open_time(wraps)
        .max_open_time(wraps);
    assert_eq!(field(config), "open_time");
    let config = BreakerConfig::consecutive_failures(1).max_open_time(Duration::MAX);
    assert_eq!(field(config), "max_open_time");
    let err = CircuitBreakerLayer::new(BreakerConfig::default().max_open_time(ten_years))
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_open_time"), "{err}");
    // The limit itself is accepted.
    assert!(CircuitBreakerLayer::new(
        BreakerConfig::default()
            .open_time(MAX_OPEN_TIME)
            .max_open_time(MAX_OPEN_TIME)
    )
    .is_ok());
}

type Svc = tower::util::BoxCloneSyncService<bool, &'static str, BoxError>;

fn service(layer: CircuitBreakerLayer) -> Svc {
    Svc::new(
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|fail: bool| async move {
                if fail {
                    Err::<&'static str, BoxError>("down".into())
                } else {
                    Ok("ok")
                }
            }),
    )
}

fn is_rejection(r: &Result<&'static str, BoxError>) -> bool {
    matches!(r, Err(e) if e.downcast_ref::<Rejection>().is_some())
}

#[tokio::test(start_paused = true)]
async fn the_longest_open_time_is_held_to_the_end() {
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(MAX_OPEN_TIME)
            .max_open_time(MAX_OPEN_TIME)
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let handle = layer.handle();
    let svc = service(layer);
    svc.clone().oneshot(true).await.unwrap_err();
    assert_eq!(handle.state(), BreakerState::Open);
    advance(MAX_OPEN_TIME - DAY).await;
    assert!(
        is_rejection(&svc.clone().oneshot(false).await),
        "still open"
    );
    let left = handle.figures().open_remaining.unwrap();
    assert!(
        left <= DAY && left > DAY - Duration::from_secs(1),
        "{left:?}"
    );
    advance(left).await;
    assert_eq!(svc.clone().oneshot(false).await.unwrap(), "ok", "a probe");
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn open_time_grown_by_failed_probes_is_capped_and_never_wraps() {
    // Grows by 10^6 per failed round: 1 s, 11.6 days, then capped at 365 days (± 50%).
    let layer = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(1)
            .open_time(Duration::from_secs(1))
            .max_open_time(MAX_OPEN_TIME)
            .backoff_multiplier(1e6)
            .jitter(0.5)
            .half_open_probes(1)
            .clock(Clock::tokio())
            .seed(3),
    )
    .unwrap();
    let handle = layer.handle();
    let svc = service(layer);
    svc.clone().oneshot(true).await.unwrap_err();
    let mut expected = Duration::from_secs(1);
    for round in 1..=4u32 {
        let left = handle.figures().open_remaining.unwrap();
        assert!(
            left >= expected.mul_f64(0.5) - Duration::from_micros(1)
                && left <= expected.mul_f64(1.5) + Duration::from_micros(1),
            "round {round}: open {left:?}, expected {expected:?} ± 50%"
        );
        // Still open just before the end, a probe just after it.
        advance(left - Duration::from_millis(1)).await;
        assert!(
            is_rejection(&svc.clone().oneshot(false).await),
            "round {round}"
        );
        advance(Duration::from_millis(1)).await;
        let r = svc.clone().oneshot(true).await;
        assert!(!is_rejection(&r), "round {round}: the probe went through");
        assert_eq!(handle.state(), BreakerState::Open);
        expected = expected.mul_f64(1e6).min(MAX_OPEN_TIME);
    }
}

/// A keyed breaker allocates a window per key when the layer is built: a count window of
/// 2^24 calls for 2^20 keys asked for about 4 TiB (the build tried to allocate it), 2^20
/// calls for 2^12 keys for 2 GiB. The windows together are bounded (256 MiB); one breaker
/// alone may still have the large window.
#[test]
fn a_keyed_breakers_windows_are_bounded_together() {
    let big = |calls: u32| {
        BreakerConfig::failure_rate(0.5)
            .window(calls)
            .minimum_calls(10)
    };
    for (calls, keys, at_least) in [
        (1u32 << 20, 1usize << 12, 1u64 << 31),
        (1 << 24, 1 << 20, 1 << 42),
    ] {
        match CircuitBreakerLayer::keyed(big(calls).max_keys(keys), |req: &u32| *req) {
            Err(BreakerConfigError::WindowsTooLarge { bytes }) => {
                assert!(bytes >= at_least, "{bytes} bytes")
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("windows of {calls} calls for {keys} keys were accepted"),
        }
    }
    let big = || big(1 << 24);
    // The same window for one breaker is fine, and so is a table of ordinary windows.
    assert!(CircuitBreakerLayer::new(big()).is_ok());
    let ordinary = BreakerConfig::failure_rate(0.5).max_keys(1 << 20);
    assert!(CircuitBreakerLayer::keyed(ordinary, |req: &u32| *req).is_ok());
}
