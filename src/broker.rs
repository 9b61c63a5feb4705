//! The process's way to the bus: the Kafka cluster named by the flags, or an embedded
//! in-memory broker when none is named and the command allows it; a readiness probe that
//! asks a broker for metadata; and the producer queue's gauge. It does not produce or
//! consume records itself.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bus::{ClientSettings, EmbeddedBroker, KafkaArgs, Producer, ProducerArgs};
use ingest::health::Readiness;
use processors::guarantee::{self, Cluster, Durability, GuaranteeArgs};
use tokio_util::sync::CancellationToken;

/// Brokers from the flags, or an embedded in-memory broker when none are given and
/// `allow_embedded`. The pipeline's topics exist when it returns.
pub(crate) async fn connect(
    kafka: &KafkaArgs,
    allow_embedded: bool,
) -> Result<(ClientSettings, Option<EmbeddedBroker>)> {
    let wants_embedded = kafka.brokers.is_none() && kafka.eventhubs_connection_string.is_none();
    if wants_embedded && allow_embedded {
        let broker = EmbeddedBroker::start(1, &schemas::topics::ALL)
            .context("starting the embedded broker")?;
        tracing::warn!(
            bootstrap = broker.bootstrap_servers(),
            "the bus is IN MEMORY (embedded broker): records not yet in the history are lost \
             if the process dies; give --brokers for a durable Kafka cluster"
        );
        let settings = ClientSettings::from_args(kafka, Some(broker.bootstrap_servers()))?;
        return Ok((settings, Some(broker)));
    }
    let settings = ClientSettings::from_args(kafka, None)?;
    bus::ensure_topics(&settings, &schemas::topics::ALL)
        .await
        .context("creating the pipeline's topics")?;
    Ok((settings, None))
}

/// How this member's processors write: the guarantee in force on this cluster (printed
/// with its reason) and the member's identity.
pub(crate) fn durability(
    kafka: &KafkaArgs,
    embedded: bool,
    args: &GuaranteeArgs,
    settings: &ClientSettings,
    tuning: &ProducerArgs,
    producer: &Producer,
) -> Result<Durability> {
    let cluster = if embedded {
        Cluster::Embedded
    } else if kafka.eventhubs_connection_string.is_some() {
        Cluster::EventHubs
    } else {
        Cluster::Kafka
    };
    let (guarantee, why) = guarantee::resolve(args.processing_guarantee, cluster)
        .map_err(|reason| anyhow::anyhow!("--processing-guarantee: {reason}"))?;
    let instance_id = args
        .instance_id
        .clone()
        .unwrap_or_else(guarantee::random_instance_id);
    tracing::info!(
        %guarantee,
        reason = why,
        instance_id = %instance_id,
        "processing guarantee: {guarantee} ({why})"
    );
    Ok(Durability {
        guarantee,
        instance_id,
        settings: settings.clone(),
        tuning: tuning.clone(),
        shared: producer.clone(),
        outputs: processors::OutputHealth::default(),
    })
}

/// Readiness: a broker answers a metadata request within two seconds.
pub(crate) fn readiness(settings: &ClientSettings) -> Result<Readiness> {
    let probe = Arc::new(bus::Reachability::new(settings)?);
    Ok(Arc::new(move || {
        let probe = Arc::clone(&probe);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                probe.check(
                    schemas::topics::DELIVERY_REQUESTS.name,
                    Duration::from_secs(2),
                )
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the broker is not reachable: {e}"))
        })
    }))
}

/// Reports the producer's queue (records enqueued and not yet acknowledged) as the gauge
/// `producer_queue_records` every second, until `stop` is cancelled.
pub(crate) async fn report_producer_queue(producer: Producer, stop: CancellationToken) {
    let gauge = metrics::gauge!("producer_queue_records");
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => gauge.set(f64::from(producer.in_flight())),
        }
    }
}

/// Waits (off the async threads) until the producer has delivered what it holds, for at
/// most ten seconds; says so when it could not.
pub(crate) async fn flush(producer: Producer) {
    let flushed =
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "producer flush incomplete");
    }
}
