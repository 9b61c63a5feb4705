//! Kafka client settings: where the brokers are, how to authenticate, and how producers
//! and consumers are tuned. Parsed by the binary from flags and environment variables;
//! this crate never reads the environment itself.

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{BusError, Result};

/// Where the Kafka cluster is and how to reach it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`. Without it (and without an
    /// Event Hubs connection string), `run` starts an in-memory broker.
    #[arg(long, env = "DRONEDELIVERY_BROKERS", value_name = "HOST:PORT,...")]
    pub brokers: Option<String>,

    /// Azure Event Hubs connection string (`Endpoint=sb://NAMESPACE.servicebus.windows.net/;
    /// SharedAccessKeyName=...;SharedAccessKey=...`). Sets the brokers to the namespace's
    /// Kafka endpoint with SASL_SSL/PLAIN and the timeouts Event Hubs needs.
    #[arg(
        long,
        env = "DRONEDELIVERY_EVENTHUBS_CONNECTION_STRING",
        hide_env_values = true,
        conflicts_with = "brokers"
    )]
    pub eventhubs_connection_string: Option<String>,

    /// An extra librdkafka setting, `key=value`, applied after every other setting (so it
    /// wins). Repeatable: `--kafka-option security.protocol=SASL_SSL --kafka-option ...`.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,

    /// A librdkafka properties file, `key=value` per line (`#` starts a comment), such as
    /// a cluster's SASL settings mounted from a secret. Applied after the pipeline's own
    /// settings and before any --kafka-option.
    #[arg(long, env = "DRONEDELIVERY_KAFKA_CONFIG", value_name = "FILE")]
    pub kafka_config: Option<std::path::PathBuf>,

    /// Replication factor of the topics the pipeline creates when they do not exist.
    /// Default: 3 on Event Hubs, otherwise the cluster's own `default.replication.factor`
    /// (so a three-broker cluster set up for it gets three replicas).
    #[arg(long, env = "DRONEDELIVERY_REPLICATION_FACTOR")]
    pub replication_factor: Option<i32>,
}

/// Largest `--kafka-config` file read.
const MAX_KAFKA_CONFIG_BYTES: u64 = 64 * 1024;

/// Parses a librdkafka properties file: `key=value` per line; blank lines and lines
/// starting with `#` are skipped; whitespace around the key and before the value is not
/// part of them. Values are otherwise taken as written after the first `=` (a password
/// may contain `=` or `#`).
pub fn parse_properties(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = parse_key_value(line.trim_end_matches('\r'))
            .map_err(|reason| format!("line {}: {reason}", n + 1))?;
        // As in Java properties files, whitespace after the `=` is not part of the value.
        out.push((k, v.trim_start().to_owned()));
    }
    Ok(out)
}

fn read_properties(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    use std::io::Read as _;
    let err = |reason: String| BusError::Config {
        key: "kafka-config".into(),
        reason: format!("{}: {reason}", path.display()),
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_KAFKA_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_KAFKA_CONFIG_BYTES {
        return Err(err(format!(
            "is larger than {MAX_KAFKA_CONFIG_BYTES} bytes"
        )));
    }
    parse_properties(&text).map_err(err)
}

const LINGER_MS: u32 = 5;
const COMPRESSION: &str = "lz4";
const QUEUE_RECORDS: u32 = 500_000;
const QUEUE_KBYTES: u32 = 262_144;
const ACK_TIMEOUT_MS: u32 = 10_000;
/// librdkafka `transaction.timeout.ms` of the transactional producers (at least the
/// acknowledgement timeout).
const TRANSACTION_TIMEOUT_MS: u32 = 60_000;
/// librdkafka `message.timeout.ms` of the transactional producers (at least the
/// acknowledgement timeout; at most the transaction timeout, as librdkafka requires).
const TRANSACTION_ACK_TIMEOUT_MS: u32 = 50_000;

/// How the producer trades latency for throughput. Every record is still acknowledged by
/// all in-sync replicas (`acks=all`) with the idempotent producer, whatever these say.
#[derive(Debug, Clone, clap::Args)]
pub struct ProducerArgs {
    /// How long the producer waits to fill a batch before sending it (librdkafka
    /// `linger.ms`).
    #[arg(long, env = "DRONEDELIVERY_PRODUCER_LINGER_MS", default_value_t = LINGER_MS)]
    pub producer_linger_ms: u32,

    /// Compression of producer batches: none, gzip, snappy, lz4 or zstd.
    #[arg(long, env = "DRONEDELIVERY_PRODUCER_COMPRESSION", default_value = COMPRESSION,
          value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    pub producer_compression: String,

    /// Most records waiting in the producer's local queue; past it a send fails at once
    /// with "queue full" and the HTTP tier answers 503.
    #[arg(
        long,
        env = "DRONEDELIVERY_PRODUCER_QUEUE_RECORDS",
        default_value_t = QUEUE_RECORDS
    )]
    pub producer_queue_records: u32,

    /// Most kilobytes waiting in the producer's local queue (the memory bound of
    /// unacknowledged records).
    #[arg(
        long,
        env = "DRONEDELIVERY_PRODUCER_QUEUE_KBYTES",
        default_value_t = QUEUE_KBYTES
    )]
    pub producer_queue_kbytes: u32,

    /// How long a record may wait for the broker's acknowledgement before it fails
    /// (librdkafka `message.timeout.ms`), in milliseconds.
    #[arg(long, env = "DRONEDELIVERY_ACK_TIMEOUT_MS", default_value_t = ACK_TIMEOUT_MS)]
    pub ack_timeout_ms: u32,
}

impl Default for ProducerArgs {
    fn default() -> Self {
        Self {
            producer_linger_ms: LINGER_MS,
            producer_compression: COMPRESSION.into(),
            producer_queue_records: QUEUE_RECORDS,
            producer_queue_kbytes: QUEUE_KBYTES,
            ack_timeout_ms: ACK_TIMEOUT_MS,
        }
    }
}

impl ProducerArgs {
    /// The acknowledgement timeout as a duration.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.ack_timeout_ms))
    }
}

fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not key=value"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("`{s}` has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Resolved client settings: the librdkafka properties every client of the pipeline
/// shares, before the producer's or consumer's own.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Settings applied after the bootstrap servers, in order.
    pub properties: Vec<(String, String)>,
    /// Settings applied last of all (the user's `--kafka-option`s).
    pub overrides: Vec<(String, String)>,
    /// Replication factor for topics the pipeline creates; `None` leaves it to the
    /// cluster's `default.replication.factor`.
    pub replication_factor: Option<i32>,
}

impl ClientSettings {
    /// Settings for a broker at `bootstrap_servers` with no authentication.
    pub fn plain(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            properties: Vec::new(),
            overrides: Vec::new(),
            replication_factor: None,
        }
    }

    /// Resolves the flags. `embedded` gives the bootstrap servers of an embedded broker,
    /// used when neither `--brokers` nor an Event Hubs connection string is set.
    pub fn from_args(args: &KafkaArgs, embedded: Option<&str>) -> Result<Self> {
        let mut settings = match (&args.brokers, &args.eventhubs_connection_string, embedded) {
            (_, Some(conn), _) => eventhubs_settings(conn)?,
            (Some(brokers), None, _) => Self::plain(brokers.clone()),
            (None, None, Some(embedded)) => Self::plain(embedded),
            (None, None, None) => {
                return Err(BusError::Config {
                    key: "brokers".into(),
                    reason: "no brokers: give --brokers or an Event Hubs connection string".into(),
                });
            }
        };
        if settings.bootstrap_servers.trim().is_empty() {
            return Err(BusError::Config {
                key: "brokers".into(),
                reason: "is empty".into(),
            });
        }
        settings.overrides = match &args.kafka_config {
            Some(path) => read_properties(path)?,
            None => Vec::new(),
        };
        settings
            .overrides
            .extend(args.kafka_options.iter().cloned());
        if let Some(factor) = args.replication_factor {
            if factor < 1 {
                return Err(BusError::Config {
                    key: "replication-factor".into(),
                    reason: "must be at least 1".into(),
                });
            }
            settings.replication_factor = Some(factor);
        }
        Ok(settings)
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config.set("client.id", "dronedelivery");
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    fn finish(&self, mut config: ClientConfig) -> ClientConfig {
        for (k, v) in &self.overrides {
            config.set(k, v);
        }
        config
    }

    /// The configuration of an admin client.
    pub(crate) fn admin_config(&self) -> ClientConfig {
        self.finish(self.base())
    }

    /// The configuration of a durable producer: `acks=all`, idempotent, with the given
    /// batching, compression, queue bounds and acknowledgement timeout. Public for
    /// measurements that drive librdkafka directly with the tier's settings (the raw
    /// producer ceiling of the end-to-end benchmark).
    pub fn producer_config(&self, tuning: &ProducerArgs) -> ClientConfig {
        let mut config = self.base();
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", tuning.producer_linger_ms.to_string())
            .set("compression.type", &tuning.producer_compression)
            .set(
                "queue.buffering.max.messages",
                tuning.producer_queue_records.to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                tuning.producer_queue_kbytes.to_string(),
            )
            .set("message.timeout.ms", tuning.ack_timeout_ms.to_string())
            .set("batch.size", "1000000");
        self.finish(config)
    }

    /// The configuration of a transactional producer: a durable producer whose records,
    /// and the input offsets sent with them, become visible all at once when its
    /// transaction commits (`transactional.id`). A transaction left open by a member
    /// that stopped answering is aborted by the broker after `transaction.timeout.ms`
    /// (60 s, or the acknowledgement timeout when that is longer: librdkafka requires
    /// it), unless a member with the same id fences it first. Its records wait up to
    /// 50 s for their acknowledgement (or the acknowledgement timeout, when longer).
    pub(crate) fn transactional_producer_config(
        &self,
        tuning: &ProducerArgs,
        transactional_id: &str,
    ) -> ClientConfig {
        let mut config = self.producer_config(tuning);
        // Longer than a broker may hang or fail over (the Java producer's default): the
        // coordinator aborts a transaction that times out and bumps its producer epoch,
        // which the producer can only take as being fenced. An instance registering
        // again with the same id aborts its predecessor's open transaction at once.
        // A record of a transaction is not given up on during an outage either: one that
        // timed out locally while its request was in flight can still be appended after
        // the transaction was aborted, leaving the partition's stable offset stuck.
        let acks = tuning.ack_timeout_ms.max(TRANSACTION_ACK_TIMEOUT_MS);
        config
            .set("transactional.id", transactional_id)
            .set("message.timeout.ms", acks.to_string())
            .set(
                "transaction.timeout.ms",
                acks.max(TRANSACTION_TIMEOUT_MS).to_string(),
            );
        self.finish(config)
    }

    /// The configuration of a consumer in `group`: offsets are stored by the application
    /// only once a record was handled (`enable.auto.offset.store=false`) and the stored
    /// offsets are committed in the background and on close.
    pub(crate) fn consumer_config(&self, group: &str) -> ClientConfig {
        self.group_config(group, "cooperative-sticky")
    }

    /// A group consumer whose members get the same partition numbers of every topic they
    /// subscribe to (the range assignor), for topics keyed alike with equal partition
    /// counts.
    pub(crate) fn copartitioned_config(&self, group: &str) -> ClientConfig {
        self.group_config(group, "range")
    }

    /// A group consumer whose offsets are committed only by a transactional producer
    /// (with the group's metadata), never by itself; copartitioned when asked.
    pub(crate) fn transactional_consumer_config(
        &self,
        group: &str,
        copartitioned: bool,
    ) -> ClientConfig {
        let strategy = if copartitioned {
            "range"
        } else {
            "cooperative-sticky"
        };
        let mut config = self.group_config(group, strategy);
        config.set("enable.auto.commit", "false");
        self.finish(config)
    }

    fn group_config(&self, group: &str, strategy: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group)
            // Records of aborted transactions, and of open ones, are never read: every
            // consumer of the pipeline sees only what a processor committed.
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("partition.assignment.strategy", strategy);
        // The connection's own settings (Event Hubs' longer session timeout) win over
        // these defaults.
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        self.finish(config)
    }

    /// A client that only looks up `group`'s committed offsets: it never joins the group,
    /// reads or commits.
    pub(crate) fn watcher_config(&self, group: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        self.finish(config)
    }

    /// A consumer outside any group that reads partitions it is given and never commits.
    pub(crate) fn reader_config(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", "dronedelivery-reader")
            // Readers follow a topic live (the status view, the live events): a fetch
            // that finds nothing new waits at most this long. A broker answers as soon as
            // records arrive anyway; librdkafka's mock cluster (the embedded broker) waits
            // the whole time, which was 500 ms added to every live event.
            .set("fetch.wait.max.ms", "50")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        self.finish(config)
    }
}

/// Settings for Azure Event Hubs' Kafka endpoint from a namespace connection string.
///
/// The brokers are `NAMESPACE.servicebus.windows.net:9093`, authentication is SASL_SSL
/// with PLAIN, user `$ConnectionString` and the connection string as password, and the
/// timeouts follow Event Hubs' recommendations for Kafka clients.
pub fn eventhubs_settings(connection_string: &str) -> Result<ClientSettings> {
    let err = |reason: &str| BusError::Config {
        key: "eventhubs-connection-string".into(),
        reason: reason.into(),
    };
    let endpoint = connection_string
        .split(';')
        .filter_map(|part| part.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("Endpoint"))
        .map(|(_, v)| v.trim())
        .ok_or_else(|| err("has no Endpoint=sb://NAMESPACE.servicebus.windows.net/"))?;
    let host = endpoint
        .strip_prefix("sb://")
        .ok_or_else(|| err("Endpoint must start with sb://"))?
        .trim_end_matches('/');
    if host.is_empty() || host.contains(['/', ':', ' ']) {
        return Err(err("Endpoint must be sb://HOST/"));
    }
    let has_key = connection_string.split(';').any(|part| {
        part.split_once('=').is_some_and(|(k, _)| {
            let k = k.trim();
            k.eq_ignore_ascii_case("SharedAccessKey")
                || k.eq_ignore_ascii_case("SharedAccessSignature")
        })
    });
    if !has_key {
        return Err(err("has no SharedAccessKey or SharedAccessSignature"));
    }
    let properties = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", "$ConnectionString"),
        ("sasl.password", connection_string),
        // Event Hubs closes idle connections after 240 s and needs longer timeouts than
        // librdkafka's defaults.
        ("socket.keepalive.enable", "true"),
        ("metadata.max.age.ms", "180000"),
        ("connections.max.idle.ms", "180000"),
        ("request.timeout.ms", "60000"),
        ("session.timeout.ms", "30000"),
        ("heartbeat.interval.ms", "3000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Ok(ClientSettings {
        bootstrap_servers: format!("{host}:9093"),
        properties,
        overrides: Vec::new(),
        replication_factor: Some(3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    const CONN: &str = "Endpoint=sb://fabrikam.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc=";

    #[test]
    fn eventhubs_connection_string_sets_sasl_ssl() {
        let s = eventhubs_settings(CONN).unwrap();
        assert_eq!(s.bootstrap_servers, "fabrikam.servicebus.windows.net:9093");
        let get = |k: &str| {
            s.properties
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(get("sasl.username"), Some("$ConnectionString"));
        assert_eq!(get("sasl.password"), Some(CONN));
        // Consumers keep Event Hubs' session timeout, not the group default.
        let consumer = s.consumer_config("g");
        assert_eq!(consumer.get("session.timeout.ms"), Some("30000"));
        assert_eq!(consumer.get("group.id"), Some("g"));
        // Through the flags: the Event Hubs default replication factor holds unless given.
        let cli = Cli::try_parse_from(["x", "--eventhubs-connection-string", CONN]).unwrap();
        let s = ClientSettings::from_args(&cli.kafka, None).unwrap();
        assert_eq!(s.replication_factor, Some(3));
        let cli = Cli::try_parse_from([
            "x",
            "--eventhubs-connection-string",
            CONN,
            "--replication-factor",
            "2",
        ])
        .unwrap();
        assert_eq!(
            ClientSettings::from_args(&cli.kafka, None)
                .unwrap()
                .replication_factor,
            Some(2)
        );
        let cli = Cli::try_parse_from(["x", "--brokers", "b:1"]).unwrap();
        let s = ClientSettings::from_args(&cli.kafka, None).unwrap();
        assert_eq!(s.replication_factor, None, "the cluster's default");
        let cli =
            Cli::try_parse_from(["x", "--brokers", "b:1", "--replication-factor", "0"]).unwrap();
        assert!(ClientSettings::from_args(&cli.kafka, None).is_err());
    }

    #[test]
    fn bad_eventhubs_connection_strings_are_rejected() {
        for bad in [
            "",
            "SharedAccessKey=x",
            "Endpoint=https://x.servicebus.windows.net/;SharedAccessKey=x",
            "Endpoint=sb://x.servicebus.windows.net/",
            "Endpoint=sb:///;SharedAccessKey=x",
        ] {
            assert!(eventhubs_settings(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kafka_options_are_key_value_and_win() {
        let cli = Cli::try_parse_from([
            "x",
            "--brokers",
            "127.0.0.1:9092",
            "--kafka-option",
            "linger.ms=50",
            "--kafka-option",
            "client.id=a=b",
        ])
        .unwrap();
        let s = ClientSettings::from_args(&cli.kafka, None).unwrap();
        assert_eq!(s.bootstrap_servers, "127.0.0.1:9092");
        let config = s.producer_config(&ProducerArgs::default());
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("client.id"), Some("a=b"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert!(Cli::try_parse_from(["x", "--kafka-option", "novalue"]).is_err());
        assert!(Cli::try_parse_from(["x", "--kafka-option", "=v"]).is_err());
    }

    #[test]
    fn a_properties_file_is_applied_before_the_options() {
        let dir = std::env::temp_dir().join(format!("bus-props-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.properties");
        std::fs::write(
            &path,
            "# SASL\nsecurity.protocol=SASL_SSL\n\n  sasl.password = a=b#c\r\nlinger.ms=7\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "x",
            "--brokers",
            "b:9092",
            "--kafka-config",
            path.to_str().unwrap(),
            "--kafka-option",
            "linger.ms=9",
        ])
        .unwrap();
        let s = ClientSettings::from_args(&cli.kafka, None).unwrap();
        let config = s.producer_config(&ProducerArgs::default());
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.password"), Some("a=b#c"));
        assert_eq!(config.get("linger.ms"), Some("9"));

        std::fs::write(&path, "security.protocol\n").unwrap();
        let err = ClientSettings::from_args(&cli.kafka, None).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        std::fs::write(&path, vec![b'#'; 70 * 1024]).unwrap();
        let err = ClientSettings::from_args(&cli.kafka, None).unwrap_err();
        assert!(err.to_string().contains("larger"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = ClientSettings::from_args(&cli.kafka, None).unwrap_err();
        assert!(err.to_string().contains("kafka-config"), "{err}");
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn embedded_broker_is_used_only_without_brokers() {
        let none = KafkaArgs::default();
        assert_eq!(
            ClientSettings::from_args(&none, Some("127.0.0.1:1"))
                .unwrap()
                .bootstrap_servers,
            "127.0.0.1:1"
        );
        assert!(ClientSettings::from_args(&none, None).is_err());
        let given = KafkaArgs {
            brokers: Some("b:9092".into()),
            ..KafkaArgs::default()
        };
        assert_eq!(
            ClientSettings::from_args(&given, Some("127.0.0.1:1"))
                .unwrap()
                .bootstrap_servers,
            "b:9092"
        );
    }

    #[test]
    fn consumers_store_offsets_only_by_hand() {
        let c = ClientSettings::plain("b:1").consumer_config("g");
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("g"));
    }
}
