//! The claim split's policy: which claimer works an event for a task (rendezvous hashing), in a
//! form every build computes alike.

use uuid::Uuid;

/// A task's score for a replica under rendezvous hashing; the highest scoring claimer claims
/// first. Defined here bit for bit (not with std's hasher, whose output may change between
/// Rust releases) so that replicas of different builds agree during a rolling upgrade.
pub fn claim_score(task: Uuid, replica: Uuid) -> u64 {
    let (t_hi, t_lo) = task.as_u64_pair();
    let (r_hi, r_lo) = replica.as_u64_pair();
    mix64(mix64(t_hi ^ mix64(r_hi)) ^ t_lo ^ mix64(r_lo).rotate_left(29))
}

/// SplitMix64's finaliser: every input bit affects every output bit.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The claimer with the highest score for `task` (`None` when there are none).
pub fn first_claimer(task: Uuid, claimers: &[Uuid]) -> Option<Uuid> {
    claimers
        .iter()
        .copied()
        .max_by_key(|r| (claim_score(task, *r), *r))
}
