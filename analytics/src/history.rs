//! The history service: the [sink](crate::sink) and the periodic
//! [compaction](crate::compact) side by side over one history root.
//!
//! Owns their shared lifetime: it opens the `--data` root, starts the sink, starts
//! compaction beside it (unless `--compact-interval-secs` is 0), and once the sink stops
//! (told to, or on an error) stops compaction and waits for it. The sink's outcome is
//! the service's; a compaction error is only logged (the next pass retries, and
//! `dronedelivery compact` does the same work).
//!
//! It must not read records, write files or commit to the log itself: that is the sink's
//! and compaction's work.

use std::path::PathBuf;

use bus::ClientSettings;
use tokio_util::sync::CancellationToken;

use crate::compact;
use crate::error::Result;
use crate::failpoint::FailPoint;
use crate::sink::{OnShutdown, Sink, SinkArgs, SinkHealth};
use crate::store::{DataArgs, DataRoot};

/// What [`run`] takes: the command-line settings and what only the program or a test
/// sets.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Where the history lives.
    pub data: DataArgs,

    /// The command-line settings of the sink and of compaction.
    pub sink: SinkArgs,

    /// What the log's offsets are scoped to: empty for a Kafka cluster whose offsets last
    /// as long as the history; a fresh value for a bus that starts empty (the embedded
    /// broker), so that its offsets are not taken for an earlier bus's.
    pub offsets_scope: String,

    /// A crash to inject (tests only).
    pub fail_at: Option<FailPoint>,

    /// Whether the sink can write now: a clone kept by the caller tells (for readiness
    /// and write backpressure).
    pub health: SinkHealth,
}

impl HistoryConfig {
    /// The command-line settings, offsets not scoped, no crash injected.
    pub fn new(data: DataArgs, sink: SinkArgs) -> Self {
        Self {
            data,
            sink,
            offsets_scope: String::new(),
            fail_at: None,
            health: SinkHealth::default(),
        }
    }
}

/// Runs the sink, and compaction beside it, until `shutdown` is cancelled.
pub async fn run(
    config: HistoryConfig,
    settings: ClientSettings,
    shutdown: CancellationToken,
    on_shutdown: OnShutdown,
) -> Result<()> {
    let HistoryConfig {
        data,
        sink,
        offsets_scope,
        fail_at,
        health,
    } = config;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let root = DataRoot::open(&data.url, &cwd)?;
    let compaction_config = sink.compaction.clone();
    let mut sink = Sink::open(
        root.clone(),
        sink,
        offsets_scope,
        fail_at,
        health,
        &settings,
        &shutdown,
    )
    .await?;
    let compaction = (compaction_config.compact_interval_secs > 0).then(|| {
        let stop = shutdown.child_token();
        (
            stop.clone(),
            tokio::spawn(compact::run_periodically(root, compaction_config, stop)),
        )
    });
    let result = sink.run(&shutdown, on_shutdown).await;
    if let Some((stop, task)) = compaction {
        stop.cancel();
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "compaction stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "compaction task failed"),
        }
    }
    result
}
