//! The benchmark's report: what `e2e.json` holds, as typed structs that serde writes and
//! reads back (`--render` reads an existing `e2e.json` into them), and `e2e.md`, the
//! report as markdown (the passes side by side, then each in full).
//!
//! The field names and the shape are those of the reports already committed, so that
//! they stay readable; a figure that is not a number is written as `null` and read back
//! as NaN (shown as `?`). This module measures nothing and starts nothing; the SVG chart
//! is `chart.rs`'s.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use loadgen::Report;
use serde::{Deserialize, Deserializer, Serialize};

use crate::plan::{HTTP_TIERS, Pass};

/// One run of the benchmark: `e2e.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct E2eReport {
    /// When the run started (RFC 3339).
    pub(crate) started: String,
    pub(crate) machine: Machine,
    /// The commit measured, with `+changes` when the working tree differed from it.
    pub(crate) commit: String,
    pub(crate) seconds_per_phase: f64,
    /// The whole pipeline's lag backpressure, in records.
    pub(crate) max_consumer_lag: u64,
    /// The command that reproduces the run.
    pub(crate) command: String,
    pub(crate) passes: Vec<PassReport>,
}

/// The machine the run was measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    pub(crate) os: String,
}

/// Every phase on one kind of broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PassReport {
    pub(crate) pass: Pass,
    /// What the broker was, in words.
    pub(crate) broker: String,
    /// The run of the whole pipeline that warmed a new Kafka cluster up, not measured.
    pub(crate) warm_up: Option<Pipeline>,
    /// The raw producer's ceiling: its fastest run.
    pub(crate) raw_producer: RawProducer,
    /// Every run of the raw producer, each way of producing before and after the HTTP
    /// tier's phases.
    #[serde(default)]
    pub(crate) raw_runs: Vec<RawProducer>,
    /// The HTTP tier in closed loop, one entry per batch size.
    pub(crate) http_tier: Vec<HttpTier>,
    /// The HTTP tier with single requests in open loop.
    pub(crate) single_open_loop: HttpTier,
    /// The largest batch's accepted records/s over the raw producer's.
    pub(crate) http_tier_efficiency: f64,
    /// The whole pipeline, saturated.
    pub(crate) pipeline: Pipeline,
    /// The whole pipeline at 80% of its own end-to-end rate.
    pub(crate) pipeline_sustained: Pipeline,
    pub(crate) overload: Overload,
}

/// The raw producer phase: generated requests straight to the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RawProducer {
    /// How it produced: `futures` (tasks sharing one producer, a future per record, as
    /// the tier does) or `callback` (producers each driven by one thread, a delivery
    /// callback counting acknowledgements).
    #[serde(default = "futures_method")]
    pub(crate) method: String,
    /// Producers (clients) used.
    #[serde(default = "one")]
    pub(crate) producers: usize,
    /// Tasks (or threads) sending.
    pub(crate) tasks: usize,
    /// `before` or `after` the HTTP tier's phases.
    #[serde(default)]
    pub(crate) when: String,
    pub(crate) records_sent: u64,
    pub(crate) records_acked: u64,
    pub(crate) records_failed: u64,
    /// Seconds from the start until the last acknowledgement.
    pub(crate) elapsed_secs: f64,
    pub(crate) records_per_sec: f64,
    pub(crate) mb_per_sec: f64,
}

fn futures_method() -> String {
    "futures".into()
}

fn one() -> usize {
    1
}

impl RawProducer {
    /// How it ran, for people: `callback, 2 producers, before the tier`.
    pub(crate) fn label(&self) -> String {
        let producers = if self.producers == 1 {
            "one producer".to_owned()
        } else {
            format!("{} producers", self.producers)
        };
        let how = match self.method.as_str() {
            "callback" => format!("delivery callback, {producers}, one thread each"),
            _ => format!("a future per record, {} tasks, {producers}", self.tasks),
        };
        if self.when.is_empty() {
            how
        } else {
            format!("{how}, {} the tier", self.when)
        }
    }
}

/// One run of the HTTP tier alone under the load generator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HttpTier {
    pub(crate) batch_size: u32,
    pub(crate) connections: u32,
    pub(crate) report: Report,
    pub(crate) peak_rss_mb: f64,
}

/// One run of the whole pipeline at a fixed offered rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pipeline {
    pub(crate) offered_records_per_sec: f64,
    pub(crate) report: Report,
    pub(crate) load_secs: f64,
    /// This run's requests in the history.
    pub(crate) history_rows: i64,
    /// This run's requests with their `Created` event in the history.
    pub(crate) created_events: i64,
    /// Accepted requests missing from the history or without their event.
    pub(crate) lost: i64,
    /// Seconds from the load's start until everything accepted was queryable (or until
    /// the history stopped growing).
    pub(crate) all_queryable_after_secs: f64,
    /// Of those, the seconds after the load's end.
    pub(crate) drain_secs: f64,
    pub(crate) end_to_end_deliveries_per_sec: f64,
    /// Took everything offered, lost nothing, and had it all queryable within 5 s of
    /// the load's end.
    pub(crate) kept_up: bool,
    pub(crate) freshness_secs: Freshness,
    pub(crate) peak_rss_mb: f64,
    /// Records the run added to each topic, as retained.
    pub(crate) kafka_records: BTreeMap<String, i64>,
    pub(crate) kafka_records_per_delivery: f64,
    pub(crate) rss_mb_at_half_load: f64,
    pub(crate) rss_mb_at_end_of_load: f64,
}

/// The probes' seconds from ack until a query saw them; NaN when none was seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Freshness {
    /// Probes acknowledged.
    pub(crate) probes: usize,
    /// Of those, probes a query saw.
    pub(crate) seen: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub(crate) p50: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub(crate) p99: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub(crate) max: f64,
}

/// The HTTP tier offered far more than it can take, for a while.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Overload {
    pub(crate) seconds: f64,
    pub(crate) report: Report,
    pub(crate) rss_mb: OverloadRss,
    /// Resident MB at the end of the run minus half-way through.
    pub(crate) growth_second_half_mb: f64,
    pub(crate) peak_rss_mb: f64,
    /// Resident memory over the run: (seconds, MB).
    pub(crate) samples: Vec<(f64, f64)>,
}

/// Resident MB at 25, 50, 75 and 100 % of the overload, and after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OverloadRss {
    pub(crate) p25: f64,
    pub(crate) p50: f64,
    pub(crate) p75: f64,
    pub(crate) end: f64,
    pub(crate) after: f64,
}

/// A figure written as `null` when it was not a number (serde_json writes NaN so), read
/// back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

impl PassReport {
    /// The pass's name for a column or a legend.
    pub(crate) fn short_label(&self) -> String {
        match self.pass {
            Pass::Embedded => "embedded broker".to_owned(),
            Pass::Kafka => {
                let broker = self.broker.as_str();
                broker
                    .split(" on ")
                    .next()
                    .unwrap_or(broker)
                    .split(" at ")
                    .next()
                    .unwrap_or(broker)
                    .to_owned()
            }
        }
    }
}

/// `e2e.md`: the run's facts, the passes side by side, then each pass in full.
pub(crate) fn markdown(r: &E2eReport) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "# End-to-end benchmark\n");
    let _ = writeln!(
        out,
        "{} · {} cores · {} GiB · commit {} · {} s per phase · `run` with lag backpressure at {} records\n",
        m.cpu,
        m.cores,
        json_number(m.memory_gib),
        r.commit,
        json_number(r.seconds_per_phase),
        r.max_consumer_lag,
    );
    let _ = writeln!(out, "Reproduce: `{}`\n", r.command);
    side_by_side(&mut out, &r.passes);
    for pass in &r.passes {
        pass_markdown(&mut out, pass);
    }
    let _ = writeln!(out, "![throughput and latency by batch size](e2e.svg)");
    out
}

/// A figure as JSON writes it (`24.0`, `null` when it is not a number).
fn json_number(v: f64) -> String {
    serde_json::Value::from(v).to_string()
}

/// The headline figures of every pass, one column each.
fn side_by_side(out: &mut String, passes: &[PassReport]) {
    let _ = writeln!(out, "## The passes side by side\n");
    let mut header = String::from("| figure |");
    let mut rule = String::from("| --- |");
    for pass in passes {
        let _ = write!(header, " {} |", pass.short_label());
        rule.push_str(" ---: |");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    // Calls an open-loop run could not send (the service fell behind): their wait is not
    // in the latencies.
    let not_sent = |report: &Report| match report.not_sent {
        0 => String::new(),
        n => format!(" · {} calls not sent", thousands(n as f64)),
    };
    let latency = |e: Option<&HttpTier>| match e {
        Some(e) => format!(
            "{} · p50 {} / p99 {} ms{}",
            thousands(e.report.records_per_sec),
            num(e.report.latency_ms.p50, 1),
            num(e.report.latency_ms.p99, 1),
            not_sent(&e.report)
        ),
        // A report with fewer batch sizes than the bench runs now.
        None => "? · p50 ? / p99 ? ms".to_owned(),
    };
    let mut line = |what: &str, cell: &dyn Fn(&PassReport) -> String| {
        let mut row = format!("| {what} |");
        for pass in passes {
            let _ = write!(row, " {} |", cell(pass));
        }
        let _ = writeln!(out, "{row}");
    };
    line("raw producer ceiling, records/s (its fastest run)", &|p| {
        format!(
            "{} · {}",
            thousands(p.raw_producer.records_per_sec),
            p.raw_producer.label()
        )
    });
    for (i, (batch, connections)) in HTTP_TIERS.into_iter().enumerate() {
        line(
            &format!("HTTP, batch {batch} ({connections} connections, closed loop), records/s"),
            &|p| latency(p.http_tier.get(i)),
        );
    }
    line("HTTP, single requests in open loop, records/s", &|p| {
        latency(Some(&p.single_open_loop))
    });
    line(
        "HTTP tier efficiency (batch 10,000 over the raw producer's ceiling)",
        &|p| num(p.http_tier_efficiency, 2),
    );
    line(
        "whole pipeline over the raw producer (saturated deliveries/s over the ceiling)",
        &|p| {
            num(
                p.pipeline.end_to_end_deliveries_per_sec / p.raw_producer.records_per_sec,
                3,
            )
        },
    );
    line("whole pipeline, saturated: accepted records/s", &|p| {
        let e = &p.pipeline;
        format!(
            "{} of {} offered · {} answers 503{}",
            thousands(e.report.records_per_sec),
            thousands(e.offered_records_per_sec),
            e.report.by_status.get(&503).copied().unwrap_or(0),
            not_sent(&e.report)
        )
    });
    line("whole pipeline, saturated: deliveries/s end to end", &|p| {
        let e = &p.pipeline;
        format!(
            "{} · {} lost",
            thousands(e.end_to_end_deliveries_per_sec),
            e.lost
        )
    });
    line(
        "whole pipeline, sustained (80% of its own end-to-end rate)",
        &|p| {
            let e = &p.pipeline_sustained;
            format!(
                "{}/s offered · kept up: {} · all in {} s after the load",
                thousands(e.offered_records_per_sec),
                yes_no(e.kept_up),
                num(e.drain_secs, 1)
            )
        },
    );
    line("history freshness, sustained (ack until queryable)", &|p| {
        let fresh = &p.pipeline_sustained.freshness_secs;
        format!("p50 {} / p99 {} s", num(fresh.p50, 2), num(fresh.p99, 2))
    });
    line("Kafka records per delivery", &|p| {
        num(p.pipeline_sustained.kafka_records_per_delivery, 2)
    });
    line("`run` peak resident MB (saturated / sustained)", &|p| {
        format!(
            "{} / {}",
            num(p.pipeline.peak_rss_mb, 0),
            num(p.pipeline_sustained.peak_rss_mb, 0)
        )
    });
    line("`ingest` resident MB under overload (end / peak)", &|p| {
        format!(
            "{} / {}",
            num(p.overload.rss_mb.end, 0),
            num(p.overload.peak_rss_mb, 0)
        )
    });
    let _ = writeln!(out);
}

fn yes_no(v: bool) -> &'static str {
    if v { "yes" } else { "no" }
}

/// `v` with `digits` decimals, or `?` when it is missing.
fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "?".to_owned()
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "?".to_owned();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 {
        out.insert(0, '-');
    }
    out
}

/// One row of a pass's table: a load run's figures and the peak resident memory of
/// the service it loaded.
fn row(out: &mut String, name: &str, rep: &Report, peak_rss_mb: f64) {
    let l = &rep.latency_ms;
    let _ = writeln!(
        out,
        "| {name} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.0} |",
        rep.records_per_sec,
        rep.calls_per_sec,
        rep.mb_per_sec,
        l.p50,
        l.p99,
        l.p999,
        l.max,
        rep.non_2xx(),
        rep.not_sent,
        peak_rss_mb,
    );
}

/// One pass in full: every phase's row, then the pipeline, records and memory.
fn pass_markdown(out: &mut String, r: &PassReport) {
    let _ = writeln!(out, "## {}\n", r.broker);
    if let Some(warm_up) = &r.warm_up {
        let _ = writeln!(
            out,
            "Warmed up first by the whole pipeline, not counted below: {} s at {} records/s offered, {} accepted, {} of them in the history {} s after the load started. Before each run below, the pipeline's topics and consumer groups were deleted and the topics created again.\n",
            num(warm_up.load_secs, 0),
            thousands(warm_up.offered_records_per_sec),
            thousands(warm_up.report.accepted as f64),
            thousands(warm_up.history_rows as f64),
            num(warm_up.all_queryable_after_secs, 1),
        );
    }
    let raw = &r.raw_producer;
    let _ = writeln!(
        out,
        "| phase | records/s | calls/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | non-2xx | calls not sent | peak RSS MB |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    if r.raw_runs.is_empty() {
        let _ = writeln!(
            out,
            "| raw producer (ceiling) | {:.0} | | {:.1} | | | | | | | |",
            raw.records_per_sec, raw.mb_per_sec
        );
    }
    for run in &r.raw_runs {
        let _ = writeln!(
            out,
            "| raw producer: {} | {:.0} | | {:.1} | | | | | | | |",
            run.label(),
            run.records_per_sec,
            run.mb_per_sec
        );
    }
    for entry in &r.http_tier {
        row(
            out,
            &format!(
                "HTTP, batch {} ({} connections, closed loop)",
                entry.batch_size, entry.connections
            ),
            &entry.report,
            entry.peak_rss_mb,
        );
    }
    let single = &r.single_open_loop;
    row(
        out,
        &format!(
            "HTTP, single requests, open loop at {:.0}/s ({} connections)",
            single.report.rate.unwrap_or(f64::NAN),
            single.connections
        ),
        &single.report,
        single.peak_rss_mb,
    );
    let p = &r.pipeline;
    let sustained = &r.pipeline_sustained;
    for (what, entry) in [("saturated", p), ("sustained", sustained)] {
        row(
            out,
            &format!(
                "whole pipeline, {what}: batch 1000, open loop at {:.0}/s",
                entry.offered_records_per_sec
            ),
            &entry.report,
            entry.peak_rss_mb,
        );
    }
    let o = &r.overload;
    row(
        out,
        &format!(
            "HTTP under overload (1,000 connections, 2M/s offered; {} calls due were never sent, their wait is not in the latencies)",
            o.report.not_sent
        ),
        &o.report,
        o.peak_rss_mb,
    );
    let _ = writeln!(
        out,
        "\n**HTTP tier efficiency** (batch 10,000 over the raw producer's ceiling, its fastest run: {}): {:.2}. **Whole pipeline over the raw producer** (saturated end-to-end deliveries/s, each about 4 Kafka records, over the ceiling's records/s; `run` holds its own embedded broker, in its process): {:.3}\n",
        raw.label(),
        r.http_tier_efficiency,
        r.pipeline.end_to_end_deliveries_per_sec / raw.records_per_sec
    );
    for (what, entry) in [("saturated", p), ("sustained", sustained)] {
        let fresh = &entry.freshness_secs;
        let _ = writeln!(
            out,
            "**Whole pipeline, {what}** ({:.0} records/s offered; kept up: {}): {} of {} accepted requests in the history ({} with their `Created` event), all queryable {:.1} s after the load started ({:.1} s after it ended): {:.0} deliveries/s end to end. Freshness (ack until a query sees it) over {} probes: p50 {:.2} s, p99 {:.2} s, max {:.2} s. Resident memory {:.0} MB half-way through the load, {:.0} MB at its end, peak {:.0} MB.\n",
            entry.offered_records_per_sec,
            yes_no(entry.kept_up),
            entry.history_rows,
            entry.report.accepted,
            entry.created_events,
            entry.all_queryable_after_secs,
            entry.drain_secs,
            entry.end_to_end_deliveries_per_sec,
            fresh.probes,
            fresh.p50,
            fresh.p99,
            fresh.max,
            entry.rss_mb_at_half_load,
            entry.rss_mb_at_end_of_load,
            entry.peak_rss_mb,
        );
    }
    let topics: Vec<String> = sustained
        .kafka_records
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "**Kafka records per delivery** (sustained run, every topic, as retained): {:.2} ({}).\n",
        sustained.kafka_records_per_delivery,
        topics.join(", ")
    );
    let rss = &o.rss_mb;
    let _ = writeln!(
        out,
        "**Memory under overload** ({:.0} s): resident {:.0} / {:.0} / {:.0} / {:.0} MB at 25 / 50 / 75 / 100 % of the run (growth over the second half {:+.0} MB), peak {:.0} MB.\n",
        o.seconds, rss.p25, rss.p50, rss.p75, rss.end, o.growth_second_half_mb, o.peak_rss_mb,
    );
}
