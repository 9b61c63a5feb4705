//! Event time for the stateful processors: when a record's event happened, each
//! partition's stream time, and the duration flags that are measured against it. Pure:
//! no I/O, no clock of its own (processing time comes in as an argument).
//!
//! A record's event time is its `dd-event-time` header (set by the processors on what
//! they derive), else its `dd-ingest-time` (set by the ingestion tier). A partition's
//! stream time is the largest event time it has seen, as in Kafka Streams, so decisions
//! made on it (retention, deadlines, eviction) come out the same when records are
//! replayed. One exception keeps quiet partitions from holding state forever: a
//! partition that handled no record for [`QUIET`] of processing time (measured by the
//! engine's ticks, which come after each batch and about once a second, so in practice
//! one to three seconds after its last record) has its stream time raised to the
//! processing time of the tick, as a wall-clock punctuator would. A
//! partition with records at least that often keeps event time, however busy the
//! engine is with other partitions.
//!
//! It must not decide what expires: the machines do, with the time it gives them.

use std::time::Duration;

use schemas::headers as h;

use crate::stateful::Record;

/// The event time of `record`, in milliseconds since the Unix epoch, if it carries one.
pub fn event_ms(record: &Record) -> Option<i64> {
    record
        .header(h::EVENT_TIME)
        .or_else(|| record.header(h::INGEST_TIME))
        .and_then(h::parse_millis)
}

/// The `dd-event-time` header for a record derived at event time `ms`.
pub fn event_time_header(ms: i64) -> (String, Vec<u8>) {
    (h::EVENT_TIME.to_owned(), ms.to_string().into_bytes())
}

/// How long a partition handles no record before its stream time follows the wall
/// clock.
pub const QUIET: Duration = Duration::from_secs(1);

/// One partition's stream time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamClock {
    time: Option<i64>,
    /// Whether a record was handled since the last tick.
    busy: bool,
    /// The processing time of the first tick after the last record handled, or of the
    /// first tick of a clock made (or restored) since.
    quiet_since: Option<i64>,
}

impl StreamClock {
    /// A clock that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream time, once any event time was seen (or a quiet tick came).
    pub fn now(&self) -> Option<i64> {
        self.time
    }

    /// A record was handled; `event_ms` is its event time, if it has one.
    pub fn observe(&mut self, event_ms: Option<i64>) {
        self.busy = true;
        if let Some(t) = event_ms {
            self.raise(t);
        }
    }

    /// Raises the stream time to at least `t` (restored state knows when it last
    /// changed).
    pub fn raise(&mut self, t: i64) {
        self.time = Some(self.time.map_or(t, |now| now.max(t)));
    }

    /// The engine's tick at processing time `now_ms`: a partition that handled nothing
    /// for [`QUIET`] (by the ticks' processing times) follows the wall clock. The first
    /// tick of a new or restored clock starts that wait: a partition restored before its
    /// backlog is read keeps the event time it was restored with meanwhile. Returns the
    /// stream time.
    pub fn tick(&mut self, now_ms: i64) -> Option<i64> {
        match self.quiet_since {
            _ if self.busy => {
                self.busy = false;
                self.quiet_since = Some(now_ms);
            }
            None => self.quiet_since = Some(now_ms),
            Some(since) if now_ms.saturating_sub(since) >= millis(QUIET) => self.raise(now_ms),
            Some(_) => {}
        }
        self.time
    }
}

/// Milliseconds of `d`, saturating.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Parses a duration flag: a number of seconds (`90`), or numbers with units, `ms`,
/// `s`, `m`, `h`, `d` (`500ms`, `2s`, `24h`, `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?}: expected a number before {rest:?}"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|e| format!("{text:?}: {e}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h, d)")),
        };
        rest = &rest[unit_len..];
        let part = number
            .checked_mul(unit_ms)
            .ok_or_else(|| format!("{text:?}: too long"))?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(|| format!("{text:?}: too long"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_flags_document() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("90"), Ok(s(90)));
        assert_eq!(parse_duration("2s"), Ok(s(2)));
        assert_eq!(parse_duration("24h"), Ok(s(86_400)));
        assert_eq!(parse_duration("1d"), Ok(s(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(s(5_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "h", "5 parsecs", "3w", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_time_is_the_largest_event_time_and_quiet_partitions_follow_the_wall_clock() {
        let mut clock = StreamClock::new();
        assert_eq!(clock.now(), None);
        clock.observe(Some(1_000));
        clock.observe(Some(500));
        clock.observe(None);
        assert_eq!(clock.now(), Some(1_000), "never goes back");
        // The tick right after a batch keeps event time...
        assert_eq!(clock.tick(9_000), Some(1_000));
        // ...and so do ticks soon after it (other partitions' batches)...
        assert_eq!(clock.tick(9_050), Some(1_000));
        assert_eq!(clock.tick(9_999), Some(1_000));
        // ...a tick a second after the last record follows the wall clock.
        assert_eq!(clock.tick(10_000), Some(10_000));
        assert_eq!(clock.tick(8_000), Some(10_000));
        // A new (or restored) clock waits as long before it follows the wall clock: a
        // partition restored before its backlog is read keeps its event time meanwhile.
        let mut idle = StreamClock::new();
        assert_eq!(idle.tick(5), None);
        assert_eq!(idle.tick(1_004), None);
        assert_eq!(idle.tick(1_005), Some(1_005));
        let mut restored = StreamClock::new();
        restored.raise(700);
        assert_eq!(restored.tick(5_000), Some(700));
        restored.observe(Some(800));
        assert_eq!(restored.tick(5_900), Some(800));
        assert_eq!(restored.tick(6_900), Some(6_900));
    }

    #[test]
    fn a_partition_with_a_record_every_half_second_keeps_event_time() {
        let mut clock = StreamClock::new();
        // Records with event times an hour behind the wall clock (a backlog), with ticks
        // of other partitions' batches every 10 ms in between.
        let (wall, behind) = (10_000_000, 3_600_000);
        for ms in (0..60_000).step_by(10) {
            if ms % 500 == 0 {
                clock.observe(Some(wall - behind + ms));
            }
            assert!(
                clock
                    .tick(wall + ms)
                    .is_some_and(|t| t <= wall - behind + ms),
                "at {ms} ms"
            );
        }
    }

    #[test]
    fn event_time_comes_from_the_event_time_header_then_the_ingest_time() {
        let mut record = Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            headers: vec![(h::INGEST_TIME.into(), b"20".to_vec())],
        };
        assert_eq!(event_ms(&record), Some(20));
        record.headers.insert(0, event_time_header(10));
        assert_eq!(event_ms(&record), Some(10));
        record.headers.clear();
        assert_eq!(event_ms(&record), None);
    }
}
