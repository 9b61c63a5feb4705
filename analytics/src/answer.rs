//! A query's answer as it streams: [`ResultStream`] hands out the result's record batches
//! one at a time under the query's limits, and [`Renderer`] turns them into the bytes of
//! an output format as they come, so that neither the server nor the client's answer ever
//! holds the whole result.
//!
//! The limits are checked batch by batch: the rows returned (`--sql-max-rows`), the
//! result's size in Arrow memory (`--sql-max-result-mb`, also per batch, so one huge batch
//! is refused too) and the time from the query's start to its last batch
//! (`--sql-timeout-secs`). A query's place among the running ones
//! (`--sql-max-concurrent`) and its stream (with its operators' memory) are held until
//! its stream ends or is dropped, and never past that time: when a client stops reading
//! (so that the stream is no longer polled), both are dropped when the time is up, and
//! the stream then ends with the time limit.
//!
//! It also owns the output formats ([`OutputFormat`]) and how an HTTP `Accept` header
//! picks one. It must not plan queries (`sql.rs` does) or know about HTTP or Flight.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use datafusion::execution::SendableRecordBatchStream;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::{AnalyticsError, Result};

/// Output formats of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Json,
    /// A JSON array of objects.
    JsonArray,
    /// A Parquet file (zstd).
    Parquet,
    /// An Arrow IPC stream.
    Arrow,
}

impl OutputFormat {
    /// The media type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Table => "text/plain; charset=utf-8",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Json => "application/x-ndjson",
            Self::JsonArray => "application/json",
            Self::Parquet => "application/vnd.apache.parquet",
            Self::Arrow => "application/vnd.apache.arrow.stream",
        }
    }

    /// The format an HTTP `Accept` header asks for (JSON when it names none we have),
    /// or `None` when it excludes every format we have.
    pub fn from_accept(accept: Option<&str>) -> Option<Self> {
        let Some(accept) = accept else {
            return Some(Self::JsonArray);
        };
        for item in accept.split(',') {
            let media = item.split(';').next().unwrap_or_default().trim();
            let found = match media.to_ascii_lowercase().as_str() {
                "application/json" | "*/*" | "application/*" => Self::JsonArray,
                "application/x-ndjson" | "application/jsonl" => Self::Json,
                "text/csv" | "text/*" => Self::Csv,
                "text/plain" => Self::Table,
                "application/vnd.apache.arrow.stream" => Self::Arrow,
                "application/vnd.apache.parquet" => Self::Parquet,
                _ => continue,
            };
            return Some(found);
        }
        None
    }
}

/// The limits one result streams under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    pub(crate) max_rows: usize,
    pub(crate) max_mb: usize,
    pub(crate) timeout: Duration,
}

/// A running query's result, batch by batch, within its limits.
pub struct ResultStream {
    schema: SchemaRef,
    limits: StreamLimits,
    started: Instant,
    rows: usize,
    bytes: usize,
    /// Whether it ended (at its end or at an error), and its outcome was counted in the
    /// query metrics.
    ended: bool,
    /// The query's stream and place, given back at the end, or by `watchdog` when the
    /// time is up.
    running: Arc<Mutex<Running>>,
    watchdog: tokio::task::JoinHandle<()>,
}

/// What a running query holds: its stream of batches (with the memory of its operators)
/// and its place among the running queries. Out of `batches` only while it is polled.
struct Running {
    batches: Option<SendableRecordBatchStream>,
    place: Option<OwnedSemaphorePermit>,
}

impl Drop for ResultStream {
    fn drop(&mut self) {
        self.watchdog.abort();
        release(&self.running);
        if !self.ended {
            metrics::counter!("sql_queries_total", "outcome" => "abandoned").increment(1);
        }
    }
}

impl fmt::Debug for ResultStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultStream")
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl ResultStream {
    pub(crate) fn new(
        schema: SchemaRef,
        batches: SendableRecordBatchStream,
        limits: StreamLimits,
        started: Instant,
        place: OwnedSemaphorePermit,
    ) -> Self {
        let running = Arc::new(Mutex::new(Running {
            batches: Some(batches),
            place: Some(place),
        }));
        let deadline = tokio::time::Instant::from_std(started + limits.timeout);
        let watchdog = tokio::spawn({
            let running = Arc::clone(&running);
            async move {
                tokio::time::sleep_until(deadline).await;
                release(&running);
            }
        });
        Self {
            schema,
            limits,
            started,
            rows: 0,
            bytes: 0,
            ended: false,
            running,
            watchdog,
        }
    }

    /// The result's columns.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The result's size limit in MiB (`--sql-max-result-mb`): a renderer that must
    /// hold the result (an aligned table) is bounded by it too ([`Renderer::bounded`]).
    pub fn max_result_mb(&self) -> usize {
        self.limits.max_mb
    }

    /// The next batch; `None` at the end. Past a limit it is an error, and the stream
    /// ends there.
    pub async fn next(&mut self) -> Option<Result<RecordBatch>> {
        if self.ended {
            return None;
        }
        let next = self.step().await.transpose();
        if !matches!(next, Some(Ok(_))) {
            self.ended = true;
            release(&self.running);
            metrics::histogram!("sql_query_seconds").record(self.started.elapsed().as_secs_f64());
            let outcome = if next.is_none() { "ok" } else { "error" };
            metrics::counter!("sql_queries_total", "outcome" => outcome).increment(1);
        }
        next
    }

    async fn step(&mut self) -> Result<Option<RecordBatch>> {
        let limits = self.limits;
        let timeout = || AnalyticsError::Timeout {
            limit: limits.timeout,
        };
        // Taken out while it is polled (and put back however the poll ends, also when
        // this future is dropped); the watchdog, past the time, drops what is left.
        let mut polled = Polled {
            running: &self.running,
            batches: lock(&self.running).batches.take(),
        };
        let Some(batches) = polled.batches.as_mut() else {
            return Err(timeout());
        };
        let left = limits.timeout.saturating_sub(self.started.elapsed());
        let next = tokio::time::timeout(left, batches.next()).await;
        drop(polled);
        let Some(batch) = next.map_err(|_| timeout())? else {
            return Ok(None);
        };
        let batch = batch.map_err(|source| AnalyticsError::Query { source })?;
        self.rows += batch.num_rows();
        if self.rows > limits.max_rows {
            return Err(AnalyticsError::TooManyRows {
                limit: limits.max_rows,
            });
        }
        self.bytes = self.bytes.saturating_add(batch.get_array_memory_size());
        if self.bytes > limits.max_mb.saturating_mul(1024 * 1024) {
            return Err(AnalyticsError::ResultTooLarge {
                limit_mb: limits.max_mb,
            });
        }
        Ok(Some(batch))
    }

    /// The batches as a stream (for Flight SQL), ending after the first error.
    pub fn into_stream(self) -> BoxStream<'static, Result<RecordBatch>> {
        futures_util::stream::unfold(Some(self), |state| async move {
            let mut stream = state?;
            match stream.next().await? {
                Ok(batch) => Some((Ok(batch), Some(stream))),
                Err(e) => Some((Err(e), None)),
            }
        })
        .boxed()
    }
}

/// A query's stream while it is polled: put back when dropped, unless the query lost its
/// place meanwhile (then it is dropped with it).
struct Polled<'a> {
    running: &'a Mutex<Running>,
    batches: Option<SendableRecordBatchStream>,
}

impl Drop for Polled<'_> {
    fn drop(&mut self) {
        let mut running = lock(self.running);
        if running.place.is_some() {
            running.batches = self.batches.take();
        }
    }
}

fn lock(running: &Mutex<Running>) -> std::sync::MutexGuard<'_, Running> {
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Drops a query's stream (and the memory it holds) and gives its place back.
fn release(running: &Mutex<Running>) {
    let (batches, place) = {
        let mut running = lock(running);
        (running.batches.take(), running.place.take())
    };
    drop(batches);
    drop(place);
}

/// A buffer the format writers write into and the renderer drains after each batch.
#[derive(Clone, Default)]
struct Drained(Arc<Mutex<Vec<u8>>>);

impl Drained {
    fn take(&self) -> Bytes {
        let mut buffer = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Bytes::from(std::mem::take(&mut *buffer))
    }
}

impl Write for Drained {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Writer {
    Csv(arrow::csv::Writer<Drained>),
    Json(arrow::json::LineDelimitedWriter<Drained>),
    JsonArray(arrow::json::ArrayWriter<Drained>),
    Arrow(arrow::ipc::writer::StreamWriter<Drained>),
    Parquet(parquet::arrow::ArrowWriter<Drained>),
    /// An aligned table needs every row for its column widths: it is rendered at the end,
    /// and held until then. Every row is as wide as the widest cell of each column, so a
    /// few long values can make a small result a huge text: the text's size is reckoned
    /// from each column's widest cell as rows come, and bounded.
    Table(TableText),
}

/// The batches of an aligned table, and the size its text will have.
struct TableText {
    batches: Vec<RecordBatch>,
    /// The widest line of a cell (in bytes) of each column so far, its name included.
    widths: Vec<usize>,
    /// The text's lines so far: a row takes as many as its cell with the most lines.
    lines: usize,
    /// The most bytes the text may take; past it the answer is refused.
    max_bytes: usize,
    max_mb: usize,
}

impl TableText {
    fn new(schema: &SchemaRef) -> Self {
        Self {
            batches: Vec::new(),
            widths: schema.fields().iter().map(|f| f.name().len()).collect(),
            lines: 0,
            max_bytes: usize::MAX,
            max_mb: usize::MAX,
        }
    }

    fn push(&mut self, batch: &RecordBatch) -> Result<()> {
        use std::fmt::Write as _;
        let options = arrow::util::display::FormatOptions::default().with_null("");
        let mut cell = String::new();
        // Lines of each row of the batch: a cell's text is split at its line breaks.
        let mut heights = vec![1_usize; batch.num_rows()];
        for (column, width) in batch.columns().iter().zip(self.widths.iter_mut()) {
            let formatter = arrow::util::display::ArrayFormatter::try_new(column, &options)
                .map_err(arrow_err)?;
            for (row, height) in heights.iter_mut().enumerate() {
                cell.clear();
                let _ = write!(cell, "{}", formatter.value(row));
                let mut lines = 0;
                for line in cell.split('\n') {
                    lines += 1;
                    *width = (*width).max(line.len());
                }
                *height = (*height).max(lines);
            }
        }
        self.lines = heights
            .iter()
            .fold(self.lines, |lines, h| lines.saturating_add(*h));
        if table_bytes(self.lines, &self.widths) > self.max_bytes {
            return Err(AnalyticsError::ResultTooLarge {
                limit_mb: self.max_mb,
            });
        }
        self.batches.push(batch.clone());
        Ok(())
    }
}

/// About the size of an aligned table's text: its rows' `lines`, the header and its
/// four borders, each line as wide as `| ` plus every column's width and ` | `.
fn table_bytes(lines: usize, widths: &[usize]) -> usize {
    let line = widths
        .iter()
        .fold(2_usize, |line, w| line.saturating_add(w.saturating_add(3)));
    lines.saturating_add(5).saturating_mul(line)
}

/// Renders a result in one format, batch by batch.
pub struct Renderer {
    schema: SchemaRef,
    writer: Writer,
    out: Drained,
    written: bool,
}

impl fmt::Debug for Renderer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Renderer")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

fn arrow_err(source: arrow::error::ArrowError) -> AnalyticsError {
    AnalyticsError::Arrow {
        action: "rendering the result",
        source,
    }
}

fn parquet_err(source: parquet::errors::ParquetError) -> AnalyticsError {
    AnalyticsError::Parquet {
        action: "rendering the result",
        source,
    }
}

impl Renderer {
    /// A renderer of results with `schema` in `format`.
    pub fn new(schema: SchemaRef, format: OutputFormat) -> Result<Self> {
        let out = Drained::default();
        let writer = match format {
            OutputFormat::Table => Writer::Table(TableText::new(&schema)),
            OutputFormat::Csv => Writer::Csv(
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(out.clone()),
            ),
            OutputFormat::Json => Writer::Json(arrow::json::LineDelimitedWriter::new(out.clone())),
            OutputFormat::JsonArray => {
                Writer::JsonArray(arrow::json::ArrayWriter::new(out.clone()))
            }
            OutputFormat::Arrow => Writer::Arrow(
                arrow::ipc::writer::StreamWriter::try_new(out.clone(), &schema)
                    .map_err(arrow_err)?,
            ),
            OutputFormat::Parquet => Writer::Parquet(
                parquet::arrow::ArrowWriter::try_new(
                    out.clone(),
                    Arc::clone(&schema),
                    Some(crate::parquet_files::properties()),
                )
                .map_err(parquet_err)?,
            ),
        };
        Ok(Self {
            schema,
            writer,
            out,
            written: false,
        })
    }

    /// Bounds what this renderer holds by `max_mb` MiB (the query's result limit): an
    /// aligned table whose text would take more is refused with
    /// [`AnalyticsError::ResultTooLarge`] before it is rendered. The other formats hold
    /// nothing: each batch is rendered and handed out as it comes.
    #[must_use]
    pub fn bounded(mut self, max_mb: usize) -> Self {
        if let Writer::Table(table) = &mut self.writer {
            table.max_mb = max_mb;
            table.max_bytes = max_mb.saturating_mul(1024 * 1024);
        }
        self
    }

    /// Renders `batch`: the bytes ready to send (possibly none yet).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<Bytes> {
        if batch.num_rows() == 0 {
            return Ok(Bytes::new());
        }
        self.written = true;
        match &mut self.writer {
            Writer::Csv(w) => w.write(batch).map_err(arrow_err)?,
            Writer::Json(w) => w.write(batch).map_err(arrow_err)?,
            Writer::JsonArray(w) => w.write(batch).map_err(arrow_err)?,
            Writer::Arrow(w) => w.write(batch).map_err(arrow_err)?,
            Writer::Parquet(w) => w.write(batch).map_err(parquet_err)?,
            Writer::Table(table) => table.push(batch)?,
        }
        Ok(self.out.take())
    }

    /// Ends the answer: the last bytes to send.
    pub fn finish(self) -> Result<Bytes> {
        let empty = || RecordBatch::new_empty(Arc::clone(&self.schema));
        match self.writer {
            Writer::Csv(mut w) => {
                // No rows: still the header.
                if !self.written {
                    w.write(&empty()).map_err(arrow_err)?;
                }
            }
            Writer::Json(mut w) => w.finish().map_err(arrow_err)?,
            Writer::JsonArray(mut w) => {
                w.finish().map_err(arrow_err)?;
                // No rows: the writer writes nothing; an empty array is what clients parse.
                if !self.written {
                    return Ok(Bytes::from_static(b"[]"));
                }
            }
            Writer::Arrow(mut w) => w.finish().map_err(arrow_err)?,
            Writer::Parquet(w) => {
                w.close().map_err(parquet_err)?;
            }
            Writer::Table(table) => {
                // No rows: still the columns.
                let shown = if table.batches.is_empty() {
                    vec![empty()]
                } else {
                    table.batches
                };
                let table =
                    arrow::util::pretty::pretty_format_batches(&shown).map_err(arrow_err)?;
                return Ok(Bytes::from(format!("{table}\n")));
            }
        }
        Ok(self.out.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    fn stream(
        batches: impl futures_util::Stream<Item = datafusion::error::Result<RecordBatch>>
        + Send
        + 'static,
        limits: StreamLimits,
        places: &Arc<tokio::sync::Semaphore>,
    ) -> ResultStream {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let place = Arc::clone(places).try_acquire_owned().unwrap();
        let batches = Box::pin(RecordBatchStreamAdapter::new(Arc::clone(&schema), batches));
        ResultStream::new(schema, batches, limits, Instant::now(), place)
    }

    fn numbers(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let column = arrow::array::Int64Array::from_iter_values(0..n);
        RecordBatch::try_new(schema, vec![Arc::new(column)]).unwrap()
    }

    #[tokio::test]
    async fn a_stream_no_one_reads_is_dropped_and_gives_its_place_back_when_its_time_is_up() {
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let limits = StreamLimits {
            max_rows: 10,
            max_mb: 1,
            timeout: Duration::from_millis(100),
        };
        // A stream that says when it is dropped (with the memory it would hold).
        struct Dropped(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = Dropped(Arc::clone(&dropped));
        let pending = futures_util::stream::pending().map(move |batch| {
            let _held = &guard;
            batch
        });
        let mut result = stream(pending, limits, &places);
        assert_eq!(places.available_permits(), 0);
        let place = tokio::time::timeout(Duration::from_secs(10), places.acquire())
            .await
            .expect("the place comes back");
        drop(place);
        assert!(
            dropped.load(std::sync::atomic::Ordering::SeqCst),
            "the stream no one reads is dropped with its place"
        );
        assert!(matches!(
            result.next().await,
            Some(Err(AnalyticsError::Timeout { .. }))
        ));
        assert!(result.next().await.is_none(), "it ends at its error");
    }

    #[tokio::test]
    async fn rows_and_bytes_are_bounded_as_they_stream_and_the_place_is_given_back() {
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let limits = StreamLimits {
            max_rows: 10,
            max_mb: 1,
            timeout: Duration::from_secs(60),
        };
        let batches = futures_util::stream::iter([Ok(numbers(6)), Ok(numbers(6))]);
        let mut result = stream(batches, limits, &places);
        assert_eq!(result.next().await.unwrap().unwrap().num_rows(), 6);
        assert!(matches!(
            result.next().await,
            Some(Err(AnalyticsError::TooManyRows { limit: 10 }))
        ));
        assert_eq!(
            places.available_permits(),
            1,
            "an ended stream holds no place"
        );

        let limits = StreamLimits {
            max_rows: 1_000_000,
            ..limits
        };
        // 1.6 MB in one batch, past the 1 MiB bound.
        let big = futures_util::stream::iter([Ok(numbers(200_000))]);
        let mut result = stream(big, limits, &places);
        assert!(matches!(
            result.next().await,
            Some(Err(AnalyticsError::ResultTooLarge { limit_mb: 1 }))
        ));
    }

    /// An aligned table pads every row to its column's widest cell: one long value in a
    /// small result would make a text many times the result's size. Its size is
    /// reckoned as rows come and bounded by the result limit; the same rows with short
    /// values render.
    #[test]
    fn an_aligned_table_is_bounded_by_the_size_of_its_text() {
        use arrow::array::StringArray;
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let rows = |long: usize| {
            let mut values = vec!["x".to_owned(); 2_000];
            values[0] = "y".repeat(long);
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(StringArray::from(values))],
            )
            .unwrap()
        };
        // 2,000 rows of 20 KB each: about 40 MB of text from 60 KB of values.
        let mut renderer = Renderer::new(Arc::clone(&schema), OutputFormat::Table)
            .unwrap()
            .bounded(1);
        assert!(matches!(
            renderer.write(&rows(20_000)),
            Err(AnalyticsError::ResultTooLarge { limit_mb: 1 })
        ));
        let mut renderer = Renderer::new(Arc::clone(&schema), OutputFormat::Table)
            .unwrap()
            .bounded(1);
        renderer.write(&rows(100)).unwrap();
        let text = renderer.finish().unwrap();
        assert!(text.len() < 1024 * 1024 && text.len() > 200_000);
        // A cell with many lines makes its row that tall, every line padded to the
        // widest cell: 50,000 lines of 20 KB from two values.
        let tall = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringArray::from(vec![
                "\n".repeat(50_000),
                "y".repeat(20_000),
            ]))],
        )
        .unwrap();
        let mut renderer = Renderer::new(Arc::clone(&schema), OutputFormat::Table)
            .unwrap()
            .bounded(1);
        assert!(matches!(
            renderer.write(&tall),
            Err(AnalyticsError::ResultTooLarge { limit_mb: 1 })
        ));
        // The other formats hold nothing, so they are not bounded here.
        let mut csv = Renderer::new(Arc::clone(&schema), OutputFormat::Csv)
            .unwrap()
            .bounded(1);
        assert!(!csv.write(&rows(20_000)).unwrap().is_empty());
    }

    #[test]
    fn every_format_renders_batch_by_batch_and_an_empty_result_still_parses() {
        let schema = numbers(0).schema();
        for format in [
            OutputFormat::Csv,
            OutputFormat::Json,
            OutputFormat::JsonArray,
            OutputFormat::Arrow,
            OutputFormat::Parquet,
            OutputFormat::Table,
        ] {
            let mut renderer = Renderer::new(Arc::clone(&schema), format).unwrap();
            let mut out = renderer.write(&numbers(3)).unwrap().to_vec();
            out.extend_from_slice(&renderer.write(&numbers(2)).unwrap());
            out.extend_from_slice(&renderer.finish().unwrap());
            let text = String::from_utf8_lossy(&out);
            match format {
                OutputFormat::Csv => assert_eq!(text, "n\n0\n1\n2\n0\n1\n"),
                OutputFormat::Json => assert_eq!(text.lines().count(), 5),
                OutputFormat::JsonArray => {
                    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
                    assert_eq!(rows.len(), 5);
                }
                OutputFormat::Arrow => {
                    let reader =
                        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(out), None)
                            .unwrap();
                    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
                    assert_eq!(rows, 5);
                }
                OutputFormat::Parquet => {
                    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
                        Bytes::from(out),
                        1024,
                    )
                    .unwrap();
                    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
                    assert_eq!(rows, 5);
                }
                OutputFormat::Table => assert_eq!(text.matches("| 1 ").count(), 2, "{text}"),
            }
            let empty = Renderer::new(Arc::clone(&schema), format)
                .unwrap()
                .finish()
                .unwrap();
            match format {
                OutputFormat::Csv => assert_eq!(&empty[..], b"n\n"),
                OutputFormat::JsonArray => assert_eq!(&empty[..], b"[]"),
                OutputFormat::Json => assert!(empty.is_empty()),
                _ => assert!(!empty.is_empty(), "{format:?}"),
            }
        }
    }
}
