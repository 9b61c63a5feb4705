//! The HTTP API as its OpenAPI document says, checked by a reader no one here wrote:
//! schemathesis (pinned in `deploy/tools/requirements.txt`, installed by
//! `deploy/tools/install`) generates requests from the `/openapi.json` a running `run`
//! serves, valid and invalid ones, and checks every answer against the document.
//!
//! `run` is started twice on loopback, on its embedded broker:
//! - with API keys for every role: a business tenant, the fleet (telemetry) and an
//!   analyst (SQL). Each key is tried on every route (so each role also meets the routes
//!   it may not use), and so is no key. Every check applies here: no 5xx, every status,
//!   content type, header and body as documented, invalid requests refused, and no route
//!   served without a valid key;
//! - without keys, where loopback clients are the `default` tenant, which may send any
//!   `ownerId`: most generated requests get past validation, and the answers of accepted
//!   ones are checked. The checks that a key is required do not apply to this mode.
//!
//! Bounded: a fixed seed, a fixed number of examples per operation and a time limit per
//! run. A finding fails the test with schemathesis' report, which gives a `curl` line to
//! reproduce it.

#![allow(clippy::unwrap_used)]

#[path = "common/binary.rs"]
mod binary;
#[path = "common/tools.rs"]
mod tools;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use binary::{Binary, Launch, Stderr};
use dronedelivery::announce;
use tools::pinned_tools;

/// Examples per operation and phase.
const EXAMPLES: &str = "40";
/// The longest one schemathesis run may take.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The checks that hold whatever the server's mode.
const CHECKS: &[&str] = &[
    "not_a_server_error",
    "response_schema_conformance",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "unsupported_method",
];

/// The checks that need keys: invalid requests (including a missing or wrong key) are
/// refused, and a required header is required. (`positive_data_acceptance` is left out:
/// some rules live only in the document's descriptions, such as a deadline after the
/// pickup time, and schema-valid requests that break them are rightly refused.)
const KEYED_CHECKS: &[&str] = &[
    "negative_data_rejection",
    "ignored_auth",
    "missing_required_header",
];

const KEYS: &[(&str, &str)] = &[
    ("contoso", "contoso-key-0123456789abcdef"),
    ("fleet", "fleet-key-0123456789abcdef01"),
    ("analyst", "analyst-key-0123456789abcdef"),
];

#[test]
fn every_answer_is_the_one_the_openapi_document_gives() -> Result<()> {
    let tools = pinned_tools()?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("keys");
    let lines: String = KEYS.iter().map(|(t, k)| format!("{t}:{k}\n")).collect();
    std::fs::write(&key_file, lines)?;

    let mut findings = Vec::new();
    {
        let keyed = start(
            &dir.path().join("keyed"),
            &[
                "--api-keys",
                key_file.to_str().unwrap(),
                "--telemetry-tenants",
                "fleet",
                "--sql-tenants",
                "analyst",
            ],
        )?;
        let base = format!("http://{}", keyed.announced(announce::API)?);
        let checks: Vec<&str> = CHECKS.iter().chain(KEYED_CHECKS).copied().collect();
        for (tenant, key) in KEYS {
            let header = format!("Authorization: Bearer {key}");
            findings.extend(schemathesis(
                &tools,
                dir.path(),
                &base,
                tenant,
                &checks,
                &["-H", &header],
            )?);
        }
        findings.extend(schemathesis(
            &tools,
            dir.path(),
            &base,
            "no key",
            &checks,
            &[],
        )?);
        keyed.stop(Duration::from_secs(30))?;
    }
    {
        let open = start(&dir.path().join("open"), &[])?;
        let base = format!("http://{}", open.announced(announce::API)?);
        findings.extend(schemathesis(
            &tools,
            dir.path(),
            &base,
            "loopback, no keys",
            CHECKS,
            &[],
        )?);
        open.stop(Duration::from_secs(30))?;
    }
    if !findings.is_empty() {
        bail!(
            "schemathesis found answers the document does not give:\n\n{}",
            findings.join("\n\n")
        );
    }
    Ok(())
}

fn start(data: &Path, args: &[&str]) -> Result<Binary> {
    Launch::new("run")
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--flight-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .arg("--data")
        .arg(data)
        .stderr(Stderr::Null)
        .start(&[announce::API])
}

/// Runs schemathesis against `base` as `who`; its report when it found something.
fn schemathesis(
    tools: &Path,
    scratch: &Path,
    base: &str,
    who: &str,
    checks: &[&str],
    extra: &[&str],
) -> Result<Option<String>> {
    let output = scratch.join(format!("schemathesis-{}.txt", who.replace([' ', ','], "-")));
    let started = Instant::now();
    let mut child = Command::new(tools.join("schemathesis"))
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--checks", &checks.join(",")])
        .args(["--max-examples", EXAMPLES, "--seed", "1", "--workers", "1"])
        .args(["--request-timeout", "10", "--generation-database", "none"])
        .args(["--no-color", "--suppress-health-check", "all"])
        // Event streams never end: each request would wait out the request timeout.
        .args(["--exclude-path-regex", "/events$"])
        .args(extra)
        .current_dir(scratch)
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&output)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting schemathesis")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("schemathesis as {who} took longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report = std::fs::read_to_string(&output)?;
    let summary = report
        .lines()
        .rev()
        .find(|l| l.contains("generated"))
        .unwrap_or("")
        .trim();
    eprintln!(
        "schemathesis as {who}: {summary} in {:.0?}",
        started.elapsed()
    );
    Ok((!status.success()).then(|| format!("--- as {who} ({status}) ---\n{report}")))
}
