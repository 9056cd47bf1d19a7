//! The `tasker` command line: parses arguments and calls the library.
//!
//! Layout of this binary: `main.rs` (the command line), `ctl` (the gRPC client for operators
//! and CI), `bench` (the benchmark). The service itself is the library (`tasker::App`); these
//! sit outside it and use it as any other program would (the benchmark also drives the
//! service's internals for its in-process floor).

mod bench;
mod ctl;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tasker::config::{self, ConfigSources, EXIT_CONFIG};
use tasker::internal::{resolve_database, Store};

#[derive(Parser)]
#[command(
    name = "tasker",
    version,
    about = "Event-driven workflow orchestration on PostgreSQL"
)]
struct Cli {
    /// Configuration directory holding base/ and environments/.
    #[arg(
        long,
        global = true,
        env = "TASKER_CONFIG_DIR",
        default_value = "config/tasker"
    )]
    config_dir: std::path::PathBuf,
    /// Environment overlay: config/tasker/environments/<ENV>.
    #[arg(
        long = "env",
        global = true,
        env = "TASKER_ENV",
        default_value = "development"
    )]
    environment: String,
    /// Database URL (overrides database.url and DATABASE_URL).
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// gRPC listen address (overrides grpc.bind).
        #[arg(long)]
        bind: Option<String>,
        /// Deployment mode: EventDrivenOnly, Hybrid or PollingOnly.
        #[arg(long)]
        mode: Option<String>,
    },
    /// Apply database migrations (idempotent).
    Migrate,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Benchmark completion -> enqueue latency and throughput in every deployment mode, in one
    /// run. Uses (and empties) database `tasker_bench` on the local server or an embedded
    /// cluster, or the database given with --database-url.
    Bench {
        /// Measurement window per scenario, in seconds (after a 1 s warm-up).
        #[arg(long, default_value_t = 8)]
        duration_secs: u64,
        /// Concurrent chains, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        concurrency: Vec<usize>,
        /// Modes, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "EventDrivenOnly,Hybrid,PollingOnly"
        )]
        modes: Vec<String>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Soak instead: the first of --modes at --rate steps/s for --duration-secs, reported
        /// every --interval-secs (memory, latency, connections, notification queue).
        #[arg(long)]
        soak: bool,
        /// Soak: offered steps per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Soak: reporting interval in seconds.
        #[arg(long, default_value_t = 10)]
        interval_secs: u64,
        /// Soak: concurrent workers.
        #[arg(long, default_value_t = 16)]
        workers: usize,
    },
    /// Call a running service over gRPC (for operators and CI).
    Ctl {
        #[command(flatten)]
        options: ctl::CtlOptions,
        #[command(subcommand)]
        command: ctl::CtlCommand,
    },
    /// Bearer tokens for grpc.auth.tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Database helpers.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the merged configuration (secrets redacted) with each value's source.
    Show,
    /// Validate the configuration; exit code 64 lists every problem.
    Check,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Print the SHA-256 to put in the config for this token.
    Hash { token: String },
    /// Make a new random token; prints it and its hash.
    Generate,
}

#[derive(Subcommand)]
enum DbAction {
    /// Run a command with DATABASE_URL set to a working database: the configured one, the local
    /// server, or an embedded cluster started for the command and stopped after it.
    Exec {
        /// Database to create and point at (default: postgres, the maintenance database).
        #[arg(long, default_value = "postgres")]
        database: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = ConfigSources::from_process_env();
    sources.config_dir = cli.config_dir.clone();
    sources.environment = cli.environment.clone();
    if let Some(url) = &cli.database_url {
        sources = sources.with_override("database.url", url.clone());
    }
    if let Command::Serve { bind, mode } = &cli.command {
        if let Some(b) = bind {
            sources = sources.with_override("grpc.bind", b.clone());
        }
        if let Some(m) = mode {
            sources = sources.with_override("orchestration.deployment.mode", m.clone());
        }
    }
    // client subcommands run where the service's configuration may not be (or not be valid)
    let client_only = matches!(cli.command, Command::Ctl { .. } | Command::Token { .. });
    let loaded = if client_only {
        config::LoadedConfig {
            config: config::TaskerConfig::default(),
            environment: sources.environment.clone(),
            sources: Default::default(),
        }
    } else {
        match config::load(&sources) {
            Ok(l) => l,
            Err(e) => {
                eprint!("{e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let telemetry = tasker::telemetry::init(
            &loaded.config.telemetry,
            loaded.config.orchestration.deployment.mode,
        );
        let result = run(cli, loaded).await;
        telemetry.shutdown().await;
        result
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, loaded: config::LoadedConfig) -> anyhow::Result<ExitCode> {
    {
        match cli.command {
            Command::Config {
                action: ConfigAction::Show,
            } => {
                println!("# environment: {}", loaded.environment);
                print!("{}", loaded.config.render(&loaded.sources));
                Ok(ExitCode::SUCCESS)
            }
            Command::Config {
                action: ConfigAction::Check,
            } => {
                println!("configuration OK (environment {})", loaded.environment);
                Ok(ExitCode::SUCCESS)
            }
            Command::Migrate => {
                let resolved = resolve_database(&loaded.config.database, "tasker").await?;
                let store = Store::connect(&resolved.url, &loaded.config.database).await?;
                let applied = store.migrate().await?;
                println!("{applied} migration(s) applied; schema is current");
                store.pool().close().await;
                Ok(ExitCode::SUCCESS)
            }
            Command::Serve { .. } => {
                let app = tasker::App::build(loaded.config).await?;
                app.run(tasker::shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Bench {
                duration_secs,
                concurrency,
                modes,
                json,
                soak,
                rate,
                interval_secs,
                workers,
            } => {
                let modes = modes
                    .iter()
                    .map(|m| {
                        m.parse::<config::DeploymentMode>()
                            .map_err(anyhow::Error::msg)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let mut db = loaded.config.database.clone();
                if cli.database_url.is_none() {
                    db.url = None; // never empty the service's own database
                }
                let resolved = resolve_database(&db, "tasker_bench").await?;
                eprintln!(
                    "bench database: {} ({})",
                    config::redact_url(&resolved.url),
                    resolved.origin
                );
                if soak {
                    let opts = bench::SoakOptions {
                        mode: modes.first().copied().unwrap_or_default(),
                        duration: std::time::Duration::from_secs(duration_secs),
                        rate,
                        interval: std::time::Duration::from_secs(interval_secs.max(1)),
                        workers: workers.max(1),
                    };
                    let report = bench::soak(&resolved.url, &loaded.config, &opts).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        println!(
                            "soak {} at {} steps/s offered: rss growth {:+.1} MiB, p50 drift {:+.2} ms, p99 drift {:+.2} ms over {} intervals",
                            report.mode,
                            report.offered_steps_per_sec,
                            report.rss_growth_mib,
                            report.p50_drift_ms,
                            report.p99_drift_ms,
                            report.intervals.len()
                        );
                    }
                    drop(resolved);
                    return Ok(ExitCode::SUCCESS);
                }
                let opts = bench::BenchOptions {
                    modes,
                    concurrency,
                    duration: std::time::Duration::from_secs(duration_secs),
                };
                let report = bench::run(&resolved.url, &loaded.config, &opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    println!("{}", bench::render(&report));
                }
                drop(resolved);
                Ok(ExitCode::SUCCESS)
            }
            Command::Ctl { options, command } => match ctl::run(options, command).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("tasker ctl: {e}");
                    Ok(ExitCode::FAILURE)
                }
            },
            Command::Token {
                action: TokenAction::Hash { token },
            } => {
                println!("{}", tasker::config::hash_token(&token));
                Ok(ExitCode::SUCCESS)
            }
            Command::Token {
                action: TokenAction::Generate,
            } => {
                let token: String = (0..32)
                    .map(|_| format!("{:02x}", rand::random::<u8>()))
                    .collect();
                println!(
                    "token:  {token}
sha256: {}",
                    tasker::config::hash_token(&token)
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Db {
                action: DbAction::Exec { database, command },
            } => {
                let resolved = resolve_database(&loaded.config.database, &database).await?;
                eprintln!(
                    "tasker db exec: DATABASE_URL={} ({})",
                    config::redact_url(&resolved.url),
                    resolved.origin
                );
                let status = tokio::process::Command::new(&command[0])
                    .args(&command[1..])
                    .env("DATABASE_URL", &resolved.url)
                    .status()
                    .await?;
                drop(resolved);
                Ok(ExitCode::from(
                    status.code().unwrap_or(1).clamp(0, 255) as u8
                ))
            }
        }
    }
}
