//! The domain's shared types and rules, below everything else: requested DAGs and their
//! validation (`dag`), the size limits of what a task holds (`limits`), the namespace name
//! rule (`namespaces`), the words of a readiness command (`command`), the deployment mode
//! (`mode`), declared retry policies (`retry`), and the states of tasks and steps (`states`). No I/O.

pub mod command;
pub mod dag;
pub mod limits;
pub mod mode;
pub mod namespaces;
pub mod retention;
pub mod retry;
pub mod schedule;
pub mod states;
pub mod task_request;
