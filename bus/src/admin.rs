//! Topic creation on a real cluster.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use schemas::Topic;

use crate::error::{BusError, Result};
use crate::settings::ClientSettings;

/// Creates those of `topics` that do not exist yet, with the partition counts of the
/// topic table, the settings' replication factor, and `cleanup.policy=compact` for state
/// changelogs. Existing topics are left as they are; when every topic exists, nothing is
/// asked of the cluster but its metadata (so clients without the right to create topics,
/// and brokers without the CreateTopics API such as the embedded one, work too).
pub async fn ensure_topics(settings: &ClientSettings, topics: &[Topic]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = settings
        .admin_config()
        .create()
        .map_err(BusError::client("creating an admin client"))?;
    let admin = std::sync::Arc::new(admin);
    let lookup = admin.clone();
    let existing: Vec<String> = tokio::task::spawn_blocking(move || {
        lookup
            .inner()
            .fetch_metadata(None, Duration::from_secs(30))
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.name().to_owned())
                    .collect()
            })
    })
    .await
    .map_err(|e| BusError::Config {
        key: "topics".into(),
        reason: format!("the metadata lookup failed: {e}"),
    })?
    .map_err(BusError::client("fetching metadata"))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|t| !existing.iter().any(|name| name == t.name))
        .map(|t| {
            let topic = NewTopic::new(
                t.name,
                t.partitions,
                TopicReplication::Fixed(settings.replication_factor),
            );
            if t.compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(BusError::client("creating topics"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::Config {
                    key: format!("topic {topic}"),
                    reason: format!("cannot be created: {code}"),
                });
            }
        }
    }
    Ok(())
}

/// A client that only asks the cluster for metadata: whether a broker answers, for
/// readiness probes of services that have no producer of their own.
pub struct Reachability {
    client: rdkafka::consumer::BaseConsumer,
}

impl std::fmt::Debug for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reachability").finish()
    }
}

impl Reachability {
    /// A metadata-only client with `settings` (it joins no group and reads nothing).
    pub fn new(settings: &ClientSettings) -> Result<Self> {
        // No group.id: librdkafka then keeps no consumer queue that would need polling.
        let client = settings
            .admin_config()
            .create()
            .map_err(BusError::client("creating a metadata client"))?;
        Ok(Self { client })
    }

    /// Asks for metadata of `topic` within `timeout`. Blocks the calling thread.
    pub fn check(&self, topic: &str, timeout: Duration) -> Result<()> {
        use rdkafka::consumer::Consumer as _;
        // Serve the client's events (connection errors while a broker is down), so that
        // they do not pile up between checks; it reads no records.
        for _ in 0..1_000 {
            if self.client.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        self.client
            .fetch_metadata(Some(topic), timeout)
            .map(|_| ())
            .map_err(BusError::client("fetching metadata"))
    }
}
