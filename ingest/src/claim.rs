//! A request's hold on its `Idempotency-Key` in the tier's shared window
//! ([`crate::idempotency::Window`]): taken before the request is handled, ended with its
//! answer, and given up (the key forgotten, or an earlier answer kept) if the request is
//! dropped first. It must not decide answers nor read requests.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{IngestError, Result};
use crate::idempotency::{Begin, Stored, Ticket, Window};
use crate::outcome::Outcome;

/// Where a request stands in the shared window of recent keys. (A key in progress or
/// used with a different body is an error instead: 409 or 422.)
#[derive(Debug)]
pub(crate) enum ClaimOutcome<'a> {
    /// A new (or forgotten) key, now held by this request: process it, then
    /// [`Claim::finish`].
    New(Claim<'a>),
    /// The key was answered before: send this answer again and produce nothing.
    Replay(Stored),
    /// The key was answered before with records failed for a transient reason (each
    /// record's fate here): send those again, merge, then [`Claim::finish`] (dropped
    /// unfinished, the earlier answer stays).
    Resume(Claim<'a>, Arc<[Outcome]>),
    /// Nothing to track: the request has no key, the window is off, or the key is too
    /// large for the window. Process the request; there is nothing to finish.
    Untracked,
}

/// A request's hold on its key in a shared window: forgets the key if dropped before
/// [`Claim::finish`] (the client went away, or the handler failed).
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    window: &'a Mutex<Window>,
    key: String,
    /// Until the claim is ended.
    ticket: Option<Ticket>,
}

impl<'a> Claim<'a> {
    /// Looks `key` up in `window`: a new claim for a new key, the stored answer for a key
    /// answered before, [`ClaimOutcome::Untracked`] for a key too large to track; 409
    /// while the key is in progress, 422 for a different body.
    pub(crate) fn begin(
        window: &'a Mutex<Window>,
        key: String,
        fingerprint: u64,
    ) -> Result<ClaimOutcome<'a>> {
        let began = window
            .lock()
            .map_err(|_| poisoned())?
            .begin(&key, fingerprint, Instant::now());
        match began {
            Begin::New(Some(ticket)) => Ok(ClaimOutcome::New(Self {
                window,
                key,
                ticket: Some(ticket),
            })),
            Begin::New(None) => Ok(ClaimOutcome::Untracked),
            Begin::Replay(stored) => Ok(ClaimOutcome::Replay(stored)),
            Begin::Resume(ticket, stored) => {
                let claim = Self {
                    window,
                    key,
                    ticket: Some(ticket),
                };
                match stored.outcomes {
                    Some(outcomes) => Ok(ClaimOutcome::Resume(claim, outcomes)),
                    // Not resumable after all: replayed as it is.
                    None => Ok(ClaimOutcome::Replay(Stored::new(
                        stored.status,
                        stored.body,
                        stored.location,
                    ))),
                }
            }
            Begin::InProgress => Err(IngestError::IdempotencyInProgress),
            Begin::Mismatch => Err(IngestError::IdempotencyMismatch),
        }
    }

    /// Keeps `answer` for replay (or forgets the key when `None`).
    pub(crate) fn finish(mut self, answer: Option<Stored>) {
        self.end(answer);
    }

    fn end(&mut self, answer: Option<Stored>) {
        if let Some(ticket) = self.ticket.take()
            && let Ok(mut window) = self.window.lock()
        {
            window.complete(&self.key, ticket, answer, Instant::now());
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.end(None);
    }
}

fn poisoned() -> IngestError {
    IngestError::Internal {
        reason: "idempotency window lock poisoned".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn stored(body: &str) -> Stored {
        Stored::new(202, Bytes::from(body.to_owned()), None)
    }

    /// Begins `key` in `window`, expecting a new claim.
    fn new_claim<'a>(window: &'a Mutex<Window>, key: &str, fingerprint: u64) -> Claim<'a> {
        match Claim::begin(window, key.into(), fingerprint).unwrap() {
            ClaimOutcome::New(claim) => claim,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_dropped_claim_forgets_its_key() {
        let window = Mutex::new(Window::new(Duration::from_secs(60), 1 << 20));
        let claim = new_claim(&window, "k", 7);
        assert!(matches!(
            Claim::begin(&window, "k".into(), 7),
            Err(IngestError::IdempotencyInProgress)
        ));
        drop(claim);
        let claim = new_claim(&window, "k", 7);
        claim.finish(Some(stored("{}")));
        match Claim::begin(&window, "k".into(), 7).unwrap() {
            ClaimOutcome::Replay(answer) => assert_eq!(answer, stored("{}")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_too_large_for_the_window_is_untracked() {
        let window = Mutex::new(Window::new(Duration::from_secs(60), 64));
        assert!(matches!(
            Claim::begin(&window, "k".repeat(100), 7),
            Ok(ClaimOutcome::Untracked)
        ));
    }
}
