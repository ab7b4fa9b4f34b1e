//! What an abandoned call (its response future dropped after the call started) counts as:
//! nothing by default, a failure with `Abandoned::Failure`.

use std::time::Duration;

use tokio::time::{advance, timeout};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{Abandoned, BreakerConfig, BreakerState, CircuitBreakerLayer};
use tower_bulwark::clock::Clock;

/// A dependency that hangs on `true` and answers at once on `false`.
async fn dependency(hang: bool) -> Result<&'static str, BoxError> {
    if hang {
        std::future::pending::<()>().await;
    }
    Ok("ok")
}

fn layer(abandoned: Option<Abandoned>) -> CircuitBreakerLayer {
    let config = BreakerConfig::consecutive_failures(3)
        .open_time(Duration::from_secs(1))
        .jitter(0.0)
        .half_open_probes(1)
        .clock(Clock::tokio());
    let config = match abandoned {
        Some(a) => config.abandoned(a),
        None => config,
    };
    CircuitBreakerLayer::new(config).unwrap()
}

/// Calls that time out above the breaker: the dependency hangs.
async fn time_out<S>(svc: &mut S, n: usize)
where
    S: Service<bool, Response = &'static str, Error = BoxError>,
{
    for _ in 0..n {
        let call = svc.ready().await.unwrap().call(true);
        assert!(timeout(Duration::from_millis(50), call).await.is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn by_default_abandoned_calls_count_as_neither() {
    let layer = layer(None);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(dependency);
    time_out(&mut svc, 10).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    assert_eq!(handle.figures().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn abandoned_calls_can_count_as_failures_and_failed_probes() {
    let layer = layer(Some(Abandoned::Failure));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(dependency);
    // A hung dependency whose callers time out trips the breaker.
    time_out(&mut svc, 2).await;
    assert_eq!(handle.figures().consecutive_failures, 2);
    time_out(&mut svc, 1).await;
    assert_eq!(handle.state(), BreakerState::Open);
    // An abandoned probe is a failed probe: open again, for longer.
    advance(Duration::from_secs(1)).await;
    time_out(&mut svc, 1).await;
    let f = handle.figures();
    assert_eq!(
        (f.state, f.reopens, f.probes_in_flight),
        (BreakerState::Open, 1, 0)
    );
    // A probe that answers closes it.
    advance(f.open_remaining.unwrap()).await;
    assert_eq!(svc.ready().await.unwrap().call(false).await.unwrap(), "ok");
    assert_eq!(handle.state(), BreakerState::Closed);
    // A success between abandoned calls resets the run, as with any failure.
    time_out(&mut svc, 2).await;
    svc.ready().await.unwrap().call(false).await.unwrap();
    time_out(&mut svc, 2).await;
    assert_eq!(handle.state(), BreakerState::Closed);
}
