//! The binary's services as separate processes, as they are deployed: started with their
//! flags, found by the addresses they print, stopped with SIGTERM or killed. Starting and
//! ending a process is the harness's (`binary.rs`); this module knows the services' flags
//! and probes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dronedelivery::announce;

use super::binary::{Binary, Launch};
use super::{HttpClient, SETTLE, call_bytes};

/// How long a service may take to say where it listens.
pub const STARTUP: Duration = super::binary::STARTUP;

/// A service of the binary started on its own, with the addresses it printed.
#[derive(Debug)]
pub struct Service {
    binary: Binary,
}

impl Service {
    /// Starts `dronedelivery ARGS` and waits for each of `announces` (a line prefix from
    /// `dronedelivery::announce`, such as `announce::HEALTH`) on its stdout; returns what
    /// follows each prefix (the bare `host:port`).
    pub fn start(
        name: &'static str,
        args: &[&str],
        announces: &[&'static str],
    ) -> Result<(Self, Vec<String>)> {
        let binary = Launch::new(name)
            .args(args)
            .startup_timeout(STARTUP)
            .start(announces)?;
        let found = binary.addresses();
        Ok((Self { binary }, found))
    }

    /// The history sink on `brokers`, writing to `data`, rolling files every 300 ms;
    /// also returns its health listener's base URL.
    pub fn history(brokers: &str, data: &str) -> Result<(Self, String)> {
        let (service, found) = Self::start(
            "history",
            &[
                "history",
                "--brokers",
                brokers,
                "--data",
                data,
                "--roll-interval-ms",
                "300",
                "--health-listen",
                "127.0.0.1:0",
            ],
            &[announce::HEALTH],
        )?;
        Ok((service, format!("http://{}", found[0])))
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub fn kill(self) -> Result<()> {
        self.binary.kill().map(drop)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.binary.pid()
    }

    /// SIGTERM, then a clean exit within the settle time.
    pub fn stop(self) -> Result<()> {
        self.binary.stop(SETTLE)
    }
}

/// Waits until `url` (GET) answers 200 with a body containing `needle`.
pub async fn eventually_contains(client: &HttpClient, url: &str, needle: &str) -> Result<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, _, body) = call_bytes(client, "GET", url, &[], Vec::new()).await?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if status == 200 && body.contains(needle) {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("{url} answered {status} without {needle:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pipeline as the compose file and the Kubernetes manifests deploy it: every service
/// its own process of the binary, meeting only through the brokers and the history's
/// folder. Services are named (`ingest`, `workflow`, `deliveries`, `scheduling`,
/// `tracking`, `history`, `simulate`, `sql-server`, with a `#N` suffix for extra members)
/// so that a test can kill and restart each.
pub struct Topology {
    pub brokers: String,
    pub data: String,
    /// The ingestion tier's base URL.
    pub api: String,
    /// The SQL server's base URL.
    pub sql: String,
    services: Vec<(String, Service)>,
}

impl Topology {
    /// Starts every service on `brokers`, writing the history to `data`. `ingest_args`
    /// are extra flags for the ingestion tier.
    pub fn start(brokers: &str, data: &str, ingest_args: &[&str]) -> Result<Self> {
        let mut args = vec!["ingest", "--brokers", brokers, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(ingest_args);
        let (ingest, found) = Service::start("ingest", &args, &[announce::API])?;
        let mut topology = Self {
            brokers: brokers.to_owned(),
            data: data.to_owned(),
            api: format!("http://{}", found[0]),
            sql: String::new(),
            services: vec![("ingest".to_owned(), ingest)],
        };
        for name in [
            "workflow",
            "deliveries",
            "scheduling",
            "tracking",
            "history",
            "simulate",
        ] {
            topology.add(name)?;
        }
        let (sql, found) = Service::start(
            "sql-server",
            &[
                "sql-server",
                "--data",
                data,
                "--listen",
                "127.0.0.1:0",
                "--flight-listen",
                "off",
            ],
            &[announce::SQL_SERVER],
        )?;
        topology.sql = format!("http://{}", found[0]);
        topology.services.push(("sql-server".to_owned(), sql));
        Ok(topology)
    }

    /// Starts one more member of `role` (a processor, `history` or `simulate`) under the
    /// name `label`; a label `role#N` starts a member of `role`.
    pub fn add(&mut self, label: &str) -> Result<()> {
        let role = label.split('#').next().unwrap_or(label);
        let service = match role {
            "history" => Service::history(&self.brokers, &self.data)?.0,
            "simulate" => {
                Service::start(
                    "simulate",
                    &[
                        "simulate",
                        "--brokers",
                        &self.brokers,
                        "--simulate-target",
                        &self.api,
                        "--simulate-speedup",
                        "20000",
                        "--simulate-tick-ms",
                        "20",
                        "--health-listen",
                        "127.0.0.1:0",
                    ],
                    &[announce::HEALTH],
                )?
                .0
            }
            processor => {
                Service::start(
                    "process",
                    &[
                        "process",
                        "--brokers",
                        &self.brokers,
                        "--processors",
                        processor,
                        "--health-listen",
                        "127.0.0.1:0",
                    ],
                    &[announce::HEALTH],
                )?
                .0
            }
        };
        self.services.push((label.to_owned(), service));
        Ok(())
    }

    fn take(&mut self, label: &str) -> Result<Service> {
        let at = self
            .services
            .iter()
            .position(|(l, _)| l == label)
            .with_context(|| format!("no service {label}"))?;
        Ok(self.services.remove(at).1)
    }

    /// SIGKILL the service `label`, as a crash would.
    pub fn kill(&mut self, label: &str) -> Result<()> {
        self.take(label)?.kill()
    }

    /// SIGTERM the service `label` and wait for its clean exit.
    pub fn stop(&mut self, label: &str) -> Result<()> {
        self.take(label)?.stop()
    }

    /// Every service, SIGTERM, in the reverse order of their start; each must exit
    /// cleanly.
    pub fn stop_all(mut self) -> Result<()> {
        while let Some((_, service)) = self.services.pop() {
            service.stop()?;
        }
        Ok(())
    }
}
