//! `CancelOnDrop`: a pooled connection whose running statement is cancelled when the caller
//! stops waiting for it.
//!
//! Dropping a sqlx future does not stop the statement: PostgreSQL runs it to the end (and
//! commits it) unless told otherwise. A gRPC request whose client gave up is dropped by tonic,
//! so a request that runs a potentially long statement holds its connection here: if it is
//! dropped before [`CancelOnDrop::release`], the connection is closed rather than returned to
//! the pool, and `pg_cancel_backend` is sent for its backend from another connection. Because
//! the connection is never reused, the cancel cannot hit anyone else's statement.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use super::StoreError;

pub struct CancelOnDrop {
    conn: Option<PoolConnection<Postgres>>,
    backend_pid: i32,
    pool: PgPool,
}

impl CancelOnDrop {
    /// A connection from `pool`, and its backend's pid (one round trip).
    pub async fn acquire(pool: &PgPool) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        let backend_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Self {
            conn: Some(conn),
            backend_pid,
            pool: pool.clone(),
        })
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until released")
    }

    /// The statement finished (well or not): the connection goes back to the pool.
    pub fn release(mut self) {
        self.conn.take();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        conn.close_on_drop();
        drop(conn);
        let pool = self.pool.clone();
        let pid = self.backend_pid;
        tracing::debug!(
            backend_pid = pid,
            "request dropped: cancelling its statement"
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = sqlx::query("SELECT pg_cancel_backend($1)")
                    .bind(pid)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %e, backend_pid = pid, "cancelling a dropped request's statement failed; statement_timeout still bounds it");
                }
            });
        }
    }
}
