//! Live delivery events for Server-Sent Events: each change of a delivery's state as one
//! SSE frame, the recent frames of each delivery for a reconnecting client, and the
//! subscribers they are pushed to.
//!
//! The status view (`status.rs`) calls [`Frames::of`] for every new version of a
//! delivery's state it reads from `delivery-state`, keeps the frames in a [`Log`] per
//! delivery, and pushes them to [`Subscribers`] while it holds its map's lock, so a
//! subscriber registered under that lock gets every frame after its backfill once.
//!
//! Bounds: a log keeps at most [`MAX_STAGE_FRAMES`] stage frames and
//! [`MAX_POSITION_FRAMES`] position frames (a position is superseded by the next one);
//! each subscriber has a queue of [`QUEUE_FRAMES`] frames ([`FEED_QUEUE_FRAMES`] for a
//! tenant's feed) and is dropped, never waited for, when it is full; subscribers are
//! bounded per delivery, per tenant and in total.
//!
//! It must not read topics or bodies, nor know HTTP beyond the SSE text format.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use schemas::tracking::{DeliveryState, EventKind};
use tokio::sync::mpsc;

/// Stage frames a delivery's log keeps (the oldest go first past it).
pub(crate) const MAX_STAGE_FRAMES: usize = 32;
/// Position frames a delivery's log keeps (the oldest go first past it).
pub(crate) const MAX_POSITION_FRAMES: usize = 8;
/// Frames waiting for one subscriber of a delivery; a subscriber that lets more pile up
/// is dropped.
pub(crate) const QUEUE_FRAMES: usize = 256;
/// Frames waiting for one subscriber of a tenant's feed, which gets every delivery's
/// changes in bursts (the status view applies what it reads a batch at a time). The
/// frames are shared, so a queue holds handles, not copies.
pub(crate) const FEED_QUEUE_FRAMES: usize = 8_192;
/// Most subscribers of one delivery (its tracking link may be shared, but not without
/// bound).
pub(crate) const MAX_PER_DELIVERY: usize = 16;

/// A frame as a subscriber gets it, and whether it is the delivery's last (a final
/// stage: its stream ends after it).
pub(crate) type Sent = (Bytes, bool);

/// One change of a delivery, as SSE text.
#[derive(Debug)]
pub(crate) struct Frames {
    /// Its version: the SSE id on the delivery's own stream.
    pub(crate) version: u64,
    pub(crate) kind: EventKind,
    /// Whether the delivery reached a final stage with it.
    pub(crate) last: bool,
    /// `id: <version>`, `event: <kind>`, `data: <state>`: the delivery's own stream.
    pub(crate) with_id: Bytes,
    /// The same without an `id:` line: a tenant's feed, which has no resume point.
    pub(crate) without_id: Bytes,
}

impl Frames {
    /// The frames of `state`'s latest change, `None` for states written before versions
    /// were kept.
    pub(crate) fn of(state: &DeliveryState) -> Option<Arc<Self>> {
        if state.version == 0 {
            return None;
        }
        let kind = state.change.unwrap_or(EventKind::Stage);
        // JSON has no raw newline, so `data:` is one line.
        let data = serde_json::to_string(state).ok()?;
        let without_id = format!("event: {}\ndata: {data}\n\n", kind.as_str());
        let with_id = format!("id: {}\n{without_id}", state.version);
        Some(Arc::new(Self {
            version: state.version,
            kind,
            last: state.stage.is_final(),
            with_id: Bytes::from(with_id),
            without_id: Bytes::from(without_id),
        }))
    }

    /// Bytes it holds.
    pub(crate) fn size(&self) -> usize {
        self.with_id.len() + self.without_id.len() + 64
    }
}

/// The recent frames of one delivery.
#[derive(Debug, Default)]
pub(crate) struct Log {
    stages: VecDeque<Arc<Frames>>,
    positions: VecDeque<Arc<Frames>>,
    bytes: usize,
}

impl Log {
    /// Adds `frames`; returns the change in bytes held.
    pub(crate) fn push(&mut self, frames: Arc<Frames>) -> isize {
        let before = self.bytes;
        self.bytes += frames.size();
        let (queue, bound) = match frames.kind {
            EventKind::Stage => (&mut self.stages, MAX_STAGE_FRAMES),
            EventKind::Position => (&mut self.positions, MAX_POSITION_FRAMES),
        };
        queue.push_back(frames);
        while queue.len() > bound {
            if let Some(old) = queue.pop_front() {
                self.bytes -= old.size();
            }
        }
        self.bytes as isize - before as isize
    }

    /// Bytes it holds.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its frames after version `after`, in order.
    pub(crate) fn after(&self, after: u64) -> Vec<Arc<Frames>> {
        let mut out: Vec<Arc<Frames>> = self
            .stages
            .iter()
            .chain(self.positions.iter())
            .filter(|f| f.version > after)
            .cloned()
            .collect();
        out.sort_by_key(|f| f.version);
        out
    }
}

/// What a subscriber follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    /// One delivery, by key.
    Delivery(String),
    /// Every delivery of a tenant.
    Tenant(String),
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The tenant holds its most subscribers.
    Tenant,
    /// The tier holds its most subscribers.
    Total,
    /// The delivery has its most subscribers.
    Delivery,
}

#[derive(Debug, Default)]
struct Inner {
    by_target: HashMap<Target, Vec<(u64, mpsc::Sender<Sent>)>>,
    per_tenant: HashMap<String, usize>,
    total: usize,
    next_id: u64,
}

/// Everyone following a delivery or a tenant's feed.
#[derive(Debug)]
pub(crate) struct Subscribers {
    inner: Mutex<Inner>,
    max_total: usize,
    max_per_tenant: usize,
}

/// A subscriber's end: its frames, and its place (given back when dropped).
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) frames: mpsc::Receiver<Sent>,
    _place: Place,
}

#[derive(Debug)]
struct Place {
    subscribers: Arc<Subscribers>,
    id: u64,
    tenant: String,
    target: Target,
}

impl Drop for Place {
    fn drop(&mut self) {
        let Ok(mut inner) = self.subscribers.inner.lock() else {
            return;
        };
        if let Some(list) = inner.by_target.get_mut(&self.target) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                inner.by_target.remove(&self.target);
            }
        }
        inner.total = inner.total.saturating_sub(1);
        if let Some(n) = inner.per_tenant.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_tenant.remove(&self.tenant);
            }
        }
        metrics::gauge!("sse_subscribers").set(inner.total as f64);
    }
}

impl Subscribers {
    /// At most `max_total` subscribers, `max_per_tenant` of one tenant.
    pub(crate) fn new(max_total: usize, max_per_tenant: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            max_total: max_total.max(1),
            max_per_tenant: max_per_tenant.max(1),
        })
    }

    /// A place following `tenant`'s delivery `key`.
    pub(crate) fn delivery(
        self: &Arc<Self>,
        tenant: &str,
        key: &str,
    ) -> Result<Subscription, Refused> {
        self.add(tenant, Target::Delivery(key.to_owned()))
    }

    /// A place following every delivery of `tenant`.
    pub(crate) fn tenant(self: &Arc<Self>, tenant: &str) -> Result<Subscription, Refused> {
        self.add(tenant, Target::Tenant(tenant.to_owned()))
    }

    fn add(self: &Arc<Self>, tenant: &str, target: Target) -> Result<Subscription, Refused> {
        let mut inner = self.inner.lock().map_err(|_| Refused::Total)?;
        if inner.total >= self.max_total {
            return Err(Refused::Total);
        }
        let of_tenant = inner.per_tenant.get(tenant).copied().unwrap_or(0);
        if of_tenant >= self.max_per_tenant {
            return Err(Refused::Tenant);
        }
        if let Target::Delivery(_) = target
            && inner
                .by_target
                .get(&target)
                .is_some_and(|l| l.len() >= MAX_PER_DELIVERY)
        {
            return Err(Refused::Delivery);
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let capacity = match target {
            Target::Delivery(_) => QUEUE_FRAMES,
            Target::Tenant(_) => FEED_QUEUE_FRAMES,
        };
        let (tx, rx) = mpsc::channel(capacity);
        inner
            .by_target
            .entry(target.clone())
            .or_default()
            .push((id, tx));
        inner.total += 1;
        *inner.per_tenant.entry(tenant.to_owned()).or_default() += 1;
        metrics::gauge!("sse_subscribers").set(inner.total as f64);
        Ok(Subscription {
            frames: rx,
            _place: Place {
                subscribers: Arc::clone(self),
                id,
                tenant: tenant.to_owned(),
                target,
            },
        })
    }

    /// Pushes `frames` of the delivery `key` of `tenant` to whoever follows it. A
    /// subscriber whose queue is full is dropped: its stream ends after what it has, and
    /// its client resumes with `Last-Event-ID`.
    pub(crate) fn publish(&self, tenant: &str, key: &str, frames: &Frames) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.total == 0 {
            return;
        }
        // A tenant's feed goes on past a delivery's end.
        for (target, frame, last) in [
            (
                Target::Delivery(key.to_owned()),
                &frames.with_id,
                frames.last,
            ),
            (Target::Tenant(tenant.to_owned()), &frames.without_id, false),
        ] {
            let Some(list) = inner.by_target.get_mut(&target) else {
                continue;
            };
            list.retain(|(_, tx)| match tx.try_send((frame.clone(), last)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics::counter!("sse_slow_subscribers_dropped_total").increment(1);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            if list.is_empty() {
                inner.by_target.remove(&target);
            }
        }
    }

    /// How many subscribers there are.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::delivery::Location;
    use schemas::tracking::Stage;

    fn state(version: u64, change: EventKind) -> DeliveryState {
        let here = Location {
            latitude: 1.0,
            longitude: 2.0,
        };
        DeliveryState {
            delivery_id: "d".into(),
            owner_id: "t".into(),
            stage: Stage::HeadedToPickup,
            drone_id: None,
            last_known_location: here,
            pickup_eta: None,
            delivery_eta: None,
            pickup_location: here,
            drop_off_location: here,
            pickup_time: String::new(),
            deadline: String::new(),
            package_size: schemas::PackageSize::Small,
            package_weight: 1.0,
            drone_region: None,
            drone_speed_mps: None,
            seq: 1,
            version,
            change: Some(change),
            updated_at: String::new(),
            cancel_reason: None,
            cancel_detail: None,
        }
    }

    #[test]
    fn frames_are_sse_text_with_the_version_as_id() {
        let f = Frames::of(&state(7, EventKind::Position)).unwrap();
        let text = std::str::from_utf8(&f.with_id).unwrap();
        assert!(
            text.starts_with("id: 7\nevent: position\ndata: {"),
            "{text}"
        );
        assert!(text.ends_with("}\n\n") && text.matches('\n').count() == 4);
        assert!(!std::str::from_utf8(&f.without_id).unwrap().contains("id: "));
        assert!(Frames::of(&state(0, EventKind::Stage)).is_none());
    }

    #[test]
    fn a_log_keeps_stages_and_the_latest_positions_in_order() {
        let mut log = Log::default();
        let mut held = 0isize;
        for v in 1..=40u64 {
            let kind = if v % 10 == 1 {
                EventKind::Stage
            } else {
                EventKind::Position
            };
            held += log.push(Frames::of(&state(v, kind)).unwrap());
        }
        assert_eq!(held, log.bytes() as isize);
        let all: Vec<u64> = log.after(0).iter().map(|f| f.version).collect();
        assert_eq!(&all[..4], &[1, 11, 21, 31], "every stage: {all:?}");
        assert_eq!(all.len(), 4 + MAX_POSITION_FRAMES);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let after: Vec<u64> = log.after(38).iter().map(|f| f.version).collect();
        assert_eq!(after, vec![39, 40]);
    }

    #[tokio::test]
    async fn subscribers_are_bounded_and_a_slow_one_is_dropped() {
        let subs = Subscribers::new(3, 2);
        let mut a = subs.delivery("t", "t/d").unwrap();
        let _b = subs.tenant("t").unwrap();
        assert_eq!(subs.delivery("t", "t/e").unwrap_err(), Refused::Tenant);
        let c = subs.delivery("u", "u/d").unwrap();
        assert_eq!(subs.tenant("v").unwrap_err(), Refused::Total);
        drop(c);
        assert_eq!(subs.len(), 2);
        let _d = subs.tenant("v").unwrap();
        // `a` reads nothing: past its queue it is dropped, its stream ends.
        for v in 1..=(QUEUE_FRAMES as u64 + 1) {
            subs.publish(
                "t",
                "t/d",
                &Frames::of(&state(v, EventKind::Position)).unwrap(),
            );
        }
        let mut got = 0;
        while let Some((frame, _)) = a.frames.recv().await {
            assert!(frame.starts_with(b"id: "));
            got += 1;
        }
        assert_eq!(got, QUEUE_FRAMES, "what it had, then the end");
        // One delivery's followers are bounded on their own.
        let subs = Subscribers::new(100, 100);
        let held: Vec<_> = (0..MAX_PER_DELIVERY)
            .map(|_| subs.delivery("t", "t/d").unwrap())
            .collect();
        assert_eq!(subs.delivery("t", "t/d").unwrap_err(), Refused::Delivery);
        assert!(subs.delivery("t", "t/e").is_ok());
        drop(held);
    }
}
