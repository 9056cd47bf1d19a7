//! `ParkedFetches`: the `FetchSteps` long-polls waiting on each namespace, which an enqueue
//! hands its steps to in its own transaction (or wakes to read the queue).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::LeasedStep;

/// The `FetchSteps` long-polls parked on each namespace, first come first served, so that an
/// enqueue can hand its steps straight to them.
///
/// ```text
///  fetch:   queue known empty? park ─> (else) note epoch ─> read the queue ─> empty? park
///             ─> epoch moved? withdraw, read again
///             └─ wait: steps delivered (leased to it in the enqueue's transaction): return them
///                      sender dropped (a plain wake-up): read the queue again
///                      recheck interval / deadline / stop: withdraw (or, if already taken,
///                      wait for what is being delivered)
///  enqueue: take parked fetches ─> one transaction enqueues and leases to them ─> deliver;
///           give back the fetches that got nothing; wake one more fetch per step left queued
/// ```
///
/// The epoch closes the gap between a fetch's read of the queue and its parking: an enqueue
/// that committed in between (and found nobody parked) moved the epoch, so the fetch reads
/// again instead of waiting for the recheck. It also lets a fetch skip the read when an
/// earlier one found the queue empty and nothing has been queued since (`known_empty`): in a
/// chain, the worker's next fetch parks at once and its step is handed over, with no read. A delivery that finds its fetch gone (the client
/// hung up) fails to send, and the enqueuer puts the steps back on the queue.
///
/// Memory stays bounded whatever namespaces clients name: an entry without parked fetches is
/// only a hint (the epoch, the last empty read), so idle entries are dropped once there are
/// more than [`IDLE_ENTRIES_KEPT`]. Epochs come from one counter for all namespaces, so an
/// entry dropped and made again never shows a fetch the epoch it noted before.
///
/// What a fetch receives is the steps leased to it; the unit tests hand over plain values.
pub struct ParkedFetches<T = Vec<LeasedStep>> {
    inner: Arc<Mutex<HashMap<String, Parked<T>>>>,
    epochs: Arc<AtomicU64>,
}

/// Namespaces whose wake-up state is kept while nobody is parked on them.
pub const IDLE_ENTRIES_KEPT: usize = 1024;

impl<T> Clone for ParkedFetches<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            epochs: self.epochs.clone(),
        }
    }
}

impl<T> Default for ParkedFetches<T> {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            epochs: Arc::new(AtomicU64::new(0)),
        }
    }
}

struct Parked<T> {
    waiters: std::collections::VecDeque<Waiter<T>>,
    /// Bumped whenever steps of any queue of the namespace were queued without being handed
    /// to a parked fetch.
    epoch: u64,
    /// Reads of the namespace's queues that found them empty, per set of queues read, at this
    /// epoch, at this time (cleared when the epoch moves: they say nothing after).
    empty_at: HashMap<Queues, (u64, std::time::Instant)>,
    next_id: u64,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Self {
            waiters: Default::default(),
            epoch: 0,
            empty_at: HashMap::new(),
            next_id: 0,
        }
    }
}

/// The queues a fetch takes steps of, in its order of preference.
pub type Queues = Arc<[String]>;

/// A parked fetch, as the enqueuer sees it.
pub struct Waiter<T = Vec<LeasedStep>> {
    id: u64,
    pub worker_id: String,
    /// At most this many steps for it.
    pub max: i32,
    pub lease_ms: i64,
    /// The queues whose steps it takes.
    pub queues: Queues,
    deliver: tokio::sync::oneshot::Sender<T>,
    /// The namespace's epoch when an enqueue took it (see `give_back`).
    taken_at: u64,
}

impl<T> Waiter<T> {
    /// Hand it what it waits for; `Err` gives the value back when the fetch is gone.
    pub fn deliver(self, value: T) -> Result<(), T> {
        self.deliver.send(value)
    }

    /// Whether the fetch behind it has gone away.
    pub fn is_gone(&self) -> bool {
        self.deliver.is_closed()
    }
}

/// A fetch's place in the queue. Dropping it (a client that hung up) withdraws it.
pub struct Ticket<T = Vec<LeasedStep>> {
    parked: ParkedFetches<T>,
    namespace: String,
    id: u64,
    /// Resolves with a delivery, or with an error when woken without one.
    pub delivery: tokio::sync::oneshot::Receiver<T>,
}

impl<T> Ticket<T> {
    /// Leave the queue. `false`: an enqueuer has taken this fetch already, and `delivery`
    /// resolves soon (with steps, or empty-handed).
    pub fn withdraw(&self) -> bool {
        self.parked.withdraw(&self.namespace, self.id)
    }
}

impl<T> Drop for Ticket<T> {
    fn drop(&mut self) {
        self.parked.withdraw(&self.namespace, self.id);
    }
}

impl<T> ParkedFetches<T> {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Parked<T>>> {
        // the lock guards a few queue operations; never held across an await
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The namespace's epoch, read before a fetch reads the queue.
    pub fn epoch(&self, namespace: &str) -> u64 {
        self.lock().get(namespace).map_or(0, |p| p.epoch)
    }

    /// Namespaces with wake-up state (parked fetches or hints).
    pub fn tracked_namespaces(&self) -> usize {
        self.lock().len()
    }

    /// Drop the entries nobody is parked on, once there are too many of them.
    fn evict_idle(map: &mut HashMap<String, Parked<T>>) {
        if map.len() > IDLE_ENTRIES_KEPT {
            map.retain(|_, p| !p.waiters.is_empty());
        }
    }

    /// A fetch read `queues` at `epoch` (the epoch it noted before reading) and found nothing
    /// it could lease.
    pub fn found_empty(&self, namespace: &str, queues: &Queues, epoch: u64) {
        let mut map = self.lock();
        Self::evict_idle(&mut map);
        let parked = map.entry(namespace.to_string()).or_default();
        if parked.epoch == epoch {
            parked
                .empty_at
                .insert(queues.clone(), (epoch, std::time::Instant::now()));
        }
    }

    /// Whether the queue is known to be empty: a read found it so, within `fresh`, and
    /// nothing was queued here since. A fetch may then park without reading it again (in a
    /// chain, every fetch after the first). Steps another replica queued count as queued here
    /// once its announcement arrives; until then (or if it is lost) they are invisible to
    /// this, as to a parked fetch, and the fetches' periodic re-read bounds the wait.
    pub fn known_empty(
        &self,
        namespace: &str,
        queues: &Queues,
        fresh: std::time::Duration,
    ) -> Option<u64> {
        let map = self.lock();
        let parked = map.get(namespace)?;
        match parked.empty_at.get(queues) {
            Some(&(epoch, at)) if epoch == parked.epoch && at.elapsed() < fresh => Some(epoch),
            _ => None,
        }
    }

    /// Park a fetch for `queues` of the namespace, behind those parked before it.
    pub fn park(
        &self,
        namespace: &str,
        queues: &Queues,
        worker_id: &str,
        max: i32,
        lease_ms: i64,
    ) -> Ticket<T> {
        let (deliver, delivery) = tokio::sync::oneshot::channel();
        let mut map = self.lock();
        Self::evict_idle(&mut map);
        let parked = map.entry(namespace.to_string()).or_default();
        let id = parked.next_id;
        parked.next_id += 1;
        parked.waiters.push_back(Waiter {
            id,
            worker_id: worker_id.to_string(),
            max,
            lease_ms,
            queues: queues.clone(),
            deliver,
            taken_at: 0,
        });
        drop(map);
        Ticket {
            parked: self.clone(),
            namespace: namespace.to_string(),
            id,
            delivery,
        }
    }

    fn withdraw(&self, namespace: &str, id: u64) -> bool {
        let mut map = self.lock();
        let Some(parked) = map.get_mut(namespace) else {
            return false;
        };
        let before = parked.waiters.len();
        parked.waiters.retain(|w| w.id != id);
        let removed = parked.waiters.len() < before;
        if parked.waiters.is_empty() && parked.epoch == 0 && parked.empty_at.is_empty() {
            map.remove(namespace);
        }
        removed
    }

    /// Take up to `limit` parked fetches of the namespace, oldest first (skipping those whose
    /// client has gone).
    pub fn take(&self, namespace: &str, limit: usize) -> Vec<Waiter<T>> {
        let mut map = self.lock();
        let Some(parked) = map.get_mut(namespace) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        while taken.len() < limit {
            match parked.waiters.pop_front() {
                Some(w) if w.is_gone() => continue,
                Some(mut w) => {
                    w.taken_at = parked.epoch;
                    taken.push(w)
                }
                None => break,
            }
        }
        taken
    }

    /// Put back fetches that were taken but got nothing, at the front, in their order. If
    /// steps were queued meanwhile (the epoch moved: another enqueue here, or another
    /// replica's announcement), their wake-up found these fetches out: wake them now, to read
    /// the queue, instead of parking them past those steps.
    pub fn give_back(&self, namespace: &str, waiters: Vec<Waiter<T>>) {
        if waiters.is_empty() {
            return;
        }
        let mut woken = Vec::new();
        let mut map = self.lock();
        let parked = map.entry(namespace.to_string()).or_default();
        for w in waiters.into_iter().rev() {
            if w.taken_at == parked.epoch {
                parked.waiters.push_front(w);
            } else {
                woken.push(w);
            }
        }
        drop(map);
        // dropping a waiter's sender wakes its fetch without a delivery
        drop(woken);
    }

    /// `steps` of `queue` (`None`: of any queue) were queued in the namespace without a fetch
    /// to hand them to, or may be leased now (a slot freed, a resume): move the epoch and
    /// wake that many of the fetches parked for that queue, oldest first, to read it.
    pub fn queued(&self, namespace: &str, queue: Option<&str>, steps: usize) {
        let woken = {
            let mut map = self.lock();
            Self::evict_idle(&mut map);
            let parked = map.entry(namespace.to_string()).or_default();
            parked.epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            parked.empty_at.clear();
            let mut woken = Vec::new();
            let mut kept = std::collections::VecDeque::with_capacity(parked.waiters.len());
            for w in parked.waiters.drain(..) {
                let takes = queue.is_none_or(|q| w.queues.iter().any(|wq| wq == q));
                if takes && woken.len() < steps {
                    woken.push(w);
                } else {
                    kept.push_back(w);
                }
            }
            parked.waiters = kept;
            woken
        };
        // dropping a waiter's sender wakes its fetch without a delivery
        drop(woken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dq() -> Queues {
        queues(&["default"])
    }

    fn queues(names: &[&str]) -> Queues {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// A step of one queue wakes only the fetches parked for that queue (oldest first); a
    /// fetch for several queues is woken by any of them.
    #[test]
    fn a_step_wakes_only_the_fetches_of_its_queue() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let mut payments = parked.park("ns", &queues(&["payments"]), "p", 1, 1000);
        let mut warehouse = parked.park("ns", &queues(&["warehouse"]), "w", 1, 1000);
        let mut both = parked.park("ns", &queues(&["warehouse", "payments"]), "b", 1, 1000);
        parked.queued("ns", Some("warehouse"), 1);
        let closed = |r: Result<u32, tokio::sync::oneshot::error::TryRecvError>| {
            matches!(r, Err(tokio::sync::oneshot::error::TryRecvError::Closed))
        };
        assert!(
            !closed(payments.delivery.try_recv()),
            "payments stays parked"
        );
        assert!(closed(warehouse.delivery.try_recv()), "warehouse is woken");
        assert!(
            !closed(both.delivery.try_recv()),
            "one step wakes one fetch"
        );
        parked.queued("ns", Some("payments"), 2);
        assert!(closed(payments.delivery.try_recv()));
        assert!(closed(both.delivery.try_recv()));
    }

    /// Fetches on 30,000 made-up namespaces (read empty, parked, gone) leave a bounded map,
    /// and the namespace someone is parked on keeps its place.
    #[test]
    fn made_up_namespaces_leave_bounded_state() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let _waiting = parked.park("real", &dq(), "w", 1, 1000);
        for i in 0..30_000 {
            let ns = format!("made-up-{i}");
            let epoch = parked.epoch(&ns);
            parked.found_empty(&ns, &dq(), epoch);
            drop(parked.park(&ns, &dq(), "w", 1, 1000));
            parked.queued(&ns, Some("default"), 1);
        }
        let tracked = parked.tracked_namespaces();
        assert!(
            tracked <= IDLE_ENTRIES_KEPT + 1,
            "{tracked} namespaces tracked"
        );
        assert_eq!(
            parked.take("real", 1).len(),
            1,
            "the parked fetch is still there"
        );
    }

    /// An entry dropped and made again never shows the epoch a fetch noted before it.
    #[test]
    fn epochs_never_repeat_across_evictions() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        parked.queued("ns", Some("default"), 1);
        let noted = parked.epoch("ns");
        for i in 0..(IDLE_ENTRIES_KEPT + 10) {
            parked.queued(&format!("other-{i}"), Some("default"), 1);
        }
        parked.queued("ns", Some("default"), 1);
        assert_ne!(parked.epoch("ns"), noted);
    }

    /// Steps queued while an enqueue had the parked fetches out (taken, to lease to them)
    /// found nobody to wake: the fetches it gives back unused are woken then, not parked past
    /// those steps until their periodic re-read.
    #[tokio::test]
    async fn fetches_given_back_after_steps_were_queued_are_woken() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let mut quiet = parked.park("ns", &dq(), "w0", 1, 1000);
        let taken = parked.take("ns", 5);
        parked.give_back("ns", taken);
        assert!(
            futures::FutureExt::now_or_never(&mut quiet.delivery).is_none(),
            "nothing was queued: it stays parked"
        );
        let taken = parked.take("ns", 5);
        // another enqueue (or replica) queued a step; no parked fetch was there to wake
        parked.queued("ns", Some("default"), 1);
        parked.give_back("ns", taken);
        assert!(
            matches!(
                futures::FutureExt::now_or_never(&mut quiet.delivery),
                Some(Err(_))
            ),
            "woken to read the queue"
        );
    }

    #[test]
    fn parked_fetches_are_served_first_come_first_served() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let tickets: Vec<_> = (0..3)
            .map(|i| parked.park("ns", &dq(), &format!("w{i}"), 1, 1000))
            .collect();
        let taken = parked.take("ns", 2);
        assert_eq!(
            taken
                .iter()
                .map(|w| w.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["w0", "w1"]
        );
        // the first gets a step, the second nothing: it goes back to the front
        let mut taken = taken.into_iter();
        taken.next().unwrap().deliver(7).unwrap();
        parked.give_back("ns", taken.collect());
        let again = parked.take("ns", 5);
        assert_eq!(
            again
                .iter()
                .map(|w| w.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["w1", "w2"]
        );
        parked.give_back("ns", again);
        let mut tickets = tickets.into_iter();
        let mut first = tickets.next().unwrap();
        assert_eq!(first.delivery.try_recv(), Ok(7));
        assert!(!first.withdraw(), "it was taken");
        let second = tickets.next().unwrap();
        assert!(second.withdraw());
        assert!(!second.withdraw(), "only once");
    }

    #[test]
    fn a_step_queued_without_a_taker_moves_the_epoch_and_wakes_one_fetch_per_step() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let e0 = parked.epoch("ns");
        let mut a = parked.park("ns", &dq(), "a", 1, 1000);
        let mut b = parked.park("ns", &dq(), "b", 1, 1000);
        parked.queued("ns", Some("default"), 1);
        assert_ne!(parked.epoch("ns"), e0);
        assert!(
            matches!(
                a.delivery.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed)
            ),
            "woken empty-handed: read the queue"
        );
        assert!(
            matches!(
                b.delivery.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ),
            "still parked"
        );
    }

    #[test]
    fn an_empty_read_is_known_until_something_is_queued_or_it_grows_old() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let fresh = std::time::Duration::from_secs(60);
        assert_eq!(parked.known_empty("ns", &dq(), fresh), None, "never read");
        let e = parked.epoch("ns");
        parked.found_empty("ns", &dq(), e);
        assert_eq!(parked.known_empty("ns", &dq(), fresh), Some(e));
        assert_eq!(
            parked.known_empty("ns", &dq(), std::time::Duration::ZERO),
            None,
            "too old"
        );
        parked.queued("ns", Some("default"), 1);
        assert_eq!(
            parked.known_empty("ns", &dq(), fresh),
            None,
            "a step was queued since"
        );
        // a read that began before the step was queued does not count
        parked.found_empty("ns", &dq(), e);
        assert_eq!(parked.known_empty("ns", &dq(), fresh), None);
    }

    #[test]
    fn a_fetch_that_hung_up_is_skipped_and_forgotten() {
        let parked: ParkedFetches<u32> = ParkedFetches::new();
        let gone = parked.park("ns", &dq(), "gone", 1, 1000);
        let _here = parked.park("ns", &dq(), "here", 1, 1000);
        drop(gone);
        let taken = parked.take("ns", 5);
        assert_eq!(
            taken
                .iter()
                .map(|w| w.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["here"]
        );
    }
}
