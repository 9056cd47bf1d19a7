//! Finding a database to run against, so `tasker serve` just works on a laptop.
//!
//! Order: the configured `database.url`; else the local server at
//! [`defaults::LOCAL_DATABASE_URL`] if it answers (its `tasker` database is created when
//! missing); else a private cluster started from the installed PostgreSQL binaries in
//! `database.embedded_data_dir`, owned by [`EmbeddedCluster`] and stopped when it is dropped.
//!
//! PostgreSQL refuses to run as root, so when this process is root the cluster is initialised
//! and run as the `postgres` user (or `nobody`), through `runuser`.
//!
//! The embedded cluster trusts no one but its owner: it listens on no TCP address at all
//! (`listen_addresses = ''`), only on a Unix socket inside its own 0700 data directory, so
//! another local user can neither reach it over the network nor open the socket. A data
//! directory that exists but belongs to someone else is refused. When the configured directory
//! is unreachable for the unprivileged server (as root, under /root), a fresh directory with a
//! random name is created exclusively under the system temp directory (never one that
//! already exists: a predictable path could be prepared by another user).
//!
//! The local server on 127.0.0.1:5432 is a development convenience: it is used only when no
//! `database.url` is configured and `database.require_url` is off (production sets it), and
//! the start-up log says so.
//!
//! ```text
//! resolve ──url set──────────────────────────────> use it
//!    │ └─local server answers──> CREATE DATABASE if missing ──> use it
//!    └─otherwise──> find binaries ──> initdb (first time) ──> pg_ctl start ──> use it
//!                                                   drop(EmbeddedCluster) ──> pg_ctl stop
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::config::{defaults, DatabaseConfig};

#[derive(Debug, thiserror::Error)]
pub enum LocalDbError {
    #[error(
        "no database configured, nothing answers at {local}, and no PostgreSQL server binaries \
         (initdb, pg_ctl) were found in PATH, `pg_config --bindir` or /usr/lib/postgresql/*/bin. \
         Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql`) \
         or set database.url / DATABASE_URL"
    )]
    NoBinaries { local: String },
    #[error("{step} failed: {detail}")]
    Command { step: String, detail: String },
    #[error("database {url} is not reachable: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "database.url is not set and database.require_url is on: refusing to fall back to a \
         local server or an embedded cluster"
    )]
    UrlRequired,
    #[error("embedded cluster directory {dir}: {problem}")]
    UnsafeDirectory { dir: String, problem: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the service's database is, and the embedded cluster behind it if one was started.
#[derive(Debug)]
pub struct ResolvedDatabase {
    pub url: String,
    /// How it was found, for the start-up log line.
    pub origin: &'static str,
    pub embedded: Option<EmbeddedCluster>,
}

/// Resolve the database per the module doc. `database_name` is the database created in the
/// local server or embedded cluster (the service uses `tasker`).
pub async fn resolve(
    cfg: &DatabaseConfig,
    database_name: &str,
) -> Result<ResolvedDatabase, LocalDbError> {
    if let Some(url) = &cfg.url {
        return Ok(ResolvedDatabase {
            url: url.clone(),
            origin: "configured database.url",
            embedded: None,
        });
    }
    if cfg.require_url {
        return Err(LocalDbError::UrlRequired);
    }
    let local = defaults::LOCAL_DATABASE_URL;
    let local_admin = with_database(local, "postgres");
    if answers(&local_admin).await {
        ensure_database(&local_admin, database_name).await?;
        return Ok(ResolvedDatabase {
            url: with_database(local, database_name),
            origin: "no database.url configured: the local development server on 127.0.0.1:5432 \
                     (a development convenience; production sets database.require_url)",
            embedded: None,
        });
    }
    let cluster = EmbeddedCluster::start(Path::new(&cfg.embedded_data_dir)).await?;
    let admin = cluster.url("postgres");
    ensure_database(&admin, database_name).await?;
    Ok(ResolvedDatabase {
        url: cluster.url(database_name),
        origin: "embedded cluster",
        embedded: Some(cluster),
    })
}

/// Replace the database name in a postgres URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

async fn answers(url: &str) -> bool {
    let Ok(opts) = url.parse::<PgConnectOptions>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), opts.connect()).await,
        Ok(Ok(_))
    )
}

async fn ensure_database(admin_url: &str, name: &str) -> Result<(), LocalDbError> {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|source| LocalDbError::Connect {
            url: crate::config::redact_url(admin_url),
            source,
        })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .map_err(|source| LocalDbError::Connect {
                url: admin_url.to_string(),
                source,
            })?;
    if !exists {
        // a concurrent creator wins the race harmlessly: 42P04 duplicate_database
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
            if e.as_database_error().and_then(|d| d.code()).as_deref() != Some("42P04") {
                return Err(LocalDbError::Connect {
                    url: admin_url.to_string(),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// A private PostgreSQL cluster in a data directory, stopped when dropped.
#[derive(Debug)]
pub struct EmbeddedCluster {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    /// `Some(user)` when commands must run as that user because we are root.
    run_as: Option<String>,
    /// Whether this process started the server (and so must stop it).
    started_here: bool,
}

impl EmbeddedCluster {
    /// Initialise (first time) and start the cluster in `data_dir` on a free loopback port.
    pub async fn start(data_dir: &Path) -> Result<Self, LocalDbError> {
        let bin_dir = find_bin_dir().ok_or_else(|| LocalDbError::NoBinaries {
            local: defaults::LOCAL_DATABASE_URL.to_string(),
        })?;
        let run_as = if is_root() {
            Some(unprivileged_user())
        } else {
            None
        };
        create_private_dir_all(data_dir)?;
        let mut data_dir = data_dir.canonicalize()?;
        // before anything is chowned or started: a directory someone else owns is theirs
        check_owned_by(&data_dir, run_as.as_deref())?;
        if run_as.is_some() && !reachable_by_others(&data_dir) {
            // The unprivileged server could not even reach a directory under, say, /root.
            let fallback = create_private_temp_dir()?;
            tracing::warn!(
                wanted = %data_dir.display(),
                using = %fallback.display(),
                "the embedded cluster's data directory is not reachable by an unprivileged user; using a new private directory under the system temp dir"
            );
            data_dir = fallback;
        }
        if let Some(user) = &run_as {
            chown_recursive(&data_dir, user)?;
        }
        // the socket file's path must fit in sockaddr_un (107 bytes)
        let socket_path_len = data_dir.as_os_str().len() + "/.s.PGSQL.65535".len();
        if socket_path_len > 107 {
            return Err(LocalDbError::UnsafeDirectory {
                dir: data_dir.display().to_string(),
                problem: format!(
                    "is too long for the cluster's Unix socket ({socket_path_len} > 107 bytes): set a shorter database.embedded_data_dir"
                ),
            });
        }
        let mut cluster = Self {
            data_dir,
            bin_dir,
            port: 0,
            run_as,
            started_here: false,
        };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.run(
                "initdb",
                &[
                    "-D",
                    &cluster.data_dir.display().to_string(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            )?;
        }
        if let Some(port) = cluster.running_port() {
            // left running by an earlier process that did not stop it: adopt it
            cluster.port = port;
        } else {
            cluster.port = free_port()?;
            let log = cluster.data_dir.join("server.log");
            // no TCP at all; the socket lives in the 0700 data directory
            let opts = format!(
                "-p {} -c listen_addresses='' -k {}",
                cluster.port,
                cluster.data_dir.display()
            );
            cluster.run(
                "pg_ctl",
                &[
                    "-D",
                    &cluster.data_dir.display().to_string(),
                    "-l",
                    &log.display().to_string(),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )?;
        }
        cluster.started_here = true;
        tracing::info!(data_dir = %cluster.data_dir.display(), port = cluster.port, "embedded PostgreSQL cluster running");
        Ok(cluster)
    }

    /// The URL of `database` in this cluster: its Unix socket (the `host` parameter is the
    /// socket's directory; the port names the socket file).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{database}?host={}",
            self.port,
            percent_encode_path(&self.data_dir)
        )
    }

    /// The socket's port number (no TCP listener has it).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stop the server now (fast shutdown: open sessions are ended, data is kept).
    pub fn stop(&mut self) -> Result<(), LocalDbError> {
        if !self.started_here {
            return Ok(());
        }
        self.started_here = false;
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir.display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )
    }

    /// Restart the server (fast shutdown, then start on the same port): every session is
    /// cut, data is kept. For fault-injection tests and operators.
    pub fn restart(&self) -> Result<(), LocalDbError> {
        // -l as at start: without it the new server would keep this command's output pipes
        // open, and waiting for the command would never end
        let log = self.data_dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir.display().to_string(),
                "-l",
                &log.display().to_string(),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ],
        )
    }

    fn running_port(&self) -> Option<u16> {
        let pid_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let status = self.run(
            "pg_ctl",
            &["-D", &self.data_dir.display().to_string(), "status"],
        );
        if status.is_err() {
            return None;
        }
        // postmaster.pid line 4 is the port
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), LocalDbError> {
        let exe = self.bin_dir.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args).current_dir("/");
        let out = cmd.output().map_err(|e| LocalDbError::Command {
            step: format!("{program} ({})", exe.display()),
            detail: e.to_string(),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LocalDbError::Command {
                step: program.to_string(),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                ),
            })
        }
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the embedded PostgreSQL cluster failed");
        }
    }
}

/// Whether every ancestor of `dir` lets other users through (the x bit for others).
fn reachable_by_others(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors().skip(1).all(|a| {
        std::fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// Create `dir` and its missing parents with mode 0700 (the parents too: `.tasker` holds
/// nothing others should list).
fn create_private_dir_all(dir: &Path) -> Result<(), LocalDbError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    Ok(())
}

/// A new directory with a random name under the system temp directory, created exclusively
/// with mode 0700: if the name exists (another user's trap, or a collision), creation fails
/// and another name is tried.
pub fn create_private_temp_dir() -> Result<PathBuf, LocalDbError> {
    use std::os::unix::fs::DirBuilderExt;
    for _ in 0..16 {
        let name: String = (0..16)
            .map(|_| format!("{:x}", rand::random::<u8>() & 0xf))
            .collect();
        let dir = std::env::temp_dir().join(format!("tasker-pg-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LocalDbError::UnsafeDirectory {
        dir: std::env::temp_dir().display().to_string(),
        problem: "could not create a fresh private directory in 16 tries".into(),
    })
}

/// Refuse a data directory that belongs to anyone but this process's user or the cluster's
/// (when root runs it as `postgres`): whoever owns it controls the server's configuration.
fn check_owned_by(dir: &Path, run_as: Option<&str>) -> Result<(), LocalDbError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let me = std::fs::metadata("/proc/self")?.uid();
    let cluster_user = run_as.and_then(uid_of);
    if !meta.is_dir() || (meta.uid() != me && Some(meta.uid()) != cluster_user) {
        return Err(LocalDbError::UnsafeDirectory {
            dir: dir.display().to_string(),
            problem: format!(
                "is owned by uid {} (or is not a directory), neither this process's user (uid {me}) nor the cluster's; refusing to use it",
                meta.uid()
            ),
        });
    }
    Ok(())
}

fn uid_of(user: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == user).then(|| f.nth(1)?.parse().ok())?
        })
}

/// A path as a URL query value.
fn percent_encode_path(p: &Path) -> String {
    p.display()
        .to_string()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn free_port() -> Result<u16, LocalDbError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    // SAFETY-free check: `id -u` would need a process; the effective uid is in /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn unprivileged_user() -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if passwd.lines().any(|l| l.starts_with("postgres:")) {
        "postgres".into()
    } else {
        "nobody".into()
    }
}

fn chown_recursive(dir: &Path, user: &str) -> Result<(), LocalDbError> {
    let out = Command::new("chown")
        .arg("-R")
        .arg(user)
        .arg(dir)
        .output()?;
    if !out.status.success() {
        return Err(LocalDbError::Command {
            step: "chown".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    // PostgreSQL insists on 0700 for its data directory
    let out = Command::new("chmod").arg("0700").arg(dir).output()?;
    if !out.status.success() {
        return Err(LocalDbError::Command {
            step: "chmod".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// The directory holding `initdb` and `pg_ctl`: PATH, then `pg_config --bindir`, then the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off PATH).
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path).find(|d| has_tools(d)) {
            return Some(d);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_or_appends_the_name() {
        assert_eq!(
            with_database("postgres://u@h:5432/tasker", "postgres"),
            "postgres://u@h:5432/postgres"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/a?sslmode=disable", "b"),
            "postgres://u@h/b?sslmode=disable"
        );
    }
}
