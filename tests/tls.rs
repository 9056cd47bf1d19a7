//! Optional TLS: with grpc.tls set, the server speaks only TLS, and a client that trusts the
//! certificate gets answers.

mod common;

use common::*;
use sqlx::PgPool;
use tasker::config::DeploymentMode;
use tasker::proto::v1;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn tls_serves_trusting_clients_only(pool: PgPool) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();

    let mut cfg = test_config(DeploymentMode::Hybrid);
    cfg.grpc.tls.cert_path = Some(cert_path.clone());
    cfg.grpc.tls.key_path = Some(key_path.clone());
    let server = TestServer::start(&pool, &cfg).await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connection");
    let mut admin = Admin::new(channel);
    let mode = admin
        .get_deployment_mode(v1::GetDeploymentModeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mode.mode, v1::DeploymentMode::Hybrid as i32);

    // plaintext is refused
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(Admin::new(ch)
            .get_deployment_mode(v1::GetDeploymentModeRequest {})
            .await
            .is_err());
    }
    server.stop().await;
}
