//! A service of the binary under measurement, started as its own process (`ingest` or
//! `run`) through the test harness's starter (`tests/common/binary.rs`), found by the
//! address it announces, stopped with SIGTERM; and its resident memory, read from
//! `/proc`, now, at its peak and sampled over a load (one process every 250 ms, or
//! several processes' current and peak memory every few seconds for the soak run). It
//! starts no broker and no load; the arithmetic on the samples is `memory.rs`'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dronedelivery::announce;

use crate::binary::{Binary, Launch, Signal};
use crate::memory::{self, Sample};

/// A service process; killed when dropped.
pub(crate) struct Service {
    binary: Binary,
    /// Its HTTP API's base URL (`http://host:port`).
    pub(crate) base: String,
}

impl Service {
    /// Starts `dronedelivery ARGS` and waits until it says where its HTTP API listens.
    pub(crate) fn start(args: &[&str]) -> Self {
        Self::start_announcing(args, &[])
    }

    /// Starts `dronedelivery ARGS` and waits until it says where its HTTP API listens
    /// and has printed a line starting with each of `more` (`announce` prefixes, read
    /// back with [`Service::announced`]).
    pub(crate) fn start_announcing(args: &[&str], more: &[&str]) -> Self {
        let mut announces = vec![announce::API];
        announces.extend_from_slice(more);
        let binary = Launch::new(args.first().copied().unwrap_or("dronedelivery"))
            .args(args)
            .start(&announces)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let base = format!("http://{}", binary.announced(announce::API).unwrap());
        Self { binary, base }
    }

    /// What followed `prefix` on the line it announced (given to `start_announcing`).
    pub(crate) fn announced(&self, prefix: &str) -> String {
        self.binary.announced(prefix).unwrap().to_owned()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.binary.pid()
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub(crate) fn peak_rss(&self) -> u64 {
        proc_status_kb(self.pid(), "VmHWM:") * 1024
    }

    /// Resident memory now (VmRSS), in bytes.
    pub(crate) fn rss(&self) -> u64 {
        proc_status_kb(self.pid(), "VmRSS:") * 1024
    }

    /// SIGTERM, then a kill if it has not exited within 30 s; how it exited is not
    /// looked at.
    pub(crate) fn stop(self) {
        let _ = self.binary.terminate(Signal::Term, Duration::from_secs(30));
    }

    /// SIGTERM, then a kill if it has not exited within `grace`: how it ended, in words
    /// (`exited with ...`, or the error), and whether it exited on its own with success.
    pub(crate) fn stop_within(self, grace: Duration) -> (String, bool) {
        match self.binary.terminate(Signal::Term, grace) {
            Ok(status) => (format!("exited with {status}"), status.success()),
            Err(e) => (format!("{e:#}; killed"), false),
        }
    }
}

/// A `kB` field of `/proc/PID/status`; 0 when it cannot be read.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    memory::status_kb(&status, field).unwrap_or(0)
}

/// Bytes as MiB.
pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Samples a process's resident memory every 250 ms: (seconds, MB).
pub(crate) struct RssSampler {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, f64)>>,
}

impl RssSampler {
    pub(crate) fn start(pid: u32) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut samples = Vec::new();
            while flag.load(Ordering::Relaxed) {
                samples.push((
                    start.elapsed().as_secs_f64(),
                    mb(proc_status_kb(pid, "VmRSS:") * 1024),
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        });
        Self { running, task }
    }

    /// The samples taken.
    pub(crate) async fn stop(self) -> Vec<(f64, f64)> {
        self.running.store(false, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The sample nearest `t` seconds.
pub(crate) fn rss_at(samples: &[(f64, f64)], t: f64) -> f64 {
    samples
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
        .map_or(0.0, |s| s.1)
}

/// Samples the current (VmRSS) and peak (VmHWM) resident memory of named processes
/// every `every`, for the soak run; prints a progress line about once a minute.
pub(crate) struct MemorySampler {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Vec<Sample>>>,
}

impl MemorySampler {
    /// Starts sampling `processes` (name, pid) now.
    pub(crate) fn start(processes: Vec<(String, u32)>, every: Duration) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut series: Vec<Vec<Sample>> = vec![Vec::new(); processes.len()];
            let mut next_progress = 60.0;
            while flag.load(Ordering::Relaxed) {
                let secs = start.elapsed().as_secs_f64();
                for ((_, pid), samples) in processes.iter().zip(&mut series) {
                    let status =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let kb = |field| {
                        memory::status_kb(&status, field).map_or(f64::NAN, |kb| kb as f64 / 1024.0)
                    };
                    samples.push(Sample {
                        secs,
                        rss_mb: kb("VmRSS:"),
                        hwm_mb: kb("VmHWM:"),
                    });
                }
                if secs >= next_progress {
                    next_progress += 60.0;
                    let now: Vec<String> = processes
                        .iter()
                        .zip(&series)
                        .filter_map(|((name, _), s)| {
                            s.last().map(|s| {
                                format!("{name} {:.0} MB (peak {:.0})", s.rss_mb, s.hwm_mb)
                            })
                        })
                        .collect();
                    println!("soak: {:.0} s, resident: {}", secs, now.join(", "));
                }
                tokio::time::sleep(every).await;
            }
            series
        });
        Self { running, task }
    }

    /// The samples taken, one series per process, in the order given.
    pub(crate) async fn stop(self) -> Vec<Vec<Sample>> {
        self.running.store(false, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}
