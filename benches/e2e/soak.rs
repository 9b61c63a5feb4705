//! The soak run (`--soak DURATION`): `dronedelivery run --simulate-drones` on its own
//! embedded broker under a sustained load below its saturation for a long while, with
//! each process's resident memory sampled every few seconds; after the load, the restore
//! time of each state changelog; then the service is stopped.
//!
//! The rate is `--soak-rate`, or half of the end-to-end rate of the whole pipeline
//! phase's saturated run (`pipeline.rs`, on a fresh embedded broker and in a process of
//! its own, so that the soaked one starts fresh). `run` is one process, so the series has one process; its changelogs live on
//! its embedded broker, which is gone when it exits, so they are read while it is up,
//! after the load, with the call a processor restores a partition with
//! (`changelog.rs`).
//!
//! It returns the report; the verdict's arithmetic is `memory.rs`'s, the files are
//! written by `main.rs`.

use std::time::{Duration, Instant};

use dronedelivery::announce;

use crate::changelog;
use crate::cluster::Broker;
use crate::memory::{self, MAX_GROWTH_PERCENT};
use crate::phases::{load, load_config};
use crate::pipeline;
use crate::report::Machine;
use crate::service::{MemorySampler, Service};
use crate::soak_report::{Calibration, ProcessMemory, SoakReport};

/// Records per call and connections of the sustained load.
const BATCH: u32 = 100;
const CONNECTIONS: u32 = 4;

/// The calibration offers this much (far above what `run` takes; lag backpressure
/// refuses the rest), as the whole pipeline phase does by default.
const CALIBRATION_OFFER: f64 = 100_000.0;

/// How long the service may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// The share of the calibrated end-to-end rate the soak offers: well below it, since the
/// soaked service also takes the simulated drones' positions, which the calibration's
/// does not.
const CALIBRATION_FRACTION: f64 = 0.5;

/// What the soak run is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct SoakArgs {
    /// Seconds of sustained load.
    pub(crate) secs: f64,
    /// Records/s offered; calibrated when `None`.
    pub(crate) rate: Option<f64>,
    /// Seconds of the calibration run.
    pub(crate) calibration_secs: f64,
    /// More flags for `run`.
    pub(crate) run_args: Vec<String>,
}

/// The facts of a run the report starts with.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// When the run started (RFC 3339).
    pub(crate) started: String,
    pub(crate) machine: Machine,
    pub(crate) commit: String,
    /// The command that reproduces the run.
    pub(crate) command: String,
}

/// Seconds between two memory samples: every few seconds, at most about 600 samples
/// per process, at least one a second.
pub(crate) fn sample_every(secs: f64) -> f64 {
    (secs / 600.0).clamp(1.0, 5.0)
}

/// `run --simulate-drones` on its own embedded broker, with its data in `data` and the
/// extra flags.
fn run_flags<'a>(data: &'a str, extra: &'a [String]) -> Vec<&'a str> {
    let mut flags = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--flight-listen",
        "off",
        "--data",
        data,
        "--simulate-drones",
    ];
    flags.extend(extra.iter().map(String::as_str));
    flags
}

/// The calibration: the whole pipeline phase's saturated run (`pipeline.rs`, `run` on a
/// fresh embedded broker of the bench's, offered far more than it takes) for `secs`.
async fn calibrate(secs: f64) -> Calibration {
    let broker = Broker::embedded();
    let saturated = pipeline::whole_pipeline(&broker.bootstrap(), CALIBRATION_OFFER, secs).await;
    broker.stop().await;
    Calibration {
        secs,
        offered_records_per_sec: CALIBRATION_OFFER,
        accepted_records_per_sec: saturated.report.records_per_sec,
        end_to_end_deliveries_per_sec: saturated.end_to_end_deliveries_per_sec,
        fraction: CALIBRATION_FRACTION,
    }
}

/// The soak run; `facts` are the report's run facts (start, machine, commit, command).
pub(crate) async fn soak(args: &SoakArgs, facts: Facts) -> SoakReport {
    let (rate, rate_from, calibration) = match args.rate {
        Some(rate) => (rate, "--soak-rate".to_owned(), None),
        None => {
            let calibration = calibrate(args.calibration_secs).await;
            let capacity = calibration.end_to_end_deliveries_per_sec;
            assert!(
                capacity.is_finite() && capacity > 0.0,
                "the calibration measured no end-to-end rate; give --soak-rate"
            );
            let rate = (capacity * CALIBRATION_FRACTION / 100.0).round().max(1.0) * 100.0;
            (
                rate,
                format!(
                    "{:.0}% of the {capacity:.0} deliveries/s end to end of the whole pipeline saturated for {:.0} s",
                    CALIBRATION_FRACTION * 100.0,
                    args.calibration_secs
                ),
                Some(calibration),
            )
        }
    };
    let data = tempfile::tempdir().unwrap();
    let flags = run_flags(data.path().to_str().unwrap(), &args.run_args);
    let service = Service::start_announcing(&flags, &[announce::EMBEDDED_BROKER]);
    let broker = service.announced(announce::EMBEDDED_BROKER);
    let every = sample_every(args.secs);
    println!(
        "soak: `dronedelivery {}` offered {rate:.0} records/s ({rate_from}) for {:.0} s, memory sampled every {every:.0} s",
        flags.join(" "),
        args.secs
    );

    let sampler = MemorySampler::start(
        vec![("run".to_owned(), service.pid())],
        Duration::from_secs_f64(every),
    );
    let mut config = load_config(&service.base, BATCH, CONNECTIONS, args.secs);
    config.rate = rate;
    let report = load(config).await;
    let series = sampler.stop().await;
    println!("soak load:\n{report}");
    // The verdict's windows are fractions of the time sampled.
    let processes: Vec<ProcessMemory> = series
        .into_iter()
        .map(|samples| {
            let secs = samples.last().map_or(args.secs, |s| s.secs);
            ProcessMemory {
                name: "run".to_owned(),
                growth: memory::growth(&samples, secs),
                samples,
            }
        })
        .collect();

    let restores = changelog::restore_times(&broker).await;
    let stopping = Instant::now();
    let (stop, stopped_cleanly) = service.stop_within(STOP_GRACE);
    let stop_secs = stopping.elapsed().as_secs_f64();
    println!("run stopped {stop_secs:.1} s after SIGTERM: {stop}");
    let pass = !processes.is_empty() && processes.iter().all(|p| p.growth.pass);
    let kept_up = kept_up(&report);
    // The data folder is a fresh temporary one.
    let service_line = format!("dronedelivery {}", flags.join(" "))
        .replace(data.path().to_str().unwrap(), "TEMP_DIR");
    SoakReport {
        started: facts.started,
        machine: facts.machine,
        commit: facts.commit,
        command: facts.command,
        service: service_line,
        rate_from,
        calibration,
        load: report,
        sample_every_secs: every,
        processes,
        restores,
        stop_secs,
        stop,
        stopped_cleanly,
        kept_up,
        max_growth_percent: MAX_GROWTH_PERCENT,
        pass,
    }
}

/// The service took the load as offered: every call due was sent, answered within the
/// timeout, and accepted. If not, the memory measured is that of a service falling
/// behind (queues filling), not of a sustained load.
pub(crate) fn kept_up(report: &loadgen::Report) -> bool {
    report.not_sent == 0
        && report.non_2xx() == 0
        && report.timeouts == 0
        && report.transport_errors == 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The checks of this module, for the bench's own runner (`main.rs`).
    pub(crate) const TESTS: &[(&str, fn())] = &[
        (
            "soak::samples_every_few_seconds_and_bounded",
            samples_every_few_seconds_and_bounded,
        ),
        (
            "soak::kept_up_means_every_call_sent_and_accepted",
            kept_up_means_every_call_sent_and_accepted,
        ),
    ];

    fn kept_up_means_every_call_sent_and_accepted() {
        let mut report: loadgen::Report = serde_json::from_value(serde_json::json!({
            "target": "http://127.0.0.1:1", "mode": "open", "rate": 1000.0, "batch_size": 100,
            "connections": 4, "tenants": 50, "format": "json", "compression": "none",
            "telemetry_percent": 0, "elapsed_secs": 10.0, "calls": 100,
            "by_status": {"202": 100}, "transport_errors": 0, "timeouts": 0, "not_sent": 0,
            "records_sent": 10000, "accepted": 10000, "telemetry_accepted": 0, "rejected": 0,
            "failed": 0, "bytes_sent": 0, "records_per_sec": 1000.0, "calls_per_sec": 10.0, "mb_per_sec": 0.3,
            "latency_ms": {"count": 100, "p50": 1.0, "p90": 1.0, "p99": 1.0, "p999": 1.0, "max": 1.0, "mean": 1.0}
        }))
        .unwrap();
        assert!(kept_up(&report));
        report.not_sent = 3;
        assert!(!kept_up(&report));
        report.not_sent = 0;
        report.by_status.insert(503, 1);
        assert!(!kept_up(&report));
    }

    fn samples_every_few_seconds_and_bounded() {
        assert_eq!(sample_every(120.0), 1.0);
        assert_eq!(sample_every(1800.0), 3.0);
        assert_eq!(sample_every(86_400.0), 5.0);
        for secs in [60.0, 1800.0, 3600.0] {
            assert!(secs / sample_every(secs) <= 720.0);
        }
    }
}
