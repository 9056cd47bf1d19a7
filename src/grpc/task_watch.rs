//! WatchTask: one task's changes as a stream, so that a caller waits for a task without
//! polling GetTask.
//!
//! ```text
//!  follow the task (TaskWatches) ─> snapshot: the task + the id of its last transition,
//!                                    in one read; its steps' states
//!  loop: woken (the database announced a change of it) or after recheck_after(...)
//!        ─> steps whose state or attempt differs from the last look ─> step_state events
//!        ─> task transitions after the last id, from its history ─> task_state events
//!        ─> complete or cancelled: end
//! ```
//!
//! The task's own changes come from `tasker.task_transitions`, which records every one under
//! the task's row lock, so reading on from the last id seen gives each change once and in
//! order, whatever announcements were lost. Following starts before the snapshot is read, so
//! no change can fall between the snapshot and the stream. Steps are compared with their last
//! look: their moves are not all announced (a fetch's lease is not), so between two looks a
//! step that moved twice shows one change; [`recheck_after`] bounds how late a step's change
//! shows (1 s after a change, up to 8 s on a quiet task; 1 s without a listener).

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

use super::context::ApiContext;
use super::task_api::{step_to_proto, task_to_proto};
use crate::events::ListenerState;
use crate::proto::{self, v1, words};
use crate::store::StepRecord;
use crate::wakeups::TaskWatch;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchTaskResponse, Status>> + Send>>;

/// How often a stream looks at its task with no announcement: step moves the database does not
/// announce, and a replica that does not LISTEN (PollingOnly).
const RECHECK: Duration = Duration::from_secs(1);

/// The longest a stream of a listening replica waits between looks at a quiet task.
const RECHECK_MAX_QUIET: Duration = Duration::from_secs(8);

/// How long a stream waits for an announcement before it looks anyway, after `quiet_looks`
/// looks in a row found nothing new. While this replica listens, a task's state changes and
/// its steps becoming ready are announced and wake the stream at once; only step moves that
/// change neither (enqueued, leased, waiting for a retry) wait for a look. So a look follows a
/// change by a second, and each quiet look doubles the wait, up to [`RECHECK_MAX_QUIET`]: a
/// task whose steps run for minutes costs its watchers a look every 8 s, not every second.
/// Without a listener (PollingOnly, or while it reconnects) nothing is announced: every second.
fn recheck_after(quiet_looks: u32, listening: bool) -> Duration {
    if !listening {
        return RECHECK;
    }
    RECHECK
        .saturating_mul(1 << quiet_looks.min(8))
        .min(RECHECK_MAX_QUIET)
}

/// Messages buffered for a slow client before the stream waits for it.
const BUFFER: usize = 64;

/// Steps read per look: every step of the largest task.
const STEPS: i64 = crate::limits::MAX_STEPS as i64;

fn is_final(state: &str) -> bool {
    matches!(state, "complete" | "cancelled")
}

/// The stream for `task_uuid`: NOT_FOUND before any message when there is no such task.
pub async fn watch_task(ctx: &ApiContext, task_uuid: Uuid) -> Result<WatchStream, Status> {
    let watch = ctx.watches.watch(task_uuid);
    let (task, last) = ctx.store.task_with_last_transition(task_uuid).await?;
    let (steps, _) = ctx
        .store
        .get_steps(task_uuid, None, STEPS, false, usize::MAX)
        .await?;
    let done = is_final(&task.state);
    let mut looks = StepLooks::default();
    looks.changes(&steps);
    let mut snapshot = task_to_proto(task);
    snapshot.steps = steps.into_iter().map(step_to_proto).collect();
    let (tx, rx) = mpsc::channel(BUFFER);
    tx.try_send(Ok(event(v1::watch_task_response::Event::Snapshot(
        snapshot,
    ))))
    .expect("an empty channel has room");
    if !done {
        let follower = Follower {
            ctx: ctx.clone(),
            task_uuid,
            watch,
            last,
            looks,
            tx,
        };
        tokio::spawn(follower.run());
    }
    Ok(Box::pin(ReceiverStream::new(rx)))
}

fn event(e: v1::watch_task_response::Event) -> v1::WatchTaskResponse {
    v1::WatchTaskResponse { event: Some(e) }
}

/// The last look at each step: state and attempt.
#[derive(Default)]
struct StepLooks(HashMap<Uuid, (String, i32)>);

impl StepLooks {
    /// The changes since the last look, remembered as the new one.
    fn changes(&mut self, steps: &[StepRecord]) -> Vec<v1::StepStateChange> {
        let mut changes = Vec::new();
        for s in steps {
            let now = (s.state.clone(), s.attempts);
            match self.0.insert(s.step_uuid, now) {
                Some((from, attempts)) if from != s.state || attempts != s.attempts => changes
                    .push(v1::StepStateChange {
                        step_uuid: s.step_uuid.to_string(),
                        name: s.name.clone(),
                        from_state: words::raw::<v1::StepState>(&from),
                        to_state: words::raw::<v1::StepState>(&s.state),
                        attempts: s.attempts,
                    }),
                _ => {}
            }
        }
        changes
    }
}

struct Follower {
    ctx: ApiContext,
    task_uuid: Uuid,
    watch: TaskWatch,
    /// Id of the last task transition sent (or shown by the snapshot).
    last: i64,
    looks: StepLooks,
    tx: mpsc::Sender<Result<v1::WatchTaskResponse, Status>>,
}

impl Follower {
    async fn run(mut self) {
        let drained = self.ctx.drained();
        tokio::pin!(drained);
        let listener = self.ctx.coordinator.listener_status();
        let mut quiet_looks = 0;
        loop {
            let listening = listener.borrow().state == ListenerState::Listening;
            let woken = tokio::select! {
                _ = &mut drained => return,
                _ = self.tx.closed() => return,
                _ = self.watch.changed() => true,
                _ = tokio::time::sleep(recheck_after(quiet_looks, listening)) => false,
            };
            match self.look().await {
                Ok(Some(sent)) => {
                    quiet_looks = if woken || sent { 0 } else { quiet_looks + 1 };
                }
                // the task is final, or the client went away
                Ok(None) => return,
                Err(e) => {
                    // the database is away: look again on the next round
                    tracing::warn!(task_uuid = %self.task_uuid, error = %e, "watching a task: reading it failed");
                }
            }
        }
    }

    /// Send what changed since the last look: whether anything did; `None` when the stream is
    /// over.
    async fn look(&mut self) -> Result<Option<bool>, crate::store::StoreError> {
        let steps = self
            .ctx
            .store
            .get_steps(self.task_uuid, None, STEPS, false, usize::MAX)
            .await?
            .0;
        let transitions = self
            .ctx
            .store
            .task_transitions_after(self.task_uuid, self.last)
            .await?;
        let changes = self.looks.changes(&steps);
        let sent = !changes.is_empty() || !transitions.is_empty();
        for change in changes {
            if !self
                .send(v1::watch_task_response::Event::StepState(change))
                .await
            {
                return Ok(None);
            }
        }
        for t in transitions {
            self.last = t.id;
            let done = is_final(&t.to_state);
            let change = v1::TaskStateChange {
                sequence: t.id,
                from_state: t
                    .from_state
                    .map_or(0, |from| words::raw::<v1::TaskState>(&from)),
                to_state: words::raw::<v1::TaskState>(&t.to_state),
                at: Some(proto::timestamp(t.created_at)),
            };
            if !self
                .send(v1::watch_task_response::Event::TaskState(change))
                .await
                || done
            {
                return Ok(None);
            }
        }
        Ok(Some(sent))
    }

    async fn send(&self, e: v1::watch_task_response::Event) -> bool {
        self.tx.send(Ok(event(e))).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_task_is_looked_at_less_and_less_only_while_announcements_come() {
        let listening: Vec<u64> = (0..6).map(|q| recheck_after(q, true).as_secs()).collect();
        assert_eq!(listening, [1, 2, 4, 8, 8, 8]);
        assert_eq!(recheck_after(40, true), RECHECK_MAX_QUIET);
        assert!((0..6).all(|q| recheck_after(q, false) == RECHECK));
    }
}
