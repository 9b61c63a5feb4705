//! Topic creation on a real cluster.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use schemas::Topic;

use crate::error::{BusError, Result};
use crate::settings::ClientSettings;

/// Creates those of `topics` that do not exist yet, with the partition counts of the
/// topic table, the settings' replication factor (the cluster's default unless set), and
/// `cleanup.policy=compact` for state changelogs. Existing topics are left as they are;
/// when every topic exists, nothing is asked of the cluster but its metadata (so clients
/// without the right to create topics, and brokers without the CreateTopics API such as
/// the embedded one, work too).
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
    let lags: Vec<String> = topics
        .iter()
        .map(|t| t.min_compaction_lag_ms.to_string())
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&lags)
        .filter(|(t, _)| !existing.iter().any(|name| name == t.name))
        .map(|(t, lag)| {
            let topic = NewTopic::new(
                t.name,
                t.partitions,
                // -1: the cluster's default.replication.factor (CreateTopics v4 and later).
                TopicReplication::Fixed(settings.replication_factor.unwrap_or(-1)),
            );
            match (t.compacted, t.min_compaction_lag_ms) {
                (false, _) => topic,
                (true, 0) => topic.set("cleanup.policy", "compact"),
                (true, _) => topic
                    .set("cleanup.policy", "compact")
                    .set("min.compaction.lag.ms", lag.as_str()),
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

/// One partition of a topic as the cluster's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition number.
    pub id: i32,
    /// The broker that leads it (-1 while it has no leader).
    pub leader: i32,
    /// The brokers holding a replica.
    pub replicas: Vec<i32>,
    /// The replicas in sync with the leader.
    pub in_sync: Vec<i32>,
}

/// A topic as the cluster describes it: its partitions and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Its partitions, by number.
    pub partitions: Vec<PartitionInfo>,
    /// Every setting the broker reports (DescribeConfigs), defaults included.
    pub configs: std::collections::BTreeMap<String, String>,
}

fn admin_client(settings: &ClientSettings) -> Result<AdminClient<DefaultClientContext>> {
    settings
        .admin_config()
        .create()
        .map_err(BusError::client("creating an admin client"))
}

/// Describes `names`: partitions with leaders, replicas and in-sync replicas from the
/// metadata, and each topic's settings (DescribeConfigs). For operators and tests.
pub async fn describe_topics(settings: &ClientSettings, names: &[&str]) -> Result<Vec<TopicInfo>> {
    use rdkafka::admin::ResourceSpecifier;
    let admin = std::sync::Arc::new(admin_client(settings)?);
    let lookup = admin.clone();
    let wanted: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut topics: Vec<TopicInfo> = tokio::task::spawn_blocking(move || {
        let metadata = lookup
            .inner()
            .fetch_metadata(None, Duration::from_secs(30))
            .map_err(BusError::client("fetching metadata"))?;
        wanted
            .iter()
            .map(|name| {
                let topic = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .ok_or_else(|| BusError::Config {
                        key: format!("topic {name}"),
                        reason: "is not in the cluster's metadata".into(),
                    })?;
                let mut partitions: Vec<PartitionInfo> = topic
                    .partitions()
                    .iter()
                    .map(|p| PartitionInfo {
                        id: p.id(),
                        leader: p.leader(),
                        replicas: p.replicas().to_vec(),
                        in_sync: p.isr().to_vec(),
                    })
                    .collect();
                partitions.sort_by_key(|p| p.id);
                Ok(TopicInfo {
                    name: name.clone(),
                    partitions,
                    configs: Default::default(),
                })
            })
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| BusError::Config {
        key: "topics".into(),
        reason: format!("the metadata lookup failed: {e}"),
    })??;
    let resources: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .describe_configs(&resources, &options)
        .await
        .map_err(BusError::client("describing topic configs"))?;
    for result in results {
        let resource = result.map_err(|code| BusError::Config {
            key: "topics".into(),
            reason: format!("configs cannot be described: {code}"),
        })?;
        let rdkafka::admin::OwnedResourceSpecifier::Topic(name) = &resource.specifier else {
            continue;
        };
        if let Some(topic) = topics.iter_mut().find(|t| &t.name == name) {
            topic.configs = resource
                .entries
                .into_iter()
                .filter_map(|e| Some((e.name, e.value?)))
                .collect();
        }
    }
    Ok(topics)
}

/// Sets `configs` on topic `name` (AlterConfigs). The settings given replace every
/// setting the topic had that is not a cluster default, so give all of those that are to
/// stay (such as `cleanup.policy`).
pub async fn alter_topic(
    settings: &ClientSettings,
    name: &str,
    configs: &[(&str, &str)],
) -> Result<()> {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let admin = admin_client(settings)?;
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(name));
    for (k, v) in configs {
        change = change.set(k, v);
    }
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .alter_configs(&[change], &options)
        .await
        .map_err(BusError::client("altering topic configs"))?;
    for result in results {
        result.map_err(|(_, code)| BusError::Config {
            key: format!("topic {name}"),
            reason: format!("its configs cannot be altered: {code}"),
        })?;
    }
    Ok(())
}
