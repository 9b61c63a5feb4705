//! Resident memory as numbers, for the soak run: reading a `kB` field (`VmRSS`, `VmHWM`)
//! out of the text of `/proc/PID/status`, the median of a time series over a window, the
//! least-squares line through it, and the verdict on its growth over the second half.
//!
//! Everything here is pure: it reads no file and samples nothing (`service.rs` reads
//! `/proc`, `soak.rs` samples), so that the verdict can be tested on made-up series.

use serde::{Deserialize, Serialize};

/// Largest growth of resident memory over the second half of a soak that passes, in
/// percent of the memory at the half (the bound).
pub(crate) const MAX_GROWTH_PERCENT: f64 = 10.0;

/// The fraction of the run, centred on its half, whose median is the memory at the half;
/// and the final fraction whose median is the memory at the end.
pub(crate) const WINDOW: f64 = 0.1;

/// A `kB` field of `/proc/PID/status` text (`field` with its colon, e.g. `"VmRSS:"`);
/// `None` when it is missing or not a number.
pub(crate) fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One sample of a process: seconds since the load started, resident MB (VmRSS) and
/// peak resident MB so far (VmHWM).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) rss_mb: f64,
    pub(crate) hwm_mb: f64,
}

/// The median of the resident MB of the samples with `from <= secs <= to`; NaN when
/// there is none.
pub(crate) fn median_rss(samples: &[Sample], from: f64, to: f64) -> f64 {
    let mut values: Vec<f64> = samples
        .iter()
        .filter(|s| s.secs >= from && s.secs <= to && s.rss_mb.is_finite())
        .map(|s| s.rss_mb)
        .collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The least-squares line through the resident MB of the samples with `secs >= from`:
/// (MB at `from`, MB per second); `None` with fewer than two distinct times.
pub(crate) fn fit_from(samples: &[Sample], from: f64) -> Option<(f64, f64)> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.secs >= from && s.rss_mb.is_finite())
        .map(|s| (s.secs, s.rss_mb))
        .collect();
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let var_t: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if var_t <= f64::EPSILON {
        return None;
    }
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let slope = cov / var_t;
    Some((mean_v + slope * (from - mean_t), slope))
}

/// How one process's resident memory moved over the second half of a run of `secs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Growth {
    /// Median resident MB over the window of `WINDOW` of the run centred on its half.
    pub(crate) half_mb: f64,
    /// Median resident MB over the last `WINDOW` of the run.
    pub(crate) end_mb: f64,
    /// `end_mb` over `half_mb`, minus one, in percent: the figure the verdict is on.
    pub(crate) growth_percent: f64,
    /// For comparison, the least-squares line through the second half: its rise over
    /// the second half in percent of its value at the half (NaN with too few samples).
    pub(crate) fit_growth_percent: f64,
    /// Peak resident MB (the last VmHWM sampled).
    pub(crate) peak_mb: f64,
    /// `growth_percent` is at most `MAX_GROWTH_PERCENT` (and was measured).
    pub(crate) pass: bool,
}

/// The growth of resident memory over the second half of a run of `secs` seconds: the
/// median of the last tenth against the median of the tenth centred on the half (medians,
/// so that a collection or a burst at one sample does not decide), with a line fitted
/// through the second half for comparison.
pub(crate) fn growth(samples: &[Sample], secs: f64) -> Growth {
    let half_mb = median_rss(
        samples,
        secs * (0.5 - WINDOW / 2.0),
        secs * (0.5 + WINDOW / 2.0),
    );
    let end_mb = median_rss(samples, secs * (1.0 - WINDOW), f64::INFINITY);
    let growth_percent = (end_mb / half_mb - 1.0) * 100.0;
    let fit_growth_percent = match fit_from(samples, secs * 0.5) {
        Some((at_half, slope)) if at_half > 0.0 => slope * secs * 0.5 / at_half * 100.0,
        _ => f64::NAN,
    };
    let peak_mb = samples.last().map_or(f64::NAN, |s| s.hwm_mb);
    Growth {
        half_mb,
        end_mb,
        growth_percent,
        fit_growth_percent,
        peak_mb,
        pass: growth_percent.is_finite() && growth_percent <= MAX_GROWTH_PERCENT,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The checks of this module, for the bench's own runner (`main.rs`).
    pub(crate) const TESTS: &[(&str, fn())] = &[
        (
            "memory::reads_kb_fields_of_proc_status",
            reads_kb_fields_of_proc_status,
        ),
        ("memory::median_of_a_window", median_of_a_window),
        ("memory::fit_of_a_line", fit_of_a_line),
        ("memory::flat_memory_passes", flat_memory_passes),
        (
            "memory::growth_past_the_bound_fails",
            growth_past_the_bound_fails,
        ),
        (
            "memory::growth_in_the_first_half_does_not_count",
            growth_in_the_first_half_does_not_count,
        ),
        ("memory::a_spike_does_not_decide", a_spike_does_not_decide),
        ("memory::no_samples_fails", no_samples_fails),
    ];

    const STATUS: &str = "Name:\tdronedelivery\nVmPeak:\t 2000000 kB\nVmHWM:\t  523264 kB\nVmRSS:\t  401408 kB\nThreads:\t42\n";

    /// One sample a second for `secs` seconds, resident MB from `rss`.
    fn series(secs: usize, rss: impl Fn(f64) -> f64) -> Vec<Sample> {
        let mut peak = 0.0f64;
        (0..=secs)
            .map(|t| {
                let t = t as f64;
                let rss_mb = rss(t);
                peak = peak.max(rss_mb);
                Sample {
                    secs: t,
                    rss_mb,
                    hwm_mb: peak,
                }
            })
            .collect()
    }

    fn reads_kb_fields_of_proc_status() {
        assert_eq!(status_kb(STATUS, "VmRSS:"), Some(401_408));
        assert_eq!(status_kb(STATUS, "VmHWM:"), Some(523_264));
        assert_eq!(status_kb(STATUS, "VmSwap:"), None);
        assert_eq!(status_kb("VmRSS:\tlots kB\n", "VmRSS:"), None);
        assert_eq!(status_kb("", "VmRSS:"), None);
    }

    fn median_of_a_window() {
        let samples = series(10, |t| t * 10.0);
        assert_eq!(median_rss(&samples, 0.0, 2.0), 10.0);
        assert_eq!(median_rss(&samples, 0.0, 3.0), 15.0);
        assert_eq!(median_rss(&samples, 9.5, f64::INFINITY), 100.0);
        assert!(median_rss(&samples, 20.0, 30.0).is_nan());
    }

    fn fit_of_a_line() {
        let samples = series(100, |t| 200.0 + 0.5 * t);
        let (at, slope) = fit_from(&samples, 50.0).unwrap();
        assert!((at - 225.0).abs() < 1e-9, "{at}");
        assert!((slope - 0.5).abs() < 1e-9, "{slope}");
        assert!(fit_from(&samples[..1], 0.0).is_none());
    }

    fn flat_memory_passes() {
        // Noise of ±3% around 400 MB.
        let samples = series(1800, |t| 400.0 * (1.0 + 0.03 * (t * 0.7).sin()));
        let g = growth(&samples, 1800.0);
        assert!(g.pass, "{g:?}");
        assert!(g.growth_percent.abs() < 6.0, "{g:?}");
        assert!(g.fit_growth_percent.abs() < 3.0, "{g:?}");
        assert!((g.peak_mb - 412.0).abs() < 1.0, "{g:?}");
    }

    fn growth_past_the_bound_fails() {
        // 400 MB at the half, rising to 460 MB (+15%) at the end.
        let samples = series(1800, |t| {
            if t < 900.0 {
                400.0
            } else {
                400.0 + 60.0 * (t - 900.0) / 900.0
            }
        });
        let g = growth(&samples, 1800.0);
        assert!(!g.pass, "{g:?}");
        assert!(g.growth_percent > 12.0 && g.growth_percent < 15.0, "{g:?}");
        assert!((g.fit_growth_percent - 15.0).abs() < 0.5, "{g:?}");
    }

    fn growth_in_the_first_half_does_not_count() {
        // Warming up: 100 MB to 400 MB over the first third, flat after.
        let samples = series(1800, |t| 100.0 + 300.0 * (t / 600.0).min(1.0));
        let g = growth(&samples, 1800.0);
        assert!(g.pass, "{g:?}");
        assert!(g.growth_percent.abs() < 1e-9, "{g:?}");
    }

    fn a_spike_does_not_decide() {
        // One sample of 2 GB in the last tenth.
        let samples = series(1800, |t| if t == 1750.0 { 2000.0 } else { 400.0 });
        let g = growth(&samples, 1800.0);
        assert!(g.pass, "{g:?}");
        assert_eq!(g.end_mb, 400.0);
        assert_eq!(g.peak_mb, 2000.0);
    }

    fn no_samples_fails() {
        let g = growth(&[], 1800.0);
        assert!(!g.pass);
        assert!(g.growth_percent.is_nan());
    }
}
