//! Flight SQL's connections: at most a bounded number open at once, each one closed if it
//! sends nothing at first, and handed to the gRPC server only once it spoke. (The server
//! itself closes connections past their age: [`ConnectionLimits::max_age`].)
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
    /// whatever it sends; it is closed once its calls in progress had the SQL time limit
    /// and a margin more, whatever its peer does.
    pub max_age: Duration,
}

/// An accepted connection that sent its first bytes, holding its place until it closes.
#[derive(Debug)]
pub(crate) struct Held {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
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
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener` that spoke, for the gRPC server, and the accept loop
/// that feeds them, which runs until `stop` (or until the server stops taking them).
pub(crate) fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    stop: CancellationToken,
) -> (
    impl Stream<Item = io::Result<Held>> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let max = limits.max_connections.max(1);
    let (ready, connections) = mpsc::channel::<io::Result<Held>>(max);
    let accept = accept(listener, limits, Arc::new(Semaphore::new(max)), ready, stop);
    let stream = futures_util::stream::unfold(connections, |mut connections| async move {
        connections.recv().await.map(|held| (held, connections))
    });
    (stream, accept)
}

async fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
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
                    let _ = ready
                        .send(Ok(Held {
                            stream,
                            _place: place,
                        }))
                        .await;
                }
                _ => tracing::debug!("Flight SQL: a connection sent nothing; closed"),
            }
        });
    }
    waiting.shutdown().await;
}
