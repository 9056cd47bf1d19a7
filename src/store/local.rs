//! Finding a database to run against, so `tasker serve` just works on a laptop.
//!
//! Order: the configured `database.url`; else the local server at
//! [`LOCAL_DATABASE_URL`] if it answers and is run by a user this process trusts
//! (root, `postgres`, or this process's own user: see [`local_server_is_trusted`]); else a
//! private cluster started from the installed PostgreSQL binaries in
//! `database.embedded_data_dir`, owned by [`EmbeddedCluster`] and stopped when it is dropped.
//!
//! PostgreSQL refuses to run as root, so when this process is root the cluster is initialised
//! and run as the `postgres` user (or `nobody`), through `runuser`.
//!
//! The embedded cluster trusts no one but its owner: it listens on no TCP address at all
//! (`listen_addresses = ''`), only on a Unix socket inside its own 0700 data directory, so
//! another local user can neither reach it over the network nor open the socket. A data
//! directory that exists but belongs to someone else is refused.
//!
//! The data directory persists, for root too: the directories root creates on the way to it
//! can be traversed (mode 0711, not listed) so that the cluster's user reaches its own 0700
//! directory. When an ancestor root did not create closes the way (as root, under /root), the
//! cluster lives in a stable directory of its own instead, `/var/lib/tasker/<name>-<hash of
//! the configured path>`: the same one at every start, under a root-owned parent that no
//! other user can write to. A cluster left running by a process that was killed is adopted
//! by the next start, and stopped when that one ends.
//!
//! The local server on 127.0.0.1:5432 is a development convenience: it is used only when no
//! `database.url` is configured and `database.require_url` is off (production sets it), and
//! only when the operating system says who runs it and that is someone trusted. On a shared
//! machine, another user's server on 5432 would otherwise receive every task: such a server is
//! passed over with a warning naming its owner. Where the owner cannot be read (no
//! `/proc/net/tcp`), the server is used with a warning.
//!
//! ```text
//! resolve ──url set─────────────────────────────────────────────────> use it
//!    │ └─local server answers, owner trusted──> CREATE DATABASE if missing ──> use it
//!    └─otherwise──> find binaries ──> initdb (first time) ──> running? adopt : pg_ctl start
//!                                                   drop(EmbeddedCluster) ──> pg_ctl stop
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::config::{DatabaseConfig, LOCAL_DATABASE_URL};

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
    let local = LOCAL_DATABASE_URL;
    let local_admin = with_database(local, "postgres");
    if answers(&local_admin).await && local_server_is_trusted(LOCAL_SERVER) {
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

/// The address of [`LOCAL_DATABASE_URL`].
const LOCAL_SERVER: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5432);

/// Whether the server listening on `addr` may receive this process's data: it is run by root,
/// by `postgres` (a distribution's server) or by this process's own user. Anyone else's is
/// passed over, with a warning naming its owner. Where the owner cannot be read (no
/// `/proc/net/tcp`, as on macOS), the server is used, with a warning.
pub fn local_server_is_trusted(addr: std::net::SocketAddr) -> bool {
    let Some(owner) = listener_owner(addr) else {
        tracing::warn!(
            %addr,
            "cannot tell which user runs the PostgreSQL server on {addr}; using it as the development database. Set database.url to choose the database yourself"
        );
        return true;
    };
    let me = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .ok();
    let trusted = owner == 0 || Some(owner) == me || Some(owner) == uid_of("postgres");
    if trusted {
        tracing::info!(%addr, owner_uid = owner, "the local PostgreSQL server is run by a trusted user");
    } else {
        tracing::warn!(
            %addr,
            owner_uid = owner,
            "the PostgreSQL server on {addr} is run by uid {owner}, neither root, postgres nor this process's user: not sending it any data; using an embedded cluster instead (set database.url to use that server on purpose)"
        );
    }
    trusted
}

/// The uid that owns the listening TCP socket serving `addr` (bound to it or to the wildcard
/// address of its family), from `/proc/net/tcp` and `/proc/net/tcp6`; `None` when no such
/// socket is listed or the tables cannot be read.
pub fn listener_owner(addr: std::net::SocketAddr) -> Option<u32> {
    let tables = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<Vec<_>>();
    tables.iter().find_map(|t| owner_in_table(t, addr))
}

/// The owner of a LISTEN socket serving `addr` in one `/proc/net/tcp{,6}` table.
fn owner_in_table(table: &str, addr: std::net::SocketAddr) -> Option<u32> {
    const LISTEN: &str = "0A";
    let port = format!("{:04X}", addr.port());
    // the addresses a listener serving `addr` may be bound to, as the table writes them
    // (each 32-bit word in host byte order: little-endian here)
    let word = |b: [u8; 4]| format!("{:08X}", u32::from_le_bytes(b));
    let wanted: Vec<String> = match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            let mapped = std::net::Ipv6Addr::from(ip.to_ipv6_mapped().octets());
            vec![
                word(ip.octets()),
                word([0; 4]),
                v6_hex(&mapped, word),
                v6_hex(&std::net::Ipv6Addr::UNSPECIFIED, word),
            ]
        }
        std::net::IpAddr::V6(ip) => vec![
            v6_hex(&ip, word),
            v6_hex(&std::net::Ipv6Addr::UNSPECIFIED, word),
        ],
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
        let (local, state, uid) = (f.get(1)?, f.get(3)?, f.get(7)?);
        let (ip, p) = local.split_once(':')?;
        (*state == LISTEN && p == port && wanted.iter().any(|w| w == ip))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

fn v6_hex(ip: &std::net::Ipv6Addr, word: impl Fn([u8; 4]) -> String) -> String {
    ip.octets()
        .chunks(4)
        .map(|c| word([c[0], c[1], c[2], c[3]]))
        .collect()
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
    /// Initialise (first time) and start the cluster in `data_dir`, or adopt the one left
    /// running there, listening on its Unix socket only.
    pub async fn start(data_dir: &Path) -> Result<Self, LocalDbError> {
        Self::start_within(data_dir, Path::new(PERSISTENT_FALLBACK_ROOT)).await
    }

    /// [`EmbeddedCluster::start`], with the directory that holds the clusters whose configured
    /// directory root's cluster user cannot reach (tests use their own).
    pub async fn start_within(data_dir: &Path, fallback_root: &Path) -> Result<Self, LocalDbError> {
        let bin_dir = find_bin_dir().ok_or_else(|| LocalDbError::NoBinaries {
            local: LOCAL_DATABASE_URL.to_string(),
        })?;
        let run_as = if is_root() {
            Some(unprivileged_user())
        } else {
            None
        };
        // as root, the directories created on the way can be traversed (not listed) by the
        // cluster's user, or it could not reach its own data directory
        create_data_dir(data_dir, run_as.is_some())?;
        let mut data_dir = data_dir.canonicalize()?;
        // before anything is chowned or started: a directory someone else owns is theirs
        check_owned_by(&data_dir, run_as.as_deref())?;
        if run_as.is_some() && !reachable_by_others(&data_dir) {
            // An ancestor this process did not create (say /root) closes the way: a stable
            // directory of its own instead, the same at every start.
            let persistent = persistent_fallback(fallback_root, &data_dir)?;
            tracing::warn!(
                wanted = %data_dir.display(),
                using = %persistent.display(),
                "the embedded cluster's data directory is not reachable by the unprivileged user the cluster runs as; using a persistent directory of its own"
            );
            data_dir = persistent;
            check_owned_by(&data_dir, run_as.as_deref())?;
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
        self.restart_with("fast")
    }

    /// Crash the server and start it again (immediate shutdown: no checkpoint, recovery from
    /// the WAL at start), as a power cut would: what was committed asynchronously and not yet
    /// written out is lost. For fault-injection tests.
    pub fn crash_and_restart(&self) -> Result<(), LocalDbError> {
        self.restart_with("immediate")
    }

    fn restart_with(&self, mode: &str) -> Result<(), LocalDbError> {
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
                mode,
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

/// Where root keeps the clusters whose configured directory its cluster user cannot reach.
const PERSISTENT_FALLBACK_ROOT: &str = "/var/lib/tasker";

/// Create `dir` (mode 0700) and its missing parents: 0700 too (`.tasker` holds nothing others
/// should list), or, when `traversable`, 0711, so that the user the cluster runs as can pass
/// through them to its own directory without listing them.
fn create_data_dir(dir: &Path, traversable: bool) -> Result<(), LocalDbError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if traversable { 0o711 } else { 0o700 })
            .create(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e.into()),
        _ => Ok(()),
    }
}

/// The stable data directory under `root` standing in for `wanted`: `<name>-<16 hex digits of
/// the SHA-256 of wanted's path>`, created 0700 if missing. `root` must belong to this
/// process's user (root) and be writable by no one else, so nobody else can have prepared
/// the directory; it is created 0711 if missing.
fn persistent_fallback(root: &Path, wanted: &Path) -> Result<PathBuf, LocalDbError> {
    use sha2::Digest;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)?;
    let meta = std::fs::symlink_metadata(root)?;
    let me = std::fs::metadata("/proc/self")?.uid();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(LocalDbError::UnsafeDirectory {
            dir: root.display().to_string(),
            problem: format!(
                "must be a directory of uid {me} that no one else can write to (is uid {}, mode {:o})",
                meta.uid(),
                meta.mode() & 0o7777
            ),
        });
    }
    let hash: String = sha2::Sha256::digest(wanted.as_os_str().as_encoded_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let name: String = wanted
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pg".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(32)
        .collect();
    let dir = root.join(format!("{name}-{hash}"));
    create_data_dir(&dir, false)?;
    Ok(dir.canonicalize()?)
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

    /// A `/proc/net/tcp` table as Linux writes it: a listener on 127.0.0.1:5432 owned by uid
    /// 105, another on 0.0.0.0:6000 by uid 1001, and a connection (not listening) from uid 0.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:1770 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 4243 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn the_owner_of_a_listener_is_read_from_the_tcp_table() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(owner_in_table(TCP, at("127.0.0.1:5432")), Some(105));
        // a wildcard listener serves loopback too
        assert_eq!(owner_in_table(TCP, at("127.0.0.1:6000")), Some(1001));
        // a connection's local port is not a listener
        assert_eq!(owner_in_table(TCP, at("127.0.0.1:8080")), None);
        assert_eq!(owner_in_table(TCP, at("10.0.0.1:5432")), None);
    }

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
