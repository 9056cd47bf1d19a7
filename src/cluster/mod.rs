//! The replica registry, as this replica sees it: its id, its heartbeat into
//! `tasker.replicas` (with its mode and whether it listens), whether any other replica is
//! alive, and which replicas claim first.
//!
//! Whether others are alive decides whether an enqueue announces the steps no local fetch took
//! (`tasker_steps_enqueued`): only while another replica could have a fetch parked for them.
//! A single replica sends no such notification and pays nothing for the registry but one
//! asynchronous-commit heartbeat per interval.
//!
//! **Claim split.** Every listening replica hears every notification. Instead of all of them
//! racing for the task's claim (the losers' attempts are wasted round trips), one of the
//! replicas listening now and serving every namespace (the *claimers*, as of the last
//! heartbeat) works each event and the others drop it. (A replica serving some namespaces
//! drops the others' events before the split, so it is never a claimer; in a fleet of such
//! replicas there are none, and each works the events of its own namespaces.) Which one: the replica whose transaction made the steps ready (the
//! notification names it), when it is a claimer, because the worker that completed the step
//! is most likely parked on it again and gets the next step handed over in the enqueue's own
//! transaction; otherwise the claimer with the highest `claim_score` for the task
//! (rendezvous hashing). Rendezvous hashing moves only the departed or arrived replica's share
//! when the claimers change. Views of the claimers can differ for up to a heartbeat, and a
//! claimer can die with events in hand; so whenever a replica's view of the claimers changes
//! it requests a catch-up sweep, which works every ready task regardless of the split. An
//! event dropped because some replica's view was stale is thus swept by that replica when its
//! view catches up; one left to a dead claimer, when the others see it gone (`gone_after`).
//! Sweeps, the poller, deadlines and API commands are not split: they are rare or explicit.
//!
//! The heartbeat also brings the fleet's deployment mode (set through any replica), as does
//! its notification (`tasker_fleet_mode`) to listening replicas; [`Fleet::fleet_mode`] is
//! what the mode controller applies, below this replica's own override.
//!
//! - `registry`: [`Fleet`], this replica's identity and what it last heard of the others
//! - `claim_split`: `claim_score`, `first_claimer` (rendezvous hashing)
//! - `heartbeat`: [`Fleet::heartbeat`] and the [`ReplicaState`] it reports

mod claim_split;
mod heartbeat;
mod registry;

pub use heartbeat::ReplicaState;
pub use registry::Fleet;

#[cfg(test)]
mod tests {
    use super::claim_split::{claim_score, first_claimer};
    use super::*;
    use uuid::Uuid;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    /// The score is part of the fleet's contract: replicas of different builds must agree.
    #[test]
    fn the_claim_score_is_fixed_bit_for_bit() {
        let task = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        let replica = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);
        assert_eq!(claim_score(task, replica), claim_score(task, replica));
        assert_eq!(claim_score(task, replica), 0x4d0f_b021_7bb1_1f06);
    }

    /// Three claimers take about a third of the tasks each; when one leaves, only its tasks
    /// move, and they spread over the other two.
    #[test]
    fn claimers_split_tasks_evenly_and_a_departure_moves_only_its_share() {
        let claimers = ids(3);
        let tasks = ids(30_000);
        let first: Vec<Uuid> = tasks
            .iter()
            .map(|t| first_claimer(*t, &claimers).unwrap())
            .collect();
        for c in &claimers {
            let share = first.iter().filter(|f| *f == c).count();
            assert!((9_000..11_000).contains(&share), "share {share}");
        }
        let remaining = &claimers[..2];
        let mut moved_to = [0usize; 2];
        for (t, before) in tasks.iter().zip(&first) {
            let after = first_claimer(*t, remaining).unwrap();
            if *before == claimers[2] {
                moved_to[remaining.iter().position(|r| *r == after).unwrap()] += 1;
            } else {
                assert_eq!(after, *before, "a task of a remaining claimer moved");
            }
        }
        assert!(moved_to.iter().all(|n| *n > 4_000), "{moved_to:?}");
    }

    #[test]
    fn a_replica_that_knows_no_claimers_claims_everything_and_one_not_among_them_nothing() {
        let fleet = Fleet::new();
        assert!(fleet.claims_first(Uuid::now_v7(), None));
        assert!(fleet.heard_claimers(ids(2)));
        assert!((0..100).all(|_| !fleet.claims_first(Uuid::now_v7(), None)));
        assert_eq!(fleet.events_left_to_peers(), 100);
        let mut with_me = ids(1);
        with_me.push(fleet.replica_id());
        assert!(fleet.heard_claimers(with_me.clone()));
        assert!(
            !fleet.heard_claimers(with_me),
            "the same claimers are no change"
        );
        let mine = (0..1000)
            .filter(|_| fleet.claims_first(Uuid::now_v7(), None))
            .count();
        assert!((350..650).contains(&mine), "{mine}");
    }

    /// The replica whose transaction made the steps ready claims first while it listens;
    /// one that does not (or anything else's change) leaves the choice to the hash.
    #[test]
    fn the_origin_of_an_event_claims_it_first_when_it_listens() {
        let fleet = Fleet::new();
        let other = Uuid::now_v7();
        assert!(fleet.heard_claimers(vec![other, fleet.replica_id()]));
        assert!((0..100).all(|_| fleet.claims_first(Uuid::now_v7(), Some(fleet.replica_id()))));
        assert!((0..100).all(|_| !fleet.claims_first(Uuid::now_v7(), Some(other))));
        let polling_only = Uuid::now_v7();
        let mine = (0..1000)
            .filter(|_| fleet.claims_first(Uuid::now_v7(), Some(polling_only)))
            .count();
        assert!((350..650).contains(&mine), "{mine}");
    }
}
