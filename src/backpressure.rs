//! Backpressure from the consumers' lag: the binary names every consumer group of the
//! pipeline and the topics each reads, and refuses writes at the ingestion tier while one
//! of them is too far behind. It reads lag only; it never moves a consumer.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Result;
use bus::ClientSettings;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::BackpressureArgs;

/// Watches the lag of every consumer group of the pipeline and sets `behind` while the
/// worst partition is more than `max` records behind (until it is at most half of that).
/// `None` when off.
pub(crate) fn watch_lag(
    settings: &ClientSettings,
    args: &BackpressureArgs,
    embedded: bool,
    shutdown: CancellationToken,
) -> Result<Option<(Arc<AtomicBool>, JoinHandle<()>)>> {
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
        .filter(|p| p.holds_up_writes())
        .map(|p| (p.group(), p.inputs()))
        .collect();
    groups.push((schemas::topics::groups::HISTORY, history.as_slice()));
    let watch = bus::LagWatch::new(settings, &groups)?;
    let every = Duration::from_millis(args.lag_check_ms.max(50));
    Ok(Some(bus::spawn_lag_watch(watch, max, every, shutdown)))
}
