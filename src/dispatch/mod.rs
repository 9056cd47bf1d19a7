//! Dispatch: getting ready steps to workers. The claim-and-enqueue pass and the hand-off to
//! parked fetches in its transaction, the queue of parked `FetchSteps`, the announcements of
//! queued steps to the other replicas, the workers' side (lease, complete in batches, fail,
//! extend), the deadlines their calls create, and the places long-lived requests hold.
//!
//! - `enqueue`: `TaskClaimStepEnqueuer`
//! - `parked`: `ParkedFetches`
//! - `announce`: `StepAnnouncer`
//! - `worker`: `WorkerQueue`; `completions`: `CompletionBatcher`
//! - `deadlines`: `DeadlinePoke`
//! - `quota`: `Quota`

pub mod announce;
pub mod completions;
pub mod deadlines;
pub mod enqueue;
pub mod parked;
pub mod quota;
pub mod worker;

pub use worker::WorkerQueue;
