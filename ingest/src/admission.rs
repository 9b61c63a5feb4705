//! What a request may hold while it is served: a place among the open connections, one
//! of the in-flight places, its body bytes within the byte budget and a place to
//! decompress; and the bounded reading of bodies into those budgets.
//!
//! It owns [`Budgets`], the [`Admission`] guard of one request, and [`read_body`] /
//! [`read_decoded`]. It must not route, parse records or produce: it refuses early (503,
//! 413) and hands bytes back. It must not import the state, the routes, the handlers or
//! the server (they use it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::batch;
use crate::config::IngestConfig;
use crate::error::{IngestError, RETRY_AFTER, Result};
use crate::tenants::Tenant;

/// The tier's budgets, shared by every request.
#[derive(Debug)]
pub(crate) struct Budgets {
    /// Open client connections, `--max-connections`.
    connections: Arc<Semaphore>,
    /// Requests handled at once, `--max-in-flight`.
    in_flight: Semaphore,
    /// Body bytes held by requests, one permit per byte.
    body_bytes: Arc<Semaphore>,
    /// Places for decompressing bodies (CPU-bound, each up to the batch limit).
    decoders: Semaphore,
    /// How fast a body must arrive.
    pace: Pace,
    /// Set while the pipeline cannot keep up (its consumers too far behind, the history
    /// not writable): while any is, writes get 503.
    behind: Vec<Arc<AtomicBool>>,
}

impl Budgets {
    /// The budgets `config` names, with the backpressure flags `behind` writes watch.
    pub(crate) fn new(config: &IngestConfig, behind: Vec<Arc<AtomicBool>>) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(config.http.max_connections.max(1))),
            in_flight: Semaphore::new(config.http.max_in_flight.max(1)),
            body_bytes: Arc::new(Semaphore::new(
                config
                    .tier
                    .max_in_flight_bytes
                    .clamp(1, Semaphore::MAX_PERMITS),
            )),
            decoders: Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
            ),
            pace: Pace {
                idle: Duration::from_secs(config.http.body_idle_timeout_secs.max(1)),
                min_rate: config.http.min_body_bytes_per_sec,
            },
            behind,
        }
    }

    /// Waits for a place among the open connections; `None` once the budget is closed.
    pub(crate) async fn connection(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.connections).acquire_owned().await.ok()
    }

    /// Takes one of the `--max-in-flight` places for a write of `tenant`'s, or answers 503
    /// at once (also while the pipeline is behind, or while the tenant holds its share).
    pub(crate) fn admit(&self, tenant: &Tenant) -> Result<Admission<'_>> {
        if self
            .behind
            .iter()
            .any(|behind| behind.load(Ordering::Relaxed))
        {
            metrics::counter!("ingest_backpressure_refusals_total").increment(1);
            return Err(IngestError::PipelineBehind {
                retry_after: RETRY_AFTER,
            });
        }
        self.admit_read(tenant)
    }

    /// Takes one of the `--max-in-flight` places for `tenant`, or answers 503 at once.
    pub(crate) fn admit_read(&self, tenant: &Tenant) -> Result<Admission<'_>> {
        let (tenant_request, tenant_bytes) = match &tenant.share {
            Some(share) => {
                let place = Arc::clone(&share.in_flight)
                    .try_acquire_owned()
                    .map_err(|_| tenant_busy("requests in flight", tenant))?;
                (Some(place), Some(Arc::clone(&share.body_bytes)))
            }
            None => (None, None),
        };
        let permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| IngestError::TooManyInFlight {
                retry_after: RETRY_AFTER,
            })?;
        metrics::gauge!("ingest_in_flight_requests").increment(1.0);
        Ok(Admission {
            _request: permit,
            _tenant_request: tenant_request,
            budgets: self,
            tenant_bytes,
            tenant_name: Arc::clone(&tenant.name),
            bytes: None,
            reserved: 0,
        })
    }
}

fn tenant_busy(what: &'static str, tenant: &Tenant) -> IngestError {
    metrics::counter!("ingest_tenant_share_refusals_total", "tenant" => tenant.name.to_string())
        .increment(1);
    IngestError::TenantShareTaken {
        what,
        retry_after: RETRY_AFTER,
    }
}

/// A request's places: one of `--max-in-flight` (and of its tenant's share of them), and
/// its body bytes within `--max-in-flight-bytes` (and within its tenant's share). Given
/// back when dropped.
#[derive(Debug)]
pub(crate) struct Admission<'a> {
    _request: SemaphorePermit<'a>,
    _tenant_request: Option<OwnedSemaphorePermit>,
    budgets: &'a Budgets,
    /// The tenant's share of body bytes, if it has one.
    tenant_bytes: Option<Arc<Semaphore>>,
    tenant_name: Arc<str>,
    /// The bytes held: of the tier's budget, and of the tenant's share.
    bytes: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
    reserved: usize,
}

impl Admission<'_> {
    /// Holds `total` body bytes in all for this request, or answers 503 at once.
    fn hold(&mut self, total: usize) -> Result<()> {
        if total <= self.reserved {
            return Ok(());
        }
        let more =
            u32::try_from(total - self.reserved).map_err(|_| IngestError::TooManyBytesInFlight)?;
        let of_tenant =
            match &self.tenant_bytes {
                Some(share) => Some(Arc::clone(share).try_acquire_many_owned(more).map_err(
                    |_| {
                        metrics::counter!(
                            "ingest_tenant_share_refusals_total",
                            "tenant" => self.tenant_name.to_string()
                        )
                        .increment(1);
                        IngestError::TenantShareTaken {
                            what: "body bytes in flight",
                            retry_after: RETRY_AFTER,
                        }
                    },
                )?),
                None => None,
            };
        let permit = Arc::clone(&self.budgets.body_bytes)
            .try_acquire_many_owned(more)
            .map_err(|_| IngestError::TooManyBytesInFlight)?;
        match &mut self.bytes {
            Some((held, held_of_tenant)) => {
                held.merge(permit);
                match (held_of_tenant, of_tenant) {
                    (Some(held), Some(more)) => held.merge(more),
                    (slot @ None, more) => *slot = more,
                    (Some(_), None) => {}
                }
            }
            None => self.bytes = Some((permit, of_tenant)),
        }
        self.reserved = total;
        Ok(())
    }
}

impl Admission<'_> {
    /// Gives back every body byte held (a refused body is read on and dropped).
    fn release(&mut self) {
        self.bytes = None;
        self.reserved = 0;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        metrics::gauge!("ingest_in_flight_requests").decrement(1.0);
    }
}

/// How fast a request body must arrive: the next bytes within `idle`, and, past the first
/// `idle`, at least `min_rate` bytes per second on average (0: no minimum). Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pace {
    pub(crate) idle: Duration,
    pub(crate) min_rate: u64,
}

impl Pace {
    /// Why a body of which `seen` bytes arrived in `elapsed` is too slow, if it is.
    pub(crate) fn too_slow(&self, seen: u64, elapsed: Duration) -> Option<String> {
        if self.min_rate == 0 || elapsed <= self.idle {
            return None;
        }
        // What it must have sent by now: the rate over the time past the first `idle`.
        let owed = (elapsed - self.idle).as_secs_f64() * self.min_rate as f64;
        (seen as f64 + 1.0 < owed).then(|| {
            format!(
                "{seen} bytes in {:.1} s, under {} bytes per second (--min-body-bytes-per-sec)",
                elapsed.as_secs_f64(),
                self.min_rate
            )
        })
    }
}

/// Past the body limit, up to this many more bytes are read and thrown away before the
/// 413 is sent, so that a client still writing its body gets the answer rather than a
/// reset connection. Bodies declared larger than that are refused without reading.
const DISCARD_MAX: u64 = 8 * 1024 * 1024;

/// The most room set aside for a body before its bytes arrive.
const INITIAL_BUFFER_MAX: usize = 1024 * 1024;

/// Reads the whole body into one `Bytes`, refusing more than `limit` bytes and holding
/// what it keeps in the request's `admission`. A body that arrives in one frame is kept as
/// it is; several frames are joined once. A body refused (too large, or no room in the
/// byte budget) is read on and thrown away, up to `DISCARD_MAX`, before the answer.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    admission: &mut Admission<'_>,
) -> Result<Bytes> {
    let too_large = || IngestError::PayloadTooLarge { limit };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64 + DISCARD_MAX) {
        return Err(too_large());
    }
    // The byte budget is taken as bytes arrive (as the buffer holding them grows), never
    // for what is only declared: a slow upload holds no more of it than it sent.
    let mut refused: Option<IngestError> = None;
    let mut body = req.into_body();
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    let mut seen: u64 = 0;
    let pace = admission.budgets.pace;
    let started = tokio::time::Instant::now();
    loop {
        let next = tokio::time::timeout(pace.idle, body.frame()).await;
        let Ok(frame) = next else {
            // A body already refused gets its refusal, not a timeout a client may retry.
            return Err(refused.take().unwrap_or_else(|| {
                if seen > limit as u64 {
                    too_large()
                } else {
                    IngestError::BodyTooSlow {
                        reason: format!(
                            "no bytes for {} s (--body-idle-timeout-secs)",
                            pace.idle.as_secs()
                        ),
                    }
                }
            }));
        };
        let Some(frame) = frame else {
            break;
        };
        let frame = frame.map_err(|e| IngestError::BodyRead {
            reason: e.to_string(),
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if let Some(reason) = pace.too_slow(seen, started.elapsed()) {
            return Err(refused.take().unwrap_or(if seen > limit as u64 {
                too_large()
            } else {
                IngestError::BodyTooSlow { reason }
            }));
        }
        if refused.is_none() && seen > limit as u64 {
            refused = Some(too_large());
        }
        if refused.is_some() {
            // Refused: keep reading (and dropping) up to DISCARD_MAX, holding nothing of
            // the budget, then answer.
            first = None;
            joined = None;
            admission.release();
            if seen > limit as u64 + DISCARD_MAX {
                break;
            }
            continue;
        }
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                // Room for what is declared, up to a bound: more grows as it arrives.
                let mut buf = Vec::with_capacity(
                    declared
                        .map_or(head.len() + data.len(), |n| n as usize)
                        .min(limit)
                        .min(INITIAL_BUFFER_MAX)
                        .max(head.len() + data.len()),
                );
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                first = None;
                joined = Some(buf);
            }
            (_, Some(buf)) => {
                // Grows by doubling, never past the limit, and only once the budget
                // holds the new room.
                if buf.capacity() - buf.len() < data.len() {
                    let room = (buf.len() + data.len()).max((buf.capacity() * 2).min(limit));
                    if let Err(e) = admission.hold(room) {
                        refused = Some(e);
                        first = None;
                        joined = None;
                        admission.release();
                        continue;
                    }
                    buf.reserve_exact(room - buf.len());
                }
                buf.extend_from_slice(&data);
            }
        }
        // What this body holds: its bytes, or the buffer they are in.
        let held = joined
            .as_ref()
            .map_or(seen as usize, Vec::capacity)
            .max(seen as usize);
        if let Err(e) = admission.hold(held) {
            refused = Some(e);
            first = None;
            joined = None;
            admission.release();
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    Ok(match (first, joined) {
        (_, Some(buf)) => Bytes::from(buf),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

/// A batch body as decoded, with the framing its content type names.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// The framing the `Content-Type` names; `None` lets the body's first byte decide.
    pub(crate) framing: Option<batch::Framing>,
    /// The decompressed body.
    pub(crate) body: Bytes,
}

/// Reads a batch body (bounded by `limit` as sent, counted to `tenant`) and decodes it
/// (bounded by `limit` again, with a decoder place); returns the framing its content type
/// names and the decoded bytes.
pub(crate) async fn read_decoded(
    req: Request<Incoming>,
    limit: usize,
    tenant: &Tenant,
    admission: &mut Admission<'_>,
) -> Result<Decoded> {
    let header_text = |name| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned())
    };
    let framing = batch::framing(header_text(header::CONTENT_TYPE).as_deref());
    let encoding = batch::encoding(header_text(header::CONTENT_ENCODING).as_deref());
    let wire = read_body(req, limit, admission).await?;
    tenant.bytes.increment(wire.len() as u64);
    let (framing, encoding) = (framing?, encoding?);
    let body = if encoding == batch::Encoding::Identity {
        wire
    } else {
        let wire_len = wire.len();
        let budgets = admission.budgets;
        let _decoder = budgets
            .decoders
            .acquire()
            .await
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })?;
        let decoded = tokio::task::spawn_blocking(move || batch::decode(wire, encoding, limit))
            .await
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })??;
        admission.hold(wire_len + decoded.len())?;
        decoded
    };
    metrics::counter!("ingest_decoded_bytes_total").increment(body.len() as u64);
    Ok(Decoded { framing, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_must_keep_a_minimum_average_rate_after_the_first_idle_period() {
        let pace = Pace {
            idle: Duration::from_secs(10),
            min_rate: 1000,
        };
        let secs = Duration::from_secs;
        // Within the first period, anything goes.
        assert_eq!(pace.too_slow(0, secs(10)), None);
        // 5 s past it: 5,000 bytes owed.
        assert_eq!(pace.too_slow(5_000, secs(15)), None);
        let reason = pace.too_slow(4_000, secs(15)).unwrap();
        assert!(reason.contains("--min-body-bytes-per-sec"), "{reason}");
        // No minimum: never too slow.
        let free = Pace {
            min_rate: 0,
            ..pace
        };
        assert_eq!(free.too_slow(0, secs(1_000)), None);
    }
}
