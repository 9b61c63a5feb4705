//! Which processing guarantee is in force, and who this member is.
//!
//! - **Exactly-once** (Kafka Streams' `exactly_once_v2` model): each processor commits a
//!   batch's outputs, changelog records and input offsets in one Kafka transaction, with
//!   the consumer group's metadata, so a member that lost its partitions cannot commit
//!   them; readers read `read_committed`. Each processor of a member has the
//!   transactional id `dronedelivery-<processor>-<instance id>`: a member restarted with
//!   the same instance id fences its predecessor, whose writes are then refused.
//! - **At-least-once**: outputs, then changelog records, then offset markers, each
//!   acknowledged before the next; a crash between them repeats outputs, and the
//!   markers keep state changes from being applied twice.
//!
//! The embedded broker and Event Hubs Standard have no real transactions: there the
//! default is at-least-once, and exactly-once is refused on the embedded broker.
//!
//! This module decides; it does not produce or consume (see `commit` and the engine).

use std::fmt;

/// How a processor's effects and its input offsets become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Guarantee {
    /// One Kafka transaction per batch: outputs, state and input offsets, all or none.
    ExactlyOnce,
    /// Outputs before state before offsets: effects may repeat after a crash, never get
    /// lost.
    AtLeastOnce,
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ExactlyOnce => "exactly-once",
            Self::AtLeastOnce => "at-least-once",
        })
    }
}

/// What the processors run against, as far as transactions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// The in-process mock cluster of `run`.
    Embedded,
    /// Azure Event Hubs' Kafka endpoint.
    EventHubs,
    /// An Apache Kafka cluster (or one that speaks its transaction protocol).
    Kafka,
}

/// The processing guarantee and the member's identity, shared by every processor.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GuaranteeArgs {
    /// exactly-once (Kafka transactions: each batch's outputs, state and input offsets
    /// commit together) or at-least-once (effects may repeat after a crash). Default:
    /// exactly-once against a Kafka cluster; at-least-once on the embedded broker and
    /// Event Hubs, which have no transactions.
    #[arg(long, env = "DRONEDELIVERY_PROCESSING_GUARANTEE", value_enum)]
    pub processing_guarantee: Option<Guarantee>,

    /// This member's stable identity (a StatefulSet's or a pod's name): its
    /// transactional ids are `dronedelivery-<processor>-<ID>`, so that a member restarted
    /// with the same id fences its predecessor. Two live members must never share one.
    /// Default: a random id per start.
    #[arg(long, env = "DRONEDELIVERY_INSTANCE_ID", value_name = "ID",
          value_parser = parse_instance_id)]
    pub instance_id: Option<String>,
}

/// Most bytes of an instance id.
const MAX_INSTANCE_ID: usize = 200;

fn parse_instance_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_INSTANCE_ID {
        return Err(format!("must be 1 to {MAX_INSTANCE_ID} bytes"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("`{c}` is not allowed: use letters, digits, - _ ."));
    }
    Ok(s.to_owned())
}

/// The guarantee in force on `cluster` when `requested` (or the default), with the reason
/// to print at start-up; an error when it cannot be had there.
pub fn resolve(
    requested: Option<Guarantee>,
    cluster: Cluster,
) -> Result<(Guarantee, &'static str), String> {
    match (requested, cluster) {
        (Some(Guarantee::ExactlyOnce), Cluster::Embedded) => Err(
            "the embedded broker has no transactions: use --processing-guarantee at-least-once, \
             or --brokers for a Kafka cluster"
                .into(),
        ),
        (Some(Guarantee::ExactlyOnce), Cluster::EventHubs) => Ok((
            Guarantee::ExactlyOnce,
            "asked for; Event Hubs supports transactions only on its Premium and Dedicated tiers",
        )),
        (Some(g), _) => Ok((g, "asked for")),
        (None, Cluster::Kafka) => Ok((Guarantee::ExactlyOnce, "the default on a Kafka cluster")),
        (None, Cluster::Embedded) => Ok((
            Guarantee::AtLeastOnce,
            "the embedded broker has no transactions",
        )),
        (None, Cluster::EventHubs) => Ok((
            Guarantee::AtLeastOnce,
            "Event Hubs Standard has no transactions",
        )),
    }
}

/// The transactional id of `processor` in the member `instance_id`.
pub fn transactional_id(processor: &str, instance_id: &str) -> String {
    format!("dronedelivery-{processor}-{instance_id}")
}

/// A random instance id, for a member started without one.
pub fn random_instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Mixed with the process id: two members started in the same nanosecond differ.
    let mixed = nanos ^ (u128::from(std::process::id()) << 64);
    format!("{:016x}", (mixed as u64) ^ ((mixed >> 64) as u64))
}

/// How the processors of this member write: the guarantee in force, and what a
/// transactional producer is built from.
#[derive(Debug, Clone)]
pub struct Durability {
    /// The guarantee in force.
    pub guarantee: Guarantee,
    /// This member's identity.
    pub instance_id: String,
    /// The cluster.
    pub settings: bus::ClientSettings,
    /// How producers are tuned.
    pub tuning: bus::ProducerArgs,
    /// The member's shared producer, used under at-least-once.
    pub shared: bus::Producer,
    /// Whether the member's outputs are being written (for its readiness).
    pub outputs: crate::output::OutputHealth,
}

impl Durability {
    /// At-least-once through `producer`, with a random instance id (the embedded
    /// broker's guarantee).
    pub fn at_least_once(settings: bus::ClientSettings, producer: bus::Producer) -> Self {
        Self {
            guarantee: Guarantee::AtLeastOnce,
            instance_id: random_instance_id(),
            settings,
            tuning: bus::ProducerArgs::default(),
            shared: producer,
            outputs: crate::output::OutputHealth::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_cluster_and_the_embedded_broker_refuses_transactions() {
        use Guarantee::*;
        assert_eq!(resolve(None, Cluster::Kafka).map(|r| r.0), Ok(ExactlyOnce));
        assert_eq!(
            resolve(None, Cluster::Embedded).map(|r| r.0),
            Ok(AtLeastOnce)
        );
        assert_eq!(
            resolve(None, Cluster::EventHubs).map(|r| r.0),
            Ok(AtLeastOnce)
        );
        assert!(resolve(Some(ExactlyOnce), Cluster::Embedded).is_err());
        assert_eq!(
            resolve(Some(ExactlyOnce), Cluster::EventHubs).map(|r| r.0),
            Ok(ExactlyOnce)
        );
        assert_eq!(
            resolve(Some(AtLeastOnce), Cluster::Kafka).map(|r| r.0),
            Ok(AtLeastOnce)
        );
    }

    #[test]
    fn instance_ids_are_short_and_plain() {
        assert!(parse_instance_id("processors-0").is_ok());
        assert!(parse_instance_id("").is_err());
        assert!(parse_instance_id("a b").is_err());
        assert!(parse_instance_id(&"x".repeat(201)).is_err());
        assert_eq!(
            transactional_id("scheduling", "processors-0"),
            "dronedelivery-scheduling-processors-0"
        );
        assert_ne!(random_instance_id(), "");
    }
}
