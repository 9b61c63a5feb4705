//! A real Apache Kafka cluster for the tests and the end-to-end benchmark
//! (`benches/e2e/main.rs` includes this file): KRaft nodes started by `deploy/tools/kafka` as
//! `java` processes on 127.0.0.1.
//!
//! A cluster is stopped when dropped, also when a test panics; the script's watchdog stops
//! it once the test process is gone (a cluster shared by a test file lives in a static,
//! which is never dropped). A test that needs Kafka fails with the script's reason when
//! Java, Maven or the jars are missing: it is never skipped.
//!
//! `DRONEDELIVERY_TEST_KAFKA_DIR=DIR` makes the tests use a cluster started before with
//! `deploy/tools/kafka start --nodes 3 --dir DIR` and leave it running, to look at its
//! topics after a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use bus::ClientSettings;

/// A running cluster and the folder holding its nodes' data, configs and logs.
#[derive(Debug)]
pub struct KafkaCluster {
    dir: PathBuf,
    bootstrap: String,
    nodes: usize,
    /// Started by this process (stopped and removed when dropped), or one started
    /// before it with the script (`DRONEDELIVERY_TEST_KAFKA_DIR`), left running.
    owned: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tools/kafka")
}

/// Runs the script with `args` on this cluster's folder; its stdout.
fn run_script(args: &[&str], dir: &Path) -> Result<String> {
    let output = Command::new(script())
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .with_context(|| format!("running deploy/tools/kafka {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "deploy/tools/kafka {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Where the clusters of the tests (and the benchmark) keep their folders: one per
/// cluster, named by the process that owns it, so that the folders of processes that
/// are gone can be removed.
fn clusters_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("kafka")
}

fn remove_clusters_of_dead_processes(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = run_script(&["stop", "--now"], &entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl KafkaCluster {
    /// Checks Java and fetches the jars (once per machine); the reason when it cannot.
    pub fn fetch() -> Result<()> {
        let output = Command::new(script())
            .arg("fetch")
            .output()
            .context("running deploy/tools/kafka fetch")?;
        if !output.status.success() {
            bail!(
                "deploy/tools/kafka fetch failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Formats and starts `nodes` (1 or 3) KRaft nodes; returns once every node answers
    /// metadata.
    pub fn start(nodes: usize) -> Result<Self> {
        let root = clusters_root();
        std::fs::create_dir_all(&root)?;
        remove_clusters_of_dead_processes(&root);
        let dir = root.join(format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()));
        let pid = std::process::id().to_string();
        let started = run_script(
            &["start", "--nodes", &nodes.to_string(), "--owner-pid", &pid],
            &dir,
        );
        let out = match started {
            Ok(out) => out,
            Err(e) => {
                // Whatever did start is stopped now, not when this process ends.
                let _ = run_script(&["stop", "--now"], &dir);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.context(format!("starting a {nodes}-node Apache Kafka cluster")));
            }
        };
        let bootstrap = out
            .lines()
            .last()
            .context("the script printed no bootstrap list")?
            .trim()
            .to_owned();
        Ok(Self {
            dir,
            bootstrap,
            nodes,
            owned: true,
        })
    }

    /// A cluster started before with `deploy/tools/kafka start --dir DIR`: the tests use
    /// it and leave it running (its topics and logs can be looked at afterwards).
    pub fn existing(dir: &Path) -> Result<Self> {
        let out =
            run_script(&["start"], dir).context("starting the nodes of an existing cluster")?;
        let bootstrap = out
            .lines()
            .last()
            .context("no bootstrap list")?
            .trim()
            .to_owned();
        let nodes = bootstrap.split(',').count();
        Ok(Self {
            dir: dir.to_path_buf(),
            bootstrap,
            nodes,
            owned: false,
        })
    }

    /// The three-node cluster this test binary shares between its tests (started by the
    /// first test that asks). Tests on it use their own tenants and ids; tests that stop
    /// brokers or need the cluster to themselves take [`exclusive`] first.
    ///
    /// A cluster that could not be started fails every test that asks, with the reason,
    /// without trying again.
    pub fn shared() -> &'static KafkaCluster {
        static SHARED: OnceLock<std::result::Result<KafkaCluster, String>> = OnceLock::new();
        let shared =
            SHARED.get_or_init(|| match std::env::var_os("DRONEDELIVERY_TEST_KAFKA_DIR") {
                Some(dir) => KafkaCluster::existing(Path::new(&dir))
                    .map_err(|e| format!("DRONEDELIVERY_TEST_KAFKA_DIR: {e:#}")),
                None => KafkaCluster::start(3)
                    .map_err(|e| format!("a real Kafka cluster is needed for this test: {e:#}")),
            });
        match shared {
            Ok(cluster) => cluster,
            Err(reason) => panic!("{reason}"),
        }
    }

    /// `host:port,...` of every node.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Client settings for this cluster.
    pub fn settings(&self) -> ClientSettings {
        ClientSettings::plain(self.bootstrap.clone())
    }

    /// How many nodes it has.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The node (1-based) whose broker has Kafka node id `id` (they are the same).
    pub fn node_of_broker(&self, id: i32) -> Result<usize> {
        usize::try_from(id)
            .ok()
            .filter(|n| (1..=self.nodes).contains(n))
            .with_context(|| format!("no node has broker id {id}"))
    }

    /// SIGKILL node `n` (1-based); returns once it is gone.
    pub fn kill(&self, n: usize) -> Result<()> {
        run_script(&["kill", &n.to_string()], &self.dir).map(drop)
    }

    /// SIGSTOP node `n`: it hangs, holding its connections.
    pub fn pause(&self, n: usize) -> Result<()> {
        run_script(&["pause", &n.to_string()], &self.dir).map(drop)
    }

    /// SIGCONT node `n`.
    pub fn resume(&self, n: usize) -> Result<()> {
        run_script(&["resume", &n.to_string()], &self.dir).map(drop)
    }

    /// Stops node `n` if it runs and starts it again; returns once it answers metadata.
    pub fn restart(&self, n: usize) -> Result<()> {
        run_script(&["restart", &n.to_string()], &self.dir).map(drop)
    }

    /// Stops every node (SIGTERM, SIGKILL after 20 s).
    pub fn stop_all(&self) -> Result<()> {
        run_script(&["stop"], &self.dir).map(drop)
    }

    /// Starts every node that is not running (resuming paused ones) with the ports and
    /// data it had; returns once all of them answer metadata.
    pub fn start_all(&self) -> Result<()> {
        let pid = std::process::id().to_string();
        if self.owned {
            run_script(&["start", "--owner-pid", &pid], &self.dir).map(drop)
        } else {
            run_script(&["start"], &self.dir).map(drop)
        }
    }

    /// The folder with the nodes' logs (`node-N/server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = run_script(&["stop", "--now"], &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serializes the tests of one binary that run the pipeline on the shared cluster: the
/// pipeline's topics and consumer groups have fixed names, so two such tests at once
/// would share their work.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
