//! Logs and metrics of the process: the tracing subscriber (text or JSON lines on stderr)
//! and the Prometheus recorder that `/metrics` renders. Set up once, by `main` and the
//! commands, before any service starts; nothing here emits a metric of its own.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ingest::MetricsRender;

use crate::cli::LogFormat;

/// Logs to stderr at `filter` (RUST_LOG syntax; `info` if it does not parse).
pub(crate) fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Installs the Prometheus recorder and returns what renders it.
pub(crate) fn init_metrics() -> Result<MetricsRender> {
    // Latencies as histograms (not summaries), so that they add up across replicas.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
        )
        .context("metric buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("ingest_batch_records".into()),
            &[1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(Arc::new(move || handle.render()))
}
