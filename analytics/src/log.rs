//! The table log: which Parquet files make up the history and which Kafka offsets are in
//! them.
//!
//! A file becomes part of a table only when a commit naming it is in the log; readers see
//! exactly the files of one log version, never a directory listing. That is what makes
//! the history exactly once and compaction atomic:
//!
//! - the sink writes a file, then commits `add` + the offsets it covers; a file written
//!   but not committed (a crash in between) is never read, and the records are read again
//!   from Kafka and written again;
//! - a commit whose offsets overlap offsets already in the log is refused ([`Conflict`]),
//!   so two sink instances that both held a partition during a rebalance cannot both
//!   write its records;
//! - compaction commits `add` of the merged file and `remove` of the small ones in one
//!   version.
//!
//! Layout under the history root: `_log/<version, 20 digits>.json` (one [`Commit`] each,
//! created with put-if-absent, so concurrent writers serialise on the version number),
//! every [`CHECKPOINT_EVERY`] versions a `<version>.checkpoint.json` with the whole
//! [`Snapshot`], and `_log/_last_checkpoint` naming the newest. Commits are deleted once
//! two newer checkpoints exist and they are an hour old ([`LOG_RETENTION`]). Every commit
//! carries a unique id, so a writer whose put was retried by the store client recognises
//! its own commit.
//!
//! [`Snapshot::check`] and [`Snapshot::apply`] are pure; [`Log`] does the I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{AnalyticsError, Result};
use crate::store::DataRoot;

/// The folder of the log under the history root.
pub const LOG_DIR: &str = "_log";

/// A checkpoint is written every this many versions.
pub const CHECKPOINT_EVERY: u64 = 50;

const LAST_CHECKPOINT: &str = "_last_checkpoint";

/// Commits and checkpoints are kept at least this long (see [`Log::clean_up`]).
pub const LOG_RETENTION: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// One Parquet file of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// The table it belongs to.
    pub table: String,
    /// Its `date` partition (`YYYY-MM-DD`).
    pub date: String,
    /// Its path relative to the history root.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its row count.
    pub rows: u64,
    /// When it was committed, in milliseconds since the Unix epoch.
    pub added_ms: i64,
}

/// A file that left the tables and waits for its physical deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// Its path relative to the history root.
    pub path: String,
    /// When it left, in milliseconds since the Unix epoch.
    pub removed_ms: i64,
}

/// The offsets of one topic partition a commit covers: `from` (the first offset read)
/// up to, not including, `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRange {
    /// The first offset read.
    pub from: i64,
    /// One past the last offset read.
    pub next: i64,
}

/// One version of the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// Its version (1, 2, ...), set by [`Log::commit`].
    pub version: u64,
    /// When it was made, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Who made it (`sink`, `compaction`, `vacuum`).
    pub writer: String,
    /// A unique id, set by [`Log::commit`]: after an ambiguous put (a retry that found
    /// the object there), the writer reads the version back and knows it by its id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Files that join the tables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<DataFile>,
    /// Paths of files that leave the tables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// Paths of removed files that are now physically deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forget: Vec<String>,
    /// Per topic and partition: the offsets whose records the added files hold (records
    /// that give no row included).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offsets: BTreeMap<String, BTreeMap<i32, OffsetRange>>,
}

/// Why a commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// Some of the commit's offsets are already in the log.
    #[error("{topic}/{partition}: offsets from {from} are already in the history (up to {next})")]
    Offsets {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// Where the commit starts.
        from: i64,
        /// Where the log is.
        next: i64,
    },
    /// A file the commit removes is no longer in the tables.
    #[error("{path} is no longer part of the history")]
    Gone {
        /// The file.
        path: String,
    },
}

/// The state of the history at one version: the live files and the offsets they cover.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The version it reflects (0: nothing committed yet).
    pub version: u64,
    /// Live files by path.
    pub files: BTreeMap<String, DataFile>,
    /// Files removed and not yet deleted.
    #[serde(default)]
    pub removed: Vec<Removed>,
    /// Per topic and partition: the offset to read next.
    #[serde(default)]
    pub next: BTreeMap<String, BTreeMap<i32, i64>>,
}

impl Snapshot {
    /// The offset to read next in `topic`/`partition`, if any of it is in the history.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.next.get(topic)?.get(&partition).copied()
    }

    /// The live files of `table`.
    pub fn table_files<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a DataFile> {
        self.files.values().filter(move |f| f.table == table)
    }

    /// The rows of `table` in this version.
    pub fn table_rows(&self, table: &str) -> u64 {
        self.table_files(table).map(|f| f.rows).sum()
    }

    /// Whether `commit` may follow this version: its offsets start at or after what the
    /// log holds, and the files it removes are live.
    pub fn check(&self, commit: &Commit) -> Result<(), Conflict> {
        for (topic, partitions) in &commit.offsets {
            for (&partition, range) in partitions {
                if let Some(next) = self.next_offset(topic, partition)
                    && range.from < next
                {
                    return Err(Conflict::Offsets {
                        topic: topic.clone(),
                        partition,
                        from: range.from,
                        next,
                    });
                }
            }
        }
        if let Some(gone) = commit.remove.iter().find(|p| !self.files.contains_key(*p)) {
            return Err(Conflict::Gone { path: gone.clone() });
        }
        Ok(())
    }

    /// Applies `commit` (checked or read from the log) and moves to its version.
    pub fn apply(&mut self, commit: &Commit) {
        for path in &commit.remove {
            if self.files.remove(path).is_some() {
                self.removed.push(Removed {
                    path: path.clone(),
                    removed_ms: commit.timestamp_ms,
                });
            }
        }
        for file in &commit.add {
            self.files.insert(file.path.clone(), file.clone());
        }
        if !commit.forget.is_empty() {
            self.removed.retain(|r| !commit.forget.contains(&r.path));
        }
        for (topic, partitions) in &commit.offsets {
            let next = self.next.entry(topic.clone()).or_default();
            for (&partition, range) in partitions {
                let at = next.entry(partition).or_insert(range.next);
                *at = (*at).max(range.next);
            }
        }
        self.version = commit.version;
    }
}

fn commit_name(version: u64) -> String {
    format!("{LOG_DIR}/{version:020}.json")
}

fn checkpoint_name(version: u64) -> String {
    format!("{LOG_DIR}/{version:020}.checkpoint.json")
}

#[derive(Serialize, Deserialize)]
struct LastCheckpoint {
    version: u64,
}

/// The log of one history root, with the newest snapshot read so far.
#[derive(Debug)]
pub struct Log {
    root: DataRoot,
    cached: tokio::sync::Mutex<Arc<Snapshot>>,
}

fn store_err(action: &'static str) -> impl FnOnce(object_store::Error) -> AnalyticsError {
    move |source| AnalyticsError::Store { action, source }
}

fn corrupt(name: &str, e: &serde_json::Error) -> AnalyticsError {
    AnalyticsError::Corrupt {
        object: name.to_owned(),
        reason: e.to_string(),
    }
}

impl Log {
    /// Opens the log of `root` (empty if nothing was committed yet).
    pub async fn open(root: DataRoot) -> Result<Self> {
        let log = Self {
            root,
            cached: tokio::sync::Mutex::new(Arc::new(Snapshot::default())),
        };
        log.snapshot().await?;
        Ok(log)
    }

    /// The history root.
    pub fn root(&self) -> &DataRoot {
        &self.root
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>> {
        match self.root.store.get(&self.root.path(name)).await {
            Ok(found) => Ok(Some(
                found
                    .bytes()
                    .await
                    .map_err(store_err("reading the table log"))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(AnalyticsError::Store {
                action: "reading the table log",
                source,
            }),
        }
    }

    /// The newest version of the history.
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>> {
        let mut cached = self.cached.lock().await;
        let mut snapshot: Option<Snapshot> = None;
        let mut checked_checkpoint = false;
        loop {
            let version = snapshot.as_ref().map_or(cached.version, |s| s.version) + 1;
            let name = commit_name(version);
            if let Some(bytes) = self.get(&name).await? {
                let commit: Commit =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&name, &e))?;
                snapshot
                    .get_or_insert_with(|| Snapshot::clone(&cached))
                    .apply(&commit);
                continue;
            }
            if checked_checkpoint {
                break;
            }
            // The tip, or commits this reader missed were cleaned up: a newer checkpoint
            // says which.
            checked_checkpoint = true;
            let Some(bytes) = self.get(&format!("{LOG_DIR}/{LAST_CHECKPOINT}")).await? else {
                break;
            };
            let last: LastCheckpoint =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(LAST_CHECKPOINT, &e))?;
            if last.version < version {
                break;
            }
            let name = checkpoint_name(last.version);
            let bytes = self
                .get(&name)
                .await?
                .ok_or_else(|| AnalyticsError::Corrupt {
                    object: name.clone(),
                    reason: "named by _last_checkpoint but missing".into(),
                })?;
            snapshot = Some(serde_json::from_slice(&bytes).map_err(|e| corrupt(&name, &e))?);
        }
        if let Some(snapshot) = snapshot {
            *cached = Arc::new(snapshot);
        }
        Ok(Arc::clone(&cached))
    }

    /// Appends `commit` as the next version if it [checks](Snapshot::check) against the
    /// newest one; retries when another writer took the version first. Returns the new
    /// snapshot, or the conflict that refused it.
    pub async fn commit(&self, mut commit: Commit) -> Result<Result<Arc<Snapshot>, Conflict>> {
        loop {
            let current = self.snapshot().await?;
            if let Err(conflict) = current.check(&commit) {
                return Ok(Err(conflict));
            }
            commit.version = current.version + 1;
            if commit.id.is_empty() {
                commit.id = uuid::Uuid::new_v4().simple().to_string();
            }
            let bytes = serde_json::to_vec(&commit).map_err(|e| corrupt("a new commit", &e))?;
            let put = self
                .root
                .store
                .put_opts(
                    &self.root.path(&commit_name(commit.version)),
                    PutPayload::from(bytes),
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match put {
                Ok(_) => {}
                // Another writer took the version, or an earlier attempt of this very put
                // (retried by the store client) did: only the id tells.
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let name = commit_name(commit.version);
                    let ours = match self.get(&name).await? {
                        Some(bytes) => serde_json::from_slice::<Commit>(&bytes)
                            .is_ok_and(|there| there.id == commit.id),
                        None => false,
                    };
                    if !ours {
                        continue;
                    }
                }
                Err(source) => {
                    return Err(AnalyticsError::Store {
                        action: "committing to the table log",
                        source,
                    });
                }
            }
            let mut next = Snapshot::clone(&current);
            next.apply(&commit);
            let next = Arc::new(next);
            {
                let mut cached = self.cached.lock().await;
                if cached.version < next.version {
                    *cached = Arc::clone(&next);
                }
            }
            if commit.version.is_multiple_of(CHECKPOINT_EVERY)
                && let Err(e) = self.checkpoint(&next).await
            {
                tracing::warn!(error = %e, version = next.version, "table log: checkpoint not written; readers replay more commits");
            }
            return Ok(Ok(next));
        }
    }

    async fn checkpoint(&self, snapshot: &Snapshot) -> Result<()> {
        let put = |name: String, bytes: Vec<u8>| async move {
            self.root
                .store
                .put(&self.root.path(&name), PutPayload::from(bytes))
                .await
                .map_err(store_err("writing a checkpoint"))
        };
        let bytes = serde_json::to_vec(snapshot).map_err(|e| corrupt("a checkpoint", &e))?;
        put(checkpoint_name(snapshot.version), bytes).await?;
        // The pointer only moves forward (a slow writer of an older checkpoint must not
        // move it back).
        let current = match self.get(&format!("{LOG_DIR}/{LAST_CHECKPOINT}")).await? {
            Some(bytes) => serde_json::from_slice::<LastCheckpoint>(&bytes)
                .map(|p| p.version)
                .unwrap_or(0),
            None => 0,
        };
        if current < snapshot.version {
            let pointer = serde_json::to_vec(&LastCheckpoint {
                version: snapshot.version,
            })
            .map_err(|e| corrupt(LAST_CHECKPOINT, &e))?;
            put(format!("{LOG_DIR}/{LAST_CHECKPOINT}"), pointer).await?;
        }
        self.clean_up(snapshot.version).await
    }

    /// Deletes commits and checkpoints older than the two checkpoints before `version`
    /// that are also older than [`LOG_RETENTION`]. The age matters: put-if-absent fences
    /// a version only while its object exists, so a writer that stalled between reading
    /// the tip and its put must not find its version number free again.
    async fn clean_up(&self, version: u64) -> Result<()> {
        let keep_from = version.saturating_sub(2 * CHECKPOINT_EVERY);
        if keep_from == 0 {
            return Ok(());
        }
        let cutoff = chrono::Utc::now() - LOG_RETENTION;
        let listed: Vec<object_store::ObjectMeta> = self
            .root
            .store
            .list(Some(&self.root.path(LOG_DIR)))
            .try_collect()
            .await
            .map_err(store_err("listing the table log"))?;
        for meta in listed {
            let Some(name) = meta.location.filename() else {
                continue;
            };
            let old = name
                .split('.')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v < keep_from);
            if old && meta.last_modified < cutoff {
                match self.root.store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, path = %meta.location, "table log: old entry not deleted");
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, rows: u64) -> DataFile {
        DataFile {
            table: "t".into(),
            date: "2026-11-24".into(),
            path: path.into(),
            size: 10,
            rows,
            added_ms: 1,
        }
    }

    fn sink_commit(add: Vec<DataFile>, partition: i32, from: i64, next: i64) -> Commit {
        Commit {
            writer: "sink".into(),
            timestamp_ms: 5,
            add,
            offsets: BTreeMap::from([(
                "topic".into(),
                BTreeMap::from([(partition, OffsetRange { from, next })]),
            )]),
            ..Commit::default()
        }
    }

    #[test]
    fn overlapping_offsets_are_refused_and_gaps_allowed() {
        let mut s = Snapshot::default();
        let first = sink_commit(vec![file("a", 3)], 0, 0, 10);
        assert_eq!(s.check(&first), Ok(()));
        s.apply(&Commit {
            version: 1,
            ..first
        });
        assert_eq!(s.next_offset("topic", 0), Some(10));
        assert_eq!(s.next_offset("topic", 1), None);
        let overlap = sink_commit(vec![file("b", 1)], 0, 9, 12);
        assert!(matches!(
            s.check(&overlap),
            Err(Conflict::Offsets {
                from: 9,
                next: 10,
                ..
            })
        ));
        // A gap (transaction markers, retention) is not a conflict.
        assert_eq!(s.check(&sink_commit(vec![], 0, 15, 16)), Ok(()));
        assert_eq!(s.check(&sink_commit(vec![], 1, 0, 1)), Ok(()));
    }

    #[test]
    fn compaction_swaps_files_in_one_version_and_vacuum_forgets() {
        let mut s = Snapshot::default();
        s.apply(&Commit {
            version: 1,
            add: vec![file("a", 3), file("b", 4)],
            ..Commit::default()
        });
        let compact = Commit {
            timestamp_ms: 9,
            add: vec![file("c", 7)],
            remove: vec!["a".into(), "b".into()],
            ..Commit::default()
        };
        assert_eq!(s.check(&compact), Ok(()));
        let before = s.table_rows("t");
        s.apply(&Commit {
            version: 2,
            ..compact.clone()
        });
        assert_eq!(s.table_rows("t"), before);
        assert_eq!(s.removed.len(), 2);
        assert_eq!(s.removed[0].removed_ms, 9);
        // The same compaction again finds its inputs gone.
        assert!(matches!(s.check(&compact), Err(Conflict::Gone { .. })));
        s.apply(&Commit {
            version: 3,
            forget: vec!["a".into()],
            ..Commit::default()
        });
        assert_eq!(s.removed.len(), 1);
        assert_eq!(s.version, 3);
    }

    #[test]
    fn commits_round_trip_as_json() {
        let c = Commit {
            version: 4,
            ..sink_commit(vec![file("x", 1)], 2, 3, 4)
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("remove"), "{text}");
        assert_eq!(serde_json::from_str::<Commit>(&text).unwrap(), c);
    }

    async fn local_log(dir: &std::path::Path) -> Log {
        let root = DataRoot::open(&dir.display().to_string(), std::path::Path::new("/")).unwrap();
        Log::open(root).await.unwrap()
    }

    #[tokio::test]
    async fn commits_checkpoints_and_fresh_readers_agree() {
        let dir = tempfile::tempdir().unwrap();
        let writer = local_log(dir.path()).await;
        for i in 0..120_i64 {
            let c = sink_commit(vec![file(&format!("f{i}"), 1)], 0, i, i + 1);
            writer.commit(c).await.unwrap().unwrap();
        }
        // A commit that overlaps is refused and changes nothing.
        let refused = writer.commit(sink_commit(vec![], 0, 5, 6)).await.unwrap();
        assert!(matches!(refused, Err(Conflict::Offsets { .. })));
        assert!(
            dir.path()
                .join("_log/00000000000000000100.checkpoint.json")
                .exists()
        );
        let reader = local_log(dir.path()).await;
        let snapshot = reader.snapshot().await.unwrap();
        assert_eq!(snapshot.version, 120);
        assert_eq!(snapshot.table_rows("t"), 120);
        assert_eq!(snapshot.next_offset("topic", 0), Some(120));
        assert_eq!(*snapshot, *writer.snapshot().await.unwrap());
    }

    /// A store whose first put-if-absent lands but answers "already exists", as a
    /// client retry of a put whose first answer was lost does.
    #[derive(Debug)]
    struct LostAnswer {
        inner: object_store::local::LocalFileSystem,
        tripped: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for LostAnswer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("lost-answer")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for LostAnswer {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let create = matches!(opts.mode, PutMode::Create);
            let result = self.inner.put_opts(location, payload, opts).await;
            if create
                && result.is_ok()
                && !self.tripped.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(object_store::Error::AlreadyExists {
                    path: location.to_string(),
                    source: "the retry found the first attempt's object".into(),
                });
            }
            result
        }

        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures_util::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[tokio::test]
    async fn a_retried_put_that_already_landed_is_recognised_as_ours() {
        let dir = tempfile::tempdir().unwrap();
        let mut root =
            DataRoot::open(&dir.path().display().to_string(), std::path::Path::new("/")).unwrap();
        root.store = Arc::new(LostAnswer {
            inner: object_store::local::LocalFileSystem::new(),
            tripped: std::sync::atomic::AtomicBool::new(false),
        });
        let log = Log::open(root).await.unwrap();
        let snapshot = log
            .commit(sink_commit(vec![file("a", 1)], 0, 0, 1))
            .await
            .unwrap()
            .expect("not a conflict with itself");
        assert_eq!(snapshot.version, 1);
        assert_eq!(snapshot.table_rows("t"), 1);
        // Another writer's commit in the way is still a conflict.
        let other = log.commit(sink_commit(vec![], 0, 0, 1)).await.unwrap();
        assert!(matches!(other, Err(Conflict::Offsets { .. })));
    }

    proptest::proptest! {
        /// Whatever order sink commits from two writers arrive in, what the log accepts
        /// covers each offset at most once.
        #[test]
        fn accepted_commits_never_overlap(
            ranges in proptest::collection::vec((0_i32..2, 0_i64..50, 1_i64..10), 1..40)
        ) {
            let mut s = Snapshot::default();
            let mut covered: BTreeMap<(i32, i64), u32> = BTreeMap::new();
            for (i, (partition, from, len)) in ranges.into_iter().enumerate() {
                let c = sink_commit(vec![], partition, from, from + len);
                if s.check(&c).is_ok() {
                    for o in from..from + len {
                        *covered.entry((partition, o)).or_default() += 1;
                    }
                    s.apply(&Commit { version: i as u64 + 1, ..c });
                }
            }
            proptest::prop_assert!(covered.values().all(|&n| n == 1));
        }
    }
}
