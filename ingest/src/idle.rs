//! Idle connections: an I/O wrapper that notes when a connection last moved bytes, and a
//! count of its requests in progress, so that the accept loop can close a connection
//! idle for longer than `--idle-timeout-secs`, whatever holds it: an HTTP/1 keep-alive
//! between requests, an HTTP/2 connection without streams, a preface that stopped
//! half-way. A streamed answer is in progress only while it waits for its next chunk
//! ([`WhileWaiting`]).
//!
//! On HTTP/1 a connection is idle with no request in progress and no byte either way (a
//! request's head is bounded by hyper's header timeout). On HTTP/2 (it starts with the
//! preface) no byte counts: bytes read may be PINGs, SETTINGS or WINDOW_UPDATEs that a
//! peer can send for ever without asking anything (a request whose headers never end is
//! not in progress either), and bytes written may be the server's acknowledgements of
//! them. What counts there is requests, and answers that the client takes: an answer's
//! body ([`Sending`]) is handed out in pieces, and each piece taken counts (h2 asks for
//! the next only once the client's window has room), so a slow reader of a large answer
//! keeps its connection and a client that stopped reading does not.
//!
//! It owns only the bookkeeping; it must not read requests or decide answers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{Body, BodyError};

/// What a connection is doing: when it last moved bytes, and its requests in progress.
#[derive(Debug)]
pub(crate) struct Activity {
    started: Instant,
    /// Milliseconds from `started` to the last byte read or written.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::SeqCst);
    }

    /// How long the connection has been idle at `now` (from `started`): `None` while a
    /// request is in progress.
    pub(crate) fn idle_at(&self, now: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last.load(Ordering::SeqCst));
        Some(now.saturating_sub(last))
    }

    /// Marks a request in progress until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InProgress {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InProgress(Arc::clone(self))
    }

    /// Returns once the connection has been idle for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        let check = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            tokio::time::sleep(check).await;
            if self
                .idle_at(self.started.elapsed())
                .is_some_and(|idle| idle >= limit)
            {
                return;
            }
        }
    }
}

/// A request in progress on a connection.
#[derive(Debug)]
pub(crate) struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's stream, noting each byte read or written in its [`Activity`] until it
/// turns out to be HTTP/2.
#[derive(Debug)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// How many of the connection's first bytes matched the HTTP/2 preface (until one
    /// did not: `None`, HTTP/1).
    preface: Option<usize>,
    http2: bool,
}

/// How an HTTP/2 connection starts: its preface, as hyper tells the protocols apart.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        activity.touch();
        Self {
            inner,
            activity,
            preface: Some(0),
            http2: false,
        }
    }

    /// Notes bytes read (`data`): activity, unless the connection is HTTP/2.
    fn read(&mut self, data: &[u8]) {
        if let Some(matched) = self.preface
            && !self.http2
        {
            let rest = &HTTP2_PREFACE[matched..];
            let take = data.len().min(rest.len());
            if data[..take] == rest[..take] {
                self.preface = Some(matched + take);
                self.http2 = matched + take == HTTP2_PREFACE.len();
            } else {
                self.preface = None;
            }
        }
        if !self.http2 {
            self.activity.touch();
        }
    }

    /// Notes bytes written: activity, unless the connection is HTTP/2.
    fn wrote(&self) {
        if !self.http2 {
            self.activity.touch();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A streamed answer's body that counts as a request in progress only while it waits for
/// its next chunk (the query is working), not while the client is slow to take what was
/// sent: a client that stops reading leaves the connection idle, and loses it after
/// `--idle-timeout-secs` (a body that is not polled never reaches its own limits).
pub(crate) struct WhileWaiting {
    body: Body,
    activity: Arc<Activity>,
    waiting: Option<InProgress>,
}

impl std::fmt::Debug for WhileWaiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhileWaiting")
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl WhileWaiting {
    pub(crate) fn new(body: Body, activity: Arc<Activity>) -> Self {
        Self {
            body,
            activity,
            waiting: None,
        }
    }
}

impl hyper::body::Body for WhileWaiting {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if this.waiting.is_none() {
                this.waiting = Some(this.activity.begin());
            }
        } else {
            this.waiting = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body on HTTP/2, handed out in pieces of at most [`PIECE`] bytes, each one
/// counted as activity when h2 takes it: h2 asks for the next piece only once the client's
/// window has room for more, so the count follows what the client actually takes (a
/// whole answer handed over at once would sit in h2's buffer while the connection looked
/// idle, and one the client does not take counts nothing).
pub(crate) struct Sending {
    body: Body,
    /// The rest of a data frame larger than a piece.
    rest: bytes::Bytes,
    activity: Arc<Activity>,
}

/// The largest piece of an answer handed to h2 at once (its default frame size).
pub(crate) const PIECE: usize = 16 * 1024;

impl std::fmt::Debug for Sending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending")
            .field("rest", &self.rest.len())
            .finish_non_exhaustive()
    }
}

impl Sending {
    pub(crate) fn new(body: Body, activity: Arc<Activity>) -> Self {
        Self {
            body,
            rest: bytes::Bytes::new(),
            activity,
        }
    }

    fn piece(&mut self) -> hyper::body::Frame<bytes::Bytes> {
        let piece = self.rest.split_to(self.rest.len().min(PIECE));
        self.activity.touch();
        hyper::body::Frame::data(piece)
    }
}

impl hyper::body::Body for Sending {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(this.piece())));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    this.rest = data;
                    Poll::Ready(Some(Ok(this.piece())))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_without_requests_in_progress() {
        let activity = Activity::new();
        let later = Duration::from_secs(100);
        assert!(
            activity
                .idle_at(later)
                .is_some_and(|idle| idle >= Duration::from_secs(99))
        );
        let request = activity.begin();
        assert_eq!(activity.idle_at(later), None, "a request in progress");
        drop(request);
        let idle = activity.idle_at(activity.started.elapsed()).unwrap();
        assert!(
            idle < Duration::from_secs(1),
            "the end of a request is activity"
        );
    }

    /// An HTTP/2 answer is handed out in pieces, each taken one counted as activity, and
    /// it reads back whole with its length.
    #[tokio::test]
    async fn an_answer_is_handed_out_in_pieces_each_one_activity() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let whole = bytes::Bytes::from(vec![7u8; 2 * PIECE + 5]);
        let body = http_body_util::Full::new(whole.clone())
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut sending = Sending::new(body, Arc::clone(&activity));
        assert_eq!(
            hyper::body::Body::size_hint(&sending).exact(),
            Some(whole.len() as u64)
        );
        let mut sizes = Vec::new();
        let mut read = Vec::new();
        while let Some(frame) = sending.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            sizes.push(data.len());
            read.extend_from_slice(&data);
            let idle = activity.idle_at(activity.started.elapsed()).unwrap();
            assert!(idle < Duration::from_secs(1), "a piece taken is activity");
        }
        assert_eq!(sizes, vec![PIECE, PIECE, 5]);
        assert_eq!(read, whole);
    }

    #[tokio::test]
    async fn a_streamed_answer_is_in_progress_only_while_it_waits_for_its_source() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let (sender, chunks) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, BodyError>>(1);
        let chunks = futures_util::stream::unfold(chunks, |mut chunks| async move {
            chunks.recv().await.map(|chunk| (chunk, chunks))
        });
        let mut body = WhileWaiting::new(crate::body::streamed(chunks), Arc::clone(&activity));
        let now = || activity.started.elapsed();
        // Not polled (a client that stopped reading): idle.
        assert!(activity.idle_at(now()).is_some());
        // Polled while its source has nothing yet: in progress.
        let waiting = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(waiting.is_err());
        assert!(activity.idle_at(now()).is_none());
        // A chunk came: no longer waiting.
        sender
            .send(Ok(bytes::Bytes::from_static(b"x")))
            .await
            .unwrap();
        assert!(body.frame().await.is_some());
        assert!(activity.idle_at(now()).is_some());
    }
}
