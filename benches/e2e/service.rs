//! A service of the binary under measurement, started as its own process (`ingest` or
//! `run`) through the test harness's starter (`tests/common/binary.rs`), found by the
//! address it announces, stopped with SIGTERM; and its resident memory, read from
//! `/proc`, now, at its peak and sampled over a load. It starts no broker and no load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dronedelivery::announce;

use crate::binary::{Binary, Launch, Signal};

/// A service process; killed when dropped.
pub(crate) struct Service {
    binary: Binary,
    /// Its HTTP API's base URL (`http://host:port`).
    pub(crate) base: String,
}

impl Service {
    /// Starts `dronedelivery ARGS` and waits until it says where its HTTP API listens.
    pub(crate) fn start(args: &[&str]) -> Self {
        let binary = Launch::new(args.first().copied().unwrap_or("dronedelivery"))
            .args(args)
            .start(&[announce::API])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let base = format!("http://{}", binary.announced(announce::API).unwrap());
        Self { binary, base }
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
}

/// A `kB` field of `/proc/PID/status`; 0 when it cannot be read.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
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
