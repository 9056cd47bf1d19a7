//! `HeldConnections`: connections a hot path keeps between its statements instead of giving
//! each back to the pool.
//!
//! sqlx checks every connection given back to its pool with a round trip to the server (a
//! Sync message and its answer), in a task of its own. The hop's statements (a completion or
//! a batch of them, a claim, a fetch) are one round trip each: that is as many again, each
//! waking the server's backend and the service. A connection kept here goes back to no pool between statements,
//! so it costs nothing but the statement. One idle long enough to have been cut meanwhile (a
//! restart, a proxy's idle timeout) is checked before it is used again, as the pool checks
//! its own; one whose statement failed or was abandoned goes back to the pool, which checks
//! it and closes it if it is broken.
//!
//! Kept connections are out of the pool's reach, so they are kept only while the hop uses
//! them: a task gives back those unused for a second, a connection finishing its statement
//! while the pool has none left is given back (others may be waiting), and the moment the
//! pool is asked to close (which waits for every connection taken from it) all go back and
//! none is kept any more.
//!
//! A statement that can run long (creating a large task) is cancelled when its caller stops
//! waiting ([`Held::cancel_if_abandoned`]): dropping a sqlx future does not stop the statement,
//! PostgreSQL runs it to the end and commits it unless told otherwise. A gRPC request whose
//! client gave up is dropped by tonic; its connection is then closed rather than given back,
//! and `pg_cancel_backend` is sent for its backend from another connection. Because the
//! connection is never used again, the cancel cannot hit anyone else's statement. The
//! backend's pid is asked once per connection and kept with it.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use super::{StoreError, CHECK_IDLE_AFTER};

/// A kept connection: since when, and its backend's pid once asked.
#[derive(Debug)]
struct Kept {
    conn: PoolConnection<Postgres>,
    backend_pid: Option<i32>,
    since: Instant,
}

/// Up to `keep` connections taken from a pool and kept between uses.
#[derive(Debug)]
pub struct HeldConnections {
    pool: PgPool,
    idle: Arc<Mutex<Idle>>,
    keep: usize,
    /// A kept connection idle this long is checked before it is used again.
    check_after: Duration,
}

#[derive(Debug, Default)]
struct Idle {
    conns: Vec<Kept>,
    /// The pool was asked to close: nothing is kept any more.
    closed: bool,
}

impl HeldConnections {
    /// Keeps up to `keep` connections of `pool`, and never more than half of the pool's
    /// size, so that the rest of the service always finds connections there.
    pub fn new(pool: &PgPool, keep: usize) -> Self {
        let half = (pool.options().get_max_connections() / 2).max(1) as usize;
        let idle = Arc::new(Mutex::new(Idle::default()));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(give_back_unused(pool.clone(), Arc::downgrade(&idle)));
        }
        Self {
            pool: pool.clone(),
            idle,
            keep: keep.min(half),
            check_after: CHECK_IDLE_AFTER,
        }
    }

    /// A kept connection (checked first if it has been idle a while), else one from the pool.
    pub async fn take(&self) -> Result<Held<'_>, StoreError> {
        let kept = self.idle.lock().expect("no holder panicked").conns.pop();
        let (conn, backend_pid) = match kept {
            Some(mut k) => {
                if k.since.elapsed() < self.check_after || k.conn.ping().await.is_ok() {
                    (k.conn, k.backend_pid)
                } else {
                    // cut while idle: the pool closes it on its own check
                    drop(k);
                    (self.pool.acquire().await?, None)
                }
            }
            None => (self.pool.acquire().await?, None),
        };
        Ok(Held {
            conn: Some(conn),
            home: self,
            last: Statement::None,
            backend_pid,
            cancel_if_abandoned: false,
        })
    }
}

/// Gives the pool back the kept connections unused for `CHECK_IDLE_AFTER` (the hop went
/// quiet: others may need them), and all of them the moment the pool is asked to close.
async fn give_back_unused(pool: PgPool, idle: Weak<Mutex<Idle>>) {
    let closing = pool.close_event();
    tokio::pin!(closing);
    let mut sweep = tokio::time::interval(CHECK_IDLE_AFTER);
    loop {
        let closed = tokio::select! {
            _ = &mut closing => true,
            _ = sweep.tick() => false,
        };
        let Some(idle) = idle.upgrade() else { return };
        let mut idle = idle.lock().expect("no holder panicked");
        if closed {
            idle.closed = true;
            idle.conns.clear();
            return;
        }
        idle.conns.retain(|k| k.since.elapsed() < CHECK_IDLE_AFTER);
    }
}

/// A connection taken from [`HeldConnections`]: kept again when dropped after
/// [`Held::finish`] saw its statement end soundly, else given back to the pool.
pub struct Held<'a> {
    conn: Option<PoolConnection<Postgres>>,
    home: &'a HeldConnections,
    /// Where the last statement is: only a connection whose statement ended soundly is kept,
    /// so an abandoned one (its future dropped mid-way) never leaves unread answers kept.
    last: Statement,
    /// The connection's backend, once asked.
    backend_pid: Option<i32>,
    /// A statement abandoned mid-way is cancelled (see the module's doc).
    cancel_if_abandoned: bool,
}

/// A held connection's last statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statement {
    /// None ran yet.
    None,
    /// Started, its end not yet seen: dropped now, it is abandoned.
    Running,
    /// Ended with the connection usable: an answer, or an error the server sent.
    Sound,
    /// Ended with the connection lost or left mid-answer (not abandoned: nothing to cancel).
    Lost,
}

impl Held<'_> {
    /// The connection, for one statement; its result goes through [`Held::finish`].
    pub fn conn(&mut self) -> &mut PgConnection {
        self.last = Statement::Running;
        self.conn.as_mut().expect("held until dropped")
    }

    /// From now on, a statement abandoned mid-way (this dropped before [`Held::finish`]) is
    /// cancelled and the connection closed. Asks the backend's pid the first time a connection
    /// is used so (one round trip), and keeps it with the connection.
    pub async fn cancel_if_abandoned(&mut self) -> Result<(), StoreError> {
        if self.backend_pid.is_none() {
            let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(self.conn())
                .await;
            self.backend_pid = Some(self.finish(pid)?);
        }
        self.cancel_if_abandoned = true;
        Ok(())
    }

    /// The statement ended with `result`: a connection lost (or left mid-answer) is not kept.
    pub fn finish<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        self.finished(result.map_err(StoreError::from))
    }

    /// [`Held::finish`] for a result already in the store's terms.
    pub fn finished<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.last = match &result {
            Err(e) if e.is_connection_lost() => Statement::Lost,
            _ => Statement::Sound,
        };
        result
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.last != Statement::Sound {
            if let (Statement::Running, true, Some(pid)) =
                (self.last, self.cancel_if_abandoned, self.backend_pid)
            {
                cancel_abandoned(&mut conn, pid, &self.home.pool);
            }
            return;
        }
        let pool = &self.home.pool;
        // a pool with every connection out may have callers waiting: this one goes to them
        let exhausted = pool.size() >= pool.options().get_max_connections() && pool.num_idle() == 0;
        let mut idle = self.home.idle.lock().expect("no holder panicked");
        if !idle.closed && !pool.is_closed() && !exhausted && idle.conns.len() < self.home.keep {
            idle.conns.push(Kept {
                conn,
                backend_pid: self.backend_pid,
                since: Instant::now(),
            });
        }
    }
}

/// A statement abandoned on `conn` (backend `pid`): the connection is closed, not given back,
/// and the statement cancelled from another connection.
fn cancel_abandoned(conn: &mut PoolConnection<Postgres>, pid: i32, pool: &PgPool) {
    conn.close_on_drop();
    tracing::debug!(
        backend_pid = pid,
        "request dropped: cancelling its statement"
    );
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let pool = pool.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn backend_pid(conn: &mut PgConnection) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    /// A connection whose statement ended soundly is kept, out of the pool's reach: the pool
    /// hands out another one meanwhile, and the next take gets it back. One whose statement
    /// lost the connection is let go.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_sound_connection_is_kept_and_a_lost_one_let_go(pool: PgPool) {
        let held = HeldConnections::new(&pool, 1);
        let mut h = held.take().await.unwrap();
        let kept = backend_pid(h.conn()).await;
        h.finish(Ok(())).unwrap();
        drop(h);
        let mut other = pool.acquire().await.unwrap();
        assert_ne!(
            backend_pid(&mut other).await,
            kept,
            "the kept one stays out of the pool"
        );
        let mut h = held.take().await.unwrap();
        assert_eq!(backend_pid(h.conn()).await, kept);
        assert!(h.finish::<()>(Err(sqlx::Error::PoolClosed)).is_err());
        drop(h);
        assert_eq!(held.idle.lock().unwrap().conns.len(), 0);
        let mut h = held.take().await.unwrap();
        // a statement abandoned mid-way (no word of its end) leaves nothing kept either
        let _ = h.conn();
        drop(h);
        assert_eq!(held.idle.lock().unwrap().conns.len(), 0);
        drop(other);
        // a kept connection cut while idle is checked before use, and replaced
        let held = HeldConnections {
            check_after: Duration::ZERO,
            ..HeldConnections::new(&pool, 1)
        };
        let mut h = held.take().await.unwrap();
        let cut = backend_pid(h.conn()).await;
        h.finish(Ok(())).unwrap();
        drop(h);
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
            .bind(cut)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(terminated);
        let mut h = held.take().await.unwrap();
        assert_ne!(backend_pid(h.conn()).await, cut);
    }

    /// The backend's pid a cancel needs is asked once per connection and kept with it; a
    /// statement abandoned mid-way after `cancel_if_abandoned` is cancelled, and its
    /// connection not kept.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn the_pid_is_asked_once_and_an_abandoned_statement_is_cancelled(pool: PgPool) {
        let held = HeldConnections::new(&pool, 1);
        let mut h = held.take().await.unwrap();
        assert_eq!(h.backend_pid, None);
        h.cancel_if_abandoned().await.unwrap();
        let pid = backend_pid(h.conn()).await;
        assert_eq!(h.backend_pid, Some(pid));
        h.finish(Ok(())).unwrap();
        drop(h);
        let mut h = held.take().await.unwrap();
        assert_eq!(h.backend_pid, Some(pid), "kept with its connection");
        h.cancel_if_abandoned().await.unwrap();
        let abandoned = sqlx::query("SELECT pg_sleep(60)").execute(h.conn());
        assert!(tokio::time::timeout(Duration::from_millis(300), abandoned)
            .await
            .is_err());
        drop(h);
        assert_eq!(held.idle.lock().unwrap().conns.len(), 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sleeping: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep(60)%' AND state = 'active'",
            )
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap();
            if sleeping == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the abandoned statement still runs"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A statement that ended with its connection reported lost was not abandoned: nothing is
    /// cancelled and the connection goes back to the pool (which checks it), not closed.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_statement_that_ended_is_not_cancelled(pool: PgPool) {
        let one = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(pool.connect_options().as_ref().clone())
            .await
            .unwrap();
        let held = HeldConnections::new(&one, 1);
        let mut h = held.take().await.unwrap();
        h.cancel_if_abandoned().await.unwrap();
        let pid = backend_pid(h.conn()).await;
        assert!(h.finish::<()>(Err(sqlx::Error::PoolClosed)).is_err());
        drop(h);
        let mut again = one.acquire().await.unwrap();
        assert_eq!(backend_pid(&mut again).await, pid, "given back, not closed");
    }

    /// Closing the pool does not wait for the kept connections: they go back to it, and
    /// nothing is kept after.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn closing_the_pool_takes_back_the_kept_connections(pool: PgPool) {
        let held = HeldConnections::new(&pool, 2);
        let mut a = held.take().await.unwrap();
        let mut b = held.take().await.unwrap();
        for h in [&mut a, &mut b] {
            let done = sqlx::query("SELECT 1").execute(h.conn()).await;
            h.finish(done).unwrap();
        }
        drop(a);
        let closing = pool.close();
        // taken before the close, given back after it: not kept
        drop(b);
        tokio::time::timeout(Duration::from_secs(30), closing)
            .await
            .expect("the pool closed with connections kept");
        assert_eq!(held.idle.lock().unwrap().conns.len(), 0);
    }

    /// A connection finishing its statement while the pool has none left goes back to it.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn an_exhausted_pool_gets_its_connection_back(pool: PgPool) {
        let small = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(pool.connect_options().as_ref().clone())
            .await
            .unwrap();
        let held = HeldConnections::new(&small, 1);
        let mut h = held.take().await.unwrap();
        let done = sqlx::query("SELECT 1").execute(h.conn()).await;
        h.finish(done).unwrap();
        let _other = small.acquire().await.unwrap();
        assert_eq!(small.size(), 2);
        drop(h);
        assert_eq!(held.idle.lock().unwrap().conns.len(), 0);
    }

    /// Never more than half of the pool is kept.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn at_most_half_the_pool_is_kept(pool: PgPool) {
        let max = pool.options().get_max_connections() as usize;
        assert_eq!(HeldConnections::new(&pool, 10_000).keep, max / 2);
        assert_eq!(HeldConnections::new(&pool, 1).keep, 1);
    }
}
