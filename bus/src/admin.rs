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
/// changelogs. Existing topics are left as they are.
pub async fn ensure_topics(settings: &ClientSettings, topics: &[Topic]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = settings
        .admin_config()
        .create()
        .map_err(BusError::client("creating an admin client"))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
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
