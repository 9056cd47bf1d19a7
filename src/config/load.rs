//! Loading: the layers (compiled defaults, the base files, the environment's overlay,
//! `DATABASE_URL`, `TASKER_*` variables, flags) merged, every leaf checked on its own against
//! the defaults' shape, then every section's rules ([`TaskerConfig::validate`]); and rendering
//! the result for `tasker config show`, secrets redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde_json::Value;

use super::TaskerConfig;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `orchestration.deployment.mode`.
    pub key: String,
    pub message: String,
    /// Where the value came from (file path, environment variable, flag), when known.
    pub source: Option<String>,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        Ok(())
    }
}

/// Every problem found, listed at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Where configuration comes from: the config directory, the environment name, the process
/// environment (injectable for tests) and command-line overrides (dotted key -> value).
#[derive(Debug, Clone)]
pub struct ConfigSources {
    /// Must exist, with `environments/<environment>`: a service started where its
    /// configuration is not must not run on the defaults unnoticed.
    pub config_dir: PathBuf,
    pub environment: String,
    /// Read from the process environment when `None`.
    pub env_vars: Option<Vec<(String, String)>>,
    pub overrides: Vec<(String, Value)>,
    /// Asked for explicitly (`--builtin-defaults`): the compiled defaults, the environment
    /// variables and the overrides, with no configuration directory (environment
    /// `development` only: the other environments are overlays in a directory).
    pub builtin_defaults: bool,
}

/// Where the configuration is looked for when neither `--config-dir` nor `TASKER_CONFIG_DIR`
/// says: the working directory's `config/tasker` (a checkout), then the installed one.
pub const CONFIG_DIRS: [&str; 2] = ["config/tasker", "/etc/tasker"];

impl ConfigSources {
    /// `TASKER_CONFIG_DIR`, else the first of [`CONFIG_DIRS`] that exists (else the first, to
    /// be reported missing); `TASKER_ENV` (default `development`).
    pub fn from_process_env() -> Self {
        let config_dir = std::env::var_os("TASKER_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let found = CONFIG_DIRS.iter().map(PathBuf::from).find(|d| d.is_dir());
                found.unwrap_or_else(|| PathBuf::from(CONFIG_DIRS[0]))
            });
        Self {
            config_dir,
            environment: std::env::var("TASKER_ENV").unwrap_or_else(|_| "development".into()),
            env_vars: None,
            overrides: Vec::new(),
            builtin_defaults: false,
        }
    }

    pub fn with_override(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.overrides.push((key.to_string(), value.into()));
        self
    }
}

/// A validated configuration plus, for `config show`, where each value came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: TaskerConfig,
    pub environment: String,
    /// dotted key -> source description, for every key set by some layer above the defaults.
    pub sources: BTreeMap<String, String>,
}

/// Build, check and return the configuration, or every problem with it.
pub fn load(sources: &ConfigSources) -> Result<LoadedConfig, ConfigError> {
    let mut problems = Vec::new();
    let figment = build_figment(sources, &mut problems);

    let merged: Value = figment.extract().unwrap_or_else(|e| {
        problems.push(ConfigProblem {
            key: e.path.join("."),
            message: e.kind.to_string(),
            source: e.metadata.as_ref().map(|m| m.name.to_string()),
        });
        Value::Object(Default::default())
    });
    let defaults = serde_json::to_value(TaskerConfig::default()).expect("defaults serialize");

    // Walk the merged tree against the defaults' shape: drop unknown keys, and test every leaf
    // on its own so that one bad value never hides the next.
    let mut sanitized = defaults.clone();
    let mut sourced = BTreeMap::new();
    check_tree(
        &figment,
        &defaults,
        &merged,
        &mut Vec::new(),
        &mut sanitized,
        &mut sourced,
        &mut problems,
    );

    let config: TaskerConfig = match serde_json::from_value(sanitized) {
        Ok(c) => c,
        Err(e) => {
            problems.push(ConfigProblem {
                key: "(configuration)".into(),
                message: e.to_string(),
                source: None,
            });
            TaskerConfig::default()
        }
    };
    for (key, message) in config.validate(&sources.environment) {
        let source = sourced.get(&key).cloned();
        problems.push(ConfigProblem {
            key,
            message,
            source,
        });
    }
    if problems.is_empty() {
        Ok(LoadedConfig {
            config,
            environment: sources.environment.clone(),
            sources: sourced,
        })
    } else {
        Err(ConfigError { problems })
    }
}

fn build_figment(sources: &ConfigSources, problems: &mut Vec<ConfigProblem>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(TaskerConfig::default()));
    if sources.builtin_defaults {
        if sources.environment != "development" {
            problems.push(ConfigProblem {
                key: "TASKER_ENV".into(),
                message: format!(
                    "environment {:?} is an overlay in a configuration directory, and --builtin-defaults uses none: give the directory (--config-dir, TASKER_CONFIG_DIR), or run environment development",
                    sources.environment
                ),
                source: Some("environment variable TASKER_ENV or --env".into()),
            });
        }
    } else if !sources.config_dir.is_dir() {
        problems.push(ConfigProblem {
            key: "TASKER_CONFIG_DIR".into(),
            message: format!(
                "configuration directory {} does not exist (without --config-dir or TASKER_CONFIG_DIR, Tasker looks for {}); give the directory, or pass --builtin-defaults to run on the compiled defaults",
                sources.config_dir.display(),
                CONFIG_DIRS.join(", then ")
            ),
            source: Some("--config-dir, TASKER_CONFIG_DIR or the working directory".into()),
        });
    } else {
        let base = sources.config_dir.join("base");
        for file in toml_files(&base) {
            figment = figment.merge(Toml::file_exact(file));
        }
        let env_dir = sources
            .config_dir
            .join("environments")
            .join(&sources.environment);
        if !env_dir.is_dir() {
            problems.push(ConfigProblem {
                key: "TASKER_ENV".into(),
                message: format!(
                    "unknown environment {:?}: no directory {}",
                    sources.environment,
                    env_dir.display()
                ),
                source: Some("environment variable TASKER_ENV or --env".into()),
            });
        }
        for file in toml_files(&env_dir) {
            figment = figment.merge(Toml::file_exact(file));
        }
    }
    let vars: Vec<(String, String)> = sources
        .env_vars
        .clone()
        .unwrap_or_else(|| std::env::vars().collect());
    if let Some((_, v)) = vars.iter().find(|(k, _)| k == "DATABASE_URL") {
        figment = figment.merge(Layer::new(
            "environment variable DATABASE_URL",
            "database.url",
            Value::String(v.clone()),
        ));
    }
    for (k, v) in &vars {
        let Some(rest) = k.strip_prefix("TASKER_") else {
            continue;
        };
        if rest.contains("__") {
            let key = rest.to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(Layer::new(
                &format!("environment variable {k}"),
                &key,
                parse_env_value(v),
            ));
        } else if !PROCESS_VARIABLES.contains(&k.as_str()) {
            problems.push(ConfigProblem {
                key: k.clone(),
                message: format!(
                    "not a setting: settings are TASKER_<SECTION>__<KEY> with `__` between levels{}; the process's own variables are {}",
                    meant_setting(rest)
                        .map(|s| format!(" (did you mean {s}?)"))
                        .unwrap_or_default(),
                    PROCESS_VARIABLES.join(", ")
                ),
                source: Some(format!("environment variable {k}")),
            });
        }
    }
    for (key, value) in &sources.overrides {
        figment = figment.merge(Layer::new(
            &format!("command-line override of {key}"),
            key,
            value.clone(),
        ));
    }
    figment
}

/// `TASKER_` variables that belong to the process (the binary's flags read them), not to the
/// configuration.
pub const PROCESS_VARIABLES: [&str; 5] = [
    "TASKER_ENV",
    "TASKER_CONFIG_DIR",
    "TASKER_ENDPOINT",
    "TASKER_TOKEN",
    "TASKER_CA_CERT",
];

/// For a variable written with single underscores (`DATABASE_URL`), the `__` spelling of a
/// setting it matches (`TASKER_DATABASE__URL`), if any.
fn meant_setting(rest: &str) -> Option<String> {
    let defaults = serde_json::to_value(TaskerConfig::default()).ok()?;
    let lower = rest.to_ascii_lowercase();
    let mut found = None;
    walk_leaves(&defaults, &mut Vec::new(), &mut |path| {
        if path.join("_") == lower {
            found = Some(format!("TASKER_{}", path.join("__").to_ascii_uppercase()));
        }
    });
    found
}

fn walk_leaves(value: &Value, path: &mut Vec<String>, f: &mut impl FnMut(&[String])) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(k.clone());
                walk_leaves(v, path, f);
                path.pop();
            }
        }
        _ => f(path),
    }
}

/// One value at a dotted key, named after where it came from so `config show` and error
/// messages can say "from environment variable TASKER_...".
struct Layer {
    name: String,
    inner: Serialized<Value>,
}

impl Layer {
    fn new(name: &str, key: &str, value: Value) -> Self {
        Self {
            name: name.to_string(),
            inner: Serialized::default(key, value),
        }
    }
}

impl figment::Provider for Layer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name.clone())
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.inner.data()
    }
}

/// Environment values are typed the way figment's `Env` types them: a number, a boolean or
/// a TOML array/table when the text parses as one, otherwise a string. A JSON array or object
/// is taken as JSON (`TASKER_GRPC__AUTH__TOKENS='[{"name": "ci", ...}]'`), since that is what
/// people write in environment variables; TOML inline tables work too.
fn parse_env_value(raw: &str) -> Value {
    let trimmed = raw.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<Value>(raw) {
            return v;
        }
    }
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(table) => table
            .get("v")
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn source_of(figment: &Figment, path: &[String]) -> Option<String> {
    let key = path.join(".");
    let meta = figment.find_metadata(&key)?;
    let name = meta.name.to_string();
    Some(match &meta.source {
        Some(figment::Source::File(p)) => p.display().to_string(),
        // the compiled defaults (`Serialized::defaults`) are not a source worth naming
        Some(figment::Source::Code(_)) => return None,
        Some(other) => format!("{name} {other}"),
        None => name,
    })
}

fn check_tree(
    figment: &Figment,
    default: &Value,
    merged: &Value,
    path: &mut Vec<String>,
    sanitized: &mut Value,
    sourced: &mut BTreeMap<String, String>,
    problems: &mut Vec<ConfigProblem>,
) {
    match (default, merged) {
        (Value::Object(dmap), Value::Object(mmap)) => {
            for (k, mv) in mmap {
                path.push(k.clone());
                match dmap.get(k) {
                    None => problems.push(ConfigProblem {
                        key: path.join("."),
                        message: format!(
                            "unknown key; known keys here: {}",
                            dmap.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                        source: source_of(figment, path),
                    }),
                    Some(dv) => {
                        let slot = sanitized
                            .as_object_mut()
                            .and_then(|o| o.get_mut(k))
                            .expect("sanitized mirrors defaults");
                        check_tree(figment, dv, mv, path, slot, sourced, problems);
                    }
                }
                path.pop();
            }
        }
        (Value::Object(_), other) => problems.push(ConfigProblem {
            key: path.join("."),
            message: format!("expected a table, found {}", kind(other)),
            source: source_of(figment, path),
        }),
        (_, mv) => {
            // A leaf: accept it only if the whole config deserializes with this value in place.
            let mut probe =
                serde_json::to_value(TaskerConfig::default()).expect("defaults serialize");
            set_path(&mut probe, path, mv.clone());
            match serde_json::from_value::<TaskerConfig>(probe) {
                Ok(_) => {
                    *sanitized = mv.clone();
                    if let Some(src) = source_of(figment, path) {
                        sourced.insert(path.join("."), src);
                    }
                }
                Err(e) => problems.push(ConfigProblem {
                    key: path.join("."),
                    message: leaf_message(mv, &e.to_string()),
                    source: source_of(figment, path),
                }),
            }
        }
    }
}

fn leaf_message(value: &Value, serde_message: &str) -> String {
    // serde's "unknown variant `Hibrid`, expected one of ..." is already clear; strip the
    // position suffix that refers to the probe document, not the user's file.
    let trimmed = serde_message
        .split(" at line ")
        .next()
        .unwrap_or(serde_message);
    format!("invalid value {value}: {trimmed}")
}

fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut cur = root;
    for (i, k) in path.iter().enumerate() {
        let obj = cur.as_object_mut().expect("path follows defaults");
        if i == path.len() - 1 {
            obj.insert(k.clone(), value);
            return;
        }
        cur = obj.get_mut(k).expect("path follows defaults");
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

impl TaskerConfig {
    /// The merged configuration as TOML-like text with secrets redacted; each value set by a
    /// layer above the compiled defaults is annotated with that layer.
    pub fn render(&self, sources: &BTreeMap<String, String>) -> String {
        let mut value = serde_json::to_value(self).expect("config serializes");
        redact(&mut value);
        let mut out = String::new();
        render_table(&value, &mut Vec::new(), sources, &mut out);
        out
    }
}

fn redact(value: &mut Value) {
    if let Some(url) = value
        .pointer_mut("/database/url")
        .and_then(|v| v.as_str().map(str::to_string))
    {
        *value.pointer_mut("/database/url").expect("present") = Value::String(redact_url(&url));
    }
    if let Some(tokens) = value
        .pointer_mut("/grpc/auth/tokens")
        .and_then(Value::as_array_mut)
    {
        for t in tokens {
            if let Some(h) = t.get_mut("sha256") {
                *h = Value::String("<redacted>".into());
            }
        }
    }
}

/// A URL with its secrets replaced: the password in the userinfo
/// (`postgres://user:secret@host/db` -> `postgres://user:<redacted>@host/db`) and any
/// `password`, `sslpassword` or `passfile`-like query parameter.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=<redacted>")
                    }
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

fn render_table(
    value: &Value,
    path: &mut Vec<String>,
    sources: &BTreeMap<String, String>,
    out: &mut String,
) {
    let Value::Object(map) = value else { return };
    let (tables, leaves): (Vec<_>, Vec<_>) = map.iter().partition(|(_, v)| v.is_object());
    if !leaves.is_empty() && !path.is_empty() {
        out.push_str(&format!("\n[{}]\n", path.join(".")));
    }
    for (k, v) in leaves {
        path.push(k.clone());
        let key = path.join(".");
        let rendered = toml::Value::try_from(v)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| v.to_string());
        match sources.get(&key) {
            Some(src) => out.push_str(&format!("{k} = {rendered}  # {src}\n")),
            None => out.push_str(&format!("{k} = {rendered}\n")),
        }
        path.pop();
    }
    for (k, v) in tables {
        path.push(k.clone());
        render_table(v, path, sources, out);
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:<redacted>@h:5432/db"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=secret&sslmode=require"),
            "postgres://u@h/db?password=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db?sslpassword=x"),
            "postgres://u:<redacted>@h/db?sslpassword=<redacted>"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
