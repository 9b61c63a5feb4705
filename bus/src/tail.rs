//! Following a whole topic from its start in the background (a compacted topic read as a
//! table): every partition, no group, each record handed to a callback.
//!
//! It owns the retrying start (the topic may not exist yet while a cluster starts) and
//! the loop; what a record means is the caller's.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consumer::Consumer;
use crate::settings::ClientSettings;

/// Reads every partition of `topic` from the start, and then as records come, calling
/// `apply(key, payload)` for each (an empty payload for a tombstone), until `shutdown`.
/// `label` names the reader in logs.
pub fn spawn_tail<F>(
    settings: ClientSettings,
    topic: &'static str,
    label: &'static str,
    shutdown: CancellationToken,
    mut apply: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(&[u8], &[u8]) + Send + 'static,
{
    tokio::spawn(async move {
        let consumer = loop {
            let settings = settings.clone();
            let made = tokio::task::spawn_blocking(move || {
                Consumer::tail(&settings, topic, Duration::from_secs(5))
            })
            .await;
            match made {
                Ok(Ok(consumer)) => break consumer,
                Ok(Err(e)) => tracing::warn!(error = %e, "{label}: cannot tail {topic} yet"),
                Err(e) => tracing::warn!(error = %e, "{label}: task failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
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
                }
                Err(e) => tracing::warn!(error = %e, "{label}: receive failed"),
            }
        }
    })
}
