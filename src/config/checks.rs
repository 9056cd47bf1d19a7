//! `Checks`: where a section's validation rules report what they find, each problem under the
//! dotted key of the value it is about.

use std::time::Duration;

/// The problems found so far, as (dotted key, message), and the section being checked.
pub struct Checks<'a> {
    section: String,
    out: &'a mut Vec<(String, String)>,
}

impl<'a> Checks<'a> {
    pub fn new(out: &'a mut Vec<(String, String)>) -> Self {
        Self {
            section: String::new(),
            out,
        }
    }

    /// The checks of a sub-section (`grpc` -> `grpc.auth`).
    pub fn section(&mut self, name: &str) -> Checks<'_> {
        Checks {
            section: self.key(name),
            out: self.out,
        }
    }

    /// `key`'s dotted name; `""` names the section itself.
    fn key(&self, key: &str) -> String {
        if self.section.is_empty() || key.is_empty() {
            if key.is_empty() {
                self.section.clone()
            } else {
                key.to_string()
            }
        } else {
            format!("{}.{key}", self.section)
        }
    }

    /// `key` (in this section) is wrong: `message` says by which rule.
    pub fn problem(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.out.push((key, message.into()));
    }

    /// `value` of `key` must lie in `min ..= max`.
    pub fn range(&mut self, key: &str, value: impl TryInto<u64>, min: u64, max: u64) {
        let value = value.try_into().unwrap_or(u64::MAX);
        if value < min || value > max {
            self.problem(key, format!("must be between {min} and {max}, is {value}"));
        }
    }

    /// A duration in seconds (`*_seconds` keys) must lie in `min ..= max`.
    pub fn seconds(&mut self, key: &str, value: Duration, min: u64, max: u64) {
        self.range(key, value.as_secs(), min, max);
    }

    /// A duration in milliseconds (`*_ms` keys) must lie in `min ..= max`.
    pub fn millis(&mut self, key: &str, value: Duration, min: u64, max: u64) {
        self.range(key, value.as_millis(), min, max);
    }
}

/// A day, in seconds: the longest any period may be.
pub const DAY_S: u64 = 86_400;
