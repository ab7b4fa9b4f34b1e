//! [`ReplayBody`]: the response body of the idempotency layer.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use super::budget::Reservation;

pin_project! {
    /// The body of a response from the idempotency layer: the inner service's body as it
    /// streams, a buffered body (with its trailers) for a first run or a replay, or the part
    /// of a too-large body already read followed by the rest.
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // Boxed, as the prefix below: a first run or a replay allocates anyway, and every
        // response that passes through carries this body inline (and moves it up the stack).
        Buffered { buf: Box<Buffered> },
        Prefixed {
            prefix: Option<Box<Prefix>>,
            // Decides, when the body ends, what becomes of the key of a response too large
            // to keep (see `Settle`).
            settle: Option<Box<dyn Settle>>,
            #[pin]
            body: B,
        },
    }
}

/// What becomes of the key of a response handed on as it streams (a body that was not ready
/// at once, or one past the layer's cap), decided by how its body ends: a copy of the body
/// kept under the cap is recorded at its end; a gRPC failure (a failing status in its
/// trailers, or no status at all) releases the key so the client can retry; a body past the
/// cap that ends well, a body that fails (the handler had answered: it ran), or one dropped
/// before its end, records the key as completed with a response not kept (dropping the
/// `Settle` does that).
pub(crate) trait Settle: Send + Sync {
    /// A data frame passed on.
    fn data(&mut self, data: &Bytes);
    /// The body's trailers arrived.
    fn trailers(&mut self, trailers: &HeaderMap);
    /// The body ended (not with an error): after its trailers, or its last frame.
    fn ended(&mut self);
}

/// A whole body, with its trailers.
struct Buffered {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    /// The layer's buffer reservation for `data`, given back once it is handed on.
    held: Reservation,
}

/// The part of a too-large body already read.
struct Prefix {
    data: Bytes,
    held: Reservation,
}

impl<B> ReplayBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ReplayBody {
            kind: Kind::Inner { body },
        }
    }

    #[cfg(test)]
    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ReplayBody::buffered_held(data, trailers, Reservation::default())
    }

    /// A buffered body that holds `held` of the layer's buffer budget until its data is
    /// handed on or it is dropped.
    pub(crate) fn buffered_held(
        data: Bytes,
        trailers: Option<HeaderMap>,
        mut held: Reservation,
    ) -> Self {
        if data.is_empty() {
            held.release();
        }
        ReplayBody {
            kind: Kind::Buffered {
                buf: Box::new(Buffered {
                    data: (!data.is_empty()).then_some(data),
                    trailers,
                    held,
                }),
            },
        }
    }

    pub(crate) fn prefixed(prefix: Bytes, body: B, held: Reservation) -> Self {
        ReplayBody {
            kind: Kind::Prefixed {
                prefix: (!prefix.is_empty()).then(|| Box::new(Prefix { data: prefix, held })),
                settle: None,
                body,
            },
        }
    }

    /// Leaves to `settle` what becomes of the key, once the rest of a prefixed body ends.
    pub(crate) fn settle_with(&mut self, settle: Box<dyn Settle>) {
        if let Kind::Prefixed { settle: s, .. } = &mut self.kind {
            *s = Some(settle);
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("ReplayBody::Inner"),
            Kind::Buffered { buf } => f
                .debug_struct("ReplayBody::Buffered")
                .field("len", &buf.data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &buf.trailers.is_some())
                .finish(),
            Kind::Prefixed { prefix, .. } => f
                .debug_struct("ReplayBody::Prefixed")
                .field("prefix_len", &prefix.as_ref().map_or(0, |p| p.data.len()))
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Buffered { buf } => {
                if let Some(d) = buf.data.take() {
                    buf.held.release();
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(buf.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Prefixed {
                prefix,
                settle,
                mut body,
            } => {
                if let Some(p) = prefix.take() {
                    let Prefix { data, held } = *p;
                    drop(held);
                    if body.is_end_stream() {
                        // The client may not poll a body that says it has ended.
                        if let Some(mut s) = settle.take() {
                            s.ended();
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                let polled = body.as_mut().poll_frame(cx).map_err(Into::into);
                if let Some(s) = settle.as_mut() {
                    match &polled {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(d) = frame.data_ref() {
                                s.data(d);
                            }
                            // Trailers are the last frame; and a client may not poll a body
                            // that says it has ended: either is its end.
                            if let Some(t) = frame.trailers_ref() {
                                s.trailers(t);
                                s.ended();
                                *settle = None;
                            } else if body.is_end_stream() {
                                s.ended();
                                *settle = None;
                            }
                        }
                        // An error: the handler ran; dropping the settlement records the
                        // key.
                        Poll::Ready(Some(Err(_))) => *settle = None,
                        // The end: dropping the settlement records the key, unless the end
                        // says the call failed.
                        Poll::Ready(None) => {
                            s.ended();
                            *settle = None;
                        }
                        Poll::Pending => {}
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Buffered { buf } => buf.data.is_none() && buf.trailers.is_none(),
            Kind::Prefixed { prefix, body, .. } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Buffered { buf } => {
                let len = buf.data.as_ref().map_or(0, |d| d.len() as u64);
                if buf.trailers.is_some() {
                    // Not exact: HTTP/1.1 would send a body of exact size with
                    // `Content-Length`, and with it no trailers. A chunked body carries them.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            Kind::Prefixed { prefix, body, .. } => {
                let p = prefix.as_ref().map_or(0, |d| d.data.len() as u64);
                let h = body.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower().saturating_add(p));
                if let Some(u) = h.upper() {
                    out.set_upper(u.saturating_add(p));
                }
                out
            }
        }
    }
}

/// Collects body chunks; a single chunk is kept as it is, without a copy.
#[derive(Default)]
pub(crate) struct BodyBuf {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
    len: usize,
}

impl BodyBuf {
    pub(crate) fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if let Some(m) = &mut self.rest {
            m.extend_from_slice(&b);
        } else if let Some(f) = self.first.take() {
            let mut m = BytesMut::with_capacity(self.len.max(2 * f.len()));
            m.extend_from_slice(&f);
            m.extend_from_slice(&b);
            self.rest = Some(m);
        } else {
            self.first = Some(b);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn take(&mut self) -> Bytes {
        self.len = 0;
        match (self.first.take(), self.rest.take()) {
            (Some(f), _) => f,
            (None, Some(m)) => m.freeze(),
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn body_buf_concatenates(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8)) {
            let mut buf = BodyBuf::default();
            let mut want = Vec::new();
            for c in &chunks {
                buf.push(Bytes::from(c.clone()));
                want.extend_from_slice(c);
            }
            prop_assert_eq!(buf.len(), want.len());
            prop_assert_eq!(buf.take(), Bytes::from(want));
            prop_assert_eq!(buf.len(), 0);
        }
    }

    #[tokio::test]
    async fn buffered_yields_data_then_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let body: ReplayBody<Full<Bytes>> =
            ReplayBody::buffered(Bytes::from_static(b"abc"), Some(t.clone()));
        // With trailers the size is not given as exact (HTTP/1.1 would drop them).
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 3);
        let plain: ReplayBody<Full<Bytes>> = ReplayBody::buffered(Bytes::from_static(b"abc"), None);
        assert_eq!(plain.size_hint().exact(), Some(3));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&t));
        assert_eq!(collected.to_bytes(), "abc");
    }

    #[tokio::test]
    async fn prefixed_yields_prefix_then_rest() {
        let body = ReplayBody::prefixed(
            Bytes::from_static(b"head-"),
            Full::new(Bytes::from_static(b"tail")),
            Reservation::default(),
        );
        assert_eq!(body.size_hint().exact(), Some(9));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "head-tail");
    }
}
