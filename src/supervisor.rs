//! The one owner of a command's service tasks: it starts them in stages, waits until the
//! process is asked to stop or a service ends on its own, and then stops the stages in the
//! order they were opened, front to back, waiting for each stage's tasks before the next
//! is told to stop. That order is what lets the back ends see every record the front end
//! acknowledged, and keeps a health listener answering until its service has stopped.
//!
//! It decides nothing about what the services do; it only owns their lifetimes.

use std::future::Future;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A group of tasks stopped together: by cancelling its token, then waiting for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stage(usize);

#[derive(Debug)]
struct Task {
    name: &'static str,
    stage: Stage,
    /// Whether its end before a stop is asked for is a failure of the whole process (a
    /// service stops only when told to). Helpers such as a gauge reporter are not.
    watched: bool,
    handle: JoinHandle<Result<()>>,
}

/// Starts service tasks in stages and stops them front to back.
#[derive(Debug, Default)]
pub(crate) struct Supervisor {
    stages: Vec<CancellationToken>,
    tasks: Vec<Task>,
}

impl Supervisor {
    /// No stages, no tasks.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Opens a stage, stopped after every stage opened before it; returns it and the
    /// token its tasks stop on.
    pub(crate) fn stage(&mut self) -> (Stage, CancellationToken) {
        let token = CancellationToken::new();
        self.stages.push(token.clone());
        (Stage(self.stages.len() - 1), token)
    }

    /// Runs a service in `stage`. It must run until the stage's token is cancelled:
    /// ending earlier, even without an error, stops the process.
    pub(crate) fn spawn<F, E>(&mut self, stage: Stage, name: &'static str, service: F)
    where
        F: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error> + Send + 'static,
    {
        self.push(stage, name, true, async move {
            service.await.map_err(Into::into)
        });
    }

    /// Runs a helper in `stage` (a reporter, a watcher, a secondary endpoint): waited
    /// for when its stage stops, and its error is then part of the result, but its
    /// ending early stops nothing.
    pub(crate) fn spawn_helper<F, E>(&mut self, stage: Stage, name: &'static str, helper: F)
    where
        F: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error> + Send + 'static,
    {
        self.push(stage, name, false, async move {
            helper.await.map_err(Into::into)
        });
    }

    fn push<F>(&mut self, stage: Stage, name: &'static str, watched: bool, task: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        self.tasks.push(Task {
            name,
            stage,
            watched,
            handle: tokio::spawn(task),
        });
    }

    /// Waits until `stop` resolves (the process is asked to stop) or a service ends on
    /// its own, then stops every stage in order. The first failure is the result; a
    /// service that ended on its own is one.
    pub(crate) async fn run_until(mut self, stop: impl Future<Output = ()>) -> Result<()> {
        let watched: Vec<usize> = (0..self.tasks.len())
            .filter(|&i| self.tasks[i].watched)
            .collect();
        let early = if watched.is_empty() {
            stop.await;
            None
        } else {
            let handles = self
                .tasks
                .iter_mut()
                .filter(|t| t.watched)
                .map(|t| &mut t.handle);
            tokio::select! {
                () = stop => None,
                (joined, index, _) = futures_util::future::select_all(handles) => {
                    Some((watched[index], joined))
                }
            }
        };
        let mut result = Ok(());
        let mut finished = None;
        if let Some((index, joined)) = early {
            let name = self.tasks[index].name;
            finished = Some(index);
            result = Err(match outcome(name, joined) {
                Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Err(e) => e,
            });
        }
        for (stage, token) in self.stages.iter().enumerate() {
            token.cancel();
            for (index, task) in self.tasks.iter_mut().enumerate() {
                if task.stage.0 != stage || finished == Some(index) {
                    continue;
                }
                let joined = (&mut task.handle).await;
                result = result.and(outcome(task.name, joined));
            }
        }
        result
    }
}

/// A task that cannot fail, in the shape the supervisor runs.
pub(crate) async fn infallible(task: impl Future<Output = ()>) -> Result<()> {
    task.await;
    Ok(())
}

/// A task's end, with its panic or error named after it.
fn outcome(name: &str, joined: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    joined
        .with_context(|| format!("{name} task panicked"))?
        .with_context(|| format!("{name} failed"))
}

/// Resolves when the process is asked to stop (Ctrl-C / SIGINT or SIGTERM).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    type Events = Arc<Mutex<Vec<String>>>;

    /// A service that records when it was told to stop and when it finished.
    fn service(
        events: &Events,
        name: &'static str,
        stop: CancellationToken,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let events = events.clone();
        async move {
            stop.cancelled().await;
            events.lock().unwrap().push(format!("{name} stopping"));
            tokio::time::sleep(Duration::from_millis(20)).await;
            events.lock().unwrap().push(format!("{name} stopped"));
            Ok(())
        }
    }

    #[tokio::test]
    async fn stages_stop_front_to_back_each_waited_for_before_the_next() {
        let events = Events::default();
        let mut supervisor = Supervisor::new();
        let (front, front_stop) = supervisor.stage();
        let (back, back_stop) = supervisor.stage();
        supervisor.spawn(back, "back", service(&events, "back", back_stop));
        supervisor.spawn(front, "front", service(&events, "front", front_stop));
        supervisor.run_until(async {}).await.unwrap();
        assert_eq!(
            *events.lock().unwrap(),
            [
                "front stopping",
                "front stopped",
                "back stopping",
                "back stopped"
            ]
        );
    }

    #[tokio::test]
    async fn a_service_ending_on_its_own_stops_the_rest_and_is_the_error() {
        let events = Events::default();
        let mut supervisor = Supervisor::new();
        let (front, _) = supervisor.stage();
        let (back, back_stop) = supervisor.stage();
        supervisor.spawn(front, "front", async {
            Err::<(), _>(anyhow::anyhow!("broken"))
        });
        supervisor.spawn(back, "back", service(&events, "back", back_stop));
        let error = supervisor
            .run_until(std::future::pending())
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("front failed: broken"),
            "{error:#}"
        );
        assert_eq!(*events.lock().unwrap(), ["back stopping", "back stopped"]);

        let mut supervisor = Supervisor::new();
        let (stage, _) = supervisor.stage();
        supervisor.spawn(stage, "quitter", async { Ok::<(), anyhow::Error>(()) });
        let error = supervisor
            .run_until(std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(error.to_string(), "quitter stopped unexpectedly");
    }

    #[tokio::test]
    async fn helpers_ending_early_stop_nothing_and_panics_are_errors() {
        let mut supervisor = Supervisor::new();
        let (stage, stop) = supervisor.stage();
        supervisor.spawn_helper(stage, "reporter", async { Ok::<(), anyhow::Error>(()) });
        let stopped = stop.clone();
        supervisor.spawn(stage, "service", async move {
            stopped.cancelled().await;
            Ok::<(), anyhow::Error>(())
        });
        let asked = tokio::time::sleep(Duration::from_millis(50));
        supervisor.run_until(asked).await.unwrap();
        assert!(stop.is_cancelled());

        let mut supervisor = Supervisor::new();
        let (stage, stop) = supervisor.stage();
        supervisor.spawn(stage, "panicky", async move {
            stop.cancelled().await;
            if stop.is_cancelled() {
                panic!("on stop");
            }
            Ok::<(), anyhow::Error>(())
        });
        let error = supervisor.run_until(async {}).await.unwrap_err();
        assert_eq!(error.to_string(), "panicky task panicked");
    }
}
