//! Flight SQL's connections: at most a bounded number open at once, each one closed if it
//! sends nothing at first, handed to the gRPC server only once it spoke, and cut once it
//! is past its age and a grace for its calls. (The server itself asks a connection to
//! close at its age, [`ConnectionLimits::max_age`]; the cut is for a peer that ignores
//! that.)
//!
//! It owns [`ConnectionLimits`] and the accept loop; it must not read calls or decide who
//! may make them.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bounds on Flight SQL's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that sends nothing for this long after it opens is closed.
    pub first_bytes_timeout: Duration,
    /// A connection is asked to close (an HTTP/2 GOAWAY, after which gRPC clients open a
    /// new one) once it is this old, so that no connection holds its place for ever,
    /// whatever it sends; it is cut once its calls in progress had the SQL time limit and
    /// a margin more, whatever its peer does.
    pub max_age: Duration,
}

/// An accepted connection that sent its first bytes, holding its place until it closes;
/// reading or writing fails once its time is up.
#[derive(Debug)]
pub(crate) struct Held {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    cut: Pin<Box<tokio::time::Sleep>>,
}

impl Held {
    /// An error once the connection's time is up (the deadline wakes the connection's
    /// task, so a silent peer is cut too).
    fn past_time(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.cut.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection is past its age and grace",
            )
        })
    }
}

impl Connected for Held {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.past_time(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.past_time(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.past_time(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener` that spoke, for the gRPC server, each cut `grace` after
/// its age, and the accept loop that feeds them, which runs until `stop` (or until the
/// server stops taking them).
pub(crate) fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    grace: Duration,
    stop: CancellationToken,
) -> (
    impl Stream<Item = io::Result<Held>> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let max = limits.max_connections.max(1);
    let (ready, connections) = mpsc::channel::<io::Result<Held>>(max);
    let lifetime = limits.max_age.saturating_add(grace);
    let accept = accept(
        listener,
        limits,
        lifetime,
        Arc::new(Semaphore::new(max)),
        ready,
        stop,
    );
    let stream = futures_util::stream::unfold(connections, |mut connections| async move {
        connections.recv().await.map(|held| (held, connections))
    });
    (stream, accept)
}

async fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    lifetime: Duration,
    places: Arc<Semaphore>,
    ready: mpsc::Sender<io::Result<Held>>,
    stop: CancellationToken,
) {
    // Connections waiting for their first bytes, each for at most the timeout.
    let mut waiting = JoinSet::new();
    loop {
        let place = tokio::select! {
            () = stop.cancelled() => break,
            () = ready.closed() => break,
            Some(_) = waiting.join_next() => continue,
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            () = ready.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "Flight SQL: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ready = ready.clone();
        let timeout = limits.first_bytes_timeout;
        waiting.spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {
                    // From now, as the server's age of the connection.
                    let cut = Box::pin(tokio::time::sleep(lifetime));
                    let _ = ready
                        .send(Ok(Held {
                            stream,
                            _place: place,
                            cut,
                        }))
                        .await;
                }
                _ => tracing::debug!("Flight SQL: a connection sent nothing; closed"),
            }
        });
    }
    waiting.shutdown().await;
}
