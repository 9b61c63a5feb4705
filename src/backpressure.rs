//! Backpressure from the consumers' lag: the binary names every consumer group of the
//! pipeline and the topics each reads, and refuses writes at the ingestion tier while one
//! of them is too far behind. It reads lag only; it never moves a consumer.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bus::ClientSettings;
use tokio_util::sync::CancellationToken;

use crate::cli::BackpressureArgs;
use tokio::task::JoinHandle;

/// Watches the lag of every consumer group of the pipeline and sets `behind` while the
/// worst partition is more than `max` records behind (until it is at most half of that).
/// `None` when off.
pub(crate) fn watch_lag(
    settings: &ClientSettings,
    args: &BackpressureArgs,
    embedded: bool,
    shutdown: CancellationToken,
) -> Result<Option<(Arc<std::sync::atomic::AtomicBool>, JoinHandle<()>)>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let max = args
        .max_consumer_lag
        .unwrap_or(if embedded { 20_000 } else { 0 });
    if max == 0 {
        return Ok(None);
    }
    let history: Vec<&str> = schemas::history::TABLES
        .iter()
        .map(|t| t.topic.name)
        .collect();
    let mut groups: Vec<(&str, &[&str])> = processors::Processor::ALL
        .iter()
        .map(|p| (p.group(), p.inputs()))
        .collect();
    groups.push((schemas::topics::groups::HISTORY, history.as_slice()));
    let watch = Arc::new(bus::LagWatch::new(settings, &groups)?);
    let behind = Arc::new(AtomicBool::new(false));
    let flag = behind.clone();
    let every = Duration::from_millis(args.lag_check_ms.max(50));
    let task = tokio::spawn(async move {
        let gauge = metrics::gauge!("pipeline_max_consumer_lag");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let probe = watch.clone();
            let worst = match tokio::task::spawn_blocking(move || {
                probe.worst(Duration::from_secs(2))
            })
            .await
            {
                Ok(Ok(worst)) => worst,
                Ok(Err(e)) => {
                    // While writes are refused, say why they stay refused.
                    if flag.load(Ordering::Relaxed) {
                        tracing::warn!(error = %e, "consumer lag not measured; writes stay refused");
                    } else {
                        tracing::debug!(error = %e, "consumer lag not measured");
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the lag check failed");
                    continue;
                }
            };
            let lag = worst.as_ref().map_or(0, |w| w.lag);
            gauge.set(lag as f64);
            let was = flag.load(Ordering::Relaxed);
            if !was && lag > max as i64 {
                flag.store(true, Ordering::Relaxed);
                if let Some(w) = &worst {
                    tracing::warn!(
                        group = %w.group, topic = %w.topic, partition = w.partition, lag, max,
                        "a consumer is behind: refusing writes (503) until it catches up"
                    );
                }
            } else if was && lag <= (max / 2) as i64 {
                flag.store(false, Ordering::Relaxed);
                tracing::info!(lag, "the consumers caught up: taking writes again");
            }
        }
    });
    Ok(Some((behind, task)))
}
