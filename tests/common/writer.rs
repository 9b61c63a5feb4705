//! A paced writer of delivery batches for tests under faults: every record carries an id
//! chosen here, so that the test knows exactly which records were answered as accepted
//! and can look for each of them in the history.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{call, client, request_in};

/// What the writer saw.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// What every id of this run starts with: `PREFIX-RUN`.
    pub ids: String,
    /// Ids of the records answered as accepted.
    pub accepted: BTreeSet<String>,
    /// Records sent.
    pub sent: u64,
    /// Calls by answer status.
    pub by_status: BTreeMap<u16, u64>,
    /// 503 answers without a `Retry-After` header.
    pub unavailable_without_retry_after: u64,
    /// Calls that got no answer within the client's timeout.
    pub timeouts: u64,
    /// Calls that failed below HTTP (connection refused or reset).
    pub transport_errors: u64,
    /// The slowest answer.
    pub slowest: Duration,
    /// When the first and the last call that did not get every record accepted ended.
    pub refusals: Option<(Instant, Instant)>,
}

impl WriterReport {
    fn merge(&mut self, other: Self) {
        self.accepted.extend(other.accepted);
        self.sent += other.sent;
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        self.unavailable_without_retry_after += other.unavailable_without_retry_after;
        self.timeouts += other.timeouts;
        self.transport_errors += other.transport_errors;
        self.slowest = self.slowest.max(other.slowest);
        self.refusals = match (self.refusals, other.refusals) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (a, b) => a.or(b),
        };
    }

    fn refused_now(&mut self) {
        let now = Instant::now();
        self.refusals = Some(self.refusals.map_or((now, now), |(first, _)| (first, now)));
    }

    /// How long after `fault` writes were last refused (zero if they never were).
    pub fn recovered_after(&self, fault: Instant) -> Duration {
        self.refusals.map_or(Duration::ZERO, |(_, last)| {
            last.saturating_duration_since(fault)
        })
    }

    /// Calls answered with a 5xx other than 503.
    pub fn server_errors(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| **s >= 500 && **s != 503)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Batches posted from a few connections until stopped.
pub struct Writer {
    ids: String,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<WriterReport>>,
}

impl Writer {
    /// Posts batches of `batch` records to `api` from `connections` tasks, each pausing
    /// `pause` between calls. Ids are `PREFIX-RUN-CONNECTION-N`, owner `prefix`, regions west
    /// of `lon` (see [`request_in`]); a call past `timeout` counts as a timeout.
    pub fn start(
        api: &str,
        prefix: &str,
        lon: i32,
        connections: usize,
        batch: usize,
        pause: Duration,
        timeout: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        // Ids new to the cluster even when it served an earlier run of the same test.
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let tasks = (0..connections)
            .map(|c| {
                let (api, prefix, stop) = (api.to_owned(), prefix.to_owned(), stop.clone());
                let run = run.clone();
                tokio::spawn(async move {
                    let http = client();
                    let url = format!("{api}/api/deliveryrequests/batch");
                    let mut report = WriterReport::default();
                    let mut seq = 0usize;
                    while !stop.is_cancelled() {
                        let records: Vec<serde_json::Value> = (0..batch)
                            .map(|i| {
                                let id = format!("{prefix}-{run}-{c}-{}", seq + i);
                                request_in(seq + i, &id, &prefix, lon)
                            })
                            .collect();
                        seq += batch;
                        let body = serde_json::to_vec(&records).unwrap_or_default();
                        report.sent += batch as u64;
                        let started = Instant::now();
                        let headers = [("content-type", "application/json")];
                        let answer = tokio::time::timeout(
                            timeout,
                            call(&http, "POST", &url, &headers, body),
                        )
                        .await;
                        report.slowest = report.slowest.max(started.elapsed());
                        match answer {
                            Err(_) => {
                                report.timeouts += 1;
                                report.refused_now();
                            }
                            Ok(Err(_)) => {
                                report.transport_errors += 1;
                                report.refused_now();
                            }
                            Ok(Ok((status, headers, body))) => {
                                if status != 202 {
                                    report.refused_now();
                                }
                                *report.by_status.entry(status).or_default() += 1;
                                if status == 503 && !headers.contains_key("retry-after") {
                                    report.unavailable_without_retry_after += 1;
                                }
                                for r in body["results"].as_array().into_iter().flatten() {
                                    if r.get("error").is_none()
                                        && let Some(id) = r["deliveryId"].as_str()
                                    {
                                        report.accepted.insert(id.to_owned());
                                    }
                                }
                            }
                        }
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                    report
                })
            })
            .collect();
        Self {
            ids: format!("{prefix}-{run}"),
            stop,
            tasks,
        }
    }

    /// Stops writing; what every connection saw.
    pub async fn finish(self) -> Result<WriterReport> {
        self.stop.cancel();
        let mut total = WriterReport {
            ids: self.ids,
            ..WriterReport::default()
        };
        for task in self.tasks {
            total.merge(task.await?);
        }
        Ok(total)
    }
}
