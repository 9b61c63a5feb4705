//! The binary's services as separate processes, as they are deployed: started with their
//! flags, found by the addresses they print, stopped with SIGTERM, killed, paused or
//! resumed. Starting and ending a process is the harness's (`binary.rs`); this module
//! knows the services' flags, the environment a deployment gives each member (its
//! instance id, the processing guarantee) and the probes.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dronedelivery::announce;

use super::binary::{Binary, Launch, Signal, Stderr};
use super::{HttpClient, SETTLE, call_bytes};

/// The variable that names a member's stable identity (`--instance-id`): its
/// transactional ids are `dronedelivery-<processor>-<instance id>`, so a member restarted
/// with the same id fences what its predecessor left behind.
pub const INSTANCE_ID_VAR: &str = "DRONEDELIVERY_INSTANCE_ID";
/// The variable that chooses the processing guarantee (`--processing-guarantee`).
pub const GUARANTEE_VAR: &str = "DRONEDELIVERY_PROCESSING_GUARANTEE";

/// The processing guarantee a [`Topology`] asks its services for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Guarantee {
    /// Whatever the binary chooses: exactly-once with `--brokers`.
    #[default]
    Default,
    /// Kafka transactions per batch.
    ExactlyOnce,
    /// Offset markers in the changelogs; a crash may repeat work.
    AtLeastOnce,
}

impl Guarantee {
    /// The value of [`GUARANTEE_VAR`], if one is set.
    pub fn value(self) -> Option<&'static str> {
        match self {
            Self::Default => None,
            Self::ExactlyOnce => Some("exactly-once"),
            Self::AtLeastOnce => Some("at-least-once"),
        }
    }

    /// Whether a pipeline on a real cluster runs exactly-once with this choice.
    pub fn exactly_once_on_a_cluster(self) -> bool {
        self != Self::AtLeastOnce
    }
}

/// How long a service may take to say where it listens.
pub const STARTUP: Duration = super::binary::STARTUP;

/// A service of the binary started on its own, with the addresses it printed.
#[derive(Debug)]
pub struct Service {
    binary: Binary,
    /// The file its stderr is appended to, when not inherited.
    log: Option<PathBuf>,
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
        Self::launch(Launch::new(name).args(args), announces)
    }

    /// Starts `launch` and waits for each of `announces`, as [`Service::start`] does.
    pub fn launch(launch: Launch, announces: &[&'static str]) -> Result<(Self, Vec<String>)> {
        let binary = launch.startup_timeout(STARTUP).start(announces)?;
        let found = binary.addresses();
        Ok((Self { binary, log: None }, found))
    }

    /// The history sink on `brokers`, writing to `data`, rolling files every 300 ms;
    /// also returns its health listener's base URL.
    pub fn history(brokers: &str, data: &str) -> Result<(Self, String)> {
        let (service, found) =
            Self::start("history", &history_args(brokers, data), &[announce::HEALTH])?;
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

    /// What followed each awaited announce line (the bare `host:port`s), in order.
    pub fn addresses(&self) -> Vec<String> {
        self.binary.addresses()
    }

    /// SIGTERM, then a clean exit within the settle time.
    pub fn stop(self) -> Result<()> {
        self.binary.stop(SETTLE)
    }

    /// SIGSTOP: the process hangs, holding its connections, as a zombie would.
    pub fn pause(&self) -> Result<()> {
        self.binary.signal(Signal::Stop)
    }

    /// SIGCONT: a paused process goes on.
    pub fn resume(&self) -> Result<()> {
        self.binary.signal(Signal::Cont)
    }

    /// Waits up to `limit` for the process to exit by itself: its status, or `None` if it
    /// still runs.
    pub fn exited_within(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.binary.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The file its stderr (its log) is appended to, when the [`Topology`] was asked to
    /// keep logs.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// What it has logged so far (empty when its stderr is inherited).
    pub fn log_text(&self) -> Result<String> {
        match &self.log {
            Some(path) => Ok(String::from_utf8_lossy(
                &std::fs::read(path).with_context(|| path.display().to_string())?,
            )
            .into_owned()),
            None => Ok(String::new()),
        }
    }
}

/// The history sink's arguments: on `brokers`, writing to `data`, rolling files every
/// 300 ms, its health listener on a free port.
fn history_args<'a>(brokers: &'a str, data: &'a str) -> [&'a str; 9] {
    [
        "history",
        "--brokers",
        brokers,
        "--data",
        data,
        "--roll-interval-ms",
        "300",
        "--health-listen",
        "127.0.0.1:0",
    ]
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

/// How a [`Topology`] runs its services, beyond their flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The processing guarantee every service is asked for (through [`GUARANTEE_VAR`]).
    pub guarantee: Guarantee,
    /// A folder for the services' logs: each process's stderr is appended to
    /// `LABEL.N.log` there (N counts the starts of that label), instead of this process's
    /// stderr.
    pub logs: Option<PathBuf>,
}

/// The pipeline as the compose file and the Kubernetes manifests deploy it: every service
/// its own process of the binary, meeting only through the brokers and the history's
/// folder. Services are named (`ingest`, `workflow`, `deliveries`, `scheduling`,
/// `tracking`, `history`, `simulate`, `sql-server`, with a `#N` suffix for extra members)
/// so that a test can kill and restart each.
///
/// Each member gets an instance id of its own ([`INSTANCE_ID_VAR`], see
/// [`Topology::instance_id`]) that stays the same when its label is started again, as a
/// pod keeps its name when its container restarts: a restarted processor fences what the
/// process before it left behind.
pub struct Topology {
    pub brokers: String,
    pub data: String,
    /// The ingestion tier's base URL.
    pub api: String,
    /// The SQL server's base URL.
    pub sql: String,
    options: Options,
    /// What every instance id of this topology starts with: new to the cluster, so that
    /// no two topologies share a transactional id.
    run: String,
    /// How many times each label was started.
    starts: std::collections::HashMap<String, usize>,
    services: Vec<(String, Service)>,
}

impl Topology {
    /// Starts every service on `brokers`, writing the history to `data`. `ingest_args`
    /// are extra flags for the ingestion tier.
    pub fn start(brokers: &str, data: &str, ingest_args: &[&str]) -> Result<Self> {
        Self::start_with(brokers, data, ingest_args, Options::default())
    }

    /// [`Topology::start`] with `options`.
    pub fn start_with(
        brokers: &str,
        data: &str,
        ingest_args: &[&str],
        options: Options,
    ) -> Result<Self> {
        let mut topology = Self {
            brokers: brokers.to_owned(),
            data: data.to_owned(),
            api: String::new(),
            sql: String::new(),
            options,
            run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            starts: Default::default(),
            services: Vec::new(),
        };
        let mut args = vec!["ingest", "--brokers", brokers, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(ingest_args);
        let (ingest, found) = topology.launch("ingest", &args, announce::API)?;
        topology.api = format!("http://{found}");
        topology.services.push(("ingest".to_owned(), ingest));
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
        let (sql, found) = topology.launch(
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
            announce::SQL_SERVER,
        )?;
        topology.sql = format!("http://{found}");
        topology.services.push(("sql-server".to_owned(), sql));
        Ok(topology)
    }

    /// The instance id of the member `label`: the same whenever that label is started
    /// again in this topology, and different from every other member's.
    pub fn instance_id(&self, label: &str) -> String {
        format!("{}-{}", self.run, label.replace('#', "-"))
    }

    /// Starts `dronedelivery ARGS` as the member `label`, with its instance id, the
    /// guarantee and where its log goes; waits for `announce` and answers what followed.
    fn launch(
        &mut self,
        label: &str,
        args: &[&str],
        announce: &'static str,
    ) -> Result<(Service, String)> {
        let mut launch = Launch::new(label.to_owned())
            .args(args)
            .env(INSTANCE_ID_VAR, self.instance_id(label));
        if let Some(guarantee) = self.options.guarantee.value() {
            launch = launch.env(GUARANTEE_VAR, guarantee);
        }
        let starts = self.starts.entry(label.to_owned()).or_default();
        *starts += 1;
        let log = self
            .options
            .logs
            .as_ref()
            .map(|folder| folder.join(format!("{}.{starts}.log", label.replace('#', "-"))));
        if let Some(path) = &log {
            launch = launch.stderr(Stderr::File(path.clone()));
        }
        let (mut service, found) = Service::launch(launch, &[announce])?;
        service.log = log;
        let found = found.into_iter().next().unwrap_or_default();
        Ok((service, found))
    }

    /// Starts one more member of `role` (a processor, `history` or `simulate`) under the
    /// name `label`; a label `role#N` starts a member of `role`. A label started before
    /// (and killed or stopped since) gets the instance id it had.
    pub fn add(&mut self, label: &str) -> Result<()> {
        let role = label.split('#').next().unwrap_or(label);
        let (brokers, data, api) = (self.brokers.clone(), self.data.clone(), self.api.clone());
        let args: Vec<&str> = match role {
            "history" => history_args(&brokers, &data).to_vec(),
            "simulate" => vec![
                "simulate",
                "--brokers",
                &brokers,
                "--simulate-target",
                &api,
                "--simulate-speedup",
                "20000",
                "--simulate-tick-ms",
                "20",
                "--health-listen",
                "127.0.0.1:0",
            ],
            processor => vec![
                "process",
                "--brokers",
                &brokers,
                "--processors",
                processor,
                "--health-listen",
                "127.0.0.1:0",
            ],
        };
        let (service, _) = self.launch(label, &args, announce::HEALTH)?;
        self.services.push((label.to_owned(), service));
        Ok(())
    }

    /// Takes the service `label` out of the topology, still running: the test owns it
    /// from now on (to pause it, or to watch it exit), and the label may be started
    /// again, with the same instance id, while it runs.
    pub fn detach(&mut self, label: &str) -> Result<Service> {
        let at = self
            .services
            .iter()
            .position(|(l, _)| l == label)
            .with_context(|| format!("no service {label}"))?;
        Ok(self.services.remove(at).1)
    }

    /// The running service `label`.
    pub fn service(&self, label: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s)
            .with_context(|| format!("no service {label}"))
    }

    /// SIGKILL the service `label`, as a crash would.
    pub fn kill(&mut self, label: &str) -> Result<()> {
        self.detach(label)?.kill()
    }

    /// SIGKILL the service `label` and start it again at once, with its instance id.
    pub fn restart(&mut self, label: &str) -> Result<()> {
        self.kill(label)?;
        self.add(label)
    }

    /// SIGTERM the service `label` and wait for its clean exit.
    pub fn stop(&mut self, label: &str) -> Result<()> {
        self.detach(label)?.stop()
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
