//! What a load run saw: counts, rates and latency, as JSON and as text.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;

use crate::plan::{Compression, Framing};

/// Latency percentiles of the calls that got an answer, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    /// Calls measured.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
}

impl Latency {
    /// The percentiles of a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

/// The report of one load run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The base URL loaded.
    pub target: String,
    /// `open` (fixed rate) or `closed` (as fast as answers come).
    pub mode: String,
    /// Open loop: the records per second asked for.
    pub rate: Option<f64>,
    /// Records per call.
    pub batch_size: u32,
    /// Connections.
    pub connections: u32,
    /// Tenants sending.
    pub tenants: u32,
    /// Batch framing (`json` or `ndjson`).
    pub format: Framing,
    /// Body compression (`none`, `gzip`, `zstd`).
    pub compression: Compression,
    /// Percent of calls posting telemetry.
    pub telemetry_percent: u8,
    /// Seconds from the first call due to the last answer.
    pub elapsed_secs: f64,
    /// Calls sent.
    pub calls: u64,
    /// Calls answered, by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Calls that got no answer: connection errors.
    pub transport_errors: u64,
    /// Calls that got no answer within the timeout.
    pub timeouts: u64,
    /// Calls that were due but never sent because the run ended (open loop only).
    pub not_sent: u64,
    /// Records sent (delivery requests and position fixes).
    pub records_sent: u64,
    /// Delivery requests the server accepted (a 202 means durably stored).
    pub accepted: u64,
    /// Position fixes the server accepted.
    pub telemetry_accepted: u64,
    /// Records refused as invalid (or too large).
    pub rejected: u64,
    /// Records not stored for a retryable reason (503, 429, timeouts, lost answers).
    pub failed: u64,
    /// Body bytes sent, as on the wire.
    pub bytes_sent: u64,
    /// Accepted records (both kinds) per second.
    pub records_per_sec: f64,
    /// Answered calls per second.
    pub calls_per_sec: f64,
    /// Body megabytes (10^6) sent per second.
    pub mb_per_sec: f64,
    /// Latency of answered calls (from when each was due, in open loop).
    pub latency_ms: Latency,
}

impl Report {
    /// Calls that got an answer, whatever its status.
    pub fn answered(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Calls answered with a status outside 2xx.
    pub fn non_2xx(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.rate {
            Some(rate) => format!("open loop at {rate:.0} records/s"),
            None => "closed loop".to_owned(),
        };
        writeln!(
            f,
            "{} for {:.2}s: {mode}, batch {}, {} connections, {} tenants, {}{}{}",
            self.target,
            self.elapsed_secs,
            self.batch_size,
            self.connections,
            self.tenants,
            match self.format {
                Framing::Json => "json",
                Framing::Ndjson => "ndjson",
            },
            match self.compression {
                Compression::None => "",
                Compression::Gzip => " + gzip",
                Compression::Zstd => " + zstd",
            },
            if self.telemetry_percent > 0 {
                format!(", {}% telemetry", self.telemetry_percent)
            } else {
                String::new()
            },
        )?;
        writeln!(
            f,
            "  throughput  {:>12.0} records/s  {:>10.0} calls/s  {:>8.1} MB/s",
            self.records_per_sec, self.calls_per_sec, self.mb_per_sec
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "  latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
        writeln!(
            f,
            "  records     {} sent, {} deliveries + {} fixes accepted, {} rejected, {} failed",
            self.records_sent, self.accepted, self.telemetry_accepted, self.rejected, self.failed
        )?;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect();
        write!(
            f,
            "  calls       {} sent; answers {}",
            self.calls,
            if statuses.is_empty() {
                "none".to_owned()
            } else {
                statuses.join(", ")
            }
        )?;
        if self.transport_errors > 0 || self.timeouts > 0 || self.not_sent > 0 {
            write!(
                f,
                "; {} connection errors, {} timeouts, {} due but not sent",
                self.transport_errors, self.timeouts, self.not_sent
            )?;
        }
        writeln!(f)
    }
}
