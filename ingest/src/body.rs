//! The body of every answer the server gives: a whole one ([`full`]) or one streamed
//! chunk by chunk ([`streamed`], for SQL results). A streamed body that fails part way
//! ends the answer early (HTTP/1: the connection closes before the chunked body's last
//! chunk; HTTP/2: the stream is reset), so a client never takes a cut answer for a
//! whole one. It is a leaf: it imports no other module of the tier.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

/// Why a streamed body ended early.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// An answer's body.
pub(crate) type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A body of `bytes`, whole.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of the chunks of `chunks`, sent as they come; an error ends it early.
pub(crate) fn streamed<S, E>(chunks: S) -> Body
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BodyError>,
{
    StreamBody::new(chunks.map(|chunk| chunk.map(Frame::data).map_err(Into::into))).boxed_unsync()
}
