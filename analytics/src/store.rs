//! Where the history lives: the `--data` URL and the object store behind it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;

use crate::error::{AnalyticsError, Result};

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
/// `cwd`), and bare paths. Other schemes are reported as not supported by this build.
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
    } else if let Some((scheme, _)) = text.split_once("://") {
        return Err(err(&format!(
            "{scheme}:// is not supported by this build; use a file:// URL or a path"
        )));
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
    /// Opens the history at `location` (see [`resolve_location`]), creating the local
    /// folder if it does not exist.
    pub fn open(location: &str, cwd: &Path) -> Result<Self> {
        let url = resolve_location(location, cwd)?;
        let dir = url.to_file_path().map_err(|()| AnalyticsError::Location {
            location: location.to_owned(),
            reason: "is not a local path".into(),
        })?;
        std::fs::create_dir_all(&dir).map_err(|e| AnalyticsError::Location {
            location: location.to_owned(),
            reason: format!("cannot create {}: {e}", dir.display()),
        })?;
        let prefix = object_store::path::Path::from_url_path(url.path()).map_err(|e| {
            AnalyticsError::Location {
                location: location.to_owned(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            url,
            store: Arc::new(LocalFileSystem::new()),
            prefix,
        })
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
        for bad in ["", "file://", "s3://bucket/h", "gs://b"] {
            assert!(resolve_location(bad, cwd).is_err(), "{bad}");
        }
    }
}
