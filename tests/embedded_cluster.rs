//! The embedded cluster trusts no one but its owner: no TCP listener, a Unix socket inside a
//! 0700 directory, and a data directory that belongs to someone else is refused.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use sqlx::{ConnectOptions, Connection};
use tasker::internal::{create_private_temp_dir, find_bin_dir, EmbeddedCluster, LocalDbError};

fn is_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

#[tokio::test]
async fn the_embedded_cluster_listens_only_on_a_private_socket() {
    let dir = tempfile::tempdir().unwrap();
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

#[test]
fn private_temp_directories_are_fresh_and_closed() {
    let a = create_private_temp_dir().unwrap();
    let b = create_private_temp_dir().unwrap();
    assert_ne!(a, b);
    for d in [&a, &b] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{} mode {mode:o}", d.display());
        std::fs::remove_dir(d).unwrap();
    }
}
