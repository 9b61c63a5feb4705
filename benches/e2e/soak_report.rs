//! The soak run's report: what `soak.json` holds (typed structs serde writes), and the
//! same as `soak.md` (markdown), `soak.csv` (every memory sample, one line each) and
//! `soak.svg` (resident memory over time, with the two windows the verdict compares).
//!
//! It measures nothing, starts nothing and writes no file: `soak.rs` measures, `main.rs`
//! writes.

use std::fmt::Write as _;

use loadgen::Report;
use serde::{Deserialize, Serialize};

use crate::changelog::Restore;
use crate::memory::{Growth, MAX_GROWTH_PERCENT, Sample, WINDOW};
use crate::report::Machine;

/// One soak run: `soak.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SoakReport {
    /// When the run started (RFC 3339).
    pub(crate) started: String,
    pub(crate) machine: Machine,
    /// The commit measured, with `+changes` when the working tree differed from it.
    pub(crate) commit: String,
    /// The command that reproduces the run.
    pub(crate) command: String,
    /// The command line of the service soaked (`dronedelivery run ...`).
    pub(crate) service: String,
    /// How the offered rate was chosen.
    pub(crate) rate_from: String,
    pub(crate) calibration: Option<Calibration>,
    /// The sustained load: the load generator's report.
    pub(crate) load: Report,
    /// Seconds between two memory samples of a process.
    pub(crate) sample_every_secs: f64,
    /// Each process's resident memory over the load and its verdict.
    pub(crate) processes: Vec<ProcessMemory>,
    /// Each state changelog read end to end after the load, while the service was up.
    pub(crate) restores: Vec<Restore>,
    /// Seconds from SIGTERM until the service exited (or was killed, after 60 s),
    /// after the changelogs were read.
    pub(crate) stop_secs: f64,
    /// How it ended: `exited with ...`, or why it was killed.
    pub(crate) stop: String,
    /// It exited on its own, with success.
    pub(crate) stopped_cleanly: bool,
    /// The service took the load as offered (every call due sent and accepted); if not,
    /// the memory measured is that of a service falling behind.
    pub(crate) kept_up: bool,
    /// The bound on the growth over the second half, in percent.
    pub(crate) max_growth_percent: f64,
    /// Every process passed.
    pub(crate) pass: bool,
}

/// The short saturated run of the whole pipeline that chose the soak's rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Calibration {
    pub(crate) secs: f64,
    pub(crate) offered_records_per_sec: f64,
    /// Records/s the service accepted (it refuses the rest with 503 under lag
    /// backpressure).
    pub(crate) accepted_records_per_sec: f64,
    /// Deliveries/s from the load's start until all were in the history.
    pub(crate) end_to_end_deliveries_per_sec: f64,
    /// The share of the end-to-end rate the soak offers.
    pub(crate) fraction: f64,
}

/// One process's resident memory over the load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProcessMemory {
    pub(crate) name: String,
    pub(crate) growth: Growth,
    pub(crate) samples: Vec<Sample>,
}

fn pass_fail(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

/// `v` with `digits` decimals, or `?` when it is not a number.
fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "?".to_owned()
    }
}

/// The verdict in one line per process, as printed at the end of the run.
pub(crate) fn verdict(r: &SoakReport) -> String {
    let mut out = String::new();
    if !r.kept_up {
        let _ = writeln!(
            out,
            "NOTE: the service did not keep up with the load ({} calls due not sent, {} answers not 2xx, {} timeouts): the memory below is that of a service falling behind; give a lower --soak-rate",
            r.load.not_sent,
            r.load.non_2xx(),
            r.load.timeouts
        );
    }
    for p in &r.processes {
        let g = &p.growth;
        let _ = writeln!(
            out,
            "{}: `{}` resident memory over the second half {:+.1}% ({} MB at the half, {} MB at the end; bound {}%); line fit {:+.1}%; peak {} MB",
            pass_fail(g.pass),
            p.name,
            g.growth_percent,
            num(g.half_mb, 0),
            num(g.end_mb, 0),
            MAX_GROWTH_PERCENT,
            g.fit_growth_percent,
            num(g.peak_mb, 0),
        );
    }
    out
}

/// `soak.md`.
pub(crate) fn markdown(r: &SoakReport) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let l = &r.load;
    let _ = writeln!(out, "# Soak run: {}\n", pass_fail(r.pass));
    let _ = writeln!(
        out,
        "{} · {} cores · {} GiB · commit {} · started {}\n",
        m.cpu, m.cores, m.memory_gib, r.commit, r.started
    );
    let _ = writeln!(out, "Reproduce: `{}`\n", r.command);
    let _ = writeln!(out, "Service: `{}`\n", r.service);
    let _ = writeln!(
        out,
        "**Load**: {} records/s offered ({}), open loop, batches of {} over {} connections, for {} s: {} requests accepted ({} records/s), {} answers not 2xx, {} calls not sent, {} timeouts; latency p50 {} / p99 {} / max {} ms. Kept up: {}.\n",
        num(l.rate.unwrap_or(f64::NAN), 0),
        r.rate_from,
        l.batch_size,
        l.connections,
        num(l.elapsed_secs, 0),
        l.accepted,
        num(l.records_per_sec, 0),
        l.non_2xx(),
        l.not_sent,
        l.timeouts,
        num(l.latency_ms.p50, 1),
        num(l.latency_ms.p99, 1),
        num(l.latency_ms.max, 1),
        if r.kept_up { "yes" } else { "no" },
    );
    let _ = writeln!(
        out,
        "**Resident memory** (VmRSS, sampled every {} s; the verdict compares the median of the last {:.0}% of the load with the median of the {:.0}% centred on its half, bound +{}%; the least-squares line through the second half is given for comparison):\n",
        num(r.sample_every_secs, 1),
        WINDOW * 100.0,
        WINDOW * 100.0,
        MAX_GROWTH_PERCENT,
    );
    let _ = writeln!(
        out,
        "| process | MB at the half | MB at the end | growth | line fit | peak MB | verdict |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for p in &r.processes {
        let g = &p.growth;
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {}% | {}% | {} | {} |",
            p.name,
            num(g.half_mb, 0),
            num(g.end_mb, 0),
            signed(g.growth_percent),
            signed(g.fit_growth_percent),
            num(g.peak_mb, 0),
            pass_fail(g.pass),
        );
    }
    let _ = writeln!(
        out,
        "\n**Restore time of each changelog** after the load (every partition read from its start to its end with the call a processor restores with, one after another, and folded as a restore folds it), while the service was up:\n"
    );
    let _ = writeln!(
        out,
        "| changelog | partitions | records | MB | live keys | seconds | slowest partition, s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in &r.restores {
        let failed = if c.failed.is_empty() {
            String::new()
        } else {
            format!(" ({} partitions not read to the end)", c.failed.len())
        };
        let _ = writeln!(
            out,
            "| `{}`{failed} | {} | {} | {} | {} | {} | {} |",
            c.topic,
            c.partitions,
            c.records,
            num(c.bytes as f64 / 1e6, 1),
            c.live_keys,
            num(c.secs, 2),
            num(c.slowest_partition_secs, 2),
        );
    }
    let _ = writeln!(
        out,
        "\n**Stop**: SIGTERM after the changelogs were read; {} s later it had {}.\n",
        num(r.stop_secs, 1),
        if r.stopped_cleanly {
            "exited cleanly".to_owned()
        } else {
            format!("not exited cleanly ({})", r.stop)
        }
    );
    let _ = writeln!(out, "{}", verdict(r));
    let _ = writeln!(out, "![resident memory over time](soak.svg)");
    out
}

/// `+1.2` / `-0.4`, or `?`.
fn signed(v: f64) -> String {
    if v.is_finite() {
        format!("{v:+.1}")
    } else {
        "?".to_owned()
    }
}

/// `soak.csv`: `process,secs,rss_mb,hwm_mb`, one line per sample.
pub(crate) fn csv(r: &SoakReport) -> String {
    let mut out = String::from("process,secs,rss_mb,hwm_mb\n");
    for p in &r.processes {
        for s in &p.samples {
            let _ = writeln!(
                out,
                "{},{:.1},{:.1},{:.1}",
                p.name, s.secs, s.rss_mb, s.hwm_mb
            );
        }
    }
    out
}

/// `soak.svg`: each process's resident memory (solid) and peak (dashed) over the load,
/// the two windows the verdict compares shaded, and their medians as short lines.
pub(crate) fn chart(r: &SoakReport) -> String {
    const COLORS: [&str; 4] = ["#4878a8", "#d35400", "#2e8b57", "#8e44ad"];
    let (w, h, pad) = (900.0, 420.0, 60.0);
    let (plot_w, plot_h) = (w - 2.0 * pad, h - 2.5 * pad);
    let (x0, y0) = (pad, h - 1.5 * pad);
    let secs = r.load.elapsed_secs.max(
        r.processes
            .iter()
            .flat_map(|p| p.samples.last())
            .map(|s| s.secs)
            .fold(1.0, f64::max),
    );
    let top = r
        .processes
        .iter()
        .flat_map(|p| &p.samples)
        .flat_map(|s| [s.rss_mb, s.hwm_mb])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let x = |t: f64| x0 + plot_w * t / secs;
    let y = |mb: f64| y0 - plot_h * mb / top;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="14" text-anchor="middle">Resident memory over the soak (MB): {}</text>"##,
        w / 2.0,
        pass_fail(r.pass)
    );
    // The windows: the tenth centred on the half, and the last tenth.
    for (from, to) in [
        (0.5 - WINDOW / 2.0, 0.5 + WINDOW / 2.0),
        (1.0 - WINDOW, 1.0),
    ] {
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{plot_h}" fill="#eee"/>"##,
            x(secs * from),
            y0 - plot_h,
            x(secs * to) - x(secs * from)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"##,
        x0 + plot_w,
        y0 - plot_h
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text><line x1="{x0}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#ddd"/>"##,
            x0 - 4.0,
            y(v) + 4.0,
            y(v),
            x0 + plot_w,
            y(v)
        );
        let t = secs * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            x(t),
            y0 + 16.0,
            minutes(t)
        );
    }
    for (k, p) in r.processes.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        for (values, dash) in [
            (
                p.samples
                    .iter()
                    .map(|s| (s.secs, s.rss_mb))
                    .collect::<Vec<_>>(),
                "",
            ),
            (
                p.samples.iter().map(|s| (s.secs, s.hwm_mb)).collect(),
                r#" stroke-dasharray="4 3""#,
            ),
        ] {
            let points: Vec<String> = values
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>"#,
                points.join(" ")
            );
        }
        let g = &p.growth;
        for (mb, from, to) in [
            (g.half_mb, 0.5 - WINDOW / 2.0, 0.5 + WINDOW / 2.0),
            (g.end_mb, 1.0 - WINDOW, 1.0),
        ] {
            if mb.is_finite() {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black" stroke-width="2"/>"#,
                    x(secs * from),
                    y(mb),
                    x(secs * to),
                    y(mb)
                );
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{color}">{}: {:+.1}% over the second half (dashed: peak)</text>"#,
            x0 + 10.0,
            y0 - plot_h + 16.0 + 16.0 * k as f64,
            p.name,
            g.growth_percent
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">minutes of load (shaded: the windows compared)</text>"#,
        x0 + plot_w / 2.0,
        y0 + 36.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// Seconds as `m:ss`.
fn minutes(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}
