//! A request body that can be sent again: bytes are kept, up to a cap, as they stream.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{Extensions, HeaderMap, Method, Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tower::BoxError;

/// The body an inner service receives from [`HttpReplay`](super::HttpReplay): the original
/// body on the first attempt (its bytes kept as they stream, up to the cap), the kept bytes
/// (then whatever of the original was not read yet) on a retry.
///
/// A request that cannot be retried carries its body through untouched; a request with an
/// empty body keeps nothing. The first attempt streams: no byte waits for the whole body.
///
/// For a tonic `Channel`, which takes `tonic::body::Body`, map it below the retry layer:
/// `.map_request(|r: http::Request<ReplayBody<tonic::body::Body>>| r.map(tonic::body::Body::new))`.
///
/// # Errors
///
/// The original body's errors, boxed. A retry whose body is still held by a previous
/// attempt's body is not made, so a replay never races its predecessor.
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// Sent once: the original body, untouched.
    Once(B),
    /// Nothing to send.
    Empty,
    /// Recorded (first attempt) or replayed (later attempts).
    Shared {
        shared: Slot<B>,
        /// The recording while this body is polled; given back on drop. Boxed, as in
        /// `shared`: it moves between the two as a pointer, and every request carries this
        /// body inline.
        state: Option<Box<Recorded<B>>>,
        /// Chunks of the recording already sent by this body.
        pos: usize,
        trailers_sent: bool,
        /// The size known when this body was made, for before it first polls.
        hint: SizeHint,
    },
}

/// Where a recording rests between attempts (`None` while a body holds it).
type Slot<B> = Arc<Mutex<Option<Box<Recorded<B>>>>>;

struct Recorded<B> {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    /// The original body while it has more to give.
    rest: Option<B>,
    /// Boxed: few bodies have trailers, and every body carries this state inline.
    trailers: Option<Box<HeaderMap>>,
    /// The body outgrew the limit or failed: it cannot be sent again.
    spoiled: bool,
}

/// The kept body of a request; see [`HttpSaved`].
pub struct SavedBody<B> {
    shared: Option<Slot<B>>,
}

/// An HTTP request kept for another attempt by [`HttpReplay`](super::HttpReplay): its head
/// and its recorded body.
pub struct HttpSaved<B> {
    pub(crate) head: Head,
    pub(crate) body: SavedBody<B>,
    /// Whether the request may be sent again after an error (see
    /// [`Replay::may_retry_error`](super::Replay::may_retry_error)).
    pub(crate) errors_safe: bool,
    /// Whether the request may be sent again after a response that may follow a run of it
    /// (see [`Replay::may_retry_response`](super::Replay::may_retry_response)).
    pub(crate) responses_safe: bool,
}

impl<B> fmt::Debug for HttpSaved<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSaved")
            .field("method", &self.head.method)
            .field("uri", &self.head.uri)
            .finish_non_exhaustive()
    }
}

/// A copy of a request's head (method, URI, version, headers, extensions), kept for another
/// attempt.
#[derive(Clone)]
pub(crate) struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    /// `None` for an empty map: nothing to make or drop.
    headers: Option<HeaderMap>,
    extensions: Extensions,
}

impl Head {
    /// Copies `parts`. An empty header map or set of extensions is made anew rather than
    /// cloned: cheaper, and common for requests that a client builds (hyper adds `Host` and
    /// the framing headers itself, below any layer).
    #[inline]
    pub(crate) fn copy_of(parts: &Parts) -> Head {
        Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: if parts.headers.is_empty() {
                None
            } else {
                Some(parts.headers.clone())
            },
            extensions: if parts.extensions.is_empty() {
                Extensions::new()
            } else {
                parts.extensions.clone()
            },
        }
    }

    /// A header of the kept request.
    pub(crate) fn header(&self, name: &http::HeaderName) -> Option<&http::HeaderValue> {
        self.headers.as_ref()?.get(name)
    }

    /// A request with this head and `body`.
    pub(crate) fn into_request<B>(self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        if let Some(headers) = self.headers {
            *req.headers_mut() = headers;
        }
        *req.extensions_mut() = self.extensions;
        req
    }
}

impl<B> ReplayBody<B> {
    pub(crate) fn once(body: B) -> Self {
        ReplayBody {
            kind: Kind::Once(body),
        }
    }

    pub(crate) fn empty() -> Self {
        ReplayBody { kind: Kind::Empty }
    }

    /// The first attempt's body, recording into the returned [`SavedBody`].
    #[inline]
    pub(crate) fn record(body: B, limit: usize) -> (Self, SavedBody<B>)
    where
        B: Body,
    {
        if body.is_end_stream() {
            return (ReplayBody::empty(), SavedBody { shared: None });
        }
        let shared = Arc::new(Mutex::new(None));
        let state = Box::new(Recorded {
            chunks: Vec::new(),
            len: 0,
            limit,
            rest: Some(body),
            trailers: None,
            spoiled: false,
        });
        (
            ReplayBody {
                kind: Kind::Shared {
                    shared: shared.clone(),
                    state: Some(state),
                    pos: 0,
                    trailers_sent: false,
                    hint: SizeHint::new(),
                },
            },
            SavedBody {
                shared: Some(shared),
            },
        )
    }
}

impl<B> SavedBody<B> {
    /// Whether the body can be sent again: not over the limit, not failed, and not held by a
    /// body still alive.
    pub(crate) fn can_replay(&self) -> bool {
        match &self.shared {
            None => true,
            Some(shared) => matches!(
                &*shared.lock().unwrap_or_else(PoisonError::into_inner),
                Some(r) if !r.spoiled
            ),
        }
    }

    pub(crate) fn replay(&self) -> ReplayBody<B>
    where
        B: Body,
    {
        match &self.shared {
            None => ReplayBody::empty(),
            Some(shared) => {
                // The whole body's size, so that a retry is framed as the first attempt was
                // (a known length rather than chunks).
                let hint = match &*shared.lock().unwrap_or_else(PoisonError::into_inner) {
                    Some(rec) => rec.size_hint_from(0),
                    None => SizeHint::new(),
                };
                ReplayBody {
                    kind: Kind::Shared {
                        shared: shared.clone(),
                        state: None,
                        pos: 0,
                        trailers_sent: false,
                        hint,
                    },
                }
            }
        }
    }
}

impl<B: Body> Recorded<B> {
    /// The size still to send for a body that has sent `pos` chunks of the recording.
    fn size_hint_from(&self, pos: usize) -> SizeHint {
        let kept: u64 = self.chunks[pos.min(self.chunks.len())..]
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0));
        let mut h = SizeHint::new();
        h.set_lower(kept + rest.lower());
        if let Some(u) = rest.upper() {
            h.set_upper(kept + u);
        }
        h
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Kind::Shared { shared, state, .. } = &mut self.kind {
            if let Some(state) = state.take() {
                *shared.lock().unwrap_or_else(PoisonError::into_inner) = Some(state);
            }
        }
    }
}

fn not_kept() -> BoxError {
    "request body was not kept in full and cannot be sent again".into()
}

fn in_use() -> BoxError {
    "request body is still held by a previous attempt".into()
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Once(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(
                    frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                ))),
            },
            Kind::Shared {
                shared,
                state,
                pos,
                trailers_sent,
                ..
            } => {
                if state.is_none() {
                    let mut slot = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    if slot.as_ref().is_some_and(|r| r.spoiled) {
                        // Kept only in part: sending it would truncate the body.
                        return Poll::Ready(Some(Err(not_kept())));
                    }
                    *state = slot.take();
                }
                let Some(rec) = state.as_mut() else {
                    return Poll::Ready(Some(Err(in_use())));
                };
                if *pos < rec.chunks.len() {
                    let chunk = rec.chunks[*pos].clone();
                    *pos += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(rest) = rec.rest.as_mut() {
                    return match Pin::new(rest).poll_frame(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(None) => {
                            rec.rest = None;
                            Poll::Ready(None)
                        }
                        Poll::Ready(Some(Err(e))) => {
                            rec.spoiled = true;
                            rec.rest = None;
                            Poll::Ready(Some(Err(e.into())))
                        }
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(mut data) => {
                                let data = data.copy_to_bytes(data.remaining());
                                if !rec.spoiled {
                                    if rec.len + data.len() > rec.limit {
                                        // Over the cap: stop keeping; this attempt is the last.
                                        rec.spoiled = true;
                                        rec.chunks = Vec::new();
                                    } else {
                                        rec.len += data.len();
                                        rec.chunks.push(data.clone());
                                        *pos = rec.chunks.len();
                                    }
                                }
                                Poll::Ready(Some(Ok(Frame::data(data))))
                            }
                            Err(frame) => match frame.into_trailers() {
                                Ok(trailers) => {
                                    rec.trailers = Some(Box::new(trailers.clone()));
                                    rec.rest = None;
                                    *trailers_sent = true;
                                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                                }
                                // A frame of a kind unknown to this version: pass nothing on.
                                Err(_) => Poll::Ready(None),
                            },
                        },
                    };
                }
                match (&rec.trailers, *trailers_sent) {
                    (Some(t), false) => {
                        *trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::clone(t)))))
                    }
                    _ => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Once(b) => b.is_end_stream(),
            Kind::Shared {
                state: Some(rec),
                pos,
                trailers_sent,
                ..
            } => {
                *pos >= rec.chunks.len()
                    && rec.rest.as_ref().is_none_or(|b| b.is_end_stream())
                    && (rec.trailers.is_none() || *trailers_sent)
            }
            Kind::Shared { hint, .. } => hint.exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Once(b) => b.size_hint(),
            Kind::Shared {
                state: Some(rec),
                pos,
                ..
            } => rec.size_hint_from(*pos),
            Kind::Shared { hint, .. } => *hint,
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Once(_) => "once",
            Kind::Empty => "empty",
            Kind::Shared { .. } => "replayable",
        };
        f.debug_struct("ReplayBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B> fmt::Debug for SavedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedBody")
            .field("replayable", &self.can_replay())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn stream(chunks: &[&'static str]) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn streams_then_replays() {
        let (body, saved) = ReplayBody::record(stream(&["ab", "cd", "ef"]), 64);
        let first = body.collect().await.unwrap().to_bytes();
        assert_eq!(first, "abcdef");
        assert!(saved.can_replay());
        for _ in 0..3 {
            let again = saved.replay().collect().await.unwrap().to_bytes();
            assert_eq!(again, "abcdef");
        }
    }

    #[tokio::test]
    async fn a_replay_knows_its_size_before_it_polls() {
        let (body, saved) = ReplayBody::record(Full::new(Bytes::from_static(b"hello")), 64);
        assert_eq!(body.size_hint().exact(), Some(5));
        let _ = body.collect().await.unwrap();
        let replay = saved.replay();
        assert_eq!(replay.size_hint().exact(), Some(5));
        assert!(!replay.is_end_stream());
        assert_eq!(replay.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn a_partly_read_body_is_finished_by_the_replay() {
        let (mut body, saved) = ReplayBody::record(stream(&["ab", "cd", "ef"]), 64);
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(body);
        let again = saved.replay().collect().await.unwrap().to_bytes();
        assert_eq!(again, "abcdef");
        let third = saved.replay().collect().await.unwrap().to_bytes();
        assert_eq!(third, "abcdef");
    }

    #[tokio::test]
    async fn over_the_limit_is_sent_once() {
        let (body, saved) = ReplayBody::record(stream(&["abcd", "efgh", "ij"]), 6);
        let first = body.collect().await.unwrap().to_bytes();
        assert_eq!(first, "abcdefghij", "the first attempt gets every byte");
        assert!(!saved.can_replay());
    }

    #[tokio::test]
    async fn a_live_body_blocks_the_replay() {
        let (body, saved) = ReplayBody::record(Full::new(Bytes::from_static(b"xyz")), 64);
        let mut body = body;
        let _ = body.frame().await;
        assert!(
            !saved.can_replay(),
            "the first body still holds the recording"
        );
        let mut replay = saved.replay();
        assert!(replay.frame().await.unwrap().is_err());
        drop(replay);
        drop(body);
        assert!(saved.can_replay());
        let again = saved.replay().collect().await.unwrap().to_bytes();
        assert_eq!(again, "xyz");
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hi"))),
            Ok(Frame::trailers(t.clone())),
        ];
        let (body, saved) =
            ReplayBody::record(StreamBody::new(futures_util::stream::iter(frames)), 64);
        let c = body.collect().await.unwrap();
        assert_eq!(c.trailers(), Some(&t));
        let c = saved.replay().collect().await.unwrap();
        assert_eq!(c.trailers(), Some(&t));
        assert_eq!(c.to_bytes(), "hi");
    }

    fn head_of(req: &Request<()>) -> Request<()> {
        let (parts, ()) = Request::new(()).into_parts();
        let mut parts = parts;
        parts.method = req.method().clone();
        parts.uri = req.uri().clone();
        parts.version = req.version();
        parts.headers = req.headers().clone();
        parts.extensions = req.extensions().clone();
        Head::copy_of(&parts).into_request(())
    }

    #[test]
    fn a_head_is_sent_again_whole() {
        #[derive(Clone, Debug, PartialEq)]
        struct Tag(u32);
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri("https://example.com:8443/a/b?c=d")
            .version(Version::HTTP_2)
            .header("x-one", "1")
            .header("x-many", "a")
            .header("x-many", "b")
            .body(())
            .unwrap();
        req.extensions_mut().insert(Tag(7));
        let again = head_of(&req);
        assert_eq!(again.method(), Method::PUT);
        assert_eq!(again.uri(), req.uri());
        assert_eq!(again.version(), Version::HTTP_2);
        assert_eq!(again.headers(), req.headers());
        assert_eq!(
            again.headers().get_all("x-many").iter().count(),
            2,
            "repeated headers are kept"
        );
        assert_eq!(again.extensions().get::<Tag>(), Some(&Tag(7)));

        // An empty head (no headers, no extensions) comes back empty, not as defaults.
        let bare = Request::builder()
            .method(Method::DELETE)
            .uri("/x")
            .body(())
            .unwrap();
        let again = head_of(&bare);
        assert_eq!(again.method(), Method::DELETE);
        assert_eq!(again.uri(), "/x");
        assert!(again.headers().is_empty());
        assert!(again.extensions().is_empty());
    }

    #[tokio::test]
    async fn empty_and_once() {
        let (body, saved) = ReplayBody::record(Full::new(Bytes::new()), 64);
        assert!(body.is_end_stream());
        assert!(saved.can_replay());
        assert!(saved.replay().is_end_stream());
        let once = ReplayBody::once(Full::new(Bytes::from_static(b"q")));
        assert_eq!(once.size_hint().exact(), Some(1));
        assert_eq!(once.collect().await.unwrap().to_bytes(), "q");
    }
}
