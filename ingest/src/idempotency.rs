//! Idempotent retries: the `Idempotency-Key` header.
//!
//! Two layers make a retried request create no duplicate delivery downstream:
//!
//! 1. **Deterministic ids.** A record without its own `deliveryId` sent under an
//!    `Idempotency-Key` gets the id `uuid-v5(tenant, key, index in the batch)`, so a retry
//!    produces the same Kafka keys as the first attempt, whichever replica takes it and
//!    however long after; consumers dedupe by key. (A record with its own `deliveryId`
//!    is keyed by that id already.)
//! 2. **A bounded window of recent keys** in each ingestion process. A retry within the
//!    window is answered with the stored answer of the first attempt and produces
//!    nothing; a retry while the first attempt is still running gets 409; the same key
//!    with a different body gets 422. Only answers that accepted something are kept:
//!    after a 4xx or 503 the retry is processed afresh. A batch answer that still has
//!    records failed for a transient reason is kept with each record's fate: a retry
//!    sends those records again, and only those, and its answer (every record, merged)
//!    takes the place of the first. The window forgets keys after its age limit, or
//!    oldest first once its byte budget is spent.
//!
//! The window logic ([`Window`]) is pure and takes the time as an argument.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{IngestError, Result};
use crate::outcome::Outcome;

/// The longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

/// What each entry costs besides its key and stored body, in bytes of the budget.
const ENTRY_OVERHEAD: usize = 128;

/// Namespace of derived delivery ids (a fixed, random UUID).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d1f_0c6e_93a4_4f0b_9a39_2c55_b1e7_40d2);

/// Checks an `Idempotency-Key` value: 1 to 255 visible ASCII characters.
pub fn check_key(value: &[u8]) -> Result<&str> {
    let bad = |reason: &str| IngestError::InvalidHeader {
        name: "Idempotency-Key",
        reason: reason.to_owned(),
    };
    if value.is_empty() || value.len() > MAX_KEY_LEN {
        return Err(bad("must be 1 to 255 characters"));
    }
    if !value.iter().all(u8::is_ascii_graphic) {
        return Err(bad("must be visible ASCII characters without spaces"));
    }
    std::str::from_utf8(value).map_err(|_| bad("must be ASCII"))
}

/// The delivery id of record `index` of a request to `route` sent by `tenant` under
/// `key`.
pub fn derived_delivery_id(tenant: &str, route: &str, key: &str, index: usize) -> String {
    let name = format!("{tenant}\n{route}\n{key}\n{index}");
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

/// A fingerprint of a request body, to tell a retry from a different request that
/// reuses a key.
pub fn fingerprint(route: &str, body: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    route.hash(&mut hasher);
    body.hash(&mut hasher);
    hasher.finish()
}

/// An answer kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Bytes,
    /// The `Location` header, if any.
    pub location: Option<String>,
    /// A batch answer with records that failed for a transient reason: every record's
    /// fate, so that a retry sends those records again (none otherwise: the answer is
    /// final).
    pub(crate) outcomes: Option<Arc<[Outcome]>>,
}

impl Stored {
    /// A final answer, replayed as it is.
    pub fn new(status: u16, body: Bytes, location: Option<String>) -> Self {
        Self {
            status,
            body,
            location,
            outcomes: None,
        }
    }

    /// Whether a retry sends some of its records again rather than replaying it.
    fn resumable(&self) -> bool {
        self.outcomes
            .as_ref()
            .is_some_and(|o| o.iter().any(Outcome::is_retryable))
    }

    /// Bytes it takes in the window's budget.
    fn cost(&self) -> usize {
        self.body.len()
            + self.location.as_ref().map_or(0, String::len)
            + self
                .outcomes
                .as_ref()
                .map_or(0, |o| o.iter().map(Outcome::cost).sum())
    }
}

/// What to do with a request that carries a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key is new (or forgotten): process the request, then [`Window::complete`] with
    /// this ticket (`None` when the key is too large for the window to track).
    New(Option<Ticket>),
    /// The key was answered before: send this again.
    Replay(Stored),
    /// The key was answered before with records to retry: send those again, then
    /// [`Window::complete`] with this ticket and the merged answer (`None` keeps the
    /// earlier answer).
    Resume(Ticket, Stored),
    /// A request with this key is being processed right now.
    InProgress,
    /// The key was used with a different body.
    Mismatch,
}

/// Names one request's hold on its key, so that only that request ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(Debug)]
enum State {
    InProgress,
    /// A retry of a kept answer's failed records is running; the answer stays until it
    /// ends.
    Resuming(Stored),
    Done(Stored),
}

#[derive(Debug)]
struct Entry {
    fingerprint: u64,
    state: State,
    since: Instant,
    seq: u64,
    cost: usize,
}

/// Recent idempotency keys, bounded by age and by bytes.
///
/// Answers are forgotten oldest first once they are older than the age limit or the
/// byte budget needs their room. Keys in progress are never forgotten (there are at most
/// as many as requests in flight); a key too large for the budget is not tracked.
#[derive(Debug)]
pub struct Window {
    entries: HashMap<String, Entry>,
    /// Every entry's key by its sequence number: the order to forget them in.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    bytes: usize,
    max_bytes: usize,
    max_age: Duration,
}

impl Window {
    /// An empty window that keeps keys up to `max_age` and within `max_bytes`.
    pub fn new(max_age: Duration, max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            bytes: 0,
            max_bytes,
            max_age,
        }
    }

    /// Bytes of the budget in use.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Looks `key` up; a new key is marked in progress.
    pub fn begin(&mut self, key: &str, fingerprint: u64, now: Instant) -> Begin {
        self.evict(now, 0);
        if let Some(entry) = self.entries.get(key) {
            if entry.fingerprint != fingerprint {
                return Begin::Mismatch;
            }
            let resumable = match &entry.state {
                State::InProgress | State::Resuming(_) => return Begin::InProgress,
                State::Done(stored) if !stored.resumable() => {
                    return Begin::Replay(stored.clone());
                }
                State::Done(stored) => stored.clone(),
            };
            // Held by this retry until it completes; a new sequence number names it.
            let Some(mut entry) = self.remove(key) else {
                return Begin::InProgress;
            };
            entry.state = State::Resuming(resumable.clone());
            let seq = self.insert(key, entry);
            return Begin::Resume(Ticket(seq), resumable);
        }
        let cost = key.len() + ENTRY_OVERHEAD;
        if cost > self.max_bytes {
            return Begin::New(None);
        }
        self.evict(now, cost);
        let seq = self.insert(
            key,
            Entry {
                fingerprint,
                state: State::InProgress,
                since: now,
                seq: 0,
                cost,
            },
        );
        Begin::New(Some(Ticket(seq)))
    }

    /// Ends the request that began `key` with `ticket`: keeps `answer` for replay, or
    /// forgets the key when there is nothing to keep (the request accepted nothing, or
    /// was abandoned); an abandoned retry of a kept answer leaves that answer. Does
    /// nothing when the key is no longer that request's.
    pub fn complete(&mut self, key: &str, ticket: Ticket, answer: Option<Stored>, now: Instant) {
        if self.entries.get(key).is_none_or(|e| e.seq != ticket.0) {
            return;
        }
        let Some(mut entry) = self.remove(key) else {
            return;
        };
        let earlier = match std::mem::replace(&mut entry.state, State::InProgress) {
            State::Resuming(earlier) => Some(earlier),
            State::InProgress | State::Done(_) => None,
        };
        let Some(answer) = answer.or(earlier) else {
            return;
        };
        let cost = key.len() + ENTRY_OVERHEAD + answer.cost();
        if cost > self.max_bytes {
            // Larger than the whole budget: not kept (the derived ids still hold).
            return;
        }
        self.evict(now, cost);
        // Aged from its answer, and moved to the back of the order.
        entry.state = State::Done(answer);
        entry.cost = cost;
        entry.since = now;
        self.insert(key, entry);
    }

    fn insert(&mut self, key: &str, mut entry: Entry) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        entry.seq = seq;
        self.bytes += entry.cost;
        self.order.insert(seq, key.to_owned());
        self.entries.insert(key.to_owned(), entry);
        seq
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.seq);
        self.bytes -= entry.cost;
        Some(entry)
    }

    /// Forgets answers from the oldest while they are past their age or the budget
    /// would be exceeded by `incoming` more bytes. Keys in progress stay.
    fn evict(&mut self, now: Instant, incoming: usize) {
        let mut forget = Vec::new();
        let mut bytes = self.bytes;
        for key in self.order.values() {
            let Some(entry) = self.entries.get(key) else {
                continue;
            };
            let expired = now.saturating_duration_since(entry.since) > self.max_age;
            let over = bytes + incoming > self.max_bytes;
            if !(expired || over) {
                break;
            }
            if matches!(entry.state, State::Done(_)) {
                bytes -= entry.cost;
                forget.push(key.clone());
            }
        }
        for key in forget {
            self.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stored(body: &str) -> Stored {
        Stored::new(202, Bytes::from(body.to_owned()), None)
    }

    #[test]
    fn an_answer_with_records_to_retry_is_resumed_once_at_a_time_and_kept_until_final() {
        use crate::outcome::{Failure, Outcome};
        let mut w = Window::new(Duration::from_secs(60), 1 << 20);
        let t0 = Instant::now();
        let failed = Outcome::Failed(Failure {
            message: "the broker did not acknowledge in time".into(),
            retryable: true,
        });
        let partial = Stored {
            outcomes: Some(vec![Outcome::Accepted(Some("a".into())), failed.clone()].into()),
            ..Stored::new(207, Bytes::from_static(b"{}"), None)
        };
        let first = new(&mut w, "k", 1, t0);
        w.complete("k", first, Some(partial.clone()), t0);
        // A retry resumes it, and holds the key while it runs.
        let Begin::Resume(ticket, earlier) = w.begin("k", 1, t0) else {
            panic!("not resumed");
        };
        assert_eq!(earlier, partial);
        assert_eq!(w.begin("k", 1, t0), Begin::InProgress);
        assert_eq!(w.begin("k", 2, t0), Begin::Mismatch);
        // Abandoned (the client went away): the earlier answer stays, and is resumed again.
        w.complete("k", ticket, None, t0);
        let Begin::Resume(ticket, _) = w.begin("k", 1, t0) else {
            panic!("the earlier answer was lost");
        };
        // Still a record to retry: kept resumable; then final: replayed as it is.
        w.complete("k", ticket, Some(partial.clone()), t0);
        let Begin::Resume(ticket, _) = w.begin("k", 1, t0) else {
            panic!("not resumed");
        };
        let done = Stored {
            outcomes: Some(vec![Outcome::Accepted(Some("a".into())); 2].into()),
            ..Stored::new(202, Bytes::from_static(b"{\"accepted\":2}"), None)
        };
        w.complete("k", ticket, Some(done.clone()), t0);
        assert_eq!(w.begin("k", 1, t0), Begin::Replay(done));
        // A final 207 (only invalid records) is replayed, never resumed.
        let invalid = Stored {
            outcomes: Some(
                vec![Outcome::Rejected(schemas::ValidationError {
                    field: "x".into(),
                    reason: "y".into(),
                })]
                .into(),
            ),
            ..Stored::new(207, Bytes::from_static(b"{}"), None)
        };
        let other = new(&mut w, "j", 1, t0);
        w.complete("j", other, Some(invalid.clone()), t0);
        assert_eq!(w.begin("j", 1, t0), Begin::Replay(invalid));
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(check_key(b"retry-1").unwrap(), "retry-1");
        assert!(check_key(b"").is_err());
        assert!(check_key(b"has space").is_err());
        assert!(check_key(&[b'a'; 256]).is_err());
        assert!(check_key("é".as_bytes()).is_err());
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_delivery_id("fabrikam", "batch", "k1", 0);
        assert_eq!(a, derived_delivery_id("fabrikam", "batch", "k1", 0));
        assert_ne!(a, derived_delivery_id("fabrikam", "batch", "k1", 1));
        assert_ne!(a, derived_delivery_id("contoso", "batch", "k1", 0));
        assert_ne!(a, derived_delivery_id("fabrikam", "batch", "k2", 0));
        assert_ne!(a, derived_delivery_id("fabrikam", "single", "k1", 0));
        schemas::delivery::check_delivery_id(&a).unwrap();
    }

    /// Begins `key`, expecting a new, tracked key.
    fn new(w: &mut Window, key: &str, fingerprint: u64, now: Instant) -> Ticket {
        match w.begin(key, fingerprint, now) {
            Begin::New(Some(ticket)) => ticket,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_retry_replays_a_kept_answer_and_a_forgotten_one_runs_again() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(60), 1 << 20);
        let k = new(&mut w, "k", 1, t0);
        assert_eq!(w.begin("k", 1, t0), Begin::InProgress);
        assert_eq!(w.begin("k", 2, t0), Begin::Mismatch);
        w.complete("k", k, Some(stored("{\"accepted\":1}")), t0);
        assert_eq!(
            w.begin("k", 1, t0),
            Begin::Replay(stored("{\"accepted\":1}"))
        );
        assert_eq!(w.begin("k", 2, t0), Begin::Mismatch);
        // A failed attempt keeps nothing: the retry runs.
        let f = new(&mut w, "f", 1, t0);
        w.complete("f", f, None, t0);
        new(&mut w, "f", 1, t0);
        // Past the age limit the key is forgotten.
        let later = t0 + Duration::from_secs(61);
        new(&mut w, "k", 1, later);
    }

    #[test]
    fn the_byte_budget_evicts_oldest_first_and_oversized_answers_are_not_kept() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(60), 1000);
        for k in ["a", "b", "c"] {
            let ticket = new(&mut w, k, 0, t0);
            w.complete(k, ticket, Some(stored(&"x".repeat(200))), t0);
        }
        assert!(w.bytes() <= 1000);
        let d = new(&mut w, "d", 0, t0);
        w.complete("d", d, Some(stored(&"x".repeat(200))), t0);
        assert!(w.bytes() <= 1000, "{}", w.bytes());
        let a = new(&mut w, "a", 0, t0);
        w.complete("a", a, None, t0);
        assert!(matches!(w.begin("d", 0, t0), Begin::Replay(_)));
        let big = new(&mut w, "big", 0, t0);
        w.complete("big", big, Some(stored(&"x".repeat(2000))), t0);
        new(&mut w, "big", 0, t0);
        // A key larger than the whole budget is not tracked at all.
        let huge = "k".repeat(1000);
        assert_eq!(w.begin(&huge, 0, t0), Begin::New(None));
        assert!(w.bytes() <= 1000);
    }

    #[test]
    fn keys_in_progress_are_never_evicted_and_a_stale_ticket_changes_nothing() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(1), 600);
        let first = new(&mut w, "k", 1, t0);
        // Age and a full budget do not push out a key in progress.
        let later = t0 + Duration::from_secs(5);
        for other in ["a", "b", "c"] {
            let ticket = new(&mut w, other, 0, later);
            w.complete(other, ticket, Some(stored(&"x".repeat(100))), later);
        }
        assert_eq!(w.begin("k", 1, later), Begin::InProgress);
        // Once answered and forgotten, a new request on the key is not ended by the
        // first one's late completion.
        w.complete("k", first, None, later);
        let second = new(&mut w, "k", 2, later);
        w.complete("k", first, Some(stored("stale")), later);
        assert_eq!(w.begin("k", 2, later), Begin::InProgress);
        w.complete("k", second, Some(stored("second")), later);
        assert_eq!(w.begin("k", 2, later), Begin::Replay(stored("second")));
    }

    proptest! {
        /// Whatever the sequence of requests, the window stays within its budget and its
        /// accounting matches what it holds.
        #[test]
        fn the_window_stays_within_its_budget(
            ops in proptest::collection::vec((0u8..20, 0usize..600, any::<bool>(), 0u64..5_000), 1..300),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut w = Window::new(Duration::from_secs(2), 4096);
            for (k, size, keep, millis) in ops {
                now += Duration::from_millis(millis);
                let key = format!("key-{k}");
                if let Begin::New(Some(ticket)) = w.begin(&key, u64::from(k), now) {
                    let answer = keep.then(|| stored(&"x".repeat(size)));
                    w.complete(&key, ticket, answer, now);
                }
                prop_assert!(w.bytes() <= 4096);
                let held: usize = w.entries.values().map(|e| e.cost).sum();
                prop_assert_eq!(held, w.bytes());
                prop_assert_eq!(w.order.len(), w.entries.len(), "no stale order items");
            }
        }
    }
}
