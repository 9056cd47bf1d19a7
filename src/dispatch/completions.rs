//! `CompletionBatcher`: groups concurrent step completions into one transaction.
//!
//! A completion that makes a step ready NOTIFYs, and PostgreSQL serializes the commits of
//! notifying transactions on one lock held through the WAL flush. Under many concurrent
//! completions that lock, not the work, sets the pace. The batcher takes whatever completions
//! are waiting when an executor is free (up to `max_batch`) and commits them together with
//! `tasker.complete_steps_and_claim`: one commit, one pass through the lock, the same per-item
//! checks and outcomes as one-by-one; a completion asking for its next steps (eager dispatch)
//! claims and enqueues what it made ready inside the batch. With nothing else waiting and an
//! executor free, a completion runs alone in its caller's own task: a lone worker sees no added
//! latency, and its hop no hand-off to the batcher's task and back (each a wake-up of another
//! task, often on another thread). (Each batch runs on a connection the store keeps between
//! the hop's statements: see `store::held`.)
//!
//! ```text
//!  complete() ─┬─> [queue empty, executor free] runs alone, in the caller's task
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
    /// `executors` batches may run at once (their non-commit work overlaps).
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
        // nothing waiting and an executor free: this completion would be a batch of one,
        // run here (a waiting batch takes a freed executor first: the semaphore is fair)
        if self.tx.capacity() == self.tx.max_capacity() {
            if let Ok(_executor) = self.executors.try_acquire() {
                return one(&self.store, &completion).await;
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
