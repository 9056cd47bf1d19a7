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
use tasker::testkit::{resolve_database, Store};

#[derive(Parser)]
#[command(
    name = "tasker",
    version,
    about = "Event-driven workflow orchestration on PostgreSQL"
)]
struct Cli {
    /// Configuration directory holding base/ and environments/ (default: ./config/tasker,
    /// else /etc/tasker; it must exist).
    #[arg(long, global = true, env = "TASKER_CONFIG_DIR")]
    config_dir: Option<std::path::PathBuf>,
    /// Run on the compiled defaults (and TASKER_ variables), with no configuration directory
    /// (environment development only).
    #[arg(long, global = true)]
    builtin_defaults: bool,
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
    /// Benchmark what users see: the service as its own process, workers in another, through
    /// the gRPC API (latency, steps/s, CPU and database budget per step, beside the machine's
    /// commit + NOTIFY floor). `--in-process` for the service's own floor, `--soak` for a
    /// long run. Uses (and empties) database `tasker_bench`.
    Bench(bench::BenchArgs),
    /// The benchmark's worker process (started by `tasker bench`).
    #[command(hide = true)]
    BenchWorker {
        /// The worker spec, JSON.
        #[arg(long)]
        spec: String,
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
    /// Delete the Tasker schema of the configured database and migrate it from scratch: for a
    /// development database made by a build from before the baseline migration.
    Reset {
        /// Yes, delete every task in that database.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = ConfigSources::from_process_env();
    if let Some(dir) = &cli.config_dir {
        sources.config_dir = dir.clone();
    }
    sources.builtin_defaults = cli.builtin_defaults;
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
    let client_only = matches!(
        cli.command,
        Command::Ctl { .. } | Command::Token { .. } | Command::BenchWorker { .. }
    );
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
            Command::Bench(args) => {
                let mut db = loaded.config.database.clone();
                match &cli.database_url {
                    // never empty a database someone named without saying so
                    Some(_) if !args.allow_emptying => anyhow::bail!(
                        "tasker bench empties the Tasker tables of the database it runs on: add \
                         --allow-emptying to use --database-url"
                    ),
                    Some(_) => {}
                    // never the service's own database (database.url / DATABASE_URL)
                    None => db.url = None,
                }
                let resolved = resolve_database(&db, "tasker_bench").await?;
                eprintln!(
                    "bench database: {} ({})",
                    config::redact_url(&resolved.url),
                    resolved.origin
                );
                bench::run(args, &resolved.url, &loaded.config).await?;
                drop(resolved);
                Ok(ExitCode::SUCCESS)
            }
            Command::BenchWorker { spec } => {
                bench::worker::run(serde_json::from_str(&spec)?).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Ctl { options, command } => match ctl::run(options, command).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("tasker ctl: {e}");
                    Ok(ExitCode::from(e.exit_code()))
                }
            },
            Command::Token {
                action: TokenAction::Hash { token },
            } => {
                println!("{}", tasker::hash_token(&token));
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
                    tasker::hash_token(&token)
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Db {
                action: DbAction::Reset { yes },
            } => {
                let resolved = resolve_database(&loaded.config.database, "tasker").await?;
                let target = config::redact_url(&resolved.url);
                if !yes {
                    eprintln!(
                        "tasker db reset deletes every task in {target} ({}); run it again with --yes",
                        resolved.origin
                    );
                    return Ok(ExitCode::from(64));
                }
                let store = Store::connect(&resolved.url, &loaded.config.database).await?;
                let applied = store.reset().await?;
                println!("{target}: Tasker schema recreated, {applied} migration(s) applied");
                store.pool().close().await;
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
