//! The broker a phase or a pass runs on: a fresh embedded broker (librdkafka's mock
//! cluster, in a process of its own: this bench's binary run again with
//! `--serve-embedded-broker`, as a broker is its own process in production), an Apache
//! Kafka cluster the bench starts with the test
//! harness's `kafka` module (stopped when dropped), or one given with `--brokers`; the
//! reset of a started cluster's topics and consumer groups between runs of the whole
//! pipeline; and the broker's description for the report. It measures nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use bus::{ClientSettings, EmbeddedBroker};
use schemas::topics;

use crate::kafka;
use crate::plan::Pass;

/// The broker of a phase (embedded) or of a pass (Kafka).
pub(crate) enum Broker {
    /// The broker process and its bootstrap address; it exits when its stdin closes.
    Embedded(Child, String),
    /// Started by the bench; stopped and removed when dropped.
    Cluster(kafka::KafkaCluster),
    External(String),
}

impl Broker {
    /// A new embedded broker, with every topic, in a process of its own.
    pub(crate) fn embedded() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--bench", SERVE_EMBEDDED_BROKER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let bootstrap = line
            .trim()
            .strip_prefix("bootstrap ")
            .unwrap_or_else(|| panic!("the embedded broker process said {line:?}"))
            .to_owned();
        Self::Embedded(child, bootstrap)
    }

    /// The Kafka pass's broker: `brokers` when given, else a new cluster of `nodes`
    /// nodes; with every topic.
    pub(crate) async fn kafka(brokers: Option<&str>, nodes: usize) -> Self {
        let broker = match brokers {
            Some(b) => Self::External(b.to_owned()),
            None => {
                let cluster =
                    tokio::task::spawn_blocking(move || kafka::KafkaCluster::start(nodes))
                        .await
                        .unwrap()
                        .unwrap_or_else(|e| panic!("{e:#}"));
                Self::Cluster(cluster)
            }
        };
        bus::ensure_topics(&ClientSettings::plain(broker.bootstrap()), &topics::ALL)
            .await
            .unwrap();
        broker
    }

    pub(crate) fn bootstrap(&self) -> String {
        match self {
            Self::Embedded(_, b) => b.clone(),
            Self::Cluster(c) => c.bootstrap().to_owned(),
            Self::External(b) => b.clone(),
        }
    }

    /// Deletes the pipeline's topics and consumer groups on a cluster the bench started,
    /// and creates the topics again (the groups come back with the next run's members):
    /// the next run of the whole pipeline starts from nothing (no state to restore, every
    /// drone free), as on a fresh embedded broker, while the cluster's JVMs stay warm.
    /// Does nothing to other brokers.
    pub(crate) async fn reset(&self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        use rdkafka::types::RDKafkaErrorCode;

        let Self::Cluster(cluster) = self else {
            return;
        };
        let bootstrap = cluster.bootstrap().to_owned();
        let config = || {
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", &bootstrap);
            config
        };
        let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let deadline = Instant::now() + Duration::from_secs(60);
        // The last run has stopped and its members have left; a group that still has
        // members (a session not expired yet) is tried again.
        let groups = [
            topics::groups::WORKFLOW,
            topics::groups::HISTORY,
            topics::groups::SCHEDULING,
            topics::groups::TRACKING,
            topics::groups::DELIVERIES,
        ];
        loop {
            let failed: Vec<String> = admin
                .delete_groups(&groups, &options)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|result| match result {
                    Err((group, code)) if code != RDKafkaErrorCode::GroupIdNotFound => {
                        Some(format!("{group}: {code}"))
                    }
                    _ => None,
                })
                .collect();
            if failed.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "deleting the consumer groups: {failed:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let names: Vec<&str> = topics::ALL.iter().map(|t| t.name).collect();
        // A deletion that timed out may still complete: the metadata below decides.
        match admin.delete_topics(&names, &options).await {
            Ok(results) => {
                for result in results {
                    if let Err((topic, code)) = result {
                        assert!(
                            matches!(
                                code,
                                RDKafkaErrorCode::UnknownTopicOrPartition
                                    | RDKafkaErrorCode::RequestTimedOut
                            ),
                            "deleting {topic}: {code}"
                        );
                    }
                }
            }
            Err(e) => println!("deleting the pipeline's topics: {e}; waiting for the metadata"),
        }
        // Creating a topic that is still being deleted fails: wait until the cluster's
        // metadata lists none of them, then until it lists all of them again.
        let metadata: BaseConsumer = config().create().unwrap();
        let metadata = Arc::new(metadata);
        let listed = || {
            let client = metadata.clone();
            tokio::task::spawn_blocking(move || {
                client
                    .fetch_metadata(None, Duration::from_secs(10))
                    .ok()
                    .map(|m| {
                        m.topics()
                            .iter()
                            .filter(|t| {
                                topics::ALL.iter().any(|a| {
                                    a.name == t.name()
                                        && t.partitions().len() == a.partitions as usize
                                })
                            })
                            .count()
                    })
            })
        };
        while listed().await.unwrap() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "the pipeline's topics were not deleted within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            bus::ensure_topics(&ClientSettings::plain(&bootstrap), &topics::ALL)
                .await
                .unwrap();
            if listed().await.unwrap() == Some(topics::ALL.len()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline's topics did not come back within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops a cluster the bench started (off the async threads).
    pub(crate) async fn stop(self) {
        match self {
            Self::Cluster(cluster) => {
                tokio::task::spawn_blocking(move || drop(cluster))
                    .await
                    .unwrap();
            }
            Self::Embedded(mut child, _) => {
                // Its stdin closes: it exits (and is killed if it has not in 10 s).
                drop(child.stdin.take());
                tokio::task::spawn_blocking(move || {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                })
                .await
                .unwrap();
            }
            Self::External(_) => {}
        }
    }
}

/// The argument that makes this bench's binary an embedded broker and nothing else.
pub(crate) const SERVE_EMBEDDED_BROKER: &str = "--serve-embedded-broker";

/// Serves an embedded broker with every topic: prints `bootstrap ADDRESS`, then serves
/// until its stdin closes (the bench stopped it, or ended).
pub(crate) fn serve_embedded_broker() {
    let broker = EmbeddedBroker::start(1, &topics::ALL).unwrap();
    println!("bootstrap {}", broker.bootstrap_servers());
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    drop(broker);
}

/// What the broker of a pass is, for the report: `brokers` is `--brokers`, `nodes` the
/// nodes of a cluster the bench starts.
pub(crate) fn label(pass: Pass, brokers: Option<&str>, nodes: usize) -> String {
    match (pass, brokers) {
        (Pass::Embedded, _) => "embedded (librdkafka mock cluster)".to_owned(),
        (Pass::Kafka, Some(b)) => format!("Kafka-compatible cluster at {b}"),
        (Pass::Kafka, None) => format!(
            "Apache Kafka {}, {} KRaft node{} on 127.0.0.1{}",
            kafka_version(),
            nodes,
            if nodes == 1 { "" } else { "s" },
            if nodes == 3 {
                " (replication factor 3, min.insync.replicas=2)"
            } else {
                ""
            }
        ),
    }
}

/// The Kafka version `deploy/tools/kafka` pins.
fn kafka_version() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tools/kafka");
    std::fs::read_to_string(script)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_VERSION="))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".into())
}
