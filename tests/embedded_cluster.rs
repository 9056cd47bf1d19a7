//! The embedded cluster trusts no one but its owner: no TCP listener, a Unix socket inside a
//! 0700 directory, and a data directory that belongs to someone else is refused. Its data
//! persists from one start to the next, for root too, and a cluster left running is adopted.
//! A local server run by another user is not used.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::open_tempdir;
use std::process::Command;

use sqlx::{ConnectOptions, Connection};
use tasker::testkit::{
    find_bin_dir, listener_owner, local_server_is_trusted, EmbeddedCluster, LocalDbError,
};

fn is_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

#[tokio::test]
async fn the_embedded_cluster_listens_only_on_a_private_socket() {
    let dir = open_tempdir();
    let data = dir.path().join("pg");
    let cluster = EmbeddedCluster::start(&data).await.unwrap();

    // its owner connects through the socket
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(listen, "", "no TCP address");
    conn.close().await.unwrap();

    // nothing answers over TCP on its port
    let tcp = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .connect()
        .await;
    assert!(
        tcp.is_err(),
        "a TCP connection to the embedded cluster was accepted"
    );

    // the socket's directory is closed to everyone else
    let mode = std::fs::metadata(cluster.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "data directory mode {mode:o}");
    if is_root() {
        // another OS user cannot open the socket
        let psql = [find_bin_dir().unwrap().join("psql")]
            .into_iter()
            .chain(
                std::fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path().join("bin/psql")),
            )
            .find(|p| p.is_file())
            .unwrap_or_else(|| "psql".into());
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&psql)
            .arg(format!(
                "host={} port={} user=postgres dbname=postgres connect_timeout=5",
                cluster.data_dir().display(),
                cluster.port()
            ))
            .args(["-c", "SELECT 1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "user nobody connected: {stderr}");
        assert!(stderr.contains("Permission denied"), "{stderr}");
    }
}

#[tokio::test]
async fn a_data_directory_owned_by_someone_else_is_refused() {
    if !is_root() {
        eprintln!("needs root to give a directory to another user; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pg");
    std::fs::create_dir(&data).unwrap();
    let status = Command::new("chown")
        .arg("nobody")
        .arg(&data)
        .status()
        .unwrap();
    assert!(status.success());
    let err = EmbeddedCluster::start(&data).await.unwrap_err();
    assert!(matches!(err, LocalDbError::UnsafeDirectory { .. }), "{err}");
    assert!(!data.join("PG_VERSION").exists(), "nothing was initialised");
}

/// Write a row in a new table of the cluster's `postgres` database, or read it back.
async fn mark(cluster: &EmbeddedCluster) {
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    sqlx::raw_sql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

async fn marked(cluster: &EmbeddedCluster) -> bool {
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let found: Option<String> = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_optional(&mut conn)
        .await
        .unwrap_or(None);
    conn.close().await.unwrap();
    found.as_deref() == Some("still here")
}

#[tokio::test]
async fn the_data_directory_persists_from_one_start_to_the_next() {
    let dir = open_tempdir();
    let data = dir.path().join(".tasker/pg");
    let first = EmbeddedCluster::start_within(&data, &dir.path().join("fallback"))
        .await
        .unwrap();
    assert_eq!(
        first.data_dir(),
        data.canonicalize().unwrap(),
        "the configured directory itself"
    );
    mark(&first).await;
    drop(first);
    let second = EmbeddedCluster::start_within(&data, &dir.path().join("fallback"))
        .await
        .unwrap();
    assert!(marked(&second).await, "the data of the first start is gone");
    let parent = std::fs::metadata(dir.path().join(".tasker")).unwrap();
    let expected = if is_root() { 0o711 } else { 0o700 };
    assert_eq!(
        parent.permissions().mode() & 0o777,
        expected,
        ".tasker lets the cluster's user through (as root) and lists nothing to anyone"
    );
}

#[tokio::test]
async fn as_root_an_unreachable_directory_is_replaced_by_a_persistent_one() {
    if !is_root() {
        eprintln!("only root runs the cluster as another user; skipped");
        return;
    }
    let dir = open_tempdir();
    // an ancestor root did not create and that the cluster's user cannot pass (as /root)
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = closed.join(".tasker/pg");
    let fallback_root = dir.path().join("var-lib-tasker");
    let first = EmbeddedCluster::start_within(&data, &fallback_root)
        .await
        .unwrap();
    assert!(
        first
            .data_dir()
            .starts_with(fallback_root.canonicalize().unwrap()),
        "{}",
        first.data_dir().display()
    );
    let used = first.data_dir().to_path_buf();
    mark(&first).await;
    drop(first);
    let second = EmbeddedCluster::start_within(&data, &fallback_root)
        .await
        .unwrap();
    assert_eq!(second.data_dir(), used, "the same directory at every start");
    assert!(marked(&second).await, "the data of the first start is gone");
}

#[tokio::test]
async fn a_cluster_left_running_is_adopted_by_the_next_start() {
    let dir = open_tempdir();
    let data = dir.path().join("pg");
    let first = EmbeddedCluster::start_within(&data, &dir.path().join("fallback"))
        .await
        .unwrap();
    mark(&first).await;
    let port = first.port();
    // the process that started it dies without stopping it (kill -9)
    std::mem::forget(first);
    let second = EmbeddedCluster::start_within(&data, &dir.path().join("fallback"))
        .await
        .unwrap();
    assert_eq!(second.port(), port, "the running server was adopted");
    assert!(marked(&second).await);
    drop(second);
    let status = Command::new(find_bin_dir().unwrap().join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        !status.status.success(),
        "the adopting start stopped it when it ended"
    );
}

#[tokio::test]
async fn a_local_server_run_by_another_user_is_passed_over() {
    // this process's own listener: trusted
    let mine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = mine.local_addr().unwrap();
    assert_eq!(
        listener_owner(addr),
        Some(std::fs::metadata("/proc/self").unwrap().uid())
    );
    assert!(local_server_is_trusted(addr));
    drop(mine);
    if !is_root() {
        eprintln!("needs root to listen as another user; the rest is skipped");
        return;
    }
    // another user's listener (as another user's PostgreSQL on 5432 would be): not trusted
    let mut theirs = tokio::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "perl", "-MIO::Socket::INET", "-e"])
        .arg(
            "$| = 1; my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, \
             Listen => 1) or die $!; print $s->sockport, \"\\n\"; sleep 60",
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(theirs.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();
    assert_eq!(listener_owner(addr), Some(65534), "nobody's uid");
    assert!(
        !local_server_is_trusted(addr),
        "another user's server would receive the service's data"
    );
}
