//! The circuit breaker in HTTP (Axum) and gRPC stacks, its rejections answered by
//! `RejectionLayer`.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use tower::{ServiceBuilder, ServiceExt};
use tower_bulwark::circuit_breaker::{BreakerConfig, CircuitBreakerLayer};
use tower_bulwark::classify::HttpStatus;
use tower_bulwark::clock::Clock;
use tower_bulwark::RejectionLayer;

#[derive(Clone, Default)]
struct Upstream {
    status: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
}

async fn handler(State(up): State<Upstream>) -> StatusCode {
    up.calls.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(up.status.load(Ordering::SeqCst)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn http_stack_answers_503_with_retry_after() {
    let up = Upstream::default();
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::consecutive_failures(3)
            .open_time(Duration::from_secs(30))
            .jitter(0.0)
            .half_open_probes(1)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(HttpStatus::new());
    let handle = breaker.handle();
    let app = Router::new()
        .route("/orders", get(handler))
        .with_state(up.clone())
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(breaker),
        );
    let get = |app: Router| async move {
        app.oneshot(Request::get("/orders").body(Body::empty()).unwrap())
            .await
            .unwrap()
    };

    // 4xx say the request was wrong, not that the upstream is sick: they never trip it.
    up.status.store(404, Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(get(app.clone()).await.status(), StatusCode::NOT_FOUND);
    }
    up.status.store(500, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            get(app.clone()).await.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), 13);

    // Open: 503, Retry-After the time left open, a problem+json body; the handler not run.
    let res = get(app.clone()).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "30");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["status"], 503);
    assert!(json["type"].as_str().unwrap().ends_with("circuit-open"));
    assert_eq!(up.calls.load(Ordering::SeqCst), 13);

    tokio::time::advance(Duration::from_millis(20_500)).await;
    let res = get(app.clone()).await;
    assert_eq!(res.headers()["retry-after"], "10", "9.5 s rounded up");

    // Healed: one probe closes it.
    tokio::time::advance(Duration::from_secs(10)).await;
    up.status.store(200, Ordering::SeqCst);
    assert_eq!(get(app.clone()).await.status(), StatusCode::OK);
    assert_eq!(
        handle.state(),
        tower_bulwark::circuit_breaker::BreakerState::Closed
    );
    assert_eq!(get(app).await.status(), StatusCode::OK);
}

#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn grpc_stack_answers_unavailable() {
    use bytes::Bytes;
    use http::Response;
    use http_body_util::Full;
    use tower::BoxError;
    use tower_bulwark::classify::GrpcStatus;

    let code = Arc::new(AtomicU16::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreakerLayer::new(
        BreakerConfig::failure_rate(0.5)
            .window(4)
            .minimum_calls(4)
            .open_time(Duration::from_secs(2))
            .jitter(0.0)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .classify(GrpcStatus::new());
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::grpc())
        .layer(breaker)
        .service_fn({
            let (code, calls) = (code.clone(), calls.clone());
            move |_req: http::Request<Full<Bytes>>| {
                let (code, calls) = (code.clone(), calls.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let res = Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", code.load(Ordering::SeqCst).to_string())
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    Ok::<_, BoxError>(res)
                }
            }
        });
    let call = |svc: _| async move {
        let svc: tower_bulwark::respond::RejectionService<_> = svc;
        svc.oneshot(http::Request::new(Full::new(Bytes::new())))
            .await
            .unwrap()
    };
    let grpc_status = |res: &http::Response<_>| {
        res.headers()["grpc-status"]
            .to_str()
            .unwrap()
            .parse::<i32>()
            .unwrap()
    };

    // NOT_FOUND (5) and INVALID_ARGUMENT (3) are the caller's problem: no trip.
    for c in [5, 3, 5, 3, 5, 3] {
        code.store(c, Ordering::SeqCst);
        assert_eq!(grpc_status(&call(svc.clone()).await), i32::from(c));
    }
    // UNAVAILABLE (14) and INTERNAL (13): 2 of the last 4 trips it.
    for c in [14, 13] {
        code.store(c, Ordering::SeqCst);
        assert_eq!(grpc_status(&call(svc.clone()).await), i32::from(c));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 8);
    let res = call(svc.clone()).await;
    assert_eq!(res.status(), StatusCode::OK, "trailers-only gRPC response");
    assert_eq!(grpc_status(&res), 14);
    assert_eq!(res.headers()["grpc-retry-pushback-ms"], "2000");
    assert_eq!(calls.load(Ordering::SeqCst), 8);
}
