//! A keyed response whose body is not ready at once is handed on as it streams, and its
//! record is written when its body ends.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{IdempotencyBuilder, IdempotencyLayer, MemoryStore};
use tower_bulwark::{Rejection, RejectionKind};

/// A body that yields its chunks one at a time, each after one `Pending` (woken at once),
/// then its trailers or its error, and says it has ended as soon as its last frame is out
/// (as `Full` does), so that a client like hyper may never poll it again.
struct Drip {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    error: bool,
    pend: bool,
}

impl Drip {
    fn new(chunks: &[&'static str]) -> Drip {
        Drip {
            chunks: chunks
                .iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
            trailers: None,
            error: false,
            pend: true,
        }
    }
}

impl Body for Drip {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.pend {
            this.pend = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.pend = true;
        if let Some(c) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if std::mem::take(&mut this.error) {
            return Poll::Ready(Some(Err("the body failed".into())));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none() && !self.error
    }
}

/// The handler: counts its runs and answers `make()`.
#[derive(Clone)]
struct App {
    runs: Arc<AtomicUsize>,
}

impl App {
    fn new() -> App {
        App {
            runs: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn service(
        &self,
        make: fn() -> Response<Drip>,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Drip>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<Drip>, BoxError>> + Send,
    > + Clone
           + Send {
        let runs = self.runs.clone();
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(make()) }
        })
    }
}

fn builder() -> IdempotencyBuilder<MemoryStore> {
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap();
    IdempotencyLayer::builder(store)
}

fn req(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("authorization", "Bearer alice")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

fn kind(err: &BoxError) -> RejectionKind {
    Rejection::find(&**err).expect("a rejection").kind()
}

/// Reads a body as hyper does: frames until it says it has ended (never the final `None`
/// of a body that says so), its data and its trailers.
async fn read<B>(mut body: B) -> Result<(Bytes, Option<HeaderMap>), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut data = Vec::new();
    let mut trailers = None;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame?;
        if let Some(d) = frame.data_ref() {
            data.extend_from_slice(d);
        }
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    Ok((Bytes::from(data), trailers))
}

fn created() -> Response<Drip> {
    Response::builder()
        .status(201)
        .header("x-order", "7")
        .body(Drip::new(&["{\"id\":", "7", "}"]))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_streamed_response_is_handed_on_at_once_recorded_at_its_end_and_replayed() {
    let app = App::new();
    let layer = builder().max_response_body(1000).build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service(created));

    let res = svc.clone().oneshot(req("s-1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let mut body = res.into_body();
    // The first chunk passes on before the rest is produced.
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "{\"id\":");
    // Meanwhile the key is held: a repeat is told it is in flight, and the layer holds room
    // for what the copy holds so far (a stream read slowly holds no more than it made).
    let err = svc.clone().oneshot(req("s-1")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyInFlight);
    assert_eq!(handle.stats().buffered_bytes, "{\"id\":".len());
    let (rest, trailers) = read(body).await.unwrap();
    assert_eq!(rest, "7}");
    assert!(trailers.is_none());
    // The end (which the client never polled past) wrote the record and gave the room back.
    assert_eq!(handle.stats().buffered_bytes, 0);

    let again = svc.clone().oneshot(req("s-1")).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-order"], "7");
    assert!(again.headers().get("trailer").is_none());
    let (body, _) = read(again.into_body()).await.unwrap();
    assert_eq!(body, "{\"id\":7}");
    assert_eq!(app.runs(), 1);
    assert_eq!(handle.stats().buffered_bytes, 0);
}

fn grpc(status: Option<&'static str>) -> Response<Drip> {
    let mut body = Drip::new(&["\0\0\0\0\x02", "ok"]);
    body.trailers = status.map(|s| {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static(s));
        t
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("trailer", "grpc-status")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_streamed_grpc_call_is_judged_by_its_trailers() {
    // OK: stored with its trailers, and replayed with them.
    let app = App::new();
    let svc = builder()
        .build()
        .unwrap()
        .layer(app.service(|| grpc(Some("0"))));
    let res = svc.clone().oneshot(req("g")).await.unwrap();
    let (_, trailers) = read(res.into_body()).await.unwrap();
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let again = svc.clone().oneshot(req("g")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["trailer"], "grpc-status");
    let (body, trailers) = read(again.into_body()).await.unwrap();
    assert_eq!(body, "\0\0\0\0\x02ok");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert_eq!(app.runs(), 1);

    // UNAVAILABLE, or no status at all: not stored, the key released.
    for make in [|| grpc(Some("14")), || grpc(None)] {
        let app = App::new();
        let layer = builder().build().unwrap();
        let handle = layer.handle();
        let svc = layer.layer(app.service(make));
        for _ in 0..2 {
            let res = svc.clone().oneshot(req("g")).await.unwrap();
            assert!(!res.headers().contains_key("idempotent-replayed"));
            let _ = read(res.into_body()).await.unwrap();
        }
        assert_eq!(app.runs(), 2);
        assert_eq!(handle.stats().not_stored, 2);
        assert_eq!(handle.stats().buffered_bytes, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_streamed_response_that_outgrows_the_cap_is_not_kept() {
    let app = App::new();
    let layer = builder().max_response_body(4).build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service(created));
    let res = svc.clone().oneshot(req("big")).await.unwrap();
    let (body, _) = read(res.into_body()).await.unwrap();
    assert_eq!(body, "{\"id\":7}", "passed on whole");
    assert_eq!(handle.stats().buffered_bytes, 0);
    let err = svc.clone().oneshot(req("big")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_that_fails_or_is_dropped_never_runs_twice() {
    fn failing() -> Response<Drip> {
        let mut res = created();
        res.body_mut().error = true;
        res
    }
    let app = App::new();
    let layer = builder().build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(app.service(failing));
    let res = svc.clone().oneshot(req("f")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(read(res.into_body()).await.is_err());
    let err = svc.clone().oneshot(req("f")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);

    // Dropped by the client midway.
    let res = svc.clone().oneshot(req("d")).await.unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let err = svc.clone().oneshot(req("d")).await.unwrap_err();
    assert_eq!(kind(&err), RejectionKind::IdempotencyResponseNotStored);
    assert_eq!(app.runs(), 2);
    assert_eq!(handle.stats().buffered_bytes, 0);
}
