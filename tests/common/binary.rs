//! The package's binary as a child process, for the integration tests and the end-to-end
//! benchmark (`benches/e2e/main.rs` includes this file with
//! `#[path = "../../tests/common/binary.rs"] mod binary;`, so it uses only std and
//! `anyhow`, never `super::`; the prefixes come from the caller, normally from
//! `dronedelivery::announce`).
//!
//! It owns starting `dronedelivery ARGS`, learning where the child listens from the
//! lines it prints (the prefixes of [`dronedelivery::announce`]), and ending the child.
//! It knows nothing of what a service does: the services' flags and probes live with
//! their callers (`tests/common/service.rs`).
//!
//! # API
//!
//! - [`Launch::new`]`(label)`: what to start; `label` names the child in errors. By
//!   default the environment gets `DRONEDELIVERY_LOG=warn`, stderr is inherited, and
//!   announces are awaited for [`STARTUP`]. Then, each returning the `Launch`:
//!   [`Launch::arg`], [`Launch::args`], [`Launch::env`] (a later value of a name wins),
//!   [`Launch::stderr`] ([`Stderr::Inherit`], [`Stderr::Null`] or [`Stderr::File`],
//!   appended to), [`Launch::startup_timeout`].
//! - [`Launch::start`]`(&[prefix, ...]) -> Result<Binary>`: spawns the child with stdout
//!   piped and waits until it printed a line starting with each prefix (in any order;
//!   the first line per prefix counts). It fails if the time runs out or the child exits
//!   first (the child is then killed and reaped). A thread reads stdout for the child's
//!   whole life, so the child never blocks on a full pipe. An empty list waits for
//!   nothing.
//! - [`Launch::output`]`(timeout) -> Result<Output>`: runs the child to completion, stdout
//!   and stderr captured, killed (and an error) if it takes longer than `timeout`.
//! - [`Binary::announced`]`(prefix) -> Result<&str>`: what followed `prefix` on its line
//!   (for `announce::API` the bare `host:port`, so a base URL is
//!   `format!("http://{addr}")`; for `announce::EMBEDDED_BROKER` the bootstrap servers).
//!   [`Binary::addresses`] gives them all in the order they were asked for.
//! - [`Binary::pid`], [`Binary::label`], [`Binary::try_wait`], [`Binary::signal`].
//! - [`Binary::stop`]`(grace) -> Result<()>`: SIGTERM, then a successful exit within
//!   `grace`, else an error (and the child is killed).
//! - [`Binary::terminate`]`(signal, grace) -> Result<ExitStatus>`: `signal`, then wait up
//!   to `grace` for any exit; after that the child is killed, reaped, and it is an error.
//! - [`Binary::kill`]`() -> Result<ExitStatus>`: SIGKILL, as a crash would, and reaped.
//! - Dropping a [`Binary`] kills and reaps the child, also when a test panics.
//!
//! Signals are sent with the `kill` command (the tests forbid unsafe code).
//!
//! ```ignore
//! let run = Launch::new("run")
//!     .args(["run", "--listen", "127.0.0.1:0", "--data", data])
//!     .stderr(Stderr::Null)
//!     .start(&[announce::API, announce::EMBEDDED_BROKER])?;
//! let base = format!("http://{}", run.announced(announce::API)?);
//! let brokers = run.announced(announce::EMBEDDED_BROKER)?.to_owned();
//! // ...
//! run.stop(Duration::from_secs(30))?;
//! ```

#![allow(dead_code, unreachable_pub)]

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The binary cargo built for these tests (or benches).
pub const BINARY: &str = env!("CARGO_BIN_EXE_dronedelivery");

/// How long a child may take, by default, to print the lines awaited by
/// [`Launch::start`].
pub const STARTUP: Duration = Duration::from_secs(60);

/// How often a wait for an exit looks again.
const POLL: Duration = Duration::from_millis(50);

/// Where the child's stderr goes.
#[derive(Debug, Clone)]
pub enum Stderr {
    /// This process's stderr (the default): the child's log shows with a test's output.
    Inherit,
    /// Nowhere.
    Null,
    /// Appended to this file (created if missing).
    File(PathBuf),
}

/// A signal [`Binary::signal`] and [`Binary::terminate`] can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: what an orchestrator sends to stop a service.
    Term,
    /// SIGINT: Ctrl-C.
    Int,
    /// SIGKILL: a crash.
    Kill,
    /// SIGSTOP: the process hangs.
    Stop,
    /// SIGCONT: a stopped process goes on.
    Cont,
}

impl Signal {
    /// The name `kill -NAME` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Term => "TERM",
            Self::Int => "INT",
            Self::Kill => "KILL",
            Self::Stop => "STOP",
            Self::Cont => "CONT",
        }
    }
}

/// What to start: arguments, environment and stderr of `dronedelivery`.
#[derive(Debug, Clone)]
pub struct Launch {
    label: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stderr: Stderr,
    startup: Duration,
}

impl Launch {
    /// `dronedelivery` with no arguments yet, named `label` in errors, with
    /// `DRONEDELIVERY_LOG=warn`, stderr inherited, and [`STARTUP`] to announce itself.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            args: Vec::new(),
            env: vec![("DRONEDELIVERY_LOG".into(), "warn".into())],
            stderr: Stderr::Inherit,
            startup: STARTUP,
        }
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable of the child (replacing an earlier value of `name`).
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Where the child's stderr goes.
    pub fn stderr(mut self, stderr: Stderr) -> Self {
        self.stderr = stderr;
        self
    }

    /// How long [`Launch::start`] waits for the announce lines.
    pub fn startup_timeout(mut self, startup: Duration) -> Self {
        self.startup = startup;
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(BINARY);
        command.args(&self.args).stdin(Stdio::null());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    fn stderr_stdio(&self) -> Result<Stdio> {
        Ok(match &self.stderr {
            Stderr::Inherit => Stdio::inherit(),
            Stderr::Null => Stdio::null(),
            Stderr::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {} for stderr", path.display()))?
                .into(),
        })
    }

    /// Spawns the child and waits until it printed a line starting with each of
    /// `announces` (prefixes from `dronedelivery::announce`).
    pub fn start(self, announces: &[&str]) -> Result<Binary> {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(self.stderr_stdio()?)
            .spawn()
            .with_context(|| format!("starting dronedelivery {}", self.label))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut binary = Binary {
            child,
            label: self.label,
            announced: Vec::new(),
        };
        let prefixes: Vec<String> = announces.iter().map(|p| (*p).to_owned()).collect();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{} stdout", binary.label))
            .spawn(move || read_stdout(stdout, &prefixes, &tx))
            .context("starting the stdout reader")?;

        let mut found: Vec<Option<String>> = vec![None; announces.len()];
        let deadline = Instant::now() + self.startup;
        while found.iter().any(Option::is_none) {
            let missing = || -> Vec<&str> {
                announces
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_none())
                    .map(|(p, _)| *p)
                    .collect()
            };
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((i, value)) => found[i] = Some(value),
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "dronedelivery {} did not print {:?} within {:?}",
                    binary.label,
                    missing(),
                    self.startup
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Stdout closed: the child exited (or closed it) before announcing.
                    let status = wait_at_most(&mut binary.child, Duration::from_secs(5))?;
                    bail!(
                        "dronedelivery {} closed its stdout ({}) before printing {:?}",
                        binary.label,
                        status.map_or_else(|| "still running".to_owned(), |s| s.to_string()),
                        missing()
                    )
                }
            }
        }
        binary.announced = announces
            .iter()
            .zip(found)
            .map(|(p, f)| ((*p).to_owned(), f.unwrap_or_default()))
            .collect();
        Ok(binary)
    }

    /// Runs the child to completion with stdout and stderr captured (the choice of
    /// [`Launch::stderr`] does not apply); kills it and fails after `timeout`.
    pub fn output(self, timeout: Duration) -> Result<Output> {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running dronedelivery {}", self.label))?;
        let stdout = read_all(child.stdout.take().context("no stdout")?);
        let stderr = read_all(child.stderr.take().context("no stderr")?);
        let Some(status) = wait_at_most(&mut child, timeout)? else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "dronedelivery {} did not finish within {timeout:?}",
                self.label
            );
        };
        let join = |reader: std::thread::JoinHandle<std::io::Result<Vec<u8>>>| {
            reader
                .join()
                .map_err(|_| anyhow!("a reader of dronedelivery {} panicked", self.label))?
                .context("reading the child's output")
        };
        Ok(Output {
            status,
            stdout: join(stdout)?,
            stderr: join(stderr)?,
        })
    }
}

/// Reads `stdout` line by line until it closes: sends `(i, rest)` for the first line
/// starting with `prefixes[i]`, and once every prefix was seen goes on reading (so that
/// the child never blocks on a full pipe) without looking.
fn read_stdout(
    stdout: std::process::ChildStdout,
    prefixes: &[String],
    tx: &mpsc::Sender<(usize, String)>,
) {
    let mut reader = BufReader::new(stdout);
    let mut seen = vec![false; prefixes.len()];
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if seen.iter().all(|s| *s) {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        for (i, prefix) in prefixes.iter().enumerate() {
            if seen[i] {
                continue;
            }
            if let Some(rest) = text.strip_prefix(prefix.as_str()) {
                seen[i] = true;
                let _ = tx.send((i, rest.to_owned()));
            }
        }
    }
}

fn read_all(
    mut from: impl Read + Send + 'static,
) -> std::thread::JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        from.read_to_end(&mut out).map(|_| out)
    })
}

/// The child's exit status once it exited, or `None` if it still runs after `limit`.
fn wait_at_most(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// A running `dronedelivery`, with what it announced; killed and reaped when dropped.
#[derive(Debug)]
pub struct Binary {
    child: Child,
    label: String,
    /// `(prefix, what followed it)`, in the order [`Launch::start`] was given.
    announced: Vec<(String, String)>,
}

impl Binary {
    /// What followed `prefix` on the line the child printed (one of the prefixes given
    /// to [`Launch::start`]).
    pub fn announced(&self, prefix: &str) -> Result<&str> {
        self.announced
            .iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, value)| value.as_str())
            .with_context(|| format!("dronedelivery {} was not asked for {prefix:?}", self.label))
    }

    /// Every announced value, in the order the prefixes were given to [`Launch::start`].
    pub fn addresses(&self) -> Vec<String> {
        self.announced.iter().map(|(_, v)| v.clone()).collect()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given to [`Launch::new`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The exit status if the child has exited (it is then reaped).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let status = Command::new("kill")
            .args([format!("-{}", signal.name()), self.pid().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!(
                "kill -{} {} ({}) failed: {status}",
                signal.name(),
                self.pid(),
                self.label
            );
        }
        Ok(())
    }

    /// Sends `signal`, then waits up to `grace` for the child to exit and answers its
    /// status; past `grace` the child is killed and reaped, and that is an error.
    pub fn terminate(mut self, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        self.signal(signal)?;
        match wait_at_most(&mut self.child, grace)? {
            Some(status) => Ok(status),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "dronedelivery {} did not stop within {grace:?} of SIG{}",
                    self.label,
                    signal.name()
                )
            }
        }
    }

    /// SIGTERM, then a successful exit within `grace`.
    pub fn stop(self, grace: Duration) -> Result<()> {
        let label = self.label.clone();
        let status = self.terminate(Signal::Term, grace)?;
        if !status.success() {
            bail!("dronedelivery {label} exited with {status}");
        }
        Ok(())
    }

    /// SIGKILL: the child dies at once, as in a crash; reaped.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        // Nothing to do for a child already reaped: std remembers its status and does
        // not signal a process id that may have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
