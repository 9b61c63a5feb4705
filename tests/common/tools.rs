//! The pinned tools of the tests that run programs written elsewhere (schemathesis, the
//! Delta readers): `deploy/tools/install` puts them in a virtualenv once per machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The directory of the pinned tools' executables (`deploy/tools/install`).
pub(crate) fn pinned_tools() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("deploy/tools/install"))
        .stderr(Stdio::inherit())
        .output()
        .context("running deploy/tools/install")?;
    if !out.status.success() {
        bail!("deploy/tools/install failed: this test needs its pinned tools");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}
