//! The deployment material in `deploy/` checked offline: every Kustomize overlay renders
//! and validates against the Kubernetes schemas, the compose file is accepted by
//! docker-compose, the YAML lints clean, and the manifests cannot drift from the code
//! (every subcommand, flag and `DRONEDELIVERY_*` variable they name exists in the
//! binary; probes, autoscalers and grace periods agree with what the services do; the
//! dashboard's metrics are ones the code exports).
//!
//! The tools (kubectl with Kustomize, kubernetes-validate, yamllint, docker-compose) are
//! pinned in `deploy/tools/requirements.txt` and installed once per machine by
//! `deploy/tools/install`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BINARY: &str = env!("CARGO_BIN_EXE_dronedelivery");
/// Overlays an operator applies (and the base they share).
const OVERLAYS: [&str; 4] = [
    "base",
    "overlays/dev",
    "overlays/prod",
    "overlays/eventhubs",
];
/// Kubernetes version whose schemas the manifests must satisfy (the oldest supported).
const KUBERNETES: &str = "1.30";

/// The tools' directory, installed on first use.
fn tools() -> &'static Path {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let out = Command::new(Path::new(ROOT).join("deploy/tools/install"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running deploy/tools/install");
        assert!(
            out.status.success(),
            "deploy/tools/install failed: the deployment checks need its tools"
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

fn tool(name: &str) -> Command {
    let mut command = Command::new(tools().join(name));
    command.current_dir(ROOT);
    command
}

/// Runs `command` with `input` on stdin; its stdout, or an error with its stderr.
fn run(mut command: Command, input: Option<&[u8]>) -> Result<String> {
    let described = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {described}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.map(<[u8]>::to_vec);
    let writer = std::thread::spawn(move || {
        if let Some(input) = input {
            let _ = stdin.write_all(&input);
        }
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{described} failed ({}):\n{stdout}\n{stderr}", out.status);
    }
    Ok(stdout + &stderr)
}

/// `kubectl kustomize` of a folder under deploy/k8s.
fn render(overlay: &str) -> Result<String> {
    let mut kubectl = tool("kubectl");
    kubectl.args(["kustomize", &format!("deploy/k8s/{overlay}")]);
    run(kubectl, None)
}

/// YAML documents as JSON values (PyYAML of the tools' virtualenv does the parsing).
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut python = tool("python");
    python.args([
        "-c",
        "import sys, json, yaml\n\
         json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
    ]);
    let json = run(python, Some(yaml.as_bytes()))?;
    Ok(serde_json::from_str(&json)?)
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() -> Result<()> {
    for overlay in OVERLAYS {
        let yaml = render(overlay)?;
        let docs = documents(&yaml)?;
        let deployments = docs.iter().filter(|d| d["kind"] == "Deployment").count();
        ensure!(
            deployments >= 7,
            "{overlay}: {deployments} Deployments rendered"
        );
        let mut validate = tool("kubernetes-validate");
        validate.args(["--strict", "--quiet", "-k", KUBERNETES, "-"]);
        let report = run(validate, Some(yaml.as_bytes()))
            .with_context(|| format!("{overlay} does not validate"))?;
        // Only KEDA's kinds (CRDs) may go unchecked.
        for line in report.lines().filter(|l| !l.trim().is_empty()) {
            ensure!(
                line.contains("Couldn't find schema") && line.contains("keda.sh/"),
                "{overlay}: {line}"
            );
        }
    }
    Ok(())
}

/// `docker-compose` on the compose file with every profile, then `args`.
fn compose(args: &[&str]) -> Command {
    let mut compose = tool("docker-compose");
    compose.args(["-f", "deploy/compose.yaml"]);
    for profile in ["loadgen", "simulator", "monitoring"] {
        compose.args(["--profile", profile]);
    }
    compose.args(args);
    compose
}

#[test]
fn the_compose_file_is_accepted_with_every_profile() -> Result<()> {
    run(compose(&["config", "-q"]), None)?;
    Ok(())
}

#[test]
fn the_deployment_yaml_lints_clean() -> Result<()> {
    let mut yamllint = tool("yamllint");
    yamllint.args([
        "--strict",
        "-c",
        ".yamllint.yaml",
        "deploy",
        ".yamllint.yaml",
    ]);
    run(yamllint, None)?;
    Ok(())
}

/// `dronedelivery SUBCOMMAND --help`, once per subcommand.
fn help(subcommand: &str) -> Result<String> {
    static HELP: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = HELP.get_or_init(Mutex::default);
    if let Some(text) = cache.lock().unwrap().get(subcommand) {
        return Ok(text.clone());
    }
    let out = Command::new(BINARY).args([subcommand, "--help"]).output()?;
    ensure!(
        out.status.success(),
        "`dronedelivery {subcommand}` is not a subcommand: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    cache
        .lock()
        .unwrap()
        .insert(subcommand.to_owned(), text.clone());
    Ok(text)
}

/// What one container of the binary is told: its arguments and environment.
#[derive(Debug)]
struct Invocation {
    /// Where it comes from, for messages.
    origin: String,
    args: Vec<String>,
    /// Variable names, with a value when it is known.
    env: BTreeMap<String, Option<String>>,
}

impl Invocation {
    fn subcommand(&self) -> &str {
        self.args.first().map_or("", String::as_str)
    }

    /// The value of `--flag`, given as `--flag VALUE` or `--flag=VALUE`.
    fn flag(&self, flag: &str) -> Option<&str> {
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            if arg == flag {
                return args.next().map(String::as_str);
            }
            if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                return Some(value);
            }
        }
        None
    }

    fn flags(&self) -> impl Iterator<Item = &str> {
        self.args
            .iter()
            .filter(|a| a.starts_with("--"))
            .map(|a| a.split('=').next().unwrap_or(a))
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).and_then(Option::as_deref)
    }
}

/// Every container of the rendered `docs` that runs the binary.
fn k8s_invocations(overlay: &str, docs: &[Value]) -> Result<Vec<(Value, Invocation)>> {
    let config_maps: HashMap<&str, &serde_json::Map<String, Value>> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .filter_map(|d| Some((d["metadata"]["name"].as_str()?, d["data"].as_object()?)))
        .collect();
    let mut out = Vec::new();
    for doc in docs {
        let Some(pod) = doc["spec"]["template"]["spec"].as_object() else {
            continue;
        };
        for container in pod["containers"].as_array().into_iter().flatten() {
            let image = container["image"].as_str().unwrap_or_default();
            if !image.contains("dronedelivery") {
                continue;
            }
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let args: Vec<String> = container["command"]
                .as_array()
                .into_iter()
                .flatten()
                .skip(1)
                .chain(container["args"].as_array().into_iter().flatten())
                .map(|a| a.as_str().unwrap_or_default().to_owned())
                .collect();
            let mut env = BTreeMap::new();
            for var in container["env"].as_array().into_iter().flatten() {
                let key = var["name"].as_str().unwrap_or_default().to_owned();
                env.insert(key, var["value"].as_str().map(str::to_owned));
            }
            for from in container["envFrom"].as_array().into_iter().flatten() {
                if let Some(map) = from["configMapRef"]["name"].as_str() {
                    let data = config_maps
                        .get(map)
                        .with_context(|| format!("{overlay}/{name}: no ConfigMap {map}"))?;
                    for (k, v) in data.iter() {
                        env.entry(k.clone())
                            .or_insert_with(|| v.as_str().map(str::to_owned));
                    }
                }
            }
            let invocation = Invocation {
                origin: format!("{overlay}: {} {name}", doc["kind"].as_str().unwrap_or("")),
                args,
                env,
            };
            out.push((doc.clone(), invocation));
        }
    }
    Ok(out)
}

/// Every service of the compose file (as docker-compose resolves it) that runs the
/// binary.
fn compose_invocations() -> Result<Vec<Invocation>> {
    let resolved = documents(&run(compose(&["config"]), None)?)?;
    let services = resolved[0]["services"].as_object().context("no services")?;
    let mut out = Vec::new();
    for (name, service) in services {
        if !service["image"]
            .as_str()
            .unwrap_or_default()
            .contains("dronedelivery")
        {
            continue;
        }
        let words = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|w| w.as_str().unwrap_or_default().to_owned())
                .collect()
        };
        let mut args = words(&service["entrypoint"]);
        if !args.is_empty() {
            args.remove(0);
        }
        args.extend(words(&service["command"]));
        let env = service["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    other => Some(other.to_string()),
                };
                (k.clone(), value)
            })
            .collect();
        out.push(Invocation {
            origin: format!("compose: {name}"),
            args,
            env,
        });
    }
    Ok(out)
}

/// The subcommand, every flag and every `DRONEDELIVERY_*` variable exist in the binary.
fn check_against_the_binary(invocation: &Invocation) -> Result<()> {
    let origin = &invocation.origin;
    let subcommand = invocation.subcommand();
    ensure!(!subcommand.is_empty(), "{origin}: no subcommand");
    let text = help(subcommand).with_context(|| origin.clone())?;
    for flag in invocation.flags() {
        let listed = text.match_indices(flag).any(|(at, _)| {
            let after = text[at + flag.len()..].chars().next();
            let before = text[..at].chars().next_back();
            matches!(after, Some(' ' | '\n' | '=' | ',') | None) && before != Some('-')
        });
        ensure!(
            listed,
            "{origin}: `dronedelivery {subcommand}` has no {flag}"
        );
    }
    // The values too: clap parses the arguments and the environment as the container
    // would give them (an invalid value, or two settings that exclude each other, fail).
    let mut parse = Command::new(BINARY);
    parse
        .env_clear()
        .args(&invocation.args)
        .arg("--check-config");
    for (name, value) in &invocation.env {
        if !name.starts_with("DRONEDELIVERY_") {
            continue;
        }
        match value {
            Some(value) => {
                parse.env(name, value);
            }
            // From a secret: a value of the right shape.
            None if name.ends_with("CONNECTION_STRING") => {
                parse.env(
                    name,
                    "Endpoint=sb://example.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=x",
                );
            }
            None => {}
        }
    }
    let out = parse.output()?;
    ensure!(
        out.status.success(),
        "{origin}: `dronedelivery {}` refuses its configuration: {}",
        invocation.args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in invocation.env.keys() {
        if name.starts_with("DRONEDELIVERY_") {
            // `[env: NAME=value]`, or `[env: NAME]` for a secret whose value is hidden.
            ensure!(
                text.contains(&format!("[env: {name}="))
                    || text.contains(&format!("[env: {name}]")),
                "{origin}: `dronedelivery {subcommand}` reads no {name}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_manifests_name_only_subcommands_flags_and_variables_the_binary_has() -> Result<()> {
    let mut checked = BTreeSet::new();
    for overlay in OVERLAYS {
        let docs = documents(&render(overlay)?)?;
        for (_, invocation) in k8s_invocations(overlay, &docs)? {
            check_against_the_binary(&invocation)?;
            checked.insert(invocation.subcommand().to_owned());
        }
    }
    for invocation in compose_invocations()? {
        check_against_the_binary(&invocation)?;
        checked.insert(invocation.subcommand().to_owned());
    }
    for subcommand in [
        "ingest",
        "process",
        "history",
        "sql-server",
        "loadgen",
        "simulate",
    ] {
        ensure!(
            checked.contains(subcommand),
            "no manifest runs {subcommand}: {checked:?}"
        );
    }
    // The check itself catches drift.
    let bogus = Invocation {
        origin: "a deliberate mistake".into(),
        args: vec!["process".into(), "--processor".into(), "workflow".into()],
        env: BTreeMap::from([("DRONEDELIVERY_BROKER".into(), None)]),
    };
    ensure!(check_against_the_binary(&bogus).is_err());
    let bogus = Invocation {
        origin: "a deliberate mistake".into(),
        args: vec!["history".into()],
        env: BTreeMap::from([("DRONEDELIVERY_MAX_CONSUMER_LAG".into(), None)]),
    };
    ensure!(check_against_the_binary(&bogus).is_err());
    for (name, value) in [
        // Brokers beside an Event Hubs connection string: they exclude each other.
        ("DRONEDELIVERY_BROKERS", "kafka:9092"),
        // Not a value the flag takes.
        ("DRONEDELIVERY_LOG_FORMAT", "JSON"),
    ] {
        let bogus = Invocation {
            origin: "a deliberate mistake".into(),
            args: vec!["history".into()],
            env: BTreeMap::from([
                (name.into(), Some(value.into())),
                ("DRONEDELIVERY_EVENTHUBS_CONNECTION_STRING".into(), None),
            ]),
        };
        ensure!(check_against_the_binary(&bogus).is_err(), "{name}={value}");
    }
    Ok(())
}

/// The variable naming a member's stable identity (`--instance-id`), from which its
/// transactional ids derive.
const INSTANCE_ID: &str = "DRONEDELIVERY_INSTANCE_ID";

/// Every processor container takes its instance id from its pod's name (stable while the
/// pod lives, so a restarted container fences what the one before it left open, and
/// unique per replica, so members never fence each other); in the compose file, where
/// each processor is one container, every processor service names its own.
#[test]
fn every_processor_member_has_a_stable_instance_id_of_its_own() -> Result<()> {
    for overlay in OVERLAYS {
        let docs = documents(&render(overlay)?)?;
        let mut processors = 0;
        for (doc, invocation) in k8s_invocations(overlay, &docs)? {
            if invocation.subcommand() != "process" {
                continue;
            }
            processors += 1;
            let origin = &invocation.origin;
            ensure!(
                doc["kind"] == "Deployment" || doc["kind"] == "StatefulSet",
                "{origin}: a processor runs as a Deployment or a StatefulSet"
            );
            let containers = doc["spec"]["template"]["spec"]["containers"]
                .as_array()
                .context("no containers")?;
            for container in containers {
                if !container["image"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("dronedelivery")
                {
                    continue;
                }
                let var = container["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == INSTANCE_ID)
                    .with_context(|| format!("{origin}: no {INSTANCE_ID}"))?;
                ensure!(
                    var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
                    "{origin}: {INSTANCE_ID} is not the pod's name: {var}"
                );
            }
        }
        ensure!(
            processors >= 4,
            "{overlay}: {processors} processor workloads"
        );
    }
    let mut ids = BTreeSet::new();
    for invocation in compose_invocations()? {
        if invocation.subcommand() != "process" {
            continue;
        }
        let origin = &invocation.origin;
        let id = invocation
            .var(INSTANCE_ID)
            .with_context(|| format!("{origin}: no {INSTANCE_ID}"))?;
        ensure!(
            ids.insert(id.to_owned()),
            "{origin}: {INSTANCE_ID}={id} again"
        );
    }
    ensure!(ids.len() >= 4, "compose: processors with ids {ids:?}");
    Ok(())
}

/// The port a `--listen`/`--health-listen` address names.
fn port_of(address: &str) -> Option<i64> {
    address.rsplit(':').next()?.parse().ok()
}

/// The consumer group a deployment runs and the topics it reads.
fn group_of(invocation: &Invocation) -> Result<Option<(&'static str, Vec<&'static str>)>> {
    use clap::ValueEnum as _;
    match invocation.subcommand() {
        "process" => {
            let names = invocation
                .flag("--processors")
                .context("each processor runs as its own deployment: give --processors")?;
            ensure!(
                !names.contains(','),
                "{}: one processor per deployment, so each scales on its own group",
                invocation.origin
            );
            let processor = processors::Processor::from_str(names, true)
                .map_err(|e| anyhow::anyhow!("{}: {e}", invocation.origin))?;
            Ok(Some((processor.group(), processor.inputs().to_vec())))
        }
        "history" => Ok(Some((
            schemas::topics::groups::HISTORY,
            schemas::history::TABLES
                .iter()
                .map(|t| t.topic.name)
                .collect(),
        ))),
        _ => Ok(None),
    }
}

fn partitions(topic: &str) -> Result<i64> {
    schemas::topics::ALL
        .iter()
        .find(|t| t.name == topic)
        .map(|t| i64::from(t.partitions))
        .with_context(|| format!("{topic} is not a topic of the pipeline"))
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn probes_scaling_and_grace_periods_agree_with_the_services() -> Result<()> {
    for overlay in OVERLAYS {
        let docs = documents(&render(overlay)?)?;
        let of_kind =
            |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == kind).collect() };
        let scaled: HashMap<&str, &Value> = of_kind("ScaledObject")
            .into_iter()
            .map(|s| {
                (
                    s["spec"]["scaleTargetRef"]["name"].as_str().unwrap_or(""),
                    s,
                )
            })
            .collect();
        let hpas: BTreeSet<&str> = of_kind("HorizontalPodAutoscaler")
            .iter()
            .filter_map(|h| h["spec"]["scaleTargetRef"]["name"].as_str())
            .collect();
        let pdbs = of_kind("PodDisruptionBudget");
        let invocations = k8s_invocations(overlay, &docs)?;
        let mut groups_seen = BTreeSet::new();
        for (doc, invocation) in &invocations {
            let origin = &invocation.origin;
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let pod = &doc["spec"]["template"]["spec"];
            let container = &pod["containers"][0];

            // Probes: /readyz and /healthz on the port the service listens on.
            let listen = invocation
                .flag("--health-listen")
                .or_else(|| invocation.flag("--listen"))
                .with_context(|| format!("{origin}: no listener for probes"))?;
            let port = port_of(listen).with_context(|| format!("{origin}: {listen}"))?;
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &container[probe]["httpGet"];
                ensure!(get["path"] == path, "{origin}: {probe} is not on {path}");
                let named = &get["port"];
                let number = match named.as_str() {
                    Some(port_name) => container["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["name"] == port_name)
                        .map(|p| int(&p["containerPort"]))
                        .with_context(|| format!("{origin}: no port named {port_name}"))?,
                    None => int(named),
                };
                ensure!(
                    number == port,
                    "{origin}: {probe} on {number}, the service listens on {port}"
                );
            }
            let scraped = &doc["spec"]["template"]["metadata"]["annotations"];
            ensure!(
                int(&scraped["prometheus.io/port"]) == port
                    && scraped["prometheus.io/scrape"] == "true",
                "{origin}: Prometheus is told to scrape another port than {port}"
            );
            let image = container["image"].as_str().unwrap_or_default();
            match overlay {
                "overlays/dev" => ensure!(
                    image == "dronedelivery:dev",
                    "{origin}: runs {image}, not the image the dev overlay says to build"
                ),
                "base" => {}
                _ => ensure!(
                    image
                        .rsplit_once(':')
                        .is_some_and(|(_, tag)| tag != "latest" && !tag.contains('/')),
                    "{origin}: runs {image}: pin a version"
                ),
            }
            // Secrets (API keys, client credentials) are not readable by every user.
            for volume in pod["volumes"].as_array().into_iter().flatten() {
                if volume["secret"].is_object() {
                    let mode = volume["secret"]["defaultMode"].as_i64().unwrap_or(0o644);
                    ensure!(
                        mode & 0o004 == 0 && pod["securityContext"]["fsGroup"].is_i64(),
                        "{origin}: secret volume {} is world-readable (mode {mode:o}) or \
                         the pod has no fsGroup",
                        volume["name"]
                    );
                }
            }
            ensure!(
                container["resources"]["requests"].is_object()
                    && container["resources"]["limits"]["memory"].is_string(),
                "{origin}: resource requests and a memory limit"
            );

            // Grace: longer than preStop plus the drain (and, for ingest, the producer's
            // flush, which may take the drain time again).
            let grace = int(&pod["terminationGracePeriodSeconds"]);
            let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
                .as_array()
                .and_then(|c| c.get(1))
                .map_or(0, int);
            let drain = invocation
                .flag("--drain-secs")
                .or_else(|| invocation.var("DRONEDELIVERY_DRAIN_SECS"))
                .map_or(30, |d| d.parse().unwrap_or(30));
            let needed = match invocation.subcommand() {
                "ingest" => pre_stop + 2 * drain,
                "sql-server" => pre_stop + drain,
                _ => 30,
            };
            ensure!(
                grace > needed,
                "{origin}: terminationGracePeriodSeconds {grace} must exceed {needed}"
            );

            // Disruption budget.
            ensure!(
                pdbs.iter().any(
                    |p| p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == name
                ),
                "{origin}: no PodDisruptionBudget"
            );

            // Scaling: ingest on CPU, each consumer on its own group's lag, never past
            // the partitions of what it reads.
            if invocation.subcommand() == "ingest" {
                ensure!(hpas.contains(name), "{origin}: no HorizontalPodAutoscaler");
            }
            if let Some((group, inputs)) = group_of(invocation)? {
                ensure!(
                    groups_seen.insert(group),
                    "{origin}: {group} runs in two deployments"
                );
                let Some(scaled) = scaled.get(name) else {
                    ensure!(
                        overlay == "overlays/dev",
                        "{origin}: no ScaledObject for {group}"
                    );
                    continue;
                };
                let spec = &scaled["spec"];
                let trigger = &spec["triggers"][0];
                ensure!(trigger["type"] == "kafka", "{origin}: a kafka trigger");
                if let Some(auth) = trigger["authenticationRef"]["name"].as_str() {
                    ensure!(
                        of_kind("TriggerAuthentication")
                            .iter()
                            .any(|t| t["metadata"]["name"] == auth),
                        "{origin}: no TriggerAuthentication {auth}"
                    );
                }
                let metadata = &trigger["metadata"];
                ensure!(
                    metadata["consumerGroup"] == group,
                    "{origin}: KEDA watches {} but the service is in {group}",
                    metadata["consumerGroup"]
                );
                if let Some(topic) = metadata["topic"].as_str() {
                    ensure!(
                        inputs.contains(&topic),
                        "{origin}: KEDA watches {topic}, which {group} does not read"
                    );
                }
                // Members past the largest input's partition count would idle (the
                // tracker's inputs are co-partitioned, so that is each one's count).
                let ceiling = inputs
                    .iter()
                    .map(|t| partitions(t))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .max()
                    .unwrap_or(0);
                let max = int(&spec["maxReplicaCount"]);
                ensure!(
                    (1..=ceiling).contains(&max),
                    "{origin}: maxReplicaCount {max} past the {ceiling} partitions"
                );
                ensure!(
                    int(&spec["minReplicaCount"]) >= 1,
                    "{origin}: at least one member"
                );
                ensure!(
                    metadata["allowIdleConsumers"] == "false",
                    "{origin}: no idle members"
                );
                let bootstrap = metadata["bootstrapServersFromEnv"]
                    .as_str()
                    .with_context(|| format!("{origin}: bootstrapServersFromEnv"))?;
                ensure!(
                    invocation.env.contains_key(bootstrap),
                    "{origin}: KEDA reads the brokers from {bootstrap}, which the pod lacks"
                );
            }
        }
        let consumers = invocations
            .iter()
            .filter(|(_, i)| group_of(i).ok().flatten().is_some())
            .count();
        ensure!(
            consumers == 6,
            "{overlay}: {consumers} consumer deployments"
        );
        ensure!(
            scaled.len() == if overlay == "overlays/dev" { 0 } else { 6 },
            "{overlay}: {} ScaledObjects",
            scaled.len()
        );
    }
    Ok(())
}

/// Metric names a PromQL expression mentions (those of the pipeline's prefixes), with
/// histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const PREFIXES: [&str; 11] = [
        "ingest_",
        "processor_",
        "workflow_",
        "deliveries_",
        "scheduling_",
        "tracking_",
        "history_",
        "sql_",
        "kafka_",
        "producer_",
        "pipeline_",
    ];
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| PREFIXES.iter().any(|p| w.starts_with(p)))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

/// Those of `metrics` no code of the workspace names as a string literal.
fn not_exported(metrics: impl IntoIterator<Item = String>) -> Result<Vec<String>> {
    let mut sources = String::new();
    rust_sources(Path::new(ROOT), &mut sources)?;
    Ok(metrics
        .into_iter()
        .filter(|m| !sources.contains(&format!("\"{m}\"")))
        .collect())
}

fn rust_sources(dir: &Path, out: &mut String) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | "tests" | "benches" | ".git" | "data") {
                rust_sources(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

#[test]
fn the_dashboard_shows_only_metrics_the_code_exports() -> Result<()> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        Path::new(ROOT).join("deploy/grafana/dronedelivery.json"),
    )?)?;
    fn exprs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    ensure!(
        used.len() >= 20,
        "the dashboard names {} metrics",
        used.len()
    );
    let missing = not_exported(used.iter().cloned())?;
    ensure!(
        missing.is_empty(),
        "the dashboard uses metrics no code exports: {missing:?}"
    );
    // What an operator must see is there.
    for needed in [
        "ingest_records_accepted_total",
        "ingest_rejections_total",
        "ingest_http_requests_total",
        "producer_queue_records",
        "kafka_consumer_lag",
        "history_last_commit_timestamp_seconds",
        "sql_query_seconds",
    ] {
        ensure!(used.contains(needed), "the dashboard lacks {needed}");
    }
    Ok(())
}

#[test]
fn the_image_builds_with_the_pinned_toolchain_and_runs_the_one_binary() -> Result<()> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("deploy/Dockerfile"))?;
    let toolchain = std::fs::read_to_string(Path::new(ROOT).join("rust-toolchain.toml"))?;
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .context("no channel")?
        .trim_matches('"');
    ensure!(
        dockerfile.contains(&format!("ARG RUST_VERSION={channel}\n")),
        "deploy/Dockerfile builds with another Rust than rust-toolchain.toml ({channel})"
    );
    ensure!(dockerfile.contains("cargo chef cook --release --locked"));
    ensure!(dockerfile.contains("cargo build --release --locked --bin dronedelivery"));
    ensure!(dockerfile.contains("USER 10001:10001"), "a non-root user");
    ensure!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/dronedelivery\"]"));
    // Every path the build copies from the context is there (and not ignored).
    let ignored = std::fs::read_to_string(Path::new(ROOT).join("deploy/Dockerfile.dockerignore"))?;
    for needed in ["Cargo.toml", "Cargo.lock", "src", "rust-toolchain.toml"] {
        ensure!(Path::new(ROOT).join(needed).exists());
        ensure!(
            !ignored.lines().any(|l| l.trim() == needed),
            "{needed} is ignored"
        );
    }
    Ok(())
}

/// Every `expr` in a rule group list.
fn rule_exprs(groups: &Value) -> Vec<String> {
    groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_alerting_rules_are_one_set_over_metrics_the_code_exports() -> Result<()> {
    let read = |path: &str| -> Result<Vec<Value>> {
        documents(&std::fs::read_to_string(Path::new(ROOT).join(path))?)
    };
    let plain = read("deploy/prometheus/alerts.yml")?;
    let operator = read("deploy/k8s/components/prometheus-operator/prometheusrule.yaml")?;
    let groups = &plain[0]["groups"];
    ensure!(
        groups == &operator[0]["spec"]["groups"],
        "deploy/prometheus/alerts.yml and the PrometheusRule differ"
    );
    let exprs = rule_exprs(groups);
    ensure!(exprs.len() >= 5, "{} rules", exprs.len());
    let missing = not_exported(exprs.iter().flat_map(|e| metric_names(e)))?;
    ensure!(
        missing.is_empty(),
        "the rules use metrics no code exports: {missing:?}"
    );
    // The compose Prometheus loads them.
    let config = read("deploy/prometheus/prometheus.yml")?;
    ensure!(
        config[0]["rule_files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "/etc/prometheus/alerts.yml")),
        "prometheus.yml does not load the rules"
    );
    Ok(())
}

#[test]
fn the_prometheus_operator_component_renders_and_scrapes_named_ports() -> Result<()> {
    // A kustomization of the base with the component, beside the overlays (Kustomize
    // takes only relative paths), removed afterwards.
    let dir = tempfile::Builder::new()
        .prefix(".check-")
        .tempdir_in(Path::new(ROOT).join("deploy/k8s"))?;
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - ../base\ncomponents:\n  - ../components/prometheus-operator\n",
    )?;
    let mut kubectl = tool("kubectl");
    kubectl.arg("kustomize").arg(dir.path());
    let yaml = run(kubectl, None)?;
    let mut validate = tool("kubernetes-validate");
    validate.args(["--strict", "--quiet", "-k", KUBERNETES, "-"]);
    let report = run(validate, Some(yaml.as_bytes()))?;
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        ensure!(
            line.contains("Couldn't find schema")
                && (line.contains("keda.sh/") || line.contains("monitoring.coreos.com/")),
            "{line}"
        );
    }
    let docs = documents(&yaml)?;
    let monitor = docs
        .iter()
        .find(|d| d["kind"] == "PodMonitor")
        .context("no PodMonitor")?;
    let ports: BTreeSet<&str> = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["port"].as_str())
        .collect();
    // Every service exposes its metrics on a port the PodMonitor names.
    for (doc, invocation) in k8s_invocations("base", &docs)? {
        let named: Vec<&str> = doc["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str())
            .collect();
        ensure!(
            named.iter().any(|n| ports.contains(n)),
            "{}: no port the PodMonitor scrapes ({named:?})",
            invocation.origin
        );
    }
    Ok(())
}
