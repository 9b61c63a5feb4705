//! Idle connections: an I/O wrapper that notes when a connection last moved bytes, and a
//! count of its requests in progress, so that the accept loop can close a connection
//! idle for longer than `--idle-timeout-secs`, whatever holds it: an HTTP/1 keep-alive
//! between requests, an HTTP/2 connection without streams, a preface that stopped
//! half-way. A streamed answer is in progress only while it waits for its next chunk
//! ([`WhileWaiting`]).
//!
//! On HTTP/1 a connection is idle with no request in progress and no byte either way (a
//! request's head is bounded by hyper's header timeout). On HTTP/2 (it starts with the
//! preface) only requests and answers count: bytes read may be PINGs, SETTINGS or
//! WINDOW_UPDATEs that a peer can send for ever without asking anything (a request whose
//! headers never end is not in progress either), and bytes written count only while an
//! answer's body is being sent ([`Sending`]), not the server's acknowledgements.
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
    /// Answers whose body is being sent (counted on HTTP/2 only).
    sending: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
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

    /// Notes bytes written: activity, unless the connection is HTTP/2 and sends no
    /// answer's body now.
    fn wrote(&self) {
        if !self.http2 || self.activity.sending.load(Ordering::SeqCst) > 0 {
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

/// An answer's body while it is being sent (on HTTP/2): the connection's writes count as
/// activity meanwhile, so a large answer a client is still reading is never cut, while a
/// connection that only exchanges PINGs is.
pub(crate) struct Sending<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> std::fmt::Debug for Sending<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending").finish_non_exhaustive()
    }
}

impl<B> Sending<B> {
    pub(crate) fn new(body: B, activity: Arc<Activity>) -> Self {
        activity.sending.fetch_add(1, Ordering::SeqCst);
        Self { body, activity }
    }
}

impl<B> Drop for Sending<B> {
    fn drop(&mut self) {
        self.activity.sending.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Sending<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
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
