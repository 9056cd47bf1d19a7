//! Size limits of what a task may hold: a task is a unit of orchestration, not a data store.
//! The DAG validation, the worker API and the configuration's response budget all read them.

pub const MAX_STEPS: usize = 1_000;
/// A join may wait for every other step of the task; the total is capped by `MAX_EDGES`.
pub const MAX_DEPENDENCIES_PER_STEP: usize = 1_000;
/// Dependencies (edges) in one task, all steps together: writing and checking them is
/// linear in this, and a task of 1,000 steps with 100 dependencies each (99,000 edges) is
/// a data-flow graph, not a workflow.
pub const MAX_EDGES: usize = 10_000;
pub const MAX_NAME_BYTES: usize = 255;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// Serialized JSON of one step's inputs, or a task's context, or a step's results.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
pub const MIN_PRIORITY: i32 = -1_000;
pub const MAX_PRIORITY: i32 = 1_000;
pub const MAX_ATTEMPTS: i32 = 100;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

/// The Unicode characters that reorder how text is displayed (Bidi_Control, as in U+202E):
/// refused in names, and escaped by `tasker ctl` along with control characters.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}
