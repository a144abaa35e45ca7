//! The deployment files in `deploy/` checked against the real thing:
//!
//! - every YAML file parses (all its documents), `compose.yaml` has the
//!   services and profiles `deploy/README.md` describes, and every
//!   Kubernetes object has an `apiVersion` and a `kind` (and the shape the
//!   shutdown and readiness rules of ADR 0007 ask for);
//! - every metric the Grafana dashboard and the Prometheus alerts name is
//!   one that `/metrics` of a running API exports (the projector's figures
//!   are read from Redis by the API: `callboard project` has no endpoint),
//!   and the probe paths answer;
//! - every `CALLBOARD_*` variable compose and the manifests set is a setting
//!   (`callboard_settings::ENV_KEYS`), and each process's environment loads
//!   (`Settings::load`), so a misspelt name or a bad value fails here
//!   rather than at start-up in production.
//!
//! Nothing here runs Docker or a cluster: images are not built, compose is
//! not started and the manifests are not applied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callboard_settings::{Settings, ENV_KEYS, PLACEHOLDER};
use callboard_testkit::Services;
use callboard_tests::dataset::generate;
use callboard_tests::{spawn_app_configured, TestApp};
use serde_json::Value;
use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlLoader};

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo_dir().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every `.yaml` / `.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("list {}: {e}", d.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file, with merge keys (`<<`) applied as
/// Compose and Kubernetes tools apply them.
fn load_yaml(path: &Path) -> Vec<Yaml> {
    let docs = YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    docs.iter().map(resolve_merges).collect()
}

/// `<<: *a` and `<<: [*a, *b]`: the mapping's own keys win, then the
/// merged mappings in order.
fn resolve_merges(y: &Yaml) -> Yaml {
    match y {
        Yaml::Hash(h) => {
            let mut out = Hash::new();
            for (k, v) in h.iter().filter(|(k, _)| k.as_str() != Some("<<")) {
                out.insert(k.clone(), resolve_merges(v));
            }
            for (_, v) in h.iter().filter(|(k, _)| k.as_str() == Some("<<")) {
                let sources: Vec<&Yaml> = match v {
                    Yaml::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for source in sources {
                    let Yaml::Hash(merged) = resolve_merges(source) else {
                        panic!("a merge key `<<` needs mappings, not {source:?}");
                    };
                    for (k, v) in merged {
                        if !out.contains_key(&k) {
                            out.insert(k, v);
                        }
                    }
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.iter().map(resolve_merges).collect()),
        other => other.clone(),
    }
}

fn has_bad_value(y: &Yaml) -> bool {
    match y {
        Yaml::BadValue | Yaml::Alias(_) => true,
        Yaml::Array(a) => a.iter().any(has_bad_value),
        Yaml::Hash(h) => h.iter().any(|(k, v)| has_bad_value(k) || has_bad_value(v)),
        _ => false,
    }
}

/// A scalar as the string a process would see.
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A command (a string, or a list of words) as one line of text.
fn command_text(y: &Yaml) -> String {
    match y {
        Yaml::Array(words) => words.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
        other => scalar(other).unwrap_or_default(),
    }
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().filter_map(scalar).collect()).unwrap_or_default()
}

/// Compose's interpolation of one value: `$$` is a `$`, `${NAME:-default}`
/// and `${NAME-default}` are their default (what runs when the variable is
/// not set). Anything else has no value in the file and is an error.
fn interpolate(raw: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| format!("{raw:?}: an unclosed ${{"))?;
            let inner = &body[..end];
            let name_len = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_len);
            match op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                Some(default) => out.push_str(default),
                None => {
                    return Err(format!("{raw:?}: ${{{name}{op}}} has no default, so its value is not in the file"))
                }
            }
            rest = &body[end + 1..];
        } else {
            return Err(format!("{raw:?}: an unbraced $ (write $$ for a literal one)"));
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// What is wrong with an environment a deploy file gives a callboard
/// process: names that are no setting, or values the settings refuse.
fn env_problems(whose: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for name in env.keys().filter(|n| n.starts_with("CALLBOARD_")) {
        if !callboard_settings::is_accepted_env(name) {
            problems.push(format!("{whose}: {name} is not a setting (callboard_settings::is_accepted_env)"));
        }
    }
    let vars: Vec<(String, String)> = env
        .iter()
        .filter(|(n, _)| n.starts_with("CALLBOARD_") && n.as_str() != "CALLBOARD_CONFIG")
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    // A placeholder secret must stop the process (a known secret signs
    // anyone's tokens); with real secrets in their place, it must start.
    let placeholder = |(n, v): &(String, String)| n.ends_with("JWT_SECRET") && v.contains(PLACEHOLDER);
    if vars.iter().any(placeholder) {
        match Settings::load(None, vars.clone()) {
            Err(e) if e.to_string().contains("placeholder") => {}
            other => problems.push(format!("{whose}: a placeholder secret was not refused: {:?}", other.err())),
        }
    }
    let real: Vec<(String, String)> = vars
        .into_iter()
        .map(|(n, v)| {
            if placeholder(&(n.clone(), v.clone())) {
                (n.clone(), format!("{n}-a-real-secret-of-32-bytes-or-more"))
            } else {
                (n, v)
            }
        })
        .collect();
    if let Err(e) = Settings::load(None, real) {
        problems.push(format!("{whose}: the settings refuse this environment: {e}"));
    }
    problems
}

// ---------------------------------------------------------------- compose

fn compose() -> Yaml {
    let mut docs = load_yaml(&deploy_dir().join("compose.yaml"));
    assert_eq!(docs.len(), 1, "compose.yaml is one document");
    docs.remove(0)
}

fn services(compose: &Yaml) -> BTreeMap<String, Yaml> {
    compose["services"]
        .as_hash()
        .expect("compose.yaml has services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service names are strings").to_string(), v.clone()))
        .collect()
}

/// A service's `environment` (a mapping or a list of `K=V`), interpolated.
fn service_env(name: &str, service: &Yaml, problems: &mut Vec<String>) -> BTreeMap<String, String> {
    let mut raw: Vec<(String, String)> = Vec::new();
    match &service["environment"] {
        Yaml::Hash(h) => {
            for (k, v) in h {
                let key = k.as_str().unwrap_or_default().to_string();
                match scalar(v) {
                    Some(value) => raw.push((key, value)),
                    // Compose passes a null through from the host: no value here.
                    None => problems.push(format!("{name}: {key} has no value in the file")),
                }
            }
        }
        Yaml::Array(items) => {
            for item in items.iter().filter_map(Yaml::as_str) {
                match item.split_once('=') {
                    Some((k, v)) => raw.push((k.to_string(), v.to_string())),
                    None => problems.push(format!("{name}: {item} has no value in the file")),
                }
            }
        }
        _ => {}
    }
    let mut env = BTreeMap::new();
    for (k, v) in raw {
        match interpolate(&v) {
            Ok(v) => {
                env.insert(k, v);
            }
            Err(e) => problems.push(format!("{name}: {k}: {e}")),
        }
    }
    env
}

fn is_callboard(service: &Yaml) -> bool {
    service["image"].as_str().is_some_and(|i| i.starts_with("callboard"))
}

/// `20s`, `1m30s`, `500ms` as seconds (rounded down).
fn duration_s(text: &str) -> u64 {
    let mut total_ms = 0u64;
    let mut number = String::new();
    let mut unit = String::new();
    let flush = |number: &mut String, unit: &mut String, total_ms: &mut u64| {
        if number.is_empty() {
            return;
        }
        let n: u64 = number.parse().expect("a duration's number");
        *total_ms += match unit.as_str() {
            "ms" => n,
            "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            other => panic!("unknown duration unit {other:?} in {text:?}"),
        };
        number.clear();
        unit.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !unit.is_empty() {
                flush(&mut number, &mut unit, &mut total_ms);
            }
            number.push(c);
        } else {
            unit.push(c);
        }
    }
    flush(&mut number, &mut unit, &mut total_ms);
    total_ms / 1000
}

/// The grace an API process needs after SIGTERM, and a projector's.
fn shutdown_budgets() -> (u64, u64) {
    let defaults = Settings::load(None, std::iter::empty()).expect("the defaults load");
    let api = defaults.http.shutdown_delay_ms.div_ceil(1000) + defaults.http.shutdown_timeout_s;
    let projector = defaults.projector.lease_ttl_ms.div_ceil(1000);
    (api, projector)
}

// ------------------------------------------------------------- kubernetes

/// ConfigMaps' or Secrets' variables, by object name.
type Named = BTreeMap<String, BTreeMap<String, String>>;

fn k8s_docs() -> Vec<(String, Yaml)> {
    let mut out = Vec::new();
    for path in yaml_files(&deploy_dir().join("k8s")) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for doc in load_yaml(&path) {
            out.push((file.clone(), doc));
        }
    }
    assert!(!out.is_empty(), "deploy/k8s holds manifests");
    out
}

fn kind(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn string_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| h.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar(v)?))).collect())
        .unwrap_or_default()
}

/// Pod templates of the workloads: (object, pod spec).
fn workloads(docs: &[(String, Yaml)]) -> Vec<(&Yaml, &Yaml)> {
    docs.iter()
        .map(|(_, d)| d)
        .filter(|d| matches!(kind(d), "Deployment" | "StatefulSet" | "DaemonSet" | "Job"))
        .map(|d| (d, &d["spec"]["template"]["spec"]))
        .collect()
}

/// A container's environment as Kubernetes gives it: `envFrom`, then `env`.
fn container_env(
    whose: &str,
    container: &Yaml,
    config_maps: &Named,
    secrets: &Named,
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let lookup = |what: &str, source: &Named, object: &str| {
        source.get(object).cloned().ok_or_else(|| format!("{whose}: no {what} named {object:?} in deploy/k8s"))
    };
    for from in container["envFrom"].as_vec().into_iter().flatten() {
        let found = if let Some(n) = from["configMapRef"]["name"].as_str() {
            lookup("ConfigMap", config_maps, n)
        } else if let Some(n) = from["secretRef"]["name"].as_str() {
            lookup("Secret", secrets, n)
        } else {
            Err(format!("{whose}: an envFrom this test does not know: {from:?}"))
        };
        match found {
            Ok(vars) => env.extend(vars),
            Err(e) => problems.push(e),
        }
    }
    for var in container["env"].as_vec().into_iter().flatten() {
        let Some(var_name) = var["name"].as_str() else {
            problems.push(format!("{whose}: an env entry without a name"));
            continue;
        };
        let value = match scalar(&var["value"]) {
            Some(v) => Ok(v),
            None => value_from(&format!("{whose}: {var_name}"), &var["valueFrom"], config_maps, secrets),
        };
        match value {
            Ok(v) => {
                env.insert(var_name.to_string(), v);
            }
            Err(e) => problems.push(e),
        }
    }
    env
}

/// An `env` entry's `valueFrom`: a key of a ConfigMap or Secret of deploy/k8s.
fn value_from(whose: &str, from: &Yaml, config_maps: &Named, secrets: &Named) -> Result<String, String> {
    let (source, refd) = if from["configMapKeyRef"].is_badvalue() {
        (secrets, &from["secretKeyRef"])
    } else {
        (config_maps, &from["configMapKeyRef"])
    };
    let (Some(n), Some(k)) = (refd["name"].as_str(), refd["key"].as_str()) else {
        return Err(format!("{whose} has neither a value nor a known valueFrom"));
    };
    source
        .get(n)
        .and_then(|m| m.get(k))
        .cloned()
        .ok_or_else(|| format!("{whose} refers to {n}/{k}, which deploy/k8s does not define"))
}

fn config_maps_and_secrets(docs: &[(String, Yaml)], problems: &mut Vec<String>) -> (Named, Named) {
    let mut config_maps = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for (file, doc) in docs {
        match kind(doc) {
            "ConfigMap" => {
                config_maps.insert(name(doc).to_string(), string_map(&doc["data"]));
            }
            "Secret" => {
                if !doc["data"].is_badvalue() {
                    problems.push(format!("{file}: Secret {}: use stringData (data is base64)", name(doc)));
                }
                secrets.insert(name(doc).to_string(), string_map(&doc["stringData"]));
            }
            _ => {}
        }
    }
    (config_maps, secrets)
}

/// The Deployment whose first container runs `callboard <command>`.
fn by_command<'a>(deployments: &[&'a Yaml], command: &str) -> &'a Yaml {
    deployments
        .iter()
        .copied()
        .find(|d| strings(&d["spec"]["template"]["spec"]["containers"][0]["args"]) == [command])
        .unwrap_or_else(|| panic!("no Deployment runs `callboard {command}`"))
}

fn labels_match(selector: &Yaml, labels: &Yaml) -> bool {
    let (selector, labels) = (string_map(selector), string_map(labels));
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// ---------------------------------------------------------------- metrics

/// The `callboard_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut from = 0;
    while let Some(i) = expr[from..].find("callboard_").map(|i| i + from) {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let end = expr[i..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(expr.len(), |e| e + i);
        if starts_word {
            out.insert(expr[i..end].to_string());
        }
        from = end;
    }
    out
}

/// The PromQL of a Grafana dashboard: every `expr`, and the variables'
/// queries.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

fn alert_rules() -> Vec<Yaml> {
    let docs = load_yaml(&deploy_dir().join("prometheus/alerts.yaml"));
    assert_eq!(docs.len(), 1, "alerts.yaml is one document");
    let groups = docs[0]["groups"].as_vec().expect("alerts.yaml has groups");
    groups.iter().flat_map(|g| g["rules"].as_vec().cloned().unwrap_or_default()).collect()
}

/// A `/metrics` text's families (from `# TYPE`) with their types, and its
/// sample names.
struct Scrape {
    families: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut families = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(n), Some(t)) = (words.next(), words.next()) {
                    families.insert(n.to_string(), t.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Self { families, samples }
    }

    /// Whether `name` is exported: a family or a sample, or a histogram's
    /// (or summary's) `_bucket` / `_sum` / `_count`.
    fn exports(&self, name: &str) -> bool {
        if self.families.contains_key(name) || self.samples.contains(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| self.families.get(base).is_some_and(|t| t == "histogram" || t == "summary"))
        })
    }

    fn missing<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        names.into_iter().filter(|n| !self.exports(n)).cloned().collect()
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn every_yaml_file_under_deploy_parses_and_compose_and_k8s_have_their_shape() {
    let files = yaml_files(&deploy_dir());
    assert!(files.len() >= 4, "deploy/ holds compose, k8s and prometheus YAML: {files:?}");
    for path in &files {
        let docs = load_yaml(path);
        assert!(!docs.is_empty(), "{} holds no document", path.display());
        for doc in &docs {
            assert!(doc.as_hash().is_some(), "{}: a document that is not a mapping", path.display());
            assert!(!has_bad_value(doc), "{}: an unresolved alias or bad value", path.display());
        }
    }

    // compose.yaml
    let compose_file = compose();
    let services = services(&compose_file);
    let default_services = [
        "mongo1",
        "mongo2",
        "mongo3",
        "mongo-init",
        "redis",
        "create-indexes",
        "api-1",
        "api-2",
        "projector-1",
        "projector-2",
    ];
    let cluster_services = [
        "redis-node-1",
        "redis-node-2",
        "redis-node-3",
        "redis-cluster-create",
        "api-cluster-1",
        "api-cluster-2",
        "projector-cluster-1",
        "projector-cluster-2",
    ];
    for name in default_services {
        let s = services.get(name).unwrap_or_else(|| panic!("compose.yaml has no service {name}"));
        assert!(strings(&s["profiles"]).is_empty(), "{name} must start without a profile");
    }
    for name in cluster_services {
        let s = services.get(name).unwrap_or_else(|| panic!("compose.yaml has no service {name}"));
        assert!(strings(&s["profiles"]).iter().any(|p| p == "cluster"), "{name} belongs to the cluster profile");
    }
    let (api_grace, projector_grace) = shutdown_budgets();
    for (name, s) in &services {
        let cmd = command_text(&s["command"]);
        if name.starts_with("api-") {
            assert!(is_callboard(s) && cmd == "serve", "{name} runs `callboard serve`: {cmd:?}");
            let grace = duration_s(s["stop_grace_period"].as_str().unwrap_or("10s"));
            assert!(grace >= api_grace, "{name}: stop_grace_period {grace} s < {api_grace} s of shutdown (ADR 0007)");
        }
        if name.starts_with("projector-") {
            assert!(is_callboard(s) && cmd == "project", "{name} runs `callboard project`: {cmd:?}");
            let grace = duration_s(s["stop_grace_period"].as_str().unwrap_or("10s"));
            assert!(grace >= projector_grace, "{name}: stop_grace_period {grace} s < a lease TTL");
        }
    }
    assert_eq!(command_text(&services["create-indexes"]["command"]), "create-indexes");
    for n in 1..=3 {
        let cmd = command_text(&services[&format!("mongo{n}")]["command"]);
        assert!(cmd.contains("--replSet rs0"), "mongo{n} is a replica set member: {cmd}");
    }
    let init = command_text(&services["mongo-init"]["command"]);
    assert!(init.contains("rs.initiate") && init.contains("NotYetInitialized"), "mongo-init initiates once: {init}");
    let redis = command_text(&services["redis"]["command"]);
    for flag in ["--maxmemory-policy noeviction", "--appendonly yes"] {
        assert!(redis.contains(flag), "redis runs with {flag}: {redis}");
    }
    for n in 1..=3 {
        let cmd = command_text(&services[&format!("redis-node-{n}")]["command"]);
        for flag in ["--cluster-enabled yes", "--maxmemory-policy noeviction", "--appendonly yes"] {
            assert!(cmd.contains(flag), "redis-node-{n} runs with {flag}: {cmd}");
        }
    }
    let create = command_text(&services["redis-cluster-create"]["command"]);
    assert!(create.contains("--cluster create") && create.contains("--cluster-yes"), "{create}");
    let mut ignored = Vec::new();
    for name in ["api-1", "api-2", "projector-1", "projector-2"] {
        let env = service_env(name, &services[name], &mut ignored);
        assert!(env.contains_key("CALLBOARD_REDIS_URL"), "{name} uses the one Redis");
    }
    for name in ["api-cluster-1", "api-cluster-2", "projector-cluster-1", "projector-cluster-2"] {
        let env = service_env(name, &services[name], &mut ignored);
        assert!(!env.contains_key("CALLBOARD_REDIS_URL"), "{name}: not both a node and a cluster");
        let nodes = env.get("CALLBOARD_REDIS_CLUSTER_NODES").map(|n| n.split(',').count());
        assert_eq!(nodes, Some(3), "{name} names the three cluster nodes");
    }
    // One partition count per deployment (per Redis).
    let mut partitions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, s) in services.iter().filter(|(_, s)| is_callboard(s)) {
        let env = service_env(name, s, &mut ignored);
        let redis = env.get("CALLBOARD_REDIS_URL").or_else(|| env.get("CALLBOARD_REDIS_CLUSTER_NODES"));
        if let Some(redis) = redis {
            let p = env.get("CALLBOARD_PROJECTOR_PARTITIONS").cloned().unwrap_or_else(|| "1".into());
            partitions.entry(redis.clone()).or_default().insert(p);
        }
    }
    for (redis, counts) in &partitions {
        assert_eq!(counts.len(), 1, "the processes on {redis} disagree on the partition count: {counts:?}");
    }

    // deploy/k8s
    let docs = k8s_docs();
    for (file, doc) in &docs {
        let (api, k) = (doc["apiVersion"].as_str().unwrap_or_default(), kind(doc));
        assert!(!api.is_empty() && !k.is_empty(), "{file}: an object without apiVersion or kind");
        if k != "Kustomization" {
            assert!(!name(doc).is_empty(), "{file}: {k} without metadata.name");
        }
    }
    let count = |k: &str| docs.iter().filter(|(_, d)| kind(d) == k).count();
    for k in ["Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"] {
        assert!(count(k) >= 1, "deploy/k8s has no {k}");
    }
    let deployments: Vec<&Yaml> = docs.iter().map(|(_, d)| d).filter(|d| kind(d) == "Deployment").collect();
    let (serve, project) = (by_command(&deployments, "serve"), by_command(&deployments, "project"));
    for d in &deployments {
        let template = &d["spec"]["template"];
        assert!(
            labels_match(&d["spec"]["selector"]["matchLabels"], &template["metadata"]["labels"]),
            "Deployment {}: its selector does not match its pods",
            name(d)
        );
        for c in template["spec"]["containers"].as_vec().into_iter().flatten() {
            let r = &c["resources"];
            assert!(
                scalar(&r["requests"]["memory"]).is_some() && scalar(&r["limits"]["memory"]).is_some(),
                "Deployment {}: memory requests and limits",
                name(d)
            );
        }
    }
    let grace = |d: &Yaml| d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30) as u64;
    assert!(grace(serve) >= api_grace, "serve: terminationGracePeriodSeconds < {api_grace} s (ADR 0007)");
    assert!(grace(project) >= projector_grace, "project: terminationGracePeriodSeconds < a lease TTL");
    let container = &serve["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let port_names: Vec<String> = container["ports"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if let Some(port) = container[probe]["httpGet"]["port"].as_str() {
            assert!(port_names.iter().any(|p| p == port), "{probe} names port {port}, which the container lacks");
        }
    }
    let serve_labels = &serve["spec"]["template"]["metadata"]["labels"];
    for (_, d) in &docs {
        match kind(d) {
            "Service" => {
                assert!(labels_match(&d["spec"]["selector"], serve_labels), "Service {} misses serve", name(d))
            }
            "PodDisruptionBudget" => assert!(
                deployments.iter().any(|dep| labels_match(
                    &d["spec"]["selector"]["matchLabels"],
                    &dep["spec"]["template"]["metadata"]["labels"]
                )),
                "PodDisruptionBudget {} selects no Deployment's pods",
                name(d)
            ),
            "HorizontalPodAutoscaler" => {
                assert_eq!(d["apiVersion"].as_str(), Some("autoscaling/v2"));
                let target = &d["spec"]["scaleTargetRef"];
                assert_eq!((target["kind"].as_str(), target["name"].as_str()), (Some("Deployment"), Some(name(serve))));
            }
            "Kustomization" => {
                for resource in strings(&d["resources"]) {
                    assert!(
                        deploy_dir().join("k8s").join(&resource).exists(),
                        "kustomization lists a missing {resource}"
                    );
                }
            }
            _ => {}
        }
    }

    // The Dockerfile copies only what exists and .dockerignore keeps.
    let ignored_paths: Vec<String> = read(&repo_dir().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    for line in read(&deploy_dir().join("Dockerfile")).lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        for source in &words[..words.len() - 1] {
            assert!(repo_dir().join(source).exists(), "Dockerfile copies {source}, which does not exist");
            let shadowed = ignored_paths.iter().find(|i| *source == i.as_str() || source.starts_with(&format!("{i}/")));
            assert!(shadowed.is_none(), "Dockerfile copies {source}, which .dockerignore leaves out");
        }
    }
}

#[test]
fn every_callboard_variable_deploy_sets_is_a_setting_and_loads() {
    // The check itself can fail: a misspelt name and a bad value.
    let typo = BTreeMap::from([("CALLBOARD_MONGO_URI".to_string(), "mongodb://x".to_string())]);
    assert!(!env_problems("typo", &typo).is_empty(), "a misspelt variable must be reported");
    let both = BTreeMap::from([
        ("CALLBOARD_REDIS_URL".to_string(), "redis://r:6379".to_string()),
        ("CALLBOARD_REDIS_CLUSTER_NODES".to_string(), "redis://a:6379".to_string()),
    ]);
    assert!(!env_problems("both", &both).is_empty(), "a node and a cluster together must be reported");
    assert!(interpolate("${CALLBOARD_JWT_SECRET}").is_err(), "a variable without a default has no value here");

    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, service) in services(&compose()) {
        let env = service_env(&name, &service, &mut problems);
        if is_callboard(&service) {
            problems.extend(env_problems(&format!("compose.yaml {name}"), &env));
            checked += 1;
        } else if let Some(var) = env.keys().find(|k| k.starts_with("CALLBOARD_")) {
            problems.push(format!("compose.yaml {name}: sets {var} but does not run callboard"));
        }
    }
    assert!(checked >= 9, "only {checked} callboard services in compose.yaml");

    let docs = k8s_docs();
    let (config_maps, secrets) = config_maps_and_secrets(&docs, &mut problems);
    for (what, maps) in [("ConfigMap", &config_maps), ("Secret", &secrets)] {
        for (map_name, vars) in maps {
            for var in vars.keys() {
                if !ENV_KEYS.iter().any(|(e, _)| *e == var.as_str()) {
                    problems.push(format!("{what} {map_name}: {var} is not a setting (callboard_settings::ENV_KEYS)"));
                }
            }
        }
    }
    for secret in secrets.values() {
        for var in ["CALLBOARD_JWT_SECRET", "CALLBOARD_ADMIN_JWT_SECRET", "CALLBOARD_MONGODB_URI"] {
            assert!(secret.contains_key(var), "the Secret holds {var}");
        }
    }
    let mut containers = 0;
    for (workload, pod) in workloads(&docs) {
        for c in pod["containers"].as_vec().into_iter().flatten() {
            let whose = format!("{} {}/{}", kind(workload), name(workload), c["name"].as_str().unwrap_or("?"));
            let env = container_env(&whose, c, &config_maps, &secrets, &mut problems);
            problems.extend(env_problems(&whose, &env));
            containers += 1;
        }
    }
    assert!(containers >= 2, "only {containers} containers in deploy/k8s");
    assert!(problems.is_empty(), "deploy/ sets variables callboard does not accept:\n{}", problems.join("\n"));
}

/// Whether `/metrics` has a sample of `name` now.
async fn exported(app: &TestApp, name: &str) -> bool {
    app.metrics().await.lines().any(|l| l.starts_with(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_name_is_exported() {
    let mut dashboard = Vec::new();
    let json: Value = serde_json::from_str(&read(&deploy_dir().join("grafana/callboard.json")))
        .expect("deploy/grafana/callboard.json is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()), "the dashboard has panels");
    dashboard_exprs(&json, &mut dashboard);
    let dashboard_names: BTreeSet<String> = dashboard.iter().flat_map(|e| metric_names(e.as_str())).collect();
    let rules = alert_rules();
    for rule in &rules {
        let alert = rule["alert"].as_str().or_else(|| rule["record"].as_str()).unwrap_or("?").to_string();
        assert!(rule["expr"].as_str().is_some(), "rule {alert} has no expr");
        if rule["alert"].as_str().is_some() {
            assert!(rule["labels"]["severity"].as_str().is_some(), "alert {alert} has no severity");
            assert!(rule["annotations"]["summary"].as_str().is_some(), "alert {alert} has no summary");
        }
    }
    let alert_names: BTreeSet<String> =
        rules.iter().filter_map(|r| r["expr"].as_str()).flat_map(metric_names).collect();
    assert!(dashboard_names.len() >= 15, "the dashboard names only {dashboard_names:?}");
    assert!(alert_names.len() >= 8, "the alerts name only {alert_names:?}");

    // A real API (and a projector, so that its figures in Redis are real),
    // with one live slot and no queue, so that a herd is refused.
    let mut app = spawn_app_configured(Services::start().expect("start Redis and MongoDB"), |s| {
        s.query.max_live_concurrency = 1;
        s.query.live_queue_wait_ms = 0;
    })
    .await;
    let ds = generate(11, 300);
    app.insert_dataset(&ds).await;
    app.start_projector();
    // A cold request (a miss, which queues a warm), then hits.
    let fields: &[(&str, &str)] = &[("limit", "5")];
    app.grouped(1, fields).await;
    let (hit, _, _) = app.wait_for_projection(1, fields, Duration::from_secs(30)).await;
    assert!(hit, "tenant 1 was never served from the cache");
    // Read-your-writes: an instant the watermark cannot cover yet.
    let token = app.token(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exported(&app, "callboard_freshness_wait_seconds_count").await {
        assert!(Instant::now() < deadline, "no min_as_of request ever waited for the projector");
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        let min_as_of = (now_ms + 300).to_string();
        let r = app.post_grouped_form(Some(&token), &[("limit", "5"), ("min_as_of", min_as_of.as_str())]).await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}");
    }
    // Live queries with different parameters at once: one slot, no queue.
    let admin = app.admin_token(1);
    let mut herds = 0;
    while !exported(&app, "callboard_live_rejected_total").await {
        herds += 1;
        assert!(herds <= 10, "10 herds of live queries on one slot, and none was refused");
        let herd: Vec<_> = (1..=16)
            .map(|limit| {
                let (client, url, admin) = (app.client.clone(), app.grouped_url(), admin.clone());
                tokio::spawn(async move {
                    let r = client
                        .post(url)
                        .bearer_auth(admin)
                        .header("Cache-Control", "no-cache")
                        .form(&[("limit", limit.to_string())])
                        .send()
                        .await
                        .expect("request sent");
                    r.status().as_u16()
                })
            })
            .collect();
        for r in herd {
            let status = r.await.expect("a request task");
            assert!(status == 200 || status == 503, "a live answer or database_busy, not {status}");
        }
    }

    let scrape = Scrape::parse(&app.metrics().await);
    // The check itself can fail.
    assert!(!scrape.exports("callboard_projection_lag_msec"), "a misspelt metric must be missing");
    assert!(!scrape.exports("callboard_projection_lag_ms_count"), "only histograms have _count");
    let missing_dashboard = scrape.missing(&dashboard_names);
    let missing_alerts = scrape.missing(&alert_names);
    assert!(
        missing_dashboard.is_empty() && missing_alerts.is_empty(),
        "metrics not exported by /metrics: dashboard {missing_dashboard:?}, alerts {missing_alerts:?}\nexported: {:?}",
        scrape.families.keys().collect::<Vec<_>>()
    );

    // The probes' paths, and the image's HEALTHCHECK's, answer 200.
    let docs = k8s_docs();
    let mut paths = BTreeSet::new();
    for (_, pod) in workloads(&docs) {
        for c in pod["containers"].as_vec().into_iter().flatten() {
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                if let Some(path) = c[probe]["httpGet"]["path"].as_str() {
                    paths.insert(path.to_string());
                }
            }
        }
    }
    let healthcheck = read(&deploy_dir().join("healthcheck.sh"));
    let hc_path = healthcheck
        .split("GET ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("healthcheck.sh sends a GET");
    paths.insert(hc_path.to_string());
    assert!(paths.contains("/readyz") && paths.contains("/healthz"), "{paths:?}");
    for path in &paths {
        let r = app.client.get(format!("{}{path}", app.address)).send().await.expect("probe sent");
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    app.stop().await;
}
