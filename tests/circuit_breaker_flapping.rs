//! A dependency that flaps between healthy and sick phases: the breaker's transitions, read
//! from its `tracing` events, at the expected times. Alone in its binary, so that no other
//! test's thread races the `tracing` callsite cache.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{advance, Instant};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{BreakerConfig, CircuitBreakerLayer};
use tower_bulwark::clock::Clock;
use tower_bulwark::Rejection;

/// Captures the breaker's transitions from its `tracing` events.
#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Transitions {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct V(Option<String>, Option<String>);
        impl tracing::field::Visit for V {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                match field.name() {
                    "from" => self.0 = Some(value.to_owned()),
                    "to" => self.1 = Some(value.to_owned()),
                    _ => {}
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut v = V(None, None);
        event.record(&mut v);
        if let (Some(from), Some(to)) = (v.0, v.1) {
            self.0.lock().unwrap().push(format!("{from}>{to}"));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_flapping_dependency() {
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Transitions::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(seen.clone()));

    let layer = CircuitBreakerLayer::new(
        BreakerConfig::failure_rate(0.5)
            .window(10)
            .minimum_calls(10)
            .open_time(Duration::from_secs(1))
            .max_open_time(Duration::from_secs(60))
            .backoff_multiplier(2.0)
            .jitter(0.0)
            .half_open_probes(2)
            .clock(Clock::tokio()),
    )
    .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|healthy: bool| async move {
            if healthy {
                Ok::<_, BoxError>("ok")
            } else {
                Err::<&str, BoxError>("down".into())
            }
        });
    let start = Instant::now();
    // Phases of 3 s, healthy then sick, one call every 100 ms.
    let mut log: Vec<(u128, String)> = vec![];
    let mut outcomes = String::new();
    for _ in 0..150u32 {
        let t = start.elapsed().as_millis();
        let healthy = (t / 3000).is_multiple_of(2);
        let before = seen.0.lock().unwrap().len();
        let r = svc.ready().await.unwrap().call(healthy).await;
        outcomes.push(match &r {
            Ok(_) => '.',
            Err(e) if e.downcast_ref::<Rejection>().is_some() => 'x',
            Err(_) => 'F',
        });
        for tr in seen.0.lock().unwrap()[before..].iter() {
            log.push((t, tr.clone()));
        }
        advance(Duration::from_millis(100)).await;
    }
    let expected: Vec<(u128, String)> = [
        // Sick from 3 s: the 5th failure makes 5 of the last 10.
        (3400, "closed>open"),
        // Open 1 s; the probe fails; open 2 s.
        (4400, "open>half-open"),
        (4400, "half-open>open"),
        // Healthy again from 6 s; two probes close it.
        (6400, "open>half-open"),
        (6500, "half-open>closed"),
        // Sick from 9 s: the open time starts again from 1 s.
        (9400, "closed>open"),
        (10400, "open>half-open"),
        (10400, "half-open>open"),
        (12400, "open>half-open"),
        (12500, "half-open>closed"),
    ]
    .iter()
    .map(|(t, s)| (*t, s.to_string()))
    .collect();
    assert_eq!(log[..expected.len()], expected[..], "{outcomes}");
}
