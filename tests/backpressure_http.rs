//! The backpressure layer in HTTP stacks: Axum with `RejectionLayer`, streaming bodies,
//! `tower::buffer::Buffer`, and hyper's connection tasks.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Notify};
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_bulwark::backpressure::BackpressureLayer;
use tower_bulwark::{Rejection, RejectionKind, RejectionLayer};

fn get_req(path: &str) -> Request<Body> {
    Request::builder().uri(path).body(Body::empty()).unwrap()
}

/// A body fed by a channel: a chunk per message, the end when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

#[tokio::test(start_paused = true)]
async fn axum_overload_is_a_503_problem_with_retry_after() {
    let gate = Arc::new(Notify::new());
    let layer = BackpressureLayer::new(1)
        .max_wait(Duration::from_millis(20))
        .retry_after(Duration::from_millis(1500));
    let handle = layer.handle();
    let app = Router::new()
        .route(
            "/slow",
            get({
                let gate = gate.clone();
                move || async move {
                    gate.notified().await;
                    "slow done"
                }
            }),
        )
        .route("/fast", get(|| async { "fast" }))
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(layer),
        );

    let first = tokio::spawn(app.clone().oneshot(get_req("/slow")));
    while handle.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    // Another route of the same router draws on the same budget: it waits 20 ms, then 503.
    let started = tokio::time::Instant::now();
    let res = app.clone().oneshot(get_req("/fast")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(20));
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The 1.5 s hint, spread over [1.5 s, 4.5 s), in whole seconds rounded up.
    let after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2..=5).contains(&after), "Retry-After: {after}");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 503);
    assert_eq!(problem["retry_after"], after);
    assert!(
        problem["type"].as_str().unwrap().ends_with(":overloaded"),
        "{problem}"
    );
    assert_eq!(handle.shed(), 1);

    gate.notify_one();
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.in_flight(), 0);
    let res = app.oneshot(get_req("/fast")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn streaming_body_holds_the_permit_until_its_end_or_drop() {
    type Slot = Arc<std::sync::Mutex<Option<mpsc::Receiver<Bytes>>>>;
    let slot: Slot = Default::default();
    let layer = BackpressureLayer::new(1).hold_until_body_end();
    let handle = layer.handle();
    let app = Router::new()
        .route(
            "/stream",
            get({
                let slot = slot.clone();
                move || {
                    let rx = slot.lock().unwrap().take();
                    async move {
                        match rx {
                            Some(rx) => Body::new(ChannelBody(rx)),
                            None => Body::from("whole"),
                        }
                    }
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(layer),
        );

    // The head is out, the body streams: the request is still in flight.
    let (tx, rx) = mpsc::channel(4);
    *slot.lock().unwrap() = Some(rx);
    let res = app.clone().oneshot(get_req("/stream")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.in_flight(), 1);
    let shed = app.clone().oneshot(get_req("/stream")).await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);

    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "a");
    assert_eq!(handle.in_flight(), 1, "mid-body: still held");
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(handle.in_flight(), 0, "released at the end of the body");

    // A body dropped mid-stream gives its permit back.
    let (tx, rx) = mpsc::channel(4);
    *slot.lock().unwrap() = Some(rx);
    let res = app.clone().oneshot(get_req("/stream")).await.unwrap();
    tx.send(Bytes::from_static(b"x")).await.unwrap();
    let mut body = res.into_body();
    let _ = body.frame().await.unwrap().unwrap();
    assert_eq!(handle.in_flight(), 1);
    drop(body);
    assert_eq!(handle.in_flight(), 0, "released when the body is dropped");

    let res = app.oneshot(get_req("/stream")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "whole");
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.shed(), 1);
}

async fn load_through(svc: CloneSvc, requests: u32) -> (u32, u32) {
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                // Arrivals spread over 50 ms: far more than the layer can serve.
                tokio::time::sleep(Duration::from_micros(u64::from(i) * 100)).await;
                tokio::time::timeout(Duration::from_secs(60), svc.oneshot(i)).await
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Err(_) => panic!("request {i} hung"),
            Ok(Ok(n)) => {
                assert_eq!(n as usize, i);
                ok += 1;
            }
            Ok(Err(e)) => {
                let r = Rejection::find(&*e).expect("only rejections");
                assert_eq!(r.kind(), RejectionKind::Overloaded);
                shed += 1;
            }
        }
    }
    (ok, shed)
}

type BoxSvc = tower::util::BoxService<u32, u32, BoxError>;
type CloneSvc = tower::util::BoxCloneService<u32, u32, BoxError>;

fn slow_inner() -> BoxSvc {
    tower::util::BoxService::new(tower::service_fn(|n: u32| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, BoxError>(n)
    }))
}

#[tokio::test(start_paused = true)]
async fn behind_a_buffer_under_load_every_request_completes_or_is_shed() {
    // Buffer above the layer: the Buffer's worker is never stalled by a wait.
    let layer = BackpressureLayer::new(4)
        .max_wait(Duration::from_millis(15))
        .max_queue(8);
    let handle = layer.handle();
    let inner = tower::buffer::Buffer::new(slow_inner(), 64);
    let svc = tower::buffer::Buffer::new(tower::util::BoxService::new(layer.layer(inner)), 16);
    let (ok, shed) = load_through(CloneSvc::new(svc), 500).await;
    assert_eq!(ok + shed, 500);
    assert!(ok >= 20, "only {ok} served");
    assert!(shed >= 100, "only {shed} shed");
    assert_eq!(u64::from(shed), handle.shed());
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn above_a_buffer_under_load_every_request_completes_or_is_shed() {
    // A Buffer below the layer: its readiness gates calls, so callers beyond its bound wait
    // in `poll_ready` (as with any service that is not ready), and a request waiting for a
    // permit keeps the Buffer slot its `poll_ready` reserved. Nothing hangs.
    let layer = BackpressureLayer::new(4)
        .max_wait(Duration::from_millis(15))
        .max_queue(8);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .buffer(2)
        .service(slow_inner());
    let (ok, shed) = load_through(CloneSvc::new(svc), 500).await;
    assert_eq!(ok + shed, 500);
    assert!(ok >= 20, "{ok} served, {shed} shed");
    assert_eq!(u64::from(shed), handle.shed());
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test]
async fn hyper_keep_alive_connections_hold_no_permit_between_requests() {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    let layer = BackpressureLayer::new(1).hold_until_body_end();
    let handle = layer.handle();
    let app = Router::new().route("/", get(|| async { "hi" })).layer(
        ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(layer),
    );
    let mut senders = Vec::new();
    for _ in 0..3 {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server_io), svc),
        );
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(sender);
    }
    // Three keep-alive connections, one permit: each request is served in turn, none is
    // shed, because an idle connection holds nothing.
    for _ in 0..5 {
        for sender in &mut senders {
            let req = Request::get("/")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let res = sender.send_request(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hi");
        }
    }
    assert_eq!(handle.shed(), 0);
    assert_eq!(handle.in_flight(), 0);
}

/// hyper drops a body that says it has ended without polling it: an empty-bodied response
/// gives its permit back, and its outcome (a 503 here) reaches the adaptive limit, as soon as
/// the response head is out.
#[tokio::test(start_paused = true)]
async fn an_empty_body_gives_the_permit_back_and_counts_its_failure() {
    use tower_bulwark::backpressure::{Adaptive, Aimd};
    use tower_bulwark::clock::Clock;

    let layer = BackpressureLayer::adaptive(
        Adaptive::aimd(Aimd::default())
            .floor(1)
            .ceiling(100)
            .initial(50)
            .window(Duration::from_millis(100))
            .min_samples(1)
            .clock(Clock::tokio()),
    )
    .unwrap()
    .hold_until_body_end();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
    }));
    let before = handle.limit();
    for _ in 0..20 {
        let res = svc.clone().oneshot(Request::new(())).await.unwrap();
        // The body is never polled, as hyper would not poll it.
        assert!(!res.body().holds_permit());
        assert_eq!(handle.in_flight(), 0);
        tokio::time::advance(Duration::from_millis(20)).await;
    }
    assert!(
        handle.limit() < before,
        "failures lowered the limit: {} -> {}",
        before,
        handle.limit()
    );
}
