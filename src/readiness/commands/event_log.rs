//! `CommandEventLog`: every command lifecycle event, numbered, sent to the observers listening
//! now and kept in a ring of the latest ones, from which an observer that reconnects resumes.
//!
//! Sequence numbers increase by one per event and start, for each process, from the start time
//! in microseconds: a number from before this process started is recognisably older than all
//! of its own, so a client resuming against a restarted replica is told that what happened in
//! between is unknown rather than handed a wrong count. Numbering, the ring and the broadcast
//! happen under one lock, so a resuming observer gets the ring's part and then the live events
//! with nothing between them and nothing twice.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::CommandEvent;

pub struct CommandEventLog {
    ring: Mutex<Ring>,
    live: broadcast::Sender<CommandEvent>,
    capacity: usize,
    /// The first sequence number of this process.
    first: u64,
}

struct Ring {
    next: u64,
    events: VecDeque<CommandEvent>,
}

/// What an observer resuming after a sequence number gets.
pub struct Resumed {
    /// Events it has not seen that the ring still holds, in order.
    pub backlog: Vec<CommandEvent>,
    pub gap: Option<Gap>,
    /// Every event after the backlog.
    pub live: broadcast::Receiver<CommandEvent>,
}

/// Events an observer cannot be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// This many (of every kind, before any filter) fell out of the ring.
    Missed(u64),
    /// The number is from before this process started: what happened since is unknown.
    BeforeStart,
    /// The number was never issued here (it is beyond the last one: another replica's, or a
    /// client's mistake): the stream starts with the events from now on.
    NeverIssued { next: u64 },
}

impl CommandEventLog {
    /// Keeps the latest `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let first = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self {
            ring: Mutex::new(Ring {
                next: first,
                events: VecDeque::with_capacity(capacity),
            }),
            live: broadcast::channel(capacity).0,
            capacity,
            first,
        }
    }

    /// Number the event, keep it, and send it to the live observers.
    pub fn publish(&self, mut event: CommandEvent) {
        let mut ring = self.lock();
        event.sequence = ring.next;
        ring.next += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        let _ = self.live.send(event);
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CommandEvent> {
        self.live.subscribe()
    }

    /// Every event after sequence number `after`: those the ring still holds, then the live
    /// ones; and what is lost in between, if anything.
    pub fn resume(&self, after: u64) -> Resumed {
        let ring = self.lock();
        let live = self.live.subscribe();
        let oldest = ring.events.front().map_or(ring.next, |e| e.sequence);
        let gap = if after < self.first.saturating_sub(1) {
            Some(Gap::BeforeStart)
        } else if after >= ring.next {
            Some(Gap::NeverIssued { next: ring.next })
        } else if after.saturating_add(1) < oldest {
            Some(Gap::Missed(oldest - after - 1))
        } else {
            None
        };
        let backlog = ring
            .events
            .iter()
            .filter(|e| e.sequence > after)
            .cloned()
            .collect();
        Resumed { backlog, gap, live }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::command::TriggeredBy;
    use crate::readiness::commands::{CommandPhase, OrchestrationCommand};

    fn event(n: u32) -> CommandEvent {
        let c = OrchestrationCommand::process_task(uuid::Uuid::now_v7(), "ns", TriggeredBy::Api);
        CommandEvent {
            command_id: uuid::Uuid::now_v7(),
            task_uuid: c.task_uuid(),
            namespace: "ns".into(),
            triggered_by: TriggeredBy::Api,
            phase: CommandPhase::Received,
            outcome: None,
            steps_enqueued: n,
            steps_held: 0,
            duration: std::time::Duration::ZERO,
            timestamp: chrono::Utc::now(),
            error: None,
            sequence: 0,
        }
    }

    #[test]
    fn a_resume_gets_the_unseen_backlog_then_live_events_and_counts_what_fell_out() {
        let log = CommandEventLog::new(3);
        for n in 0..5 {
            log.publish(event(n));
        }
        let first = log.first;
        // saw the first two; the ring holds the last three
        let r = log.resume(first + 1);
        assert_eq!(r.gap, None);
        let seqs: Vec<u64> = r.backlog.iter().map(|e| e.sequence - first).collect();
        assert_eq!(seqs, [2, 3, 4]);
        // saw only the first: one fell out of the ring
        let mut r = log.resume(first);
        assert_eq!(r.gap, Some(Gap::Missed(1)));
        log.publish(event(5));
        assert_eq!(
            r.live.try_recv().unwrap().sequence,
            first + 5,
            "live after backlog"
        );
        // a number from before this process started
        assert_eq!(log.resume(first / 2).gap, Some(Gap::BeforeStart));
        // a number never issued here (beyond the last): said so, not passed over in silence
        let next = log
            .resume(0)
            .backlog
            .last()
            .map_or(first, |e| e.sequence + 1);
        assert_eq!(log.resume(next).gap, Some(Gap::NeverIssued { next }));
        assert_eq!(log.resume(next - 1).gap, None, "the last one issued");
        // up to date: nothing behind, nothing lost
        let r = log.resume(first + 5);
        assert!(r.backlog.is_empty() && r.gap.is_none());
    }
}
