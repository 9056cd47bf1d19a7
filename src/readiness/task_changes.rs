//! `TaskWatches`: the tasks WatchTask streams follow, woken when the database announces a
//! change of one (its state, steps of it becoming ready), so that their feeds read it at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The tasks `WatchTask` streams are following, each with a wake-up per stream. A change the
/// database announces for a task (its state, steps of it becoming ready) wakes its streams,
/// which read what changed; each wake-up is a permit, so one that comes while a stream is busy
/// reading is not lost.
#[derive(Clone, Default)]
pub struct TaskWatches {
    inner: Arc<Mutex<WatchedTasks>>,
    next_id: Arc<AtomicU64>,
}

/// Each watched task's streams: (stream id, its wake-up).
type WatchedTasks = HashMap<uuid::Uuid, Vec<(u64, Arc<Notify>)>>;

impl TaskWatches {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follow `task` until the returned watch is dropped.
    pub fn watch(&self, task: uuid::Uuid) -> TaskWatch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(task)
            .or_default()
            .push((id, notify.clone()));
        TaskWatch {
            watches: self.clone(),
            task,
            id,
            notify,
        }
    }

    /// The database announced a change of `task`: wake its streams.
    pub fn changed(&self, task: uuid::Uuid) {
        if let Some(streams) = self.lock().get(&task) {
            for (_, n) in streams {
                n.notify_one();
            }
        }
    }

    /// Tasks watched now.
    pub fn watched(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchedTasks> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's following of a task; dropping it stops the following.
pub struct TaskWatch {
    watches: TaskWatches,
    task: uuid::Uuid,
    id: u64,
    notify: Arc<Notify>,
}

impl TaskWatch {
    /// A change was announced since the last call (or comes now).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

impl Drop for TaskWatch {
    fn drop(&mut self) {
        let mut map = self.watches.lock();
        if let Some(streams) = map.get_mut(&self.task) {
            streams.retain(|(id, _)| *id != self.id);
            if streams.is_empty() {
                map.remove(&self.task);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_wakes_each_watch_of_the_task_once_and_a_dropped_watch_leaves_nothing() {
        let watches = TaskWatches::new();
        let (t, other) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let (a, b) = (watches.watch(t), watches.watch(t));
        // announced while nobody waits: kept as a permit
        watches.changed(t);
        watches.changed(other);
        use futures::FutureExt;
        assert!(a.changed().now_or_never().is_some());
        assert!(b.changed().now_or_never().is_some());
        assert!(
            a.changed().now_or_never().is_none(),
            "one permit per change"
        );
        drop(a);
        assert_eq!(watches.watched(), 1);
        drop(b);
        assert_eq!(watches.watched(), 0);
    }
}
