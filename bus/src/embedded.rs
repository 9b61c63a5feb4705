//! The embedded broker: librdkafka's in-process mock cluster, for `run` without
//! `--brokers` and for tests.
//!
//! It speaks the Kafka protocol on 127.0.0.1 ports of its own, so every client of the
//! pipeline uses it exactly as it would use a real cluster. It keeps records in memory
//! only: what it holds is gone when the process exits.
//!
//! librdkafka's mock cluster handle may not move between threads, so one thread owns it
//! and this handle sends that thread commands.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;
use schemas::Topic;

use crate::error::{BusError, Result};

enum Command {
    BrokerDown(i32, mpsc::Sender<Result<()>>),
    BrokerUp(i32, mpsc::Sender<Result<()>>),
    Stop,
}

/// A running in-memory Kafka cluster. Dropping it stops the cluster.
pub struct EmbeddedBroker {
    bootstrap_servers: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers (ids 1 to `brokers`) with `topics` created.
    pub fn start(brokers: i32, topics: &[Topic]) -> Result<Self> {
        let topics = topics.to_vec();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String>>();
        let (commands, command_rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let cluster = match start_cluster(brokers, &topics) {
                    Ok(cluster) => {
                        let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                        cluster
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Runs until Stop or until every handle is gone.
                while let Ok(command) = command_rx.recv() {
                    match command {
                        Command::BrokerDown(id, reply) => {
                            let _ = reply.send(cluster.broker_down(id).map_err(mock_err));
                        }
                        Command::BrokerUp(id, reply) => {
                            let _ = reply.send(cluster.broker_up(id).map_err(mock_err));
                        }
                        Command::Stop => break,
                    }
                }
                drop(cluster);
            })
            .map_err(|e| BusError::Embedded {
                reason: format!("cannot start its thread: {e}"),
            })?;
        let bootstrap_servers = ready_rx.recv().map_err(|_| BusError::Embedded {
            reason: "its thread ended before the cluster started".into(),
        })??;
        Ok(Self {
            bootstrap_servers,
            commands,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` of the cluster (127.0.0.1 ports).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Takes broker `id` down: clients see its connections fail, as with a crashed broker.
    pub fn broker_down(&self, id: i32) -> Result<()> {
        self.call(|reply| Command::BrokerDown(id, reply))
    }

    /// Brings broker `id` back up.
    pub fn broker_up(&self, id: i32) -> Result<()> {
        self.call(|reply| Command::BrokerUp(id, reply))
    }

    fn call(&self, command: impl FnOnce(mpsc::Sender<Result<()>>) -> Command) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let gone = || BusError::Embedded {
            reason: "the cluster has stopped".into(),
        };
        self.commands.send(command(tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mock_err(e: rdkafka::error::KafkaError) -> BusError {
    BusError::Embedded {
        reason: e.to_string(),
    }
}

fn start_cluster(
    brokers: i32,
    topics: &[Topic],
) -> Result<MockCluster<'static, rdkafka::producer::DefaultProducerContext>> {
    let cluster = MockCluster::new(brokers).map_err(mock_err)?;
    let replication = brokers.min(3);
    for topic in topics {
        cluster
            .create_topic(topic.name, topic.partitions, replication)
            .map_err(mock_err)?;
    }
    Ok(cluster)
}
