//! `tasker serve` as a separate process (the real binary, SIGKILL-able), and connecting to one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

pub async fn connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
}

/// A `tasker serve` process on its own port, against the test's database.
pub struct ServiceProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl ServiceProcess {
    pub async fn spawn(url: &str, mode: &str) -> Self {
        Self::spawn_with(url, mode, &[]).await
    }

    /// With extra `TASKER_*` settings.
    pub async fn spawn_with(url: &str, mode: &str, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        Self::spawn_configured(url, mode, addr, env).await
    }

    /// On a given address: a restarted instance comes back where its workers expect it.
    pub async fn spawn_on(url: &str, mode: &str, addr: SocketAddr) -> Self {
        Self::spawn_configured(url, mode, addr, &[]).await
    }

    pub async fn spawn_configured(
        url: &str,
        mode: &str,
        addr: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tasker"))
            .args(["serve", "--bind", &addr.to_string(), "--mode", mode])
            .env("DATABASE_URL", url)
            .env(
                "TASKER_CONFIG_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/tasker"),
            )
            .env("TASKER_ENV", "test")
            .env(
                "TASKER_ORCHESTRATION__TASK_READINESS__FALLBACK_POLLING_INTERVAL_SECONDS",
                "1",
            )
            .env("TASKER_DATABASE__MAX_CONNECTIONS", "12")
            .env("TASKER_DATABASE__MIN_CONNECTIONS", "1")
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tasker serve");
        let me = Self { child, addr };
        me.wait_serving().await;
        me
    }

    /// Health SERVING is the signal that the process is up.
    pub async fn wait_serving(&self) {
        let started = Instant::now();
        loop {
            if let Ok(ch) = connect(self.addr).await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if let Ok(r) = h
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    if r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                    {
                        return;
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "service did not become SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn sigkill(mut self) {
        self.child.start_kill().unwrap(); // SIGKILL: no graceful anything
        let _ = self.child.wait().await;
    }
}
