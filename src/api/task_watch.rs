//! WatchTask: one task's changes as a stream, so that a caller waits for a task without
//! polling GetTask.
//!
//! Every stream of a task shares one [`Feed`]: one follower reads what changed and fans it out
//! in memory, so a change costs the database one read however many watch the task, and each
//! stream only the messages of its delta (4,096 streams on one task each re-reading every step
//! at every change used to slow every hop of the service ~200x).
//!
//! ```text
//!  stream: take a place (grpc.max_watch_streams, _per_caller) ─> subscribe to the task's feed
//!          ─> wait for the feed's first look (where it counts changes from)
//!          ─> snapshot: the task + the id of its last transition, in one read; its steps
//!          ─> forward the feed's changes newer than the snapshot (a task change by its
//!             sequence, a step change when it differs from the stream's last look at the
//!             step) ─> complete or cancelled: end; the server drains: UNAVAILABLE
//!  feed:   one per watched task, while a stream follows it
//!          woken (the database announced a change of the task) or after recheck_after(...)
//!          ─> task transitions after the last id (its history) ─> task changes
//!          ─> steps updated since the last look (a margin before it) whose state or attempt
//!             differs from the last look ─> step changes
//! ```
//!
//! What is sent: every change of the task's state, in order, none missed (`tasker.task_transitions`
//! records each under the task's row lock, so reading on from the last id seen gives each once
//! and in order, whatever announcements were lost). For steps, each change between two looks
//! of the feed: a look follows each announcement of the task (its state changing, steps of it
//! becoming ready) and otherwise comes after [`recheck_after`] (1 s after a change, up to 8 s on
//! a quiet task; 1 s without a listener). A step that moved twice between two looks (leased and
//! completed within one) shows as one change, from the state of the last look to the state
//! now, with its attempt.
//!
//! A stream too slow for the feed's buffer reads what it missed from the database itself, then
//! goes on with the feed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

use super::context::ApiContext;
use super::task_api::{step_to_proto, task_to_proto};
use crate::dispatch::quota::{Limit, Place, Quota};
use crate::model::states::{StepState, TaskState};
use crate::proto::{self, v1, words};
use crate::readiness::ListenerState;
use crate::store::{StepSnapshot, Store, StoreError, TaskTransition};

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchTaskResponse, Status>> + Send>>;

/// How often a feed looks at its task with no announcement: step moves the database does not
/// announce, and a replica that does not LISTEN (PollingOnly).
const RECHECK: Duration = Duration::from_secs(1);

/// The longest a feed of a listening replica waits between looks at a quiet task.
const RECHECK_MAX_QUIET: Duration = Duration::from_secs(8);

/// A step's update becomes visible when its transaction commits, a moment after the time it
/// records: a look reads the steps updated since this long before the previous look.
const COMMIT_MARGIN: Duration = Duration::from_secs(5);

/// How long a feed waits for an announcement before it looks anyway, after `quiet_looks`
/// looks in a row found nothing new. While this replica listens, a task's state changes and
/// its steps becoming ready are announced and wake the feed at once; only step moves that
/// change neither (enqueued, leased, waiting for a retry) wait for a look. So a look follows a
/// change by a second, and each quiet look doubles the wait, up to [`RECHECK_MAX_QUIET`].
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

/// Changes a feed keeps for streams that fall behind; beyond, a stream reads what it missed.
const FEED_BUFFER: usize = 1024;

/// Steps read for a snapshot: every step of the largest task.
const STEPS: i64 = crate::model::limits::MAX_STEPS as i64;

/// Whether a task's change leaves it final: nothing more will happen to watch.
fn ends_the_task(t: &v1::TaskStateChange) -> bool {
    use crate::proto::Vocabulary;
    t.to_state()
        .word()
        .parse::<TaskState>()
        .is_ok_and(TaskState::is_final)
}

/// One change a feed saw.
#[derive(Clone, Debug)]
enum Change {
    Task(v1::TaskStateChange),
    /// A step's state and attempt as of the feed's look.
    Step(StepSnapshot),
}

/// The feeds of the watched tasks, and the places of the streams following them.
#[derive(Clone)]
pub struct TaskFeeds {
    feeds: Arc<Mutex<HashMap<Uuid, Weak<Feed>>>>,
    places: Arc<Quota>,
    /// Followers running: one per watched task.
    followers: Arc<std::sync::atomic::AtomicUsize>,
}

/// One watched task's changes, fanned out to its streams.
struct Feed {
    changes: broadcast::Sender<Change>,
    /// True once the follower's first look is taken: the feed carries every change after it.
    /// A stream reads its snapshot only then, so no change falls between the two (a change
    /// between a snapshot and a later first look would reach neither).
    looked: watch::Receiver<bool>,
}

impl TaskFeeds {
    pub fn new(max_streams: usize, max_streams_per_caller: usize) -> Self {
        Self {
            feeds: Arc::default(),
            places: Quota::new(
                Limit {
                    max: max_streams,
                    setting: "grpc.max_watch_streams",
                },
                &[Limit {
                    max: max_streams_per_caller,
                    setting: "grpc.max_watch_streams_per_caller",
                }],
            ),
            followers: Arc::default(),
        }
    }

    /// WatchTask streams open now.
    pub fn streams(&self) -> usize {
        *self.places.held().borrow()
    }

    /// Tasks followed now: their followers, one each however many streams.
    pub fn tasks(&self) -> usize {
        self.followers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Follow `task_uuid`'s feed, starting it if no stream follows the task yet.
    fn subscribe(
        &self,
        ctx: &ApiContext,
        task_uuid: Uuid,
    ) -> (Arc<Feed>, broadcast::Receiver<Change>) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(feed) = feeds.get(&task_uuid).and_then(Weak::upgrade) {
            let rx = feed.changes.subscribe();
            return (feed, rx);
        }
        let (changes, rx) = broadcast::channel(FEED_BUFFER);
        let (looked_tx, looked) = watch::channel(false);
        let feed = Arc::new(Feed { changes, looked });
        feeds.insert(task_uuid, Arc::downgrade(&feed));
        feeds.retain(|_, f| f.strong_count() > 0);
        let follower = Follower {
            ctx: ctx.clone(),
            task_uuid,
            feed: Arc::downgrade(&feed),
            changes: feed.changes.clone(),
            looked: looked_tx,
        };
        let running = self.followers.clone();
        running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            follower.run().await;
            running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
        (feed, rx)
    }
}

/// The stream for `task_uuid` of `caller`: NOT_FOUND before any message when there is no such
/// task, RESOURCE_EXHAUSTED when the caller (or the server) has every stream it may.
pub async fn watch_task(
    ctx: &ApiContext,
    task_uuid: Uuid,
    caller: &str,
) -> Result<WatchStream, Status> {
    let place = ctx.feeds.places.take(&[caller]).map_err(|full| {
        Status::resource_exhausted(format!(
            "{} WatchTask streams are open{} ({}); close one, or retry later",
            full.count,
            if full.key.is_some() {
                " for this caller"
            } else {
                ""
            },
            full.setting
        ))
    })?;
    // subscribed, and the feed's first look taken, before the snapshot is read: every change
    // after the snapshot is in the feed (the forwarder drops those the snapshot shows)
    let (feed, changes) = ctx.feeds.subscribe(ctx, task_uuid);
    // an Err: the follower has ended (its task finished), and the snapshot shows the end
    let _ = feed.looked.clone().wait_for(|looked| *looked).await;
    let (task, last) = ctx.store.task_with_last_transition(task_uuid).await?;
    let (steps, _) = ctx
        .store
        .get_steps(task_uuid, None, STEPS, false, usize::MAX)
        .await?;
    let done = task.state.is_final();
    let mut looks = StepLooks::default();
    for s in &steps {
        looks.0.insert(s.step_uuid, (s.state, s.attempts));
    }
    let mut snapshot = task_to_proto(task);
    snapshot.steps = steps.into_iter().map(step_to_proto).collect();
    let (tx, rx) = mpsc::channel(BUFFER);
    tx.try_send(Ok(event(v1::watch_task_response::Event::Snapshot(
        snapshot,
    ))))
    .expect("an empty channel has room");
    if !done {
        let forwarder = Forwarder {
            ctx: ctx.clone(),
            task_uuid,
            last,
            looks,
            tx,
            _feed: feed,
            _place: place,
        };
        tokio::spawn(forwarder.run(changes));
    }
    Ok(Box::pin(ReceiverStream::new(rx)))
}

fn event(e: v1::watch_task_response::Event) -> v1::WatchTaskResponse {
    v1::WatchTaskResponse { event: Some(e) }
}

fn task_change(t: TaskTransition) -> v1::TaskStateChange {
    v1::TaskStateChange {
        sequence: t.id,
        from_state: t
            .from_state
            .map_or(0, |from| words::raw::<v1::TaskState>(&from)),
        to_state: words::raw::<v1::TaskState>(&t.to_state),
        at: Some(proto::timestamp(t.created_at)),
    }
}

/// The last look at each step: state and attempt.
#[derive(Default)]
struct StepLooks(HashMap<Uuid, (StepState, i32)>);

impl StepLooks {
    /// The step's change since the last look, if it changed; remembered as the new look.
    fn change(&mut self, s: &StepSnapshot) -> Option<v1::StepStateChange> {
        let now = (s.state, s.attempts);
        match self.0.insert(s.step_uuid, now) {
            Some((from, attempts)) if from != s.state || attempts != s.attempts => {
                Some(v1::StepStateChange {
                    step_uuid: s.step_uuid.to_string(),
                    name: s.name.clone(),
                    from_state: words::raw::<v1::StepState>(&from),
                    to_state: words::raw::<v1::StepState>(&s.state),
                    attempts: s.attempts,
                })
            }
            _ => None,
        }
    }
}

/// Reads the task's changes for its feed while a stream follows it.
struct Follower {
    ctx: ApiContext,
    task_uuid: Uuid,
    /// Ends the follower once no stream holds the feed.
    feed: Weak<Feed>,
    changes: broadcast::Sender<Change>,
    /// Set after the first look (even a failed one: the reader then counts from the task's
    /// first transition, which is earlier than any snapshot).
    looked: watch::Sender<bool>,
}

impl Follower {
    async fn run(self) {
        let watch = self.ctx.watches.watch(self.task_uuid);
        let listener = self.ctx.mode_controller.listener_status();
        let mut reader = ChangeReader::new(self.ctx.store.clone(), self.task_uuid);
        let mut quiet_looks = 0;
        let mut first = true;
        loop {
            if !first {
                let listening = listener.borrow().state == ListenerState::Listening;
                let woken = tokio::select! {
                    _ = watch.changed() => true,
                    _ = tokio::time::sleep(recheck_after(quiet_looks, listening)) => false,
                };
                if self.feed.strong_count() == 0 {
                    return;
                }
                quiet_looks = if woken { 0 } else { quiet_looks + 1 };
            }
            match reader.read(first).await {
                Ok(changes) => {
                    if !changes.is_empty() {
                        quiet_looks = 0;
                    }
                    let mut done = false;
                    for change in changes {
                        done |= matches!(&change, Change::Task(t) if ends_the_task(t));
                        // no receiver: every stream has gone; the check above ends the feed
                        let _ = self.changes.send(change);
                    }
                    if done {
                        return;
                    }
                }
                Err(e) => {
                    // the database is away: look again on the next round
                    tracing::warn!(task_uuid = %self.task_uuid, error = %e, "watching a task: reading it failed");
                }
            }
            if first {
                let _ = self.looked.send(true);
            }
            first = false;
        }
    }
}

/// What changed of a task since the last read: its transitions after the last id seen, and
/// its steps whose state or attempt differs from the last read.
struct ChangeReader {
    store: Store,
    task_uuid: Uuid,
    last_transition: i64,
    looks: StepLooks,
    /// The database's time of the last read of the steps.
    steps_read_at: Option<DateTime<Utc>>,
}

impl ChangeReader {
    fn new(store: Store, task_uuid: Uuid) -> Self {
        Self {
            store,
            task_uuid,
            last_transition: 0,
            looks: StepLooks::default(),
            steps_read_at: None,
        }
    }

    /// The changes since the last read. The first read only learns where things stand (its
    /// steps' states; task transitions from now on) and reports nothing.
    async fn read(&mut self, first: bool) -> Result<Vec<Change>, StoreError> {
        if first {
            let (_, last) = self.store.task_with_last_transition(self.task_uuid).await?;
            self.last_transition = last;
        }
        let since = self
            .steps_read_at
            .map(|t| t - chrono::Duration::from_std(COMMIT_MARGIN).unwrap_or_default());
        // the task's transitions before its steps: a step's change commits with the task
        // transition it causes (the last step's, with the task's end), so a change committed
        // between the two reads shows its step now and its task transition at the next read,
        // never the task's end without the step change that made it
        let transitions = self
            .store
            .task_transitions_after(self.task_uuid, self.last_transition)
            .await?;
        let (steps, read_at) = self.store.step_states_since(self.task_uuid, since).await?;
        self.steps_read_at = Some(read_at);
        let mut changes = Vec::new();
        for s in steps {
            let changed = self.looks.change(&s).is_some();
            if changed && !first {
                changes.push(Change::Step(s));
            }
        }
        for t in transitions {
            self.last_transition = t.id;
            changes.push(Change::Task(task_change(t)));
        }
        Ok(changes)
    }
}

/// One stream: the feed's changes newer than its snapshot, each step change relative to what
/// this stream last showed of the step.
struct Forwarder {
    ctx: ApiContext,
    task_uuid: Uuid,
    /// Id of the last task transition sent (or shown by the snapshot).
    last: i64,
    looks: StepLooks,
    tx: mpsc::Sender<Result<v1::WatchTaskResponse, Status>>,
    /// Held while the stream lives: the feed runs while a stream holds it.
    _feed: Arc<Feed>,
    /// The stream's place under grpc.max_watch_streams.
    _place: Place,
}

impl Forwarder {
    async fn run(mut self, mut changes: broadcast::Receiver<Change>) {
        let drained = self.ctx.drained();
        tokio::pin!(drained);
        loop {
            let change = tokio::select! {
                _ = &mut drained => {
                    // the task is not finished: the client should watch again elsewhere
                    let _ = self
                        .tx
                        .send(Err(Status::unavailable(
                            "the server is shutting down; watch the task again (on another replica)",
                        )))
                        .await;
                    return;
                }
                _ = self.tx.closed() => return,
                c = changes.recv() => c,
            };
            let go_on = match change {
                Ok(c) => self.forward(c).await,
                Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                // the feed ended: its task is final, and its last change was forwarded
                Err(broadcast::error::RecvError::Closed) => false,
            };
            if !go_on {
                return;
            }
        }
    }

    /// Send one change if it is new to this stream; whether the stream goes on.
    async fn forward(&mut self, change: Change) -> bool {
        match change {
            Change::Task(t) if t.sequence > self.last => {
                self.last = t.sequence;
                let done = ends_the_task(&t);
                self.send(v1::watch_task_response::Event::TaskState(t))
                    .await
                    && !done
            }
            Change::Task(_) => true,
            Change::Step(s) => match self.looks.change(&s) {
                Some(c) => {
                    self.send(v1::watch_task_response::Event::StepState(c))
                        .await
                }
                None => true,
            },
        }
    }

    /// This stream fell behind the feed: read what it missed (every step, the transitions
    /// after its last), then go on with the feed.
    async fn catch_up(&mut self) -> bool {
        let read = async {
            let (steps, _) = self
                .ctx
                .store
                .step_states_since(self.task_uuid, None)
                .await?;
            let transitions = self
                .ctx
                .store
                .task_transitions_after(self.task_uuid, self.last)
                .await?;
            Ok::<_, StoreError>((steps, transitions))
        };
        let (steps, transitions) = match read.await {
            Ok(read) => read,
            Err(e) => {
                // the feed goes on; what was missed shows with the next change of each step
                tracing::warn!(task_uuid = %self.task_uuid, error = %e, "watching a task: catching up failed");
                return true;
            }
        };
        let changes = steps.into_iter().map(Change::Step).chain(
            transitions
                .into_iter()
                .map(|t| Change::Task(task_change(t))),
        );
        for c in changes {
            if !self.forward(c).await {
                return false;
            }
        }
        true
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
