//! Idle connections: an I/O wrapper that notes when a connection last moved bytes, and a
//! count of its requests in progress, so that the accept loop can close a connection
//! idle for longer than `--idle-timeout-secs` (no request in progress, no byte either
//! way), whatever holds it: an HTTP/1 keep-alive between requests, an HTTP/2 connection
//! without streams, a preface that stopped half-way.
//!
//! It owns only the bookkeeping; it must not read requests or decide answers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

/// A connection's stream, noting each byte read or written in its [`Activity`].
#[derive(Debug)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        activity.touch();
        Self { inner, activity }
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
            self.activity.touch();
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
            self.activity.touch();
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
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
}
