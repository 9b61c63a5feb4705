//! The Kafka boundary of the pipeline.
//!
//! This crate owns everything that talks the Kafka protocol: client settings (plain Kafka
//! and Azure Event Hubs' Kafka endpoint), the producer, the consumer with offsets stored
//! only once a record was handled, topic creation, and the embedded broker that `run` uses
//! when no `--brokers` is given (librdkafka's in-process mock cluster).
//!
//! It is the only crate that imports `rdkafka`; services see the small types defined here.
//! It knows topics only as the `schemas` crate names them and decides nothing about what a
//! record means.

mod acks;
mod admin;
mod consumer;
mod embedded;
mod error;
mod lag;
mod producer;
mod progress;
mod settings;
mod tail;

pub use acks::{Acks, Delivered, Results, Settled};
pub use admin::{
    PartitionInfo, Reachability, TopicInfo, alter_topic, describe_topics, ensure_topics,
};
pub use consumer::{Consumer, LagProbe, Received, StoredRecord, read_partition};
pub use embedded::EmbeddedBroker;
pub use error::{BusError, Result, TransactionFailure};
pub use lag::{Backpressure, LagWatch, PartitionLag, Transition, spawn_lag_watch};
pub use producer::{OutRecord, Producer};
pub use settings::{ClientSettings, KafkaArgs, ProducerArgs, eventhubs_settings, parse_properties};
pub use tail::spawn_tail;
