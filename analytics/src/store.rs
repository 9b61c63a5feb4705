//! Where the history lives: the `--data` URL and the object store behind it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;

use crate::error::{AnalyticsError, Result};

/// Where the history lives: the one `--data` flag of every command that reads or writes
/// it.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Where the history lives: `file:///path`, a path, `s3://bucket/prefix`,
    /// `az://container/prefix` or `gs://bucket/prefix` (credentials from the store's usual
    /// environment variables, such as `AWS_ACCESS_KEY_ID`, `AZURE_STORAGE_ACCOUNT_NAME` or
    /// `GOOGLE_SERVICE_ACCOUNT`).
    #[arg(
        id = "data",
        long = "data",
        env = "DRONEDELIVERY_DATA",
        default_value = DEFAULT_DATA
    )]
    pub url: String,
}

/// The history next to the working directory.
pub const DEFAULT_DATA: &str = "file://./data";

impl Default for DataArgs {
    fn default() -> Self {
        Self {
            url: DEFAULT_DATA.to_owned(),
        }
    }
}

impl DataArgs {
    /// The history at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }
}

/// The root of the history: a URL ending in `/`, and the store that holds it.
#[derive(Debug, Clone)]
pub struct DataRoot {
    /// The root URL, such as `file:///srv/history/`.
    pub url: Url,
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The root's path within the store.
    pub prefix: object_store::path::Path,
}

/// Resolves a `--data` location to an absolute URL ending in `/`.
///
/// Accepted: `file:///abs/path`, `file://./rel/path` and `file://rel/path` (relative to
/// `cwd`), bare paths, and `s3://bucket[/prefix]`, `az://container[/prefix]` (or
/// `abfs[s]://container@account.dfs.core.windows.net[/prefix]`) and `gs://bucket[/prefix]`.
pub fn resolve_location(text: &str, cwd: &Path) -> Result<Url> {
    let err = |reason: &str| AnalyticsError::Location {
        location: text.to_owned(),
        reason: reason.to_owned(),
    };
    let path: PathBuf = if let Some(rest) = text.strip_prefix("file://") {
        if rest.is_empty() {
            return Err(err("has no path"));
        }
        PathBuf::from(rest)
    } else if let Some((scheme, rest)) = text.split_once("://") {
        if !CLOUD_SCHEMES.contains(&scheme) {
            return Err(err(&format!(
                "{scheme}:// is not supported; use file://, s3://, az://, abfss:// or gs://"
            )));
        }
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(err("names no bucket or container"));
        }
        let with_slash = if text.ends_with('/') {
            text.to_owned()
        } else {
            format!("{text}/")
        };
        return Url::parse(&with_slash).map_err(|e| err(&e.to_string()));
    } else if text.is_empty() {
        return Err(err("is empty"));
    } else {
        PathBuf::from(text)
    };
    let absolute = if path.is_absolute() {
        path
    } else {
        cwd.join(path)
    };
    let normalized = normalize(&absolute);
    Url::from_directory_path(&normalized).map_err(|()| err("is not a valid directory path"))
}

const CLOUD_SCHEMES: [&str; 5] = ["s3", "az", "abfs", "abfss", "gs"];

/// Removes `.` and `..` components without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl DataRoot {
    /// Opens the history at `location` (see [`resolve_location`]). A local folder is
    /// created if it does not exist; a cloud store takes its credentials and region from
    /// the environment variables object_store reads (`AWS_*`, `AZURE_*`, `GOOGLE_*`).
    pub fn open(location: &str, cwd: &Path) -> Result<Self> {
        let url = resolve_location(location, cwd)?;
        let err = |reason: String| AnalyticsError::Location {
            location: location.to_owned(),
            reason,
        };
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| err("is not a local path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
                Arc::new(LocalFileSystem::new())
            }
            "s3" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            ),
            _ => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            ),
        };
        let prefix =
            object_store::path::Path::from_url_path(url.path()).map_err(|e| err(e.to_string()))?;
        Ok(Self { url, store, prefix })
    }

    /// The URL of the store itself (scheme and authority), as DataFusion registers it.
    pub fn store_url(&self) -> String {
        format!("{}://{}", self.url.scheme(), self.url.authority())
    }

    /// The path of `location` relative to the root, if it is under it.
    pub fn relative(&self, location: &object_store::path::Path) -> Option<String> {
        let full = location.as_ref();
        let prefix = self.prefix.as_ref();
        if prefix.is_empty() {
            return Some(full.to_owned());
        }
        full.strip_prefix(prefix)?
            .strip_prefix('/')
            .map(str::to_owned)
    }

    /// The URL of a table's folder, ending in `/`.
    pub fn table_url(&self, table: &str) -> String {
        format!("{}{table}/", self.url)
    }

    /// The store path of `relative` under the root.
    pub fn path(&self, relative: &str) -> object_store::path::Path {
        relative
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_to_absolute_directory_urls() {
        let cwd = Path::new("/home/a");
        let ok = |s: &str| resolve_location(s, cwd).unwrap().to_string();
        assert_eq!(ok("file://./data"), "file:///home/a/data/");
        assert_eq!(ok("file://data"), "file:///home/a/data/");
        assert_eq!(ok("file:///srv/h"), "file:///srv/h/");
        assert_eq!(ok("./x/../data"), "file:///home/a/data/");
        assert_eq!(ok("/tmp/h/"), "file:///tmp/h/");
        assert_eq!(ok("s3://bucket/h"), "s3://bucket/h/");
        assert_eq!(ok("gs://b"), "gs://b/");
        assert_eq!(ok("az://c/x/"), "az://c/x/");
        for bad in ["", "file://", "ftp://h/x", "s3://", "s3:///x"] {
            assert!(resolve_location(bad, cwd).is_err(), "{bad}");
        }
    }

    #[test]
    fn cloud_roots_open_without_touching_the_network() {
        let cwd = Path::new("/");
        let root = DataRoot::open("s3://bucket/history", cwd).unwrap();
        assert_eq!(root.store_url(), "s3://bucket");
        assert_eq!(root.table_url("t"), "s3://bucket/history/t/");
        let file = root.path("t/date=2026-11-24/a.parquet");
        assert_eq!(root.relative(&file).unwrap(), "t/date=2026-11-24/a.parquet");
        let gs = DataRoot::open("gs://b", cwd).unwrap();
        assert_eq!(gs.relative(&gs.path("x/y")).unwrap(), "x/y");
    }
}
