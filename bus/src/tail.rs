//! Following a whole topic from its start in the background (a compacted topic read as a
//! table): every partition, no group, each record handed to a callback.
//!
//! It owns the retrying start (the topic may not exist yet while a cluster starts) and
//! the loop; what a record means is the caller's.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consumer::Consumer;
use crate::settings::ClientSettings;

/// Reads every partition of `topic` (of `partitions`) from the start, and then as
/// records come, calling `apply(key, payload)` for each (an empty payload for a
/// tombstone), until `shutdown`. `label` names the reader in logs.
///
/// The answer turns `true` once every record that was in the topic when the reader
/// started has been applied (judged by offsets: meant for a topic written without
/// transactions, whose offsets have no gaps).
pub fn spawn_tail<F>(
    settings: ClientSettings,
    topic: &'static str,
    partitions: i32,
    label: &'static str,
    shutdown: CancellationToken,
    mut apply: F,
) -> tokio::sync::watch::Receiver<bool>
where
    F: FnMut(&[u8], &[u8]) + Send + 'static,
{
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (consumer, mut ends) = loop {
            let settings = settings.clone();
            let stopping = shutdown.clone();
            // Each call blocks a thread briefly, and none is started once stopping: a
            // process waits for its blocking tasks before it exits.
            let made = tokio::task::spawn_blocking(move || {
                let consumer = Consumer::tail(&settings, topic, Duration::from_secs(2))?;
                // Where each partition ends now: caught up once read that far.
                let mut ends = std::collections::HashMap::new();
                // Partitions the topic has (a broker may have made it with fewer than
                // asked for), each to be read up to its end; a failed look-up is tried
                // again from the start.
                let assigned = consumer.assigned()?;
                for partition in (0..partitions).filter(|p| assigned.iter().any(|(_, a)| a == p)) {
                    if stopping.is_cancelled() {
                        return Err(crate::BusError::Timeout {
                            action: "reading where a tailed topic ends (stopping)",
                        });
                    }
                    let (low, high) =
                        consumer.watermarks(topic, partition, Duration::from_secs(1))?;
                    if high > low {
                        ends.insert(partition, high);
                    }
                }
                Ok::<_, crate::BusError>((consumer, ends))
            })
            .await;
            match made {
                Ok(Ok(made)) => break made,
                Ok(Err(e)) => tracing::warn!(error = %e, "{label}: cannot tail {topic} yet"),
                Err(e) => tracing::warn!(error = %e, "{label}: task failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        if ends.is_empty() {
            let _ = ready_tx.send(true);
        }
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = consumer.recv() => received,
            };
            match received {
                Ok(record) => {
                    if let Some(key) = record.key() {
                        apply(key, record.payload().unwrap_or_default());
                    }
                    let partition = record.partition();
                    if ends
                        .get(&partition)
                        .is_some_and(|end| record.offset() + 1 >= *end)
                    {
                        ends.remove(&partition);
                        if ends.is_empty() {
                            let _ = ready_tx.send(true);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "{label}: receive failed"),
            }
        }
    });
    ready
}
