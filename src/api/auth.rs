//! Bearer-token authentication and scope authorization, as a tower layer in front of every
//! service. Each `tasker.v1` method requires one scope (the table in [`required_scope`]);
//! unknown methods require `admin`; health and reflection are open.
//!
//! Tokens are configured as SHA-256 hashes (`tasker token hash <token>` prints one), so config
//! files hold no secret; a presented token is hashed and compared in constant time.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tonic::Status;

use crate::config::AuthConfig;

/// The hex SHA-256 of a token, as `grpc.auth.tokens[].sha256` stores it: configuration files
/// hold no secret, and a request's token is compared by its hash.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The scope a method needs, `None` for open services. Anything unknown under `tasker.` needs
/// `admin`: a new method is closed until it is given a scope here.
pub fn required_scope(path: &str) -> Option<Scope> {
    let method = path.trim_start_matches('/');
    if !method.starts_with("tasker.") {
        return None; // grpc.health.v1, grpc.reflection.*
    }
    Some(match method {
        "tasker.v1.ReadinessService/GetTaskReadiness"
        | "tasker.v1.ReadinessService/ListReadyTasks"
        | "tasker.v1.ReadinessService/StreamCommandEvents"
        | "tasker.v1.AdminService/GetDeploymentMode"
        | "tasker.v1.AdminService/GetStatus"
        | "tasker.v1.AdminService/ListNamespaces"
        | "tasker.v1.AdminService/GetQueueSettings"
        | "tasker.v1.AdminService/GetNamespaceSettings"
        | "tasker.v1.TaskService/GetTask"
        | "tasker.v1.TaskService/ListTasks"
        | "tasker.v1.TaskService/WatchTask"
        | "tasker.v1.ScheduleService/GetSchedule"
        | "tasker.v1.ScheduleService/ListSchedules" => Scope::Read,
        "tasker.v1.ReadinessService/ProcessTaskReadiness"
        | "tasker.v1.TaskService/CreateTask"
        | "tasker.v1.TaskService/CancelTask"
        | "tasker.v1.TaskService/RetryTask"
        | "tasker.v1.WorkerService/FetchSteps"
        | "tasker.v1.WorkerService/CompleteStep"
        | "tasker.v1.WorkerService/FailStep"
        | "tasker.v1.WorkerService/ExtendLease"
        | "tasker.v1.WorkerService/Work"
        | "tasker.v1.ScheduleService/CreateSchedule"
        | "tasker.v1.ScheduleService/PauseSchedule"
        | "tasker.v1.ScheduleService/ResumeSchedule"
        | "tasker.v1.ScheduleService/DeleteSchedule"
        | "tasker.v1.ScheduleService/TriggerSchedule" => Scope::Write,
        _ => Scope::Admin,
    })
}

#[derive(Debug)]
struct Token {
    name: String,
    sha256: [u8; 32],
    scopes: HashSet<Scope>,
}

impl Token {
    /// `admin` implies `read`: an operator who may change the deployment mode may also see
    /// the status it changes. It does not imply `write`: creating tasks and working steps
    /// stay with the tokens meant for them.
    fn grants(&self, needed: Scope) -> bool {
        self.scopes.contains(&needed)
            || (needed == Scope::Read && self.scopes.contains(&Scope::Admin))
    }
}

/// Checks requests against the configured tokens. With no tokens, everything is open.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: Vec<Token>,
}

impl Authenticator {
    pub fn from_config(cfg: &AuthConfig) -> Self {
        let tokens = cfg
            .tokens
            .iter()
            .filter_map(|t| {
                let mut sha256 = [0u8; 32];
                for (i, chunk) in t.sha256.as_bytes().chunks(2).enumerate().take(32) {
                    let hex = std::str::from_utf8(chunk).ok()?;
                    sha256[i] = u8::from_str_radix(hex, 16).ok()?;
                }
                Some(Token {
                    name: t.name.clone(),
                    sha256,
                    scopes: t.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                })
            })
            .collect();
        Self { tokens }
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// `Ok` with the caller's token name (None when open), or the status to answer with.
    pub fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<String>, Status> {
        let Some(scope) = required_scope(path) else {
            return Ok(None);
        };
        if self.is_open() {
            return Ok(None);
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing bearer token: send `authorization: Bearer <token>`",
                )
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let token = self
            .tokens
            .iter()
            .find(|t| constant_time_eq(&t.sha256, &digest))
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if token.grants(scope) {
            Ok(Some(token.name.clone()))
        } else {
            // The token's configured name stays in the server's logs: it tells a caller
            // holding a stolen token which identity it impersonates.
            Err(Status::permission_denied(format!(
                "this token lacks the {:?} scope this method needs",
                format!("{scope:?}").to_lowercase()
            )))
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` header. The scheme is matched
/// case-insensitively (RFC 7235 section 2.1); `None` for any other scheme or an empty token.
fn bearer_credentials(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who a request comes from, for the limits kept per caller (parked fetches, watch streams):
/// the name of its token when tokens are configured, otherwise its peer's address. Every
/// request that passed authentication carries it in its extensions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller(pub String);

impl Caller {
    /// The caller of a request (one the auth layer did not see, in tests: anonymous).
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller("anonymous".into()))
    }
}

/// The tower layer applying an [`Authenticator`] to every request.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        match self.auth.check(req.uri().path(), req.headers()) {
            Ok(token) => {
                let caller = match token {
                    Some(name) => format!("token {name}"),
                    None => req
                        .extensions()
                        .get::<super::connections::ConnectionInfo>()
                        .and_then(|c| c.peer())
                        .map_or_else(|| "anonymous".into(), |p| format!("peer {}", p.ip())),
                };
                req.extensions_mut().insert(Caller(caller));
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    #[test]
    fn scopes_are_enforced_per_method() {
        let auth = Authenticator::from_config(&AuthConfig {
            required: true,
            tokens: vec![TokenConfig {
                name: "reader".into(),
                sha256: hash_token("r-secret"),
                scopes: vec!["read".into()],
            }],
        });
        let mut h = http::HeaderMap::new();
        assert_eq!(
            auth.check("/grpc.health.v1.Health/Check", &h).unwrap(),
            None
        );
        assert_eq!(
            auth.check("/tasker.v1.AdminService/GetStatus", &h)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer r-secret".parse().unwrap(),
        );
        assert_eq!(
            auth.check("/tasker.v1.AdminService/GetStatus", &h).unwrap(),
            Some("reader".into())
        );
        for read in [
            "/tasker.v1.TaskService/ListTasks",
            "/tasker.v1.TaskService/WatchTask",
        ] {
            assert!(auth.check(read, &h).is_ok(), "{read} needs only read");
        }
        // an operator's decision: resolving a step by hand needs admin
        assert_eq!(
            auth.check("/tasker.v1.TaskService/ResolveStep", &h)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        // a worker's stream carries its reports: write, as the calls it carries
        assert_eq!(
            auth.check("/tasker.v1.WorkerService/Work", &h)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            auth.check("/tasker.v1.AdminService/SetDeploymentMode", &h)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            auth.check("/tasker.v1.NewService/Anything", &h)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        h.insert(http::header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert_eq!(
            auth.check("/tasker.v1.TaskService/GetTask", &h)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    fn one_token(name: &str, secret: &str, scopes: &[&str]) -> Authenticator {
        Authenticator::from_config(&AuthConfig {
            required: true,
            tokens: vec![TokenConfig {
                name: name.into(),
                sha256: hash_token(secret),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            }],
        })
    }

    fn with_authorization(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let auth = one_token("ops", "s3cret", &["read"]);
        for header in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR  s3cret",
        ] {
            assert_eq!(
                auth.check(
                    "/tasker.v1.TaskService/GetTask",
                    &with_authorization(header)
                )
                .unwrap(),
                Some("ops".into()),
                "{header}"
            );
        }
        for header in [
            "Basic s3cret",
            "Bearer",
            "Bearer ",
            "s3cret",
            "Bearers3cret",
        ] {
            assert_eq!(
                auth.check(
                    "/tasker.v1.TaskService/GetTask",
                    &with_authorization(header)
                )
                .unwrap_err()
                .code(),
                tonic::Code::Unauthenticated,
                "{header}"
            );
        }
    }

    #[test]
    fn admin_implies_read_but_not_write() {
        let auth = one_token("ops", "s3cret", &["admin"]);
        let h = with_authorization("Bearer s3cret");
        assert!(auth.check("/tasker.v1.AdminService/GetStatus", &h).is_ok());
        assert!(auth
            .check("/tasker.v1.AdminService/SetDeploymentMode", &h)
            .is_ok());
        let denied = auth
            .check("/tasker.v1.TaskService/CreateTask", &h)
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            !denied.message().contains("ops"),
            "the token's name is not told to its bearer: {}",
            denied.message()
        );
        assert!(
            denied.message().contains("\"write\""),
            "{}",
            denied.message()
        );
    }
}
