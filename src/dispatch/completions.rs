//! `CompletionBatcher`: groups concurrent step completions into one transaction.
//!
//! A completion that makes a step ready NOTIFYs, and PostgreSQL serializes the commits of
//! notifying transactions on one lock held through the WAL flush. Under many concurrent
//! completions that lock, not the work, sets the pace. The batcher takes whatever completions
//! are waiting when an executor is free (up to `max_batch`) and commits them together with
//! `tasker.complete_steps_and_claim`: one commit, one pass through the lock, the same per-item
//! checks and outcomes as one-by-one; a completion asking for its next steps (eager dispatch)
//! claims and enqueues what it made ready inside the batch. With nothing else waiting and an
//! executor free, a completion runs alone at once, in a task of its own: a lone worker sees no
//! added latency, and its hop no trip through the queue and the batcher's task (each a
//! wake-up of another task, often on another thread). Like a batch, it finishes even if its
//! caller goes away. (Each batch runs on a connection the store keeps between the hop's
//! statements: see `store::held`.)
//!
//! ```text
//!  complete() ─┬─> [queue empty, executor free] runs alone, at once
//!              └─> queue ──> [executor free] take first + everything waiting (<= max_batch)
//!                              └─> one transaction ──> each caller gets its own outcome
//!                                  (on a whole-batch error: each item again on its own)
//! ```

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store::{Completion, EagerEnqueue, Store, StoreError};

/// A completion's outcome, with the enqueue it ran itself when it asked for its next steps.
type Outcome = Result<Option<EagerEnqueue>, StoreError>;
type Reply = oneshot::Sender<Outcome>;

/// Completions waiting for an executor; senders wait when it is full.
const QUEUE: usize = 4096;

#[derive(Clone)]
pub struct CompletionBatcher {
    tx: mpsc::Sender<(Completion, Reply)>,
    stop: CancellationToken,
    store: Store,
    /// One per batch (or lone completion) in flight.
    executors: Arc<Semaphore>,
}

impl CompletionBatcher {
    /// `executors` batches, or lone completions, may run at once (their non-commit work
    /// overlaps).
    pub fn spawn(store: Store, max_batch: usize, executors: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let executors = executors.max(1);
        let permits = Arc::new(Semaphore::new(executors));
        tokio::spawn(
            run(
                store.clone(),
                rx,
                max_batch.max(1),
                (permits.clone(), executors),
                stop.clone(),
            )
            .instrument(tracing::info_span!("completion_batcher")),
        );
        Self {
            tx,
            stop,
            store,
            executors: permits,
        }
    }

    /// Refuse new completions (`ShuttingDown`), commit those already queued, and return once
    /// every batch has finished.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tx.closed().await;
    }

    pub async fn complete(&self, completion: Completion) -> Outcome {
        if self.stop.is_cancelled() {
            return Err(StoreError::ShuttingDown);
        }
        // nothing waiting and an executor free: this completion would be a batch of one, run
        // at once (a waiting batch takes a freed executor first: the semaphore is fair); in a
        // task of its own, as a batch runs, so that a caller gone mid-way abandons nothing
        if self.tx.capacity() == self.tx.max_capacity() {
            if let Ok(executor) = self.executors.clone().try_acquire_owned() {
                let store = self.store.clone();
                let alone = tokio::spawn(async move {
                    let outcome = one(&store, &completion).await;
                    drop(executor);
                    outcome
                });
                // no answer: the runtime stopped under it; as for an abandoned batch below
                return alone.await.unwrap_or(Err(StoreError::ShuttingDown));
            }
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((completion, reply))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        // no reply: the batch was abandoned as the runtime stopped; whether it committed is
        // unknown, and a retry of the same attempt answers that
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }
}

async fn run(
    store: Store,
    mut rx: mpsc::Receiver<(Completion, Reply)>,
    max_batch: usize,
    (permits, executors): (Arc<Semaphore>, usize),
    stop: CancellationToken,
) {
    loop {
        // the first waiting completion; then an executor (lone completions may hold them all)
        let first = tokio::select! {
            biased;
            item = rx.recv() => item,
            _ = stop.cancelled() => {
                // no new completions; what is queued is still committed
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // take everything that queued behind it meanwhile
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            execute(&store, batch).await;
            drop(permit);
        });
    }
    // every executor is back: the batches (and lone completions) in flight have answered;
    // closed, so that no completion runs alone after this (it is refused: ShuttingDown)
    let all = permits.acquire_many(executors as u32).await;
    permits.close();
    drop(all);
}

async fn execute(store: &Store, batch: Vec<(Completion, Reply)>) {
    if batch.len() == 1 {
        let (c, reply) = batch.into_iter().next().expect("one item");
        let _ = reply.send(one(store, &c).await);
        return;
    }
    let (items, replies): (Vec<Completion>, Vec<Reply>) = batch.into_iter().unzip();
    match store.complete_steps(&items).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            // the whole transaction failed (a deadlock with a lease sweep, a lost connection):
            // nothing was committed, so every item gets its own attempt
            tracing::warn!(error = %e, items = items.len(), "batched completion failed; completing one by one");
            for (c, reply) in items.iter().zip(replies) {
                let _ = reply.send(one(store, c).await);
            }
        }
    }
}

async fn one(store: &Store, c: &Completion) -> Outcome {
    if c.next.is_some() {
        return store.complete_step_and_claim(c).await;
    }
    store
        .complete_step(
            c.lease,
            &c.results,
            &serde_json::json!({}),
            c.traceparent.as_deref(),
        )
        .await
        .map(|()| None)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use sqlx::PgPool;
    use uuid::Uuid;

    use super::*;
    use crate::model::dag::TaskSpec;
    use crate::model::namespaces::DEFAULT_QUEUE;
    use crate::store::LeasedStep;

    const WAIT: Duration = Duration::from_secs(10);

    /// Claim what is ready of `task` and lease every queued step of its namespace.
    async fn lease_ready(store: &Store, task: Uuid) -> Vec<LeasedStep> {
        store
            .claim_and_enqueue(task, &json!({}), None, &[], None)
            .await
            .unwrap();
        let queues = [DEFAULT_QUEUE.to_string()];
        store
            .fetch_steps("batching", &queues, "w", 100, 60_000)
            .await
            .unwrap()
    }

    fn completion(step: &LeasedStep) -> Completion {
        Completion {
            lease: step.held(),
            results: json!({}),
            traceparent: None,
            next: None,
        }
    }

    /// Completions that come while every executor is busy wait and commit together, in one
    /// transaction; one that comes with nothing waiting and an executor free runs at once (it
    /// completes though nothing reads the queue).
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn waiting_completions_commit_together_and_a_lone_one_needs_no_batcher(pool: PgPool) {
        let store = Store::new(pool.clone());
        let spec = TaskSpec::fan("batching", 3).into_new_task().unwrap();
        let task = store.create_task(&spec, &json!({}), None).await.unwrap();
        let root = lease_ready(&store, task.task_uuid).await;
        store
            .complete_step(root[0].held(), &json!({}), &json!({}), None)
            .await
            .unwrap();
        let children = lease_ready(&store, task.task_uuid).await;
        assert_eq!(children.len(), 3);

        // the one executor held: the three queue (the loop holds the first, waiting for it)
        let batcher = CompletionBatcher::spawn(store.clone(), 64, 1);
        let busy = batcher.executors.clone().try_acquire_owned().unwrap();
        let waiting: Vec<_> = children
            .iter()
            .map(|c| {
                tokio::spawn({
                    let (b, c) = (batcher.clone(), completion(c));
                    async move { b.complete(c).await }
                })
            })
            .collect();
        // (the test's runtime runs one task at a time: two queued means all three were sent)
        tokio::time::timeout(WAIT, async {
            while batcher.tx.max_capacity() - batcher.tx.capacity() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the completions queued");
        drop(busy);
        for w in waiting {
            assert!(matches!(w.await.unwrap(), Ok(None)));
        }
        let ids: Vec<Uuid> = children.iter().map(|c| c.step_uuid).collect();
        let transactions: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT xmin::text) FROM tasker.workflow_steps WHERE step_uuid = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(transactions, 1, "the waiting completions committed apart");

        // the join, completed through a batcher whose queue nobody reads
        let join = lease_ready(&store, task.task_uuid).await;
        let (tx, _unread) = mpsc::channel(QUEUE);
        let lone = CompletionBatcher {
            tx,
            stop: CancellationToken::new(),
            store: store.clone(),
            executors: Arc::new(Semaphore::new(1)),
        };
        let done = tokio::time::timeout(WAIT, lone.complete(completion(&join[0])))
            .await
            .expect("a lone completion waited for the batcher");
        assert!(matches!(done, Ok(None)));
    }
}
