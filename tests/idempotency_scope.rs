//! Idempotency keys are scoped by the caller: one caller's key never reaches another's records.

#[path = "support/tracing_on.rs"]
mod tracing_on;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_bulwark::clock::Clock;
use tower_bulwark::idempotency::{
    Fingerprint, IdempotencyLayer, Lease, MemoryStore, Record, Store, StoreKey,
};
use tower_bulwark::RejectionLayer;

/// A handler that counts its runs, answers `201 run N`, and, for a request with `x-gate`,
/// first waits for a permit of the gate.
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

    fn service(
        &self,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
           + Send
           + 'static {
        let app = self.clone();
        tower::service_fn(move |req: Request<Body>| {
            let app = app.clone();
            async move {
                let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
                if req.headers().contains_key("x-gate") {
                    app.gate.acquire().await.unwrap().forget();
                }
                let res = Response::builder()
                    .status(StatusCode::CREATED)
                    .header("x-run", n.to_string())
                    .body(Body::from(format!("run {n}")))
                    .unwrap();
                Ok::<_, BoxError>(res)
            }
        })
    }
}

fn store() -> MemoryStore {
    MemoryStore::builder()
        .clock(Clock::tokio())
        .build()
        .unwrap()
}

/// A keyed POST with `body`, sent with `authorization` (or none).
fn order(authorization: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders").header("idempotency-key", "\"order-1\"");
    if let Some(a) = authorization {
        b = b.header("authorization", a);
    }
    b.body(Body::from(body)).unwrap()
}

fn replayed(res: &Response<impl http_body::Body>) -> bool {
    res.headers().contains_key("idempotent-replayed")
}

#[tokio::test(start_paused = true)]
async fn the_default_never_replays_one_callers_response_to_another() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(store()))
        .service(app.service());

    let alice = svc
        .clone()
        .oneshot(order(Some("Bearer alice"), "{}"))
        .await
        .unwrap();
    assert_eq!(alice.status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 1);

    // Same key, same body, other credentials: the handler (and its auth check) runs.
    let mallory = svc
        .clone()
        .oneshot(order(Some("Bearer mallory"), "{}"))
        .await
        .unwrap();
    assert!(
        !replayed(&mallory),
        "another caller's response was replayed"
    );
    assert_eq!(mallory.headers()["x-run"], "2");
    // No credentials at all: runs too.
    let anonymous = svc.clone().oneshot(order(None, "{}")).await.unwrap();
    assert!(
        !replayed(&anonymous),
        "a caller's response was replayed to an anonymous request"
    );
    assert_eq!(anonymous.headers()["x-run"], "3");
    assert_eq!(app.runs(), 3);

    // Each caller's own repeat is still a replay of its own response.
    let again = svc
        .clone()
        .oneshot(order(Some("Bearer alice"), "{}"))
        .await
        .unwrap();
    assert!(replayed(&again));
    assert_eq!(again.headers()["x-run"], "1");
    let again = svc.clone().oneshot(order(None, "{}")).await.unwrap();
    assert!(replayed(&again));
    assert_eq!(again.headers()["x-run"], "3");
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_default_tells_no_stranger_that_a_key_is_in_use() {
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(store()))
        .service(app.service());

    // Another payload under the same key from another caller: not 422, it runs.
    let alice = svc
        .clone()
        .oneshot(order(Some("Bearer alice"), "{\"sku\":1}"))
        .await
        .unwrap();
    assert_eq!(alice.status(), StatusCode::CREATED);
    let other = svc
        .clone()
        .oneshot(order(Some("Bearer bob"), "{\"sku\":2}"))
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        StatusCode::CREATED,
        "a stranger learnt the key is in use"
    );
    let none = svc
        .clone()
        .oneshot(order(None, "{\"sku\":3}"))
        .await
        .unwrap();
    assert_eq!(
        none.status(),
        StatusCode::CREATED,
        "a stranger learnt the key is in use"
    );
    assert_eq!(app.runs(), 3);

    // While alice's request is in flight, another caller's is not 409: it runs as well.
    let gated = |auth: &str| {
        Request::post("/orders")
            .header("idempotency-key", "in-flight")
            .header("authorization", auth)
            .header("x-gate", "1")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(gated("Bearer alice")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(app.runs(), 4);
    let second = tokio::spawn(svc.clone().oneshot(gated("Bearer bob")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    app.gate.add_permits(2);
    let second = second.await.unwrap().unwrap();
    assert_eq!(
        second.status(),
        StatusCode::CREATED,
        "a stranger learnt the key is in flight"
    );
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 5);
}

#[tokio::test(start_paused = true)]
async fn unscoped_is_one_key_space_for_every_caller() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .unscoped()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(app.service());
    svc.clone()
        .oneshot(order(Some("Bearer alice"), "{}"))
        .await
        .unwrap();
    let other = svc
        .clone()
        .oneshot(order(Some("Bearer bob"), "{}"))
        .await
        .unwrap();
    assert!(replayed(&other));
    assert_eq!(app.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_scope_function_replaces_the_credential_scope() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .scope(|head: &http::request::Parts| {
            head.headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(app.service());
    let as_tenant = |tenant: &str, auth: &str| {
        Request::post("/orders")
            .header("idempotency-key", "k")
            .header("x-tenant", tenant)
            .header("authorization", auth)
            .body(Body::from("{}"))
            .unwrap()
    };
    svc.clone()
        .oneshot(as_tenant("acme", "Bearer one"))
        .await
        .unwrap();
    // The same tenant with a refreshed token: the function alone decides, so it replays.
    let same_tenant = svc
        .clone()
        .oneshot(as_tenant("acme", "Bearer two"))
        .await
        .unwrap();
    assert!(replayed(&same_tenant));
    let other_tenant = svc
        .clone()
        .oneshot(as_tenant("globex", "Bearer one"))
        .await
        .unwrap();
    assert!(!replayed(&other_tenant));
    assert_eq!(app.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn cookie_scope_follows_the_named_cookie_and_ignores_the_others() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .scope_by_cookie("session")
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(app.service());
    let with_cookies = |cookies: &str| {
        Request::post("/orders")
            .header("idempotency-key", "k")
            .header("cookie", cookies)
            .body(Body::from("{}"))
            .unwrap()
    };
    svc.clone()
        .oneshot(with_cookies("session=s1; _ga=1"))
        .await
        .unwrap();
    // A retry whose unrelated cookies changed is the same caller.
    let retry = svc
        .clone()
        .oneshot(with_cookies("_ga=2; session=s1"))
        .await
        .unwrap();
    assert!(replayed(&retry));
    let other = svc
        .clone()
        .oneshot(with_cookies("session=s2; _ga=1"))
        .await
        .unwrap();
    assert!(!replayed(&other));
    let none = svc.clone().oneshot(with_cookies("_ga=1")).await.unwrap();
    assert!(!replayed(&none));
    assert_eq!(app.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn header_scope_tells_api_key_callers_apart() {
    let app = App::new();
    let layer = IdempotencyLayer::builder(store())
        .scope_by_header("x-api-key")
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(layer)
        .service(app.service());
    let with_key = |api_key: &str| {
        Request::post("/orders")
            .header("idempotency-key", "k")
            .header("x-api-key", api_key)
            .body(Body::from("{}"))
            .unwrap()
    };
    let alice = svc.clone().oneshot(with_key("alice")).await.unwrap();
    assert_eq!(alice.status(), StatusCode::CREATED);
    let retry = svc.clone().oneshot(with_key("alice")).await.unwrap();
    assert!(replayed(&retry), "the same API key is the same caller");
    let mallory = svc.clone().oneshot(with_key("mallory")).await.unwrap();
    assert!(!replayed(&mallory), "another API key is another caller");
    // Combined with `Authorization`: other credentials with the same API key are another caller.
    let mut other = with_key("alice");
    other
        .headers_mut()
        .insert("authorization", "Bearer x".parse().unwrap());
    let other = svc.clone().oneshot(other).await.unwrap();
    assert!(!replayed(&other));
    assert_eq!(app.runs(), 3);
    assert_eq!(handle.stats().anonymous, 0, "every request had credentials");
}

#[test]
fn an_invalid_scope_header_is_refused_at_build() {
    let err = IdempotencyLayer::builder(MemoryStore::default())
        .scope_by_header("not a header")
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        tower_bulwark::idempotency::ConfigError::InvalidHeaderName("scope_by_header")
    );
}

/// Collects what a `tracing` subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn requests_without_credentials_are_counted_and_warned_about_once() {
    // Other tests of this binary set and drop subscribers on their threads: keep every
    // callsite enabled process-wide, so this thread's subscriber sees its events.
    tracing_on::tracing_always_on();
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let app = App::new();
            let layer = IdempotencyLayer::new(store());
            let handle = layer.handle();
            let svc = ServiceBuilder::new()
                .layer(RejectionLayer::http())
                .layer(layer)
                .service(app.service());
            for body in ["{\"a\":1}", "{\"a\":1}", "{\"a\":1}"] {
                svc.clone().oneshot(order(None, body)).await.unwrap();
            }
            svc.clone()
                .oneshot(order(Some("Bearer a"), "{}"))
                .await
                .unwrap();
            // Unkeyed requests are none of the layer's business.
            svc.clone()
                .oneshot(Request::post("/orders").body(Body::from("{}")).unwrap())
                .await
                .unwrap();
            assert_eq!(handle.stats().anonymous, 3);

            // A scope function or `unscoped` is the user's choice: not counted.
            for layer in [
                IdempotencyLayer::builder(store())
                    .unscoped()
                    .build()
                    .unwrap(),
                IdempotencyLayer::builder(store())
                    .scope(|_: &http::request::Parts| "tenant")
                    .build()
                    .unwrap(),
            ] {
                let handle = layer.handle();
                let svc = ServiceBuilder::new()
                    .layer(RejectionLayer::http())
                    .layer(layer)
                    .service(app.service());
                svc.oneshot(order(None, "{}")).await.unwrap();
                assert_eq!(handle.stats().anonymous, 0);
            }
        })
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("anonymous idempotency key space").count(),
        1,
        "warned once per layer: {text}"
    );
    for fix in [".scope(...)", ".scope_by_header(...)", ".unscoped()"] {
        assert!(text.contains(fix), "the warning names {fix}: {text}");
    }
}

/// A [`MemoryStore`] that keeps a copy of every key it is asked to claim.
#[derive(Clone)]
struct Spy {
    inner: MemoryStore,
    keys: Arc<Mutex<Vec<StoreKey>>>,
}

impl Store for Spy {
    type ClaimFuture = <MemoryStore as Store>::ClaimFuture;
    type CompleteFuture = <MemoryStore as Store>::CompleteFuture;
    type RenewFuture = <MemoryStore as Store>::RenewFuture;
    type ReleaseFuture = <MemoryStore as Store>::ReleaseFuture;
    type GetFuture = <MemoryStore as Store>::GetFuture;

    fn claim(&self, key: &StoreKey, fp: Fingerprint, lease_ttl: Duration) -> Self::ClaimFuture {
        self.keys.lock().unwrap().push(key.clone());
        self.inner.claim(key, fp, lease_ttl)
    }

    fn complete(&self, lease: &Lease, record: Record, ttl: Duration) -> Self::CompleteFuture {
        self.inner.complete(lease, record, ttl)
    }

    fn renew(&self, lease: &Lease, lease_ttl: Duration) -> Self::RenewFuture {
        self.inner.renew(lease, lease_ttl)
    }

    fn release(&self, lease: &Lease) -> Self::ReleaseFuture {
        self.inner.release(lease)
    }

    fn get(&self, key: &StoreKey) -> Self::GetFuture {
        self.inner.get(key)
    }

    fn release_detached(&self, lease: Lease, until: tokio::time::Instant) {
        self.inner.release_detached(lease, until)
    }
}

#[tokio::test(start_paused = true)]
async fn the_store_sees_a_digest_of_the_credentials_never_the_credentials() {
    let spy = Spy {
        inner: store(),
        keys: Arc::default(),
    };
    let app = App::new();
    let svc = ServiceBuilder::new()
        .layer(RejectionLayer::http())
        .layer(IdempotencyLayer::new(spy.clone()))
        .service(app.service());
    let secret = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0";
    svc.clone()
        .oneshot(order(Some(secret), "{}"))
        .await
        .unwrap();
    let keys = spy.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key.key(), b"order-1");
    assert_eq!(key.scope().len(), 20, "a SHA-1 digest");
    let encoded = key.encoded();
    for part in ["eyJhbGciOiJIUzI1NiJ9", "c2VjcmV0", "Bearer"] {
        assert!(
            !encoded.windows(part.len()).any(|w| w == part.as_bytes()),
            "the store key holds {part:?} in clear"
        );
    }
    assert!(!format!("{key:?}").contains("eyJ"));
}
