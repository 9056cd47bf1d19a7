//! Configuration: layer order, every invalid case reported at once, `config check` exit codes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tasker::config::{self, ConfigSources, DeploymentMode};

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn sources(dir: &Path, env: &str, vars: &[(&str, &str)]) -> ConfigSources {
    ConfigSources {
        config_dir: dir.to_path_buf(),
        environment: env.into(),
        env_vars: Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        overrides: Vec::new(),
        builtin_defaults: false,
    }
}

fn fixture() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "base/orchestration.toml",
        "[orchestration.deployment]\nmode = \"Hybrid\"\n[orchestration.task_readiness]\nfallback_polling_interval_seconds = 30\nage_threshold_seconds = 5\nbatch_size = 50\n",
    );
    write(
        d.path(),
        "environments/development/orchestration.toml",
        "[orchestration.task_readiness]\nbatch_size = 70\n",
    );
    write(
        d.path(),
        "environments/test/orchestration.toml",
        "[orchestration.task_readiness]\nbatch_size = 80\nage_threshold_seconds = 2\n",
    );
    d
}

#[test]
fn repository_config_is_valid_in_every_environment_but_production_without_tokens_and_url() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tasker");
    for env in ["development", "test"] {
        let loaded =
            config::load(&sources(&dir, env, &[])).unwrap_or_else(|e| panic!("{env}: {e}"));
        assert_eq!(
            loaded.config.orchestration.deployment.mode,
            DeploymentMode::Hybrid
        );
    }
    let base = config::load(&sources(&dir, "test", &[])).unwrap();
    assert_eq!(base.config.orchestration.task_readiness.batch_size, 50);
    // production names both what it lacks: tokens, and a database it was told to use (it
    // never falls back to whatever answers on 127.0.0.1:5432)
    let e = config::load(&sources(&dir, "production", &[])).unwrap_err();
    let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["database.url", "grpc.auth.tokens"], "{e}");
    assert!(e.to_string().contains("database.require_url"), "{e}");
    let token = format!(
        "[{{name = \"ci\", sha256 = \"{}\", scopes = [\"read\"]}}]",
        "a".repeat(64)
    );
    let ok = config::load(&sources(
        &dir,
        "production",
        &[
            ("TASKER_GRPC__AUTH__TOKENS", &token),
            ("DATABASE_URL", "postgres://tasker@db.internal/tasker"),
        ],
    ));
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn layers_merge_in_order_base_overlay_env_override() {
    let d = fixture();
    let c = config::load(&sources(d.path(), "development", &[])).unwrap();
    assert_eq!(
        c.config.orchestration.task_readiness.batch_size, 70,
        "overlay beats base"
    );
    assert_eq!(
        c.config.orchestration.task_readiness.age_threshold,
        Duration::from_secs(5),
        "base kept where overlay is silent"
    );
    assert_eq!(
        c.sources["orchestration.task_readiness.batch_size"],
        d.path()
            .join("environments/development/orchestration.toml")
            .display()
            .to_string()
    );

    let c = config::load(&sources(
        d.path(),
        "test",
        &[("TASKER_ORCHESTRATION__TASK_READINESS__BATCH_SIZE", "90")],
    ))
    .unwrap();
    assert_eq!(
        c.config.orchestration.task_readiness.batch_size, 90,
        "env beats overlay"
    );
    assert_eq!(
        c.config.orchestration.task_readiness.age_threshold,
        Duration::from_secs(2)
    );
    assert_eq!(
        c.sources["orchestration.task_readiness.batch_size"],
        "environment variable TASKER_ORCHESTRATION__TASK_READINESS__BATCH_SIZE"
    );

    let s = sources(
        d.path(),
        "test",
        &[
            ("TASKER_ORCHESTRATION__DEPLOYMENT__MODE", "PollingOnly"),
            (
                "TASKER_ORCHESTRATION__TASK_READINESS__FALLBACK_POLLING_INTERVAL_SECONDS",
                "3",
            ),
            ("DATABASE_URL", "postgres://u:secret@db/x"),
            ("TASKER_ENV", "ignored-not-a-setting"),
        ],
    )
    .with_override("orchestration.deployment.mode", "EventDrivenOnly");
    let c = config::load(&s).unwrap();
    assert_eq!(
        c.config.orchestration.deployment.mode,
        DeploymentMode::EventDrivenOnly,
        "flag beats env"
    );
    assert_eq!(
        c.config
            .orchestration
            .task_readiness
            .fallback_polling_interval,
        Duration::from_secs(3)
    );
    assert_eq!(
        c.config.database.url.as_deref(),
        Some("postgres://u:secret@db/x")
    );
    let shown = c.config.render(&c.sources);
    assert!(shown.contains("postgres://u:<redacted>@db/x"), "{shown}");
    assert!(!shown.contains("secret"));

    let s = sources(
        d.path(),
        "test",
        &[
            ("DATABASE_URL", "postgres://a@h/one"),
            ("TASKER_DATABASE__URL", "postgres://b@h/two"),
        ],
    );
    assert_eq!(
        config::load(&s).unwrap().config.database.url.as_deref(),
        Some("postgres://b@h/two")
    );
}

#[test]
fn every_invalid_value_is_reported_at_once() {
    let d = fixture();
    write(
        d.path(),
        "environments/test/bad.toml",
        "[orchestration.deployment]\nmode = \"Hibrid\"\nenabled = true\n[orchestration.task_readiness]\nfallback_polling_interval_seconds = 0\n",
    );
    let e = config::load(&sources(
        d.path(),
        "test",
        &[
            (
                "TASKER_ORCHESTRATION__TASK_READINESS__AGE_THRESHOLD_SECONDS",
                "-5",
            ),
            ("TASKER_ORCHESTRATION__TASK_READINESS__BATCH_SIZE", "0"),
            ("TASKER_ORCHESTRATION__REPLICAS__ANNOUNCE_GRACE_MS", "5000"),
            ("TASKER_GRPC__BIND", "not-an-address"),
            ("TASKER_TELEMETRY__SAMPLE_RATIO", "\"lots\""),
            (
                "TASKER_ORCHESTRATION__TASK_READINESS__NAMESPACES",
                "[\"ok\", \"Not OK\"]",
            ),
        ],
    ))
    .unwrap_err();
    let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
    for expected in [
        "orchestration.deployment.mode",
        "orchestration.deployment.enabled",
        "orchestration.task_readiness.fallback_polling_interval_seconds",
        "orchestration.task_readiness.age_threshold_seconds",
        "orchestration.task_readiness.batch_size",
        "orchestration.replicas.announce_grace_ms",
        "grpc.bind",
        "telemetry.sample_ratio",
        "orchestration.task_readiness.namespaces[1]",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
    let text = e.to_string();
    assert!(
        text.contains("Hibrid") && text.contains("EventDrivenOnly"),
        "{text}"
    );
    assert!(text.contains("bad.toml"), "names the file: {text}");
    assert!(text.contains("unknown key"), "{text}");
}

/// Tokens on a non-loopback address need TLS, unless plaintext is allowed explicitly (a
/// TLS-terminating proxy in front).
#[test]
fn tokens_do_not_cross_a_network_in_cleartext() {
    let d = fixture();
    let token = format!(
        "[{{name = \"ci\", sha256 = \"{}\", scopes = [\"read\"]}}]",
        "a".repeat(64)
    );
    let open_bind = [
        ("TASKER_GRPC__BIND", "0.0.0.0:50051"),
        ("TASKER_GRPC__AUTH__TOKENS", token.as_str()),
    ];
    let e = config::load(&sources(d.path(), "test", &open_bind)).unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert_eq!(e.problems[0].key, "grpc.tls");
    assert!(e.to_string().contains("allow_plaintext"), "{e}");

    let mut allowed = open_bind.to_vec();
    allowed.push(("TASKER_GRPC__TLS__ALLOW_PLAINTEXT", "true"));
    assert!(config::load(&sources(d.path(), "test", &allowed)).is_ok());
    let mut with_tls = open_bind.to_vec();
    with_tls.push(("TASKER_GRPC__TLS__CERT_PATH", "\"/etc/tasker/cert.pem\""));
    with_tls.push(("TASKER_GRPC__TLS__KEY_PATH", "\"/etc/tasker/key.pem\""));
    assert!(config::load(&sources(d.path(), "test", &with_tls)).is_ok());
    // loopback stays plaintext without a word
    let loopback = [("TASKER_GRPC__AUTH__TOKENS", token.as_str())];
    assert!(config::load(&sources(d.path(), "test", &loopback)).is_ok());
}

/// The SHA-256 of the empty string would admit `authorization: Bearer ` with nothing after it.
#[test]
fn the_hash_of_an_empty_token_is_refused() {
    let d = fixture();
    let token = format!(
        "[{{name = \"ci\", sha256 = \"{}\", scopes = [\"read\"]}}]",
        tasker::hash_token("").to_uppercase()
    );
    let e = config::load(&sources(
        d.path(),
        "test",
        &[("TASKER_GRPC__AUTH__TOKENS", token.as_str())],
    ))
    .unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert_eq!(e.problems[0].key, "grpc.auth.tokens[0].sha256");
    assert!(e.to_string().contains("empty string"), "{e}");
}

#[test]
fn deployment_mode_parses_canonical_and_snake_case() {
    assert_eq!(
        "Hybrid".parse::<DeploymentMode>().unwrap(),
        DeploymentMode::Hybrid
    );
    assert_eq!(
        "event_driven_only".parse::<DeploymentMode>().unwrap(),
        DeploymentMode::EventDrivenOnly
    );
    assert_eq!(
        "POLLING_ONLY".parse::<DeploymentMode>().unwrap(),
        DeploymentMode::PollingOnly
    );
    assert!("Hibrid".parse::<DeploymentMode>().is_err());
}

#[test]
fn config_check_exit_codes() {
    let d = fixture();
    let run = |vars: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasker"));
        cmd.args(["config", "check"])
            .env("TASKER_CONFIG_DIR", d.path())
            .env("TASKER_ENV", "test");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let ok = run(&[]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run(&[
        ("TASKER_ORCHESTRATION__DEPLOYMENT__MODE", "Hibrid"),
        ("TASKER_ORCHESTRATION__TASK_READINESS__BATCH_SIZE", "0"),
    ]);
    assert_eq!(bad.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("2 problem(s)")
            && stderr.contains("Hibrid")
            && stderr.contains("batch_size"),
        "{stderr}"
    );
}

#[test]
fn a_tasker_variable_that_is_no_setting_is_reported_with_what_it_meant() {
    let d = fixture();
    let e = config::load(&sources(
        d.path(),
        "test",
        &[
            ("TASKER_DATABASE_URL", "postgres://x@h/db"),
            ("TASKER_ENV", "test"),
            ("TASKER_TOKEN", "secret"),
        ],
    ))
    .unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert_eq!(e.problems[0].key, "TASKER_DATABASE_URL");
    assert!(
        e.problems[0]
            .message
            .contains("did you mean TASKER_DATABASE__URL?"),
        "{e}"
    );
}

#[test]
fn durations_and_addresses_are_typed_when_read() {
    let d = fixture();
    let c = config::load(&sources(
        d.path(),
        "test",
        &[
            ("TASKER_GRPC__MAX_FETCH_WAIT_MS", "1500"),
            ("TASKER_GRPC__BIND", "\"127.0.0.1:7000\""),
            ("TASKER_TELEMETRY__LOG_FORMAT", "json"),
        ],
    ))
    .unwrap();
    assert_eq!(c.config.grpc.max_fetch_wait, Duration::from_millis(1500));
    assert_eq!(c.config.grpc.bind, "127.0.0.1:7000".parse().unwrap());
    assert_eq!(c.config.telemetry.log_format, config::LogFormat::Json);
    let e = config::load(&sources(
        d.path(),
        "test",
        &[
            ("TASKER_GRPC__MAX_FETCH_WAIT_MS", "1.5"),
            ("TASKER_TELEMETRY__LOG_FORMAT", "xml"),
        ],
    ))
    .unwrap_err();
    let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["grpc.max_fetch_wait_ms", "telemetry.log_format"],
        "{e}"
    );
}

/// A binary started outside the repository does not run on the defaults unnoticed: with no
/// configuration directory found (./config/tasker, then /etc/tasker), a directory that does not
/// exist, or an environment with no overlay, `config check` exits 64 naming the problem; the
/// compiled defaults run only when asked for (--builtin-defaults), and only as development.
#[test]
fn a_missing_configuration_directory_or_environment_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let check = |args: &[&str], vars: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasker"));
        cmd.args(["config", "check"])
            .args(args)
            .current_dir(outside.path())
            .env_remove("TASKER_CONFIG_DIR")
            .env_remove("TASKER_ENV")
            .env_remove("DATABASE_URL");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    if Path::new("/etc/tasker").exists() {
        eprintln!("/etc/tasker exists here: the default lookup finds it; that case is skipped");
    } else {
        let (code, out) = check(&[], &[("TASKER_ENV", "production")]);
        assert_eq!(code, Some(64), "{out}");
        assert!(
            out.contains("config/tasker") && out.contains("/etc/tasker"),
            "{out}"
        );
    }
    let (code, out) = check(&["--config-dir", "/nonexistent"], &[]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("/nonexistent"), "{out}");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tasker");
    let (code, out) = check(&["--config-dir", repo, "--env", "nosuchenv"], &[]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("unknown environment \"nosuchenv\""), "{out}");
    // the repository's directory, found through TASKER_CONFIG_DIR from anywhere
    let (code, out) = check(&[], &[("TASKER_CONFIG_DIR", repo), ("TASKER_ENV", "test")]);
    assert_eq!(code, Some(0), "{out}");
    // the defaults, asked for
    let (code, out) = check(&["--builtin-defaults"], &[]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check(&["--builtin-defaults", "--env", "production"], &[]);
    assert_eq!(code, Some(64), "{out}");
}

/// The token list docs/operations.md shows, as JSON in the environment, is taken (it failed: "invalid
/// type: string, expected a sequence"); TOML inline tables still work.
#[test]
fn tokens_from_the_environment_as_json_as_the_operations_guide_shows() {
    let d = fixture();
    let sha = "b".repeat(64);
    let json = format!(r#"[{{"name":"ci","sha256":"{sha}","scopes":["read","write"]}}]"#);
    let c = config::load(&sources(
        d.path(),
        "test",
        &[("TASKER_GRPC__AUTH__TOKENS", json.as_str())],
    ))
    .unwrap();
    let t = &c.config.grpc.auth.tokens[0];
    assert_eq!(
        (t.name.as_str(), t.sha256.as_str(), t.scopes.clone()),
        (
            "ci",
            sha.as_str(),
            vec!["read".to_string(), "write".to_string()]
        )
    );
    let toml = format!(r#"[{{name = "ci", sha256 = "{sha}", scopes = ["read"]}}]"#);
    assert!(config::load(&sources(
        d.path(),
        "test",
        &[("TASKER_GRPC__AUTH__TOKENS", toml.as_str())],
    ))
    .is_ok());
}

/// Every leaf of a JSON tree as (dotted key, value).
fn leaves(value: &serde_json::Value, path: &str, out: &mut Vec<(String, serde_json::Value)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(v, &key, out);
            }
        }
        leaf => out.push((path.to_string(), leaf.clone())),
    }
}

/// `config/tasker/base/*.toml` documents the defaults: it must say exactly what the compiled
/// defaults say, key for key and value for value, or a reader is misled (and a service started
/// with `--builtin-defaults` behaves unlike one started from the files).
#[test]
fn the_base_files_say_what_the_compiled_defaults_say() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tasker/base");
    let mut files = serde_json::Map::new();
    let mut paths: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let table: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let serde_json::Value::Object(map) = serde_json::to_value(table).unwrap() else {
            unreachable!()
        };
        for (section, value) in map {
            assert!(
                files.insert(section.clone(), value).is_none(),
                "[{section}] is in more than one file"
            );
        }
    }
    let (mut said, mut compiled) = (Vec::new(), Vec::new());
    leaves(&serde_json::Value::Object(files), "", &mut said);
    leaves(
        &serde_json::to_value(config::TaskerConfig::default()).unwrap(),
        "",
        &mut compiled,
    );
    let said: std::collections::BTreeMap<_, _> = said.into_iter().collect();
    let compiled: std::collections::BTreeMap<_, _> = compiled.into_iter().collect();
    let same = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    };
    let mut differences = Vec::new();
    for (key, value) in &compiled {
        match said.get(key) {
            None => differences.push(format!("{key}: the files do not say (default {value})")),
            Some(v) if !same(v, value) => {
                differences.push(format!("{key}: the files say {v}, the default is {value}"))
            }
            Some(_) => {}
        }
    }
    for key in said.keys().filter(|k| !compiled.contains_key(*k)) {
        differences.push(format!("{key}: in the files, but no setting"));
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
