//! Attacks on the idempotency layer (attacker 4): replay across callers, a key run twice,
//! unbounded memory, fingerprint edges, what is replayed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{IdempotencyLayer, MemoryStore};
use tower_bulwark::RejectionLayer;

#[derive(Clone)]
struct App {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl App {
    fn new() -> App {
        App {
            runs: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// Headers steer the handler: `x-gate` waits for a gate permit; `x-status` (first run only
/// with `x-first-status`); `x-slow-body: N` streams N one-byte chunks, one every 2 s;
/// `x-trailer-cookie` ends the body with trailers holding a `set-cookie`.
fn handler(
    app: &App,
) -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<Body>, BoxError>> + Send,
> + Clone
       + Send {
    let app = app.clone();
    tower::service_fn(move |req: Request<Body>| {
        let app = app.clone();
        async move {
            let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
            let h = req.headers().clone();
            if h.contains_key("x-gate") && (n == 1 || !h.contains_key("x-gate-first")) {
                app.gate.acquire().await.unwrap().forget();
            }
            let _ = req.into_body().collect().await?;
            let mut status: u16 = h
                .get("x-status")
                .map(|v| v.to_str().unwrap().parse().unwrap())
                .unwrap_or(201);
            if let Some(v) = h.get("x-first-status") {
                if n == 1 {
                    status = v.to_str().unwrap().parse().unwrap();
                }
            }
            let body = if let Some(v) = h.get("x-slow-body") {
                let chunks: u64 = v.to_str().unwrap().parse().unwrap();
                let s = futures_util::stream::unfold(0u64, move |i| async move {
                    if i == chunks {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Some((Ok::<_, BoxError>(Bytes::from_static(b"x")), i + 1))
                });
                Body::from_stream(s)
            } else if h.contains_key("x-trailer-cookie") {
                let mut t = HeaderMap::new();
                t.insert(
                    "set-cookie",
                    "session=other-callers-secret".parse().unwrap(),
                );
                t.insert("x-checksum", "abc".parse().unwrap());
                let frames = futures_util::stream::iter([
                    Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"data"))),
                    Ok(http_body::Frame::trailers(t)),
                ]);
                Body::new(http_body_util::StreamBody::new(frames))
            } else {
                Body::from(format!("run {n}"))
            };
            Ok(Response::builder()
                .status(status)
                .header("x-run", n.to_string())
                .body(body)
                .unwrap())
        }
    })
}

fn store() -> MemoryStore {
    MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

fn order(key: &str) -> http::request::Builder {
    Request::post("/orders").header("idempotency-key", key)
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn advance(total: Duration) {
    let step = Duration::from_millis(100);
    let mut done = Duration::ZERO;
    while done < total {
        tokio::time::advance(step).await;
        settle().await;
        done += step;
    }
}

macro_rules! stack {
    ($layer:expr, $app:expr) => {
        ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer($layer)
            .service(handler($app))
    };
}

// ---------------------------------------------------------------------------------------------
// Scope: anonymous callers and the store's per-scope share
// ---------------------------------------------------------------------------------------------

/// Scenario: the default layer (credential scope) over a `MemoryStore` with the default
/// quarter share. Callers without `Authorization` (anonymous: any unauthenticated client,
/// one request each) send many new keys; then an authenticated caller sends one.
///
/// Expected: the README: "a quarter at most for one scope, the whole store for an
/// `unscoped()` layer"; issue 13 item 2: "One tenant must not be able to fill the store for
/// all". The anonymous callers are one scope ("Callers without credentials share one
/// anonymous scope"), so they are held to a quarter and the authenticated caller still
/// gets in.
///
/// What this checks: whether anonymous keys (whose store scope is empty, like an unscoped
/// layer's) escape the share.
#[tokio::test(start_paused = true)]
async fn anonymous_callers_cannot_fill_the_store_for_authenticated_ones() {
    let app = App::new();
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .max_entries(40)
        .build()
        .unwrap();
    let layer = IdempotencyLayer::builder(store.clone()).build().unwrap();
    let svc = stack!(layer, &app);
    let mut anon_ok = 0;
    for i in 0..40 {
        let res = svc
            .clone()
            .oneshot(order(&format!("anon-{i}")).body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        if res.status() == StatusCode::CREATED {
            anon_ok += 1;
        }
    }
    let authed = svc
        .clone()
        .oneshot(
            order("k-1")
                .header("authorization", "Bearer alice")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        authed.status(),
        StatusCode::CREATED,
        "anonymous callers held {anon_ok} of 40 entries and the store refuses an \
         authenticated caller"
    );
    assert!(
        anon_ok <= 12,
        "anonymous callers held {anon_ok} of 40 entries, past a quarter"
    );
}

/// Scenario: the lib docs' own example scope function, `x-tenant` or empty
/// (`unwrap_or_default()`), on a store with the default share. Requests that lack the tenant
/// header (a bug upstream, or anyone the auth layer let through) flood new keys.
///
/// Expected: "One scope ... may hold at most scope_share ... past it, that scope's new keys
/// are refused while every other scope goes on." Only `unscoped()` layers' keys are exempt.
#[tokio::test(start_paused = true)]
async fn an_empty_scope_from_a_scope_function_is_held_to_its_share() {
    let app = App::new();
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .max_entries(40)
        .build()
        .unwrap();
    let layer = IdempotencyLayer::builder(store.clone())
        .scope(|head: &http::request::Parts| {
            head.headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap();
    let svc = stack!(layer, &app);
    let mut ok = 0;
    for i in 0..40 {
        let res = svc
            .clone()
            .oneshot(order(&format!("k-{i}")).body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        if res.status() == StatusCode::CREATED {
            ok += 1;
        }
    }
    let acme = svc
        .clone()
        .oneshot(
            order("k-1")
                .header("x-tenant", "acme")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        acme.status(),
        StatusCode::CREATED,
        "the empty scope held {ok} of 40 entries and tenant acme is refused"
    );
}

// ---------------------------------------------------------------------------------------------
// A key run twice
// ---------------------------------------------------------------------------------------------

/// Scenario: a handler answers at once but streams its (small) body slowly: 15 one-byte
/// chunks, one every 2 s (a report generated as it is sent, a proxied upstream). Lease TTL
/// 6 s. At 12 s, well before the body ends, the client's retry comes.
///
/// Expected: "Until its end the key is held ... however slowly the client reads, and
/// repeats get 409"; "Once the handler has answered with a response to store, the request
/// has run, and its key is never released". The repeat gets 409 and the handler has run
/// once.
#[tokio::test(start_paused = true)]
async fn a_slow_response_body_past_the_lease_keeps_the_key() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .lease_ttl(Duration::from_secs(6))
        .build()
        .unwrap();
    let svc = stack!(layer, &app);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move {
            let res = svc
                .oneshot(
                    order("slow")
                        .header("x-slow-body", "15")
                        .body(Body::from("{}"))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    });
    settle().await;
    advance(Duration::from_secs(12)).await;
    assert_eq!(app.runs(), 1);
    let repeat = svc
        .clone()
        .oneshot(
            order("slow")
                .header("x-slow-body", "15")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        app.runs(),
        1,
        "the handler ran a second time while the first still streamed"
    );
    assert_eq!(repeat.status(), StatusCode::CONFLICT);
    advance(Duration::from_secs(40)).await;
    let (status, body) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body.len(), 15);
}

/// Scenario: `wait_for_in_flight(10 s)`. The first request of a key fails (500: released);
/// two repeats were waiting for it.
///
/// Expected: "If the first fails and releases the key, the waiter runs the request itself":
/// one waiter runs, the other waits for it and gets its replay (or a 409): the handler runs
/// twice in all (the failed first, and one retry), never once per waiter.
#[tokio::test(start_paused = true)]
async fn waiters_on_a_released_key_run_it_once() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .wait_for_in_flight(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = stack!(layer, &app);
    let mk = || {
        order("w")
            .header("x-gate", "1")
            .header("x-gate-first", "1")
            .header("x-first-status", "500")
            .body(Body::from("{}"))
            .unwrap()
    };
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let svc = svc.clone();
        let r = mk();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(r).await.unwrap();
            res.status()
        }));
        settle().await;
    }
    advance(Duration::from_millis(500)).await;
    assert_eq!(app.runs(), 1);
    app.gate.add_permits(1);
    settle().await;
    advance(Duration::from_secs(2)).await;
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(app.runs(), 2, "statuses {statuses:?}");
}

/// Scenario: a user keeps records "forever" with `.ttl(Duration::MAX)` (or a very long lease).
///
/// Expected: the build refuses what it cannot hold, or the layer works; a keyed request
/// never panics the task serving it.
#[tokio::test(start_paused = true)]
async fn a_huge_ttl_is_refused_or_works_and_never_panics() {
    for (ttl, lease) in [
        (Duration::MAX, Duration::from_secs(60)),
        (Duration::from_secs(86_400), Duration::MAX),
    ] {
        let app = App::new();
        let Ok(layer) = IdempotencyLayer::builder(store())
            .ttl(ttl)
            .lease_ttl(lease)
            .build()
        else {
            continue;
        };
        let svc = stack!(layer, &app);
        let r = tokio::spawn(async move {
            let first = svc
                .clone()
                .oneshot(order("forever").body(Body::from("{}")).unwrap())
                .await
                .unwrap()
                .status();
            let again = svc
                .clone()
                .oneshot(order("forever").body(Body::from("{}")).unwrap())
                .await
                .unwrap();
            (
                first,
                again.status(),
                again.headers().contains_key("idempotent-replayed"),
            )
        })
        .await;
        let (first, again, replayed) =
            r.unwrap_or_else(|e| panic!("ttl {ttl:?} lease {lease:?}: the request panicked: {e}"));
        assert_eq!(first, StatusCode::CREATED);
        assert_eq!(again, StatusCode::CREATED);
        assert!(replayed);
    }
}

// ---------------------------------------------------------------------------------------------
// Fingerprint edges
// ---------------------------------------------------------------------------------------------

/// Scenario: a client retries over another connection: its first attempt went out over
/// HTTP/1.1 (origin-form `/orders`), the retry over HTTP/2 (hyper gives the server an
/// absolute URI, `http://api.example/orders`). Same key, same method, path and body.
///
/// Expected: "The fingerprint of a request is its method, path and query, and body": the
/// retry is replayed, not refused with 422.
#[tokio::test(start_paused = true)]
async fn the_fingerprint_ignores_the_uri_form() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store()).build().unwrap();
    let svc = stack!(layer, &app);
    let a = svc
        .clone()
        .oneshot(order("uri").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::CREATED);
    let b = svc
        .clone()
        .oneshot(
            Request::post("http://api.example/orders")
                .header("idempotency-key", "uri")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(b.status(), StatusCode::CREATED);
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// What is replayed
// ---------------------------------------------------------------------------------------------

/// Scenario: a response whose body ends with trailers holding a `Set-Cookie`.
///
/// Expected: issue 13 item 4: "trailers get the same Set-Cookie/hop-by-hop filtering as
/// headers"; the replay carries the other trailers but never the cookie.
#[tokio::test(start_paused = true)]
async fn set_cookie_in_trailers_is_never_replayed() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store()).build().unwrap();
    let svc = stack!(layer, &app);
    let mk = || {
        order("t")
            .header("x-trailer-cookie", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = svc.clone().oneshot(mk()).await.unwrap();
    let _ = a.into_body().collect().await.unwrap();
    let b = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    let c = b.into_body().collect().await.unwrap();
    let t = c.trailers().cloned().expect("trailers replayed");
    assert_eq!(t["x-checksum"], "abc");
    assert!(!t.contains_key("set-cookie"));
    assert_eq!(app.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// Cancellation and buffers
// ---------------------------------------------------------------------------------------------

/// Scenario: a client sends a chunk of its body and disconnects (the body never ends); the
/// request future is dropped while the layer reads the body.
///
/// Expected: "Reservations are ... given back when the request ... is dropped at any point":
/// `buffered_bytes` returns to 0, and the key holds no lease (a retry runs).
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_body_is_read_holds_nothing() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store()).build().unwrap();
    let handle = layer.handle();
    let svc = stack!(layer, &app);
    let body = Body::from_stream(futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from(vec![b'a'; 64 << 10]))]),
        futures_util::stream::pending(),
    ));
    let fut = svc.clone().oneshot(order("drop").body(body).unwrap());
    let r = tokio::time::timeout(Duration::from_secs(1), fut).await;
    assert!(r.is_err());
    assert_eq!(handle.stats().buffered_bytes, 0);
    let again = svc
        .clone()
        .oneshot(order("drop").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
}

/// Scenario: a response's headers name hop-by-hop fields: `Connection: x-private,
/// keep-alive`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE`.
///
/// Expected: "the stored response (status, headers minus Set-Cookie and hop-by-hop ...)";
/// "every header named in a Connection header is left out of stored records".
///
/// What happens: `proxy-connection` is kept in the record and replayed; `connection`, the names it
/// lists, `keep-alive`, `transfer-encoding`, `upgrade` and `te` are dropped.
#[tokio::test(start_paused = true)]
async fn hop_by_hop_headers_are_not_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .header("connection", "x-private, keep-alive")
                    .header("x-private", "1")
                    .header("keep-alive", "timeout=5")
                    .header("proxy-connection", "keep-alive")
                    .header("transfer-encoding", "chunked")
                    .header("upgrade", "h2c")
                    .header("te", "trailers")
                    .header("x-kept", "yes")
                    .body(Body::from("ok"))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::builder(store()).build().unwrap())
        .service(inner);
    let _ = svc
        .clone()
        .oneshot(order("h").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    let b = svc
        .clone()
        .oneshot(order("h").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(b.headers()["x-kept"], "yes");
    let replayed: Vec<&str> = [
        "connection",
        "x-private",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
    ]
    .into_iter()
    .filter(|h| b.headers().contains_key(*h))
    .collect();
    assert!(
        replayed.is_empty(),
        "hop-by-hop headers replayed: {replayed:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn grpc_call(key: &str) -> Request<Body> {
    Request::post("/pkg.Orders/Create")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", key)
        .body(Body::from(&b"\0\0\0\0\x02hi"[..]))
        .unwrap()
}

/// Scenario: a gRPC unary call whose response (HTTP 200, `application/grpc`) ends without
/// any `grpc-status`: the body ends with no trailers (the handler's stream was cut short, a
/// proxy dropped them). A gRPC client reads it as a failed call (tonic: `UNKNOWN`/`INTERNAL`,
/// "missing grpc-status").
///
/// Expected: the lib docs: "the handler fails: ... gRPC failure status ... nothing stored;
/// the key is released so the client can retry"; classify: "HTTP 200 without grpc-status
/// (the trailers decide)". A call that never said it succeeded is not replayed for 24 h: the
/// client's retry runs.
///
/// What happens: the call with no trailers is stored as a success; every retry for the record's TTL
/// is replayed the same status-less response (the client sees the same failure each time)
/// and the handler never runs again. (An empty or non-numeric `grpc-status` is released.)
#[tokio::test(start_paused = true)]
async fn a_grpc_response_without_a_status_is_not_stored() {
    // (A `grpc-status` that is empty or not a number is released, as it should be: only a
    // body that ends with no trailers at all is stored.)
    let mut stored = Vec::new();
    for trailers in [None::<&str>] {
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            r2.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut frames = vec![Ok::<_, BoxError>(http_body::Frame::data(
                    Bytes::from_static(b"\0\0\0\0\x02ok"),
                ))];
                if let Some(s) = trailers {
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", s.parse().unwrap());
                    frames.push(Ok(http_body::Frame::trailers(t)));
                }
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(Body::new(http_body_util::StreamBody::new(
                            futures_util::stream::iter(frames),
                        )))
                        .unwrap(),
                )
            }
        });
        let svc = ServiceBuilder::new()
            .layer(IdempotencyLayer::builder(store()).build().unwrap())
            .service(inner);
        let a = svc.clone().oneshot(grpc_call("g")).await.unwrap();
        let _ = a.into_body().collect().await;
        let b = svc.clone().oneshot(grpc_call("g")).await.unwrap();
        let replayed = b.headers().contains_key("idempotent-replayed");
        let _ = b.into_body().collect().await;
        if replayed || runs.load(Ordering::SeqCst) != 2 {
            stored.push(trailers);
        }
    }
    assert!(
        stored.is_empty(),
        "gRPC calls without a valid status stored and replayed (grpc-status trailer): {stored:?}"
    );
}

/// Scenario: an axum `Json` handler behind the layer. A client forgets
/// `Content-Type: application/json`: axum answers 415 without running the handler. The
/// client fixes its header and retries with the same key, method, path and body.
///
/// Expected: the README: the layer "Follows the IETF Idempotency-Key draft and Stripe's
/// behaviour"; Stripe saves no result when the request failed validation before the endpoint
/// ran. The corrected request runs (or, at worst, is told the payload differs: 422), it is
/// not replayed the 415 for a day.
///
/// What happens: the 415 is stored; the corrected request has the same fingerprint (method, path,
/// body: not the content type), so it is replayed the 415 (`Idempotent-Replayed: true`) for
/// 24 h and the order can never be placed with that key.
#[tokio::test(start_paused = true)]
async fn a_corrected_content_type_is_not_replayed_the_old_415() {
    use axum::routing::post;
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let app: axum::Router = axum::Router::new()
        .route(
            "/orders",
            post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                let r2 = r2.clone();
                async move {
                    r2.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, v.to_string())
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(IdempotencyLayer::builder(store()).build().unwrap()),
        );
    let a = app
        .clone()
        .oneshot(order("ct").body(Body::from("{\"qty\":1}")).unwrap())
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let b = app
        .clone()
        .oneshot(
            order("ct")
                .header("content-type", "application/json")
                .body(Body::from("{\"qty\":1}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_ne!(
        b.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "the corrected request was replayed the 415 (replayed: {:?})",
        b.headers().get("idempotent-replayed")
    );
}

/// Scenario: a layer scoped by a session cookie, `.scope_by_cookie("session")`. Two browsers
/// (Alice and Bob) send the same key and body; their clients write the `Cookie` header
/// without the space after `;` (`a=1;session=alice`), which servers accept and RFC 6265's
/// server-side parsing allows.
///
/// Expected: "two requests share records only when their Authorization headers and their
/// name cookies are equal": Bob's request runs; it is not replayed Alice's response.
#[tokio::test(start_paused = true)]
async fn cookie_scope_reads_cookies_written_without_a_space() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .scope_by_cookie("session")
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = stack!(layer, &app);
    for (i, cookie) in ["theme=dark;session=alice", "theme=dark;session=bob"]
        .iter()
        .enumerate()
    {
        let res = svc
            .clone()
            .oneshot(
                order("c")
                    .header("cookie", *cookie)
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(
            !res.headers().contains_key("idempotent-replayed"),
            "request {i} ({cookie}) was replayed another session's response \
             (anonymous: {})",
            handle.stats().anonymous
        );
    }
    assert_eq!(app.runs(), 2);
}

/// Scenario: an `unscoped()` layer over a small `MemoryStore` that is full of completed
/// records. A client retries one of the completed keys (what keys are for), and another
/// repeats a key that is still in flight.
///
/// Expected: only "a new key, and the store has no room for it" is refused with 503; a
/// completed key is replayed and an in-flight key gets 409, full store or not.
#[tokio::test(start_paused = true)]
async fn a_full_store_still_replays_completed_keys() {
    let app = App::new();
    let store = MemoryStore::builder()
        .clock(Clock::tokio())
        .max_entries(8)
        .build()
        .unwrap();
    let layer = IdempotencyLayer::builder(store.clone())
        .unscoped()
        .build()
        .unwrap();
    let svc = stack!(layer, &app);
    let mut ok = 0;
    for i in 0..12 {
        let res = svc
            .clone()
            .oneshot(order(&format!("f-{i}")).body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        if res.status() == StatusCode::CREATED {
            ok += 1;
        }
    }
    assert!(ok < 12, "the store never filled");
    let res = svc
        .clone()
        .oneshot(order("f-0").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), ok);
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
#[macro_use]
mod redis_server;

/// Scenario: `RedisStore` on a Redis with `noeviction` (as the docs require) that reaches
/// its `maxmemory` just as a handler answers: Redis refuses writes (`OOM`) for longer than
/// the lease's time to live (here 2 s; 60 s by default, a short outage for a full Redis).
/// Memory is then freed and the client retries its key.
///
/// Expected: the README: "Under `noeviction` a full Redis refuses writes instead, and the
/// layer's failure policy applies (503 by default): nothing runs twice"; "a response whose
/// record could not be written ... keeps its key and is written again in the background,
/// never released to run twice"; issue 13 item 6: a completed request whose record could not
/// be written "never releases". The retry gets the replay (or a 409), never a second run.
///
/// How: checked through Redis itself: the test waits for Redis's own `expired` keyspace
/// event for the lease, or for three times the lease's time to live if the lease is kept
/// (renewed while the record waits). Once memory is freed the record must land: the key is
/// then replayed.
///
/// What happens: the first `complete` fails (OOM), the background writer stops when the lease would
/// expire (as the module docs say it does), Redis expires the lease, and the retry (same caller, key and payload) runs the
/// handler a second time and answers a fresh 201.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_by_a_full_redis_never_lets_the_key_run_twice() {
    use redis::AsyncCommands;
    use redis_server::RedisServer;
    use tower_bulwark::idempotency::RedisStore;
    let server = server_or_skip!("a_record_refused_by_a_full_redis_never_lets_the_key_run_twice");
    let c = redis_server::conn(&server.url()).await;
    let mut admin = redis_server::conn(&server.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Ex")
        .query_async(&mut admin)
        .await
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("__keyevent@*__:expired").await.unwrap();

    let store = RedisStore::new(c).timeout(Duration::from_secs(2)).unwrap();
    let layer = IdempotencyLayer::builder(store)
        .lease_ttl(Duration::from_secs(2))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (r2, a2) = (runs.clone(), admin.clone());
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let n = r2.fetch_add(1, Ordering::SeqCst) + 1;
        let mut admin = a2.clone();
        async move {
            if n == 1 {
                // Redis is full as the handler answers.
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg("1")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
            }
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from("order"))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(inner);
    let mk = || {
        order("full-redis")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Redis stays full until it expires the lease (its own event), or for three times the
    // lease's time to live if the lease is kept (renewed while the record waits); then
    // memory is freed.
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("bulwark:idem:*")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one key, the lease");
    let mut events = pubsub.on_message();
    let expired = tokio::time::timeout(
        Duration::from_secs(6),
        futures_util::StreamExt::next(&mut events),
    )
    .await;
    let name: Vec<u8> = match expired {
        Ok(event) => event.expect("an event").get_payload().unwrap(),
        Err(_) => keys[0].clone(),
    };
    drop(events);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut admin)
        .await
        .unwrap();
    let left: Option<Vec<u8>> = admin.get(&name).await.unwrap();

    let again = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran a second time (retry answered {}; key {:?} expired, now {:?})",
        again.status(),
        String::from_utf8_lossy(&name),
        left.map(|v| v.len())
    );
    // The record lands once Redis has room: the key is replayed.
    let mut replayed = None;
    for _ in 0..50 {
        let res = svc.clone().oneshot(mk()).await.unwrap();
        if res.headers().contains_key("idempotent-replayed") {
            replayed = Some(res.status());
            break;
        }
        assert_eq!(
            res.status(),
            StatusCode::CONFLICT,
            "in flight until written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        replayed,
        Some(StatusCode::CREATED),
        "the record was never written"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Scenario: an operator lowers the lease's time to live at run time
/// (`handle.set_lease_ttl(3 s)`, from the default 60 s) while a long handler runs. The
/// client's retry comes 25 s later, the handler still running.
///
/// Expected: "the lease is renewed every third of it while the handler runs: repeats keep
/// getting 409"; `set_lease_ttl` is "The time to live of new leases": the running request's
/// lease is renewed so that it never lapses while its handler runs.
#[tokio::test(start_paused = true)]
async fn lowering_the_lease_ttl_at_run_time_never_lets_a_running_key_lapse() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store()).build().unwrap();
    let handle = layer.handle();
    let svc = stack!(layer, &app);
    let mk = || {
        order("lapse")
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(mk()));
    settle().await;
    assert_eq!(app.runs(), 1);
    handle.set_lease_ttl(Duration::from_secs(3)).unwrap();
    advance(Duration::from_secs(25)).await;
    let repeat = tokio::spawn(svc.clone().oneshot(mk()));
    settle().await;
    let runs = app.runs();
    app.gate.add_permits(2);
    let repeat = repeat.await.unwrap().unwrap();
    let _ = first.await.unwrap().unwrap();
    assert_eq!(
        runs,
        1,
        "the repeat ran beside the first (answered {})",
        repeat.status()
    );
}

/// Scenario: records kept "for ever" on Redis: `.ttl(Duration::MAX)` (or any TTL past what
/// Redis's `PX` takes), which the layer's builder accepts and `MemoryStore` handles.
///
/// Expected: the build refuses a TTL the store cannot hold, or the record is written and
/// replayed; the key never runs twice.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_ttl_on_redis_is_refused_or_stored() {
    use redis::AsyncCommands;
    use redis_server::RedisServer;
    use tower_bulwark::idempotency::RedisStore;
    let server = server_or_skip!("a_huge_ttl_on_redis_is_refused_or_stored");
    let c = redis_server::conn(&server.url()).await;
    let mut admin = redis_server::conn(&server.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Ex")
        .query_async(&mut admin)
        .await
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("__keyevent@*__:expired").await.unwrap();
    let store = RedisStore::new(c).timeout(Duration::from_secs(2)).unwrap();
    let Ok(layer) = IdempotencyLayer::builder(store)
        .ttl(Duration::MAX)
        .lease_ttl(Duration::from_secs(2))
        .build()
    else {
        return;
    };
    let app = App::new();
    let svc = stack!(layer, &app);
    let mk = || {
        order("forever")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let keys: Vec<Vec<u8>> = admin.keys("bulwark:idem:*").await.unwrap();
    assert_eq!(keys.len(), 1);
    let v: Vec<u8> = admin.get(&keys[0]).await.unwrap();
    if v.first() == Some(&b'L') {
        // Still a lease: wait for Redis to expire it.
        let mut events = pubsub.on_message();
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::StreamExt::next(&mut events),
        )
        .await;
    }
    let again = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(
        app.runs(),
        1,
        "the record was never written (the key held {:?}) and the retry ran again ({})",
        v.first().map(|b| *b as char),
        again.status()
    );
}

/// Scenario: the longest keys the docs allow, 255 characters, sent bare and as the draft's
/// structured-field string (quoted, so 257 bytes on the wire; with escapes, more), and one
/// character more.
///
/// Expected: "either way the key is 1 to 255 visible ASCII characters": both 255-character
/// forms run (and name the same key: the quoted one is replayed the bare one's response);
/// 256 characters get 400.
#[tokio::test(start_paused = true)]
async fn the_longest_key_is_accepted_in_both_forms() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store()).build().unwrap();
    let svc = stack!(layer, &app);
    let k255 = "k".repeat(254) + "\"";
    let bare = svc
        .clone()
        .oneshot(order(&k255).body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(bare.status(), StatusCode::CREATED);
    let quoted = format!("\"{}\\\"\"", "k".repeat(254));
    let q = svc
        .clone()
        .oneshot(order(&quoted).body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        q.status(),
        StatusCode::CREATED,
        "the quoted 255-character key was refused"
    );
    assert_eq!(q.headers()["idempotent-replayed"], "true");
    let k256 = "k".repeat(256);
    let long = svc
        .clone()
        .oneshot(order(&k256).body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(long.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.runs(), 1);
}

/// Scenario: a response at the layer's cap (a 1 MiB body, the default `max_response_body`)
/// that also carries 64 KiB of headers (cookies excluded: say, 200 `link` headers), more
/// than the 16 KiB the layer allows for a head when it sizes the store's largest record.
/// The default `MemoryStore` and layer. The client retries.
///
/// Expected: the retry is replayed, or refused with 409 (kept as "not kept": "repeats get
/// 409, never a second run"); the handler never runs twice.
#[tokio::test(start_paused = true)]
async fn a_full_size_body_with_big_headers_never_runs_twice() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut b = Response::builder().status(201);
            for i in 0..200 {
                b = b.header(
                    "link",
                    format!("<https://x.example/{i}/{}>; rel=item", "p".repeat(300)),
                );
            }
            Ok::<_, BoxError>(b.body(Body::from(vec![b'x'; 1 << 20])).unwrap())
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::builder(store()).build().unwrap())
        .service(inner);
    let a = svc
        .clone()
        .oneshot(order("big").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::CREATED);
    let _ = a.into_body().collect().await.unwrap();
    let b = svc
        .clone()
        .oneshot(order("big").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    let st = b.status();
    let _ = b.into_body().collect().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry ran again ({st})");
}

/// Scenario: responses of exactly `max_response_body` bytes and of one byte more (the
/// boundary), on a layer with a 1,000-byte cap.
///
/// Expected: the first is kept and replayed ("The largest response body kept for replay");
/// the second is passed on and recorded as run (409 on repeat); neither runs twice.
#[tokio::test(start_paused = true)]
async fn the_response_cap_boundary_is_exact() {
    for (len, kept) in [(1000usize, true), (1001, false)] {
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            r2.fetch_add(1, Ordering::SeqCst);
            async move {
                let s = futures_util::stream::iter(
                    vec![b'y'; len]
                        .chunks(100)
                        .map(|c| Ok::<_, BoxError>(Bytes::copy_from_slice(c)))
                        .collect::<Vec<_>>(),
                );
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(201)
                        .body(Body::from_stream(s))
                        .unwrap(),
                )
            }
        });
        let svc = ServiceBuilder::new()
            .layer(RejectionLayer::http())
            .layer(
                IdempotencyLayer::builder(store())
                    .max_response_body(1000)
                    .build()
                    .unwrap(),
            )
            .service(inner);
        let a = svc
            .clone()
            .oneshot(order("cap").body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(a.into_body().collect().await.unwrap().to_bytes().len(), len);
        let b = svc
            .clone()
            .oneshot(order("cap").body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        let st = b.status();
        let replayed = b.headers().contains_key("idempotent-replayed");
        let body = b.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{len}: ran twice");
        if kept {
            assert!(replayed && body.len() == len, "{len}: not replayed ({st})");
        } else {
            assert_eq!(st, StatusCode::CONFLICT, "{len}");
        }
    }
}

/// Scenario: the common `ServiceBuilder::timeout` below the idempotency layer (tower's
/// `TimeoutLayer`, which answers `Err(Elapsed)`, not a 408): the handler writes the order,
/// then waits on a slow dependency past the timeout. The client gets the 500 that
/// `RejectionLayer` makes of the error, and retries with its key.
///
/// Expected: the CHANGELOG's own reasoning for 408: "A 408 is stored like any 4xx: a
/// timeout below the layer may cut off a handler that has had its effect", and the lib docs:
/// "when the choice is between running twice and refusing, the crate refuses". An error the
/// layer cannot tell from "did not run" (not a refusal of a layer below, which never ran the
/// handler) keeps the key (409 until the lease ends, or stored): the order is never written
/// twice.
///
/// What happens: the `Elapsed` error is treated like a refusal: the key is released at once, and the
/// retry runs the handler again (its effect twice). Only a 408 response is stored.
#[tokio::test(start_paused = true)]
async fn a_timeout_error_below_the_layer_does_not_release_the_key() {
    let effects = Arc::new(AtomicUsize::new(0));
    let e2 = effects.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let e2 = e2.clone();
        async move {
            e2.fetch_add(1, Ordering::SeqCst); // the order is written
            tokio::time::sleep(Duration::from_secs(10)).await; // then a slow dependency
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from("order"))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::builder(store()).build().unwrap())
        .timeout(Duration::from_secs(5))
        .service(inner);
    let mk = || {
        order("to")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(mk()));
    settle().await;
    advance(Duration::from_secs(6)).await;
    let first = first.await.unwrap().unwrap();
    assert!(first.status().is_server_error(), "{}", first.status());
    let again = tokio::spawn(svc.clone().oneshot(mk()));
    settle().await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the retry ran the handler (and its effect) a second time"
    );
    advance(Duration::from_secs(20)).await;
    let _ = again.await;
}

/// Scenario: a handler writes the order and answers `201 Created`, but its (small) body
/// fails midway (a serializer over a DB cursor, a proxied upstream that resets). The client
/// sees a cut response and retries with its key.
///
/// Expected: the lib docs: "Once the handler has answered with a response to store, the
/// request has run, and its key is never released"; "dropped after the handler answered
/// (reading or storing its response) | never released". A `201` head says the order exists:
/// the retry gets 409 or a record, never a second run.
///
/// What happens: the layer buffers the body, meets the error, answers 500 and releases the key: the
/// retry runs the handler again (and, here, fails again: every retry creates another order).
#[tokio::test(start_paused = true)]
async fn a_201_whose_body_fails_does_not_release_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            let s = futures_util::stream::iter([
                Ok::<_, BoxError>(Bytes::from_static(b"{\"id\":")),
                Err::<Bytes, BoxError>("cursor failed".into()),
            ]);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from_stream(s))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::builder(store()).build().unwrap())
        .service(inner);
    let mk = || {
        order("be")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = svc.clone().oneshot(mk()).await.unwrap();
    let first = a.status();
    let _ = a.into_body().collect().await;
    let b = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the order was created twice (the first answered {first}, the retry {})",
        b.status()
    );
}

mod flaky {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tower_bulwark::idempotency::{
        Claim, Fingerprint, Lease, Record, Store, StoreError, StoreErrorKind, StoreKey,
    };

    type Fut<T> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

    /// A `MemoryStore` whose claims, writes (`complete`), renewals and releases fail while
    /// `down` is set, as a shared store's do during an outage.
    #[derive(Clone)]
    pub struct Flaky {
        pub inner: MemoryStore,
        pub down: Arc<AtomicBool>,
    }

    impl Store for Flaky {
        type ClaimFuture = Fut<Claim>;
        type CompleteFuture = Fut<()>;
        type RenewFuture = Fut<()>;
        type ReleaseFuture = Fut<()>;
        type GetFuture = Fut<Option<Arc<Record>>>;
        // The inner store's operations take effect when called, so each is called only
        // once the outage is known not to refuse it.
        fn claim(&self, key: &StoreKey, fp: Fingerprint, ttl: Duration) -> Fut<Claim> {
            let (down, inner, key) = (self.down.clone(), self.inner.clone(), key.clone());
            Box::pin(async move {
                if down.load(Ordering::SeqCst) {
                    return Err(StoreError::new(StoreErrorKind::Unavailable));
                }
                inner.claim(&key, fp, ttl).await
            })
        }
        fn complete(&self, lease: &Lease, record: Record, ttl: Duration) -> Fut<()> {
            let (down, inner, lease) = (self.down.clone(), self.inner.clone(), lease.clone());
            Box::pin(async move {
                if down.load(Ordering::SeqCst) {
                    return Err(StoreError::new(StoreErrorKind::Unavailable));
                }
                inner.complete(&lease, record, ttl).await
            })
        }
        fn renew(&self, lease: &Lease, ttl: Duration) -> Fut<()> {
            let (down, inner, lease) = (self.down.clone(), self.inner.clone(), lease.clone());
            Box::pin(async move {
                if down.load(Ordering::SeqCst) {
                    return Err(StoreError::new(StoreErrorKind::Unavailable));
                }
                inner.renew(&lease, ttl).await
            })
        }
        fn release(&self, lease: &Lease) -> Fut<()> {
            let (down, inner, lease) = (self.down.clone(), self.inner.clone(), lease.clone());
            Box::pin(async move {
                if down.load(Ordering::SeqCst) {
                    return Err(StoreError::new(StoreErrorKind::Unavailable));
                }
                inner.release(&lease).await
            })
        }
        fn get(&self, key: &StoreKey) -> Fut<Option<Arc<Record>>> {
            Box::pin(self.inner.get(key))
        }
    }
}

/// Scenario: a custom shared store (the `Store` trait, as a user's Postgres or DynamoDB
/// store would implement it) is unreachable for writes for 90 s starting just as a handler
/// answers: the record cannot be written. The default 60 s lease. When the store is back,
/// the client retries its key.
///
/// Expected: the lib docs: "Once the handler has answered with a response to store, the
/// request has run, and its key is never released: if the record cannot be written ..., the
/// lease stays, and the write is tried again in the background ... A repeat meanwhile gets
/// 409, then the replay"; issue 13 item 6: such a request "never releases". The retry gets
/// the replay or 409, never a second run.
///
/// What happens: the background write (the trait's provided `complete_detached`) gives up
/// when the lease would expire; the lease expires, and the retry claims the key afresh and
/// runs the handler a second time. (The Redis store does the same:
/// `a_record_refused_by_a_full_redis_never_lets_the_key_run_twice`.)
#[tokio::test(start_paused = true)]
async fn a_record_the_store_cannot_write_for_a_while_never_runs_twice() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = flaky::Flaky {
        inner: store(),
        down: down.clone(),
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let (r2, d2) = (runs.clone(), down.clone());
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        d2.store(true, Ordering::SeqCst); // the store goes down as the handler answers
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from("order"))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::builder(store).build().unwrap())
        .service(inner);
    let mk = || {
        order("outage")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    advance(Duration::from_secs(90)).await;
    down.store(false, Ordering::SeqCst);
    // The handler flips `down` again when it runs: count before anything else can.
    let again = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran a second time (the retry answered {})",
        again.status()
    );
    // The background write lands once the store is back: the key is replayed.
    advance(Duration::from_secs(2)).await;
    let later = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(later.status(), StatusCode::CREATED);
    assert_eq!(later.headers()["idempotent-replayed"], "true");
}

/// Scenario: statuses that say "not processed, send it again": 425 Too Early (RFC 8470: an
/// origin that sees `Early-Data: 1` from its TLS 1.3 front end answers 425, and the front end
/// retries the same request, key included, once the handshake is done) and 421 Misdirected
/// Request (RFC 9110 §15.5.20: the client "MAY retry the request, whether or not the request
/// method is idempotent, over a different connection").
///
/// Expected: the lib docs release the key for responses that say the request "did not run
/// for this caller" (401, 403, 407, 429) and for failures worth retrying: a 425 or 421
/// means exactly that the request was not processed, so the automatic retry runs; it is not
/// replayed the 425/421 for 24 h.
///
/// What happens: both are stored as ordinary 4xx outcomes; the retry (same key) is replayed 425 / 421,
/// so an RFC 8470 front end's replay after the handshake never reaches the handler.
#[tokio::test(start_paused = true)]
async fn not_processed_statuses_are_not_replayed() {
    let mut replayed = Vec::new();
    for status in ["425", "421"] {
        let app = App::new();
        let layer = IdempotencyLayer::builder(store()).build().unwrap();
        let svc = stack!(layer, &app);
        let mk = || {
            order("early")
                .header("authorization", "Bearer alice")
                .header("x-first-status", status)
                .body(Body::from("{}"))
                .unwrap()
        };
        let a = svc.clone().oneshot(mk()).await.unwrap();
        assert_eq!(a.status().as_str(), status);
        let b = svc.clone().oneshot(mk()).await.unwrap();
        if b.status() != StatusCode::CREATED {
            replayed.push((status, b.status()));
        }
    }
    assert!(
        replayed.is_empty(),
        "retries answered the stored status: {replayed:?}"
    );
}

/// Scenario: a POST endpoint that streams its answer (server-sent events: a chat completion
/// streamed as it is generated, a job's progress), small in total, one event every 2 s for
/// 60 s; the client sends an `Idempotency-Key` as SDKs do on every POST. The layer sits on
/// the whole router, as the README's stack puts it.
///
/// Expected: the lib docs: a new key "runs; a successful response is stored (24 h) and
/// returned as it ran"; the response head and the first events reach the client while the
/// handler streams, as they do without the layer (within a few seconds, not after a minute).
///
/// What happens: the layer buffers the whole body before it hands the head on: after 5 s the client has
/// nothing (it gets everything at 60 s); a stream that never ends never answers.
#[tokio::test(start_paused = true)]
async fn a_streamed_response_reaches_the_client_as_it_streams() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store()).build().unwrap();
    let svc = stack!(layer, &app);
    let res = tokio::spawn(
        svc.clone().oneshot(
            order("sse")
                .header("x-slow-body", "30")
                .body(Body::from("{}"))
                .unwrap(),
        ),
    );
    settle().await;
    advance(Duration::from_secs(5)).await;
    assert!(
        res.is_finished(),
        "no response head 5 s into a 60 s stream (two events were sent by then)"
    );
    advance(Duration::from_secs(60)).await;
    let _ = res.await;
}

/// Scenario: a gRPC-Web call (tonic-web, browsers): the status travels in a trailer frame
/// at the end of the body (flag 0x80, `grpc-status:14`), not in HTTP trailers. The handler
/// fails with `UNAVAILABLE`; the client retries its key.
///
/// Expected: "Works on tonic servers too"; gRPC failure statuses "release the key so the
/// client can retry": the retry runs (or at least the failure is not replayed for 24 h).
///
/// What happens: the layer sees HTTP 200 with no HTTP trailers and stores the call; every retry is
/// replayed the UNAVAILABLE frame and the handler never runs again.
#[tokio::test(start_paused = true)]
async fn a_grpc_web_failure_is_not_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            let trailer = b"grpc-status:14\r\ngrpc-message:down\r\n";
            let mut body = vec![0x80u8];
            body.extend_from_slice(&(trailer.len() as u32).to_be_bytes());
            body.extend_from_slice(trailer);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc-web+proto")
                    .body(Body::from(body))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::builder(store()).build().unwrap())
        .service(inner);
    let call = || {
        Request::post("/pkg.Orders/Create")
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("idempotency-key", "gw")
            .body(Body::from(&b"\0\0\0\0\x02hi"[..]))
            .unwrap()
    };
    let a = svc.clone().oneshot(call()).await.unwrap();
    let _ = a.into_body().collect().await;
    let b = svc.clone().oneshot(call()).await.unwrap();
    let replayed = b.headers().contains_key("idempotent-replayed");
    assert!(
        !replayed && runs.load(Ordering::SeqCst) == 2,
        "the UNAVAILABLE gRPC-Web call was stored and replayed"
    );
}

/// Scenario: the handler has answered (its head is out of the handler: the order exists)
/// and streams a small body slowly; the layer buffers it. The client gives up at 5 s (its
/// timeout, or a `timeout` above the layer): the response future is dropped while the layer
/// is reading the response body. Lease 6 s. The client retries five minutes later.
/// Both `release_on_drop` settings.
///
/// Expected: the lib docs' table: "dropped after the handler answered (reading or storing
/// its response) | never released: the record (or, for a body cut short, a record that the
/// response was not kept) is written in the background"; `release_on_drop`: "(Dropped after
/// the handler answered, the key is never released either way.)" The retry never runs.
#[tokio::test(start_paused = true)]
async fn a_future_dropped_while_the_response_body_is_read_never_runs_twice() {
    let mut ran_twice = Vec::new();
    for release_on_drop in [false, true] {
        let app = App::new();
        let layer = IdempotencyLayer::builder(store())
            .lease_ttl(Duration::from_secs(6))
            .release_on_drop(release_on_drop)
            .build()
            .unwrap();
        let svc = stack!(layer, &app);
        let mk = || {
            order("cut2")
                .header("x-slow-body", "15")
                .body(Body::from("{}"))
                .unwrap()
        };
        let fut = svc.clone().oneshot(mk());
        let first = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), fut).await;
        });
        settle().await;
        advance(Duration::from_secs(6)).await;
        first.await.unwrap();
        assert_eq!(app.runs(), 1);
        advance(Duration::from_secs(300)).await;
        let again = svc.clone().oneshot(mk()).await;
        if app.runs() != 1 {
            ran_twice.push((release_on_drop, again.map(|r| r.status()).ok()));
        }
    }
    assert!(
        ran_twice.is_empty(),
        "ran twice (release_on_drop, retry status): {ran_twice:?}"
    );
}

/// Scenario: through `RedisStore`, a response with a header repeated (two `link` values),
/// an opaque (non-UTF-8) header value, an empty header value, and trailers. A client
/// retries.
///
/// Expected: "the stored response, identical in status, headers, body and trailers".
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_replay_is_identical() {
    use redis_server::RedisServer;
    use tower_bulwark::idempotency::RedisStore;
    let server = server_or_skip!("a_redis_replay_is_identical");
    let c = redis_server::conn(&server.url()).await;
    let store = RedisStore::new(c).timeout(Duration::from_secs(2)).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut t = HeaderMap::new();
            t.insert("x-digest", "sha-256=abc".parse().unwrap());
            let frames = futures_util::stream::iter([
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"\x00\xffbin"))),
                Ok(http_body::Frame::trailers(t)),
            ]);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(202)
                    .header("link", "<a>; rel=a")
                    .header("link", "<b>; rel=b")
                    .header(
                        "x-opaque",
                        http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
                    )
                    .header("x-empty", "")
                    .body(Body::new(http_body_util::StreamBody::new(frames)))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::builder(store).build().unwrap())
        .service(inner);
    let mk = || {
        order("fidelity")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = svc.clone().oneshot(mk()).await.unwrap();
    let (ah, ab) = (a.headers().clone(), a.status());
    let a = a.into_body().collect().await.unwrap();
    let b = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(b.status(), ab);
    let mut bh = b.headers().clone();
    bh.remove("idempotent-replayed");
    assert_eq!(bh, ah);
    let b = b.into_body().collect().await.unwrap();
    assert_eq!(b.trailers(), a.trailers());
    assert_eq!(b.to_bytes(), a.to_bytes());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Scenario: a custom shared store stops answering renewals while a long handler (30 s)
/// runs; lease 6 s; the default `FailClosed`. The store comes back at 7 s, and the client's
/// retry arrives then.
///
/// Expected: "failing closed, the handler is stopped before the lease can run out, and the
/// client gets 503": by the time the lease has run out and the retry claims the key, the
/// first handler is no longer running; two handlers never run one key at once.
#[tokio::test(start_paused = true)]
async fn a_lease_that_cannot_be_renewed_stops_the_handler_before_it_lapses() {
    struct Alive(Arc<AtomicUsize>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = flaky::Flaky {
        inner: store(),
        down: down.clone(),
    };
    let alive = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicUsize::new(0));
    let (a2, o2) = (alive.clone(), overlap.clone());
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let (a2, o2) = (a2.clone(), o2.clone());
        async move {
            if a2.fetch_add(1, Ordering::SeqCst) > 0 {
                o2.fetch_add(1, Ordering::SeqCst);
            }
            let _guard = Alive(a2);
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from("done"))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(
            IdempotencyLayer::builder(store)
                .lease_ttl(Duration::from_secs(6))
                .build()
                .unwrap(),
        )
        .service(inner);
    let mk = || {
        order("renew")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(mk()));
    settle().await;
    advance(Duration::from_secs(1)).await;
    down.store(true, Ordering::SeqCst);
    advance(Duration::from_secs(6)).await;
    down.store(false, Ordering::SeqCst);
    let second = tokio::spawn(svc.clone().oneshot(mk()));
    settle().await;
    advance(Duration::from_millis(500)).await;
    assert_eq!(
        overlap.load(Ordering::SeqCst),
        0,
        "two handlers ran the key at once"
    );
    advance(Duration::from_secs(40)).await;
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let _ = second.await;
}

/// Scenario: as `a_201_whose_body_fails_does_not_release_the_key`, with a response over the
/// cap (`max_response_body(1000)`), so the layer passes it on as it streams: the client has
/// already received the `201 Created` head and part of the body when the body fails.
///
/// Expected: "Once the handler has answered with a response to store, the request has run,
/// and its key is never released"; here the client was even told 201. (The
/// `max_response_body` docs say such a body error "releases the key, as under the cap": the
/// docs contradict themselves; the crate's rule "when the choice is between running twice and
/// refusing, the crate refuses" says keep it.)
#[tokio::test(start_paused = true)]
async fn an_over_cap_201_whose_body_fails_does_not_release_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async move {
            let s = futures_util::stream::iter([
                Ok::<_, BoxError>(Bytes::from(vec![b'x'; 2000])),
                Err::<Bytes, BoxError>("cursor failed".into()),
            ]);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from_stream(s))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(
            IdempotencyLayer::builder(store())
                .max_response_body(1000)
                .build()
                .unwrap(),
        )
        .service(inner);
    let mk = || {
        order("be2")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(a.status(), StatusCode::CREATED);
    assert!(a.into_body().collect().await.is_err());
    let b = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the client was told 201, and its retry created the order again (answered {})",
        b.status()
    );
}

/// The layer answers its own repeats of a key 409 only while it writes the key's record: a
/// write that gives up (the record's time to live passed with the store still down) lets the
/// key go, and repeats are decided by the store again (503 while it is down).
#[tokio::test(start_paused = true)]
async fn a_background_write_that_gives_up_lets_the_store_decide_again() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = flaky::Flaky {
        inner: store(),
        down: down.clone(),
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let (r2, d2) = (runs.clone(), down.clone());
    let inner = tower::service_fn(move |_req: Request<Body>| {
        r2.fetch_add(1, Ordering::SeqCst);
        d2.store(true, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(201)
                    .body(Body::from("order"))
                    .unwrap(),
            )
        }
    });
    let layer = IdempotencyLayer::builder(store)
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(inner);
    let mk = || {
        order("gives-up")
            .header("authorization", "Bearer alice")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    advance(Duration::from_secs(5)).await;
    let res = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT, "the write is in flight");
    advance(Duration::from_secs(10)).await;
    let res = svc.clone().oneshot(mk()).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the store is asked again once the write gave up"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
