//! The proto enums of the service's closed vocabularies (task and step states, execution
//! status, where a command came from, its phase and outcome, what a FailStep did) and the
//! words the rest of the service uses for the same values (`in_progress`,
//! `claimed_elsewhere`: the database's, the logs', `tasker ctl`'s JSON).
//!
//! One rule joins the two spellings: the proto value is the enum's prefix followed by the word
//! in upper case (`TASK_STATE_` + `IN_PROGRESS`), as buf's style asks. A rule rather than a
//! table per enum, so a word added to a vocabulary needs only its proto value, and the tests
//! below fail until it has one.

use super::v1;

/// A proto enum whose values are the words of one vocabulary.
pub trait Vocabulary: Sized + Copy {
    /// The enum's name in the proto (`TaskState`).
    const TYPE: &'static str;
    /// The prefix of every value's name (`TASK_STATE_`).
    const PREFIX: &'static str;

    fn from_name(name: &str) -> Option<Self>;

    fn name(self) -> &'static str;

    /// The value of a word: `"in_progress"` -> `TASK_STATE_IN_PROGRESS`. `None` for a word with
    /// no value, and for `"unspecified"` (which names no word).
    fn from_word(word: &str) -> Option<Self> {
        if word.is_empty() || word.eq_ignore_ascii_case("unspecified") {
            return None;
        }
        Self::from_name(&format!("{}{}", Self::PREFIX, word.to_ascii_uppercase()))
    }

    /// The word of a value: `TASK_STATE_IN_PROGRESS` -> `"in_progress"`; `"unspecified"` for
    /// the zero value.
    fn word(self) -> String {
        self.name()[Self::PREFIX.len()..].to_ascii_lowercase()
    }

    /// Every word, in the proto's order (the zero value left out).
    fn words() -> Vec<String>
    where
        Self: TryFrom<i32>,
    {
        (1..)
            .map_while(|n| Self::try_from(n).ok())
            .map(Self::word)
            .collect()
    }

    /// The value a person typed: a word (`in_progress`) or a value's name
    /// (`TASK_STATE_IN_PROGRESS`); `None` for anything else, the zero value's name included.
    fn from_input(input: &str) -> Option<Self> {
        Self::from_word(input)
            .or_else(|| Self::from_name(input).filter(|v| v.name() != Self::zero_name()))
    }

    /// The zero value's name (`TASK_STATE_UNSPECIFIED`).
    fn zero_name() -> String {
        format!("{}UNSPECIFIED", Self::PREFIX)
    }

    /// The word of a raw field value; `"unknown(<n>)"` for a number this build does not know
    /// (a newer server's value, say).
    fn word_of(raw: i32) -> String
    where
        Self: TryFrom<i32>,
    {
        Self::try_from(raw)
            .map(Self::word)
            .unwrap_or_else(|_| format!("unknown({raw})"))
    }
}

macro_rules! vocabulary {
    ($($enum:ident => $prefix:literal),* $(,)?) => {$(
        impl Vocabulary for v1::$enum {
            const TYPE: &'static str = stringify!($enum);
            const PREFIX: &'static str = $prefix;

            fn from_name(name: &str) -> Option<Self> {
                v1::$enum::from_str_name(name)
            }

            fn name(self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}

vocabulary! {
    TaskState => "TASK_STATE_",
    StepState => "STEP_STATE_",
    ExecutionStatus => "EXECUTION_STATUS_",
    TriggeredBy => "TRIGGERED_BY_",
    CommandPhase => "COMMAND_PHASE_",
    CommandOutcome => "COMMAND_OUTCOME_",
    FailStepOutcome => "FAIL_STEP_OUTCOME_",
    OverlapPolicy => "OVERLAP_POLICY_",
    CatchUpPolicy => "CATCH_UP_POLICY_",
}

/// The raw value of a word, for a message field: the zero value (`*_UNSPECIFIED`) when the word
/// has none. Only for words the service itself produces, whose every value the tests below
/// check has a proto value; input from callers is parsed with [`Vocabulary::from_word`].
pub fn raw<E: Vocabulary + Into<i32>>(word: impl AsRef<str>) -> i32 {
    E::from_word(word.as_ref()).map_or(0, Into::into)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The words of the row rule `NEW.state IN (...)` after `marker` in `sql/states.sql` (the
    /// live guards, which tests/sql_layout keeps equal to the database's): the vocabulary the
    /// database enforces.
    fn schema_words(marker: &str) -> Vec<String> {
        let sql = include_str!("../../sql/states.sql");
        let at = sql.find(marker).expect("marker in sql/states.sql");
        let list = &sql[at..];
        let open = list.find("state IN (").expect("a state list") + "state IN (".len();
        let close = open + list[open..].find(')').expect("closed");
        list[open..close]
            .split(',')
            .map(|w| w.trim().trim_matches('\'').to_string())
            .collect()
    }

    pub(crate) fn round_trips<E: Vocabulary + std::fmt::Debug + PartialEq>(words: &[String]) {
        assert!(!words.is_empty());
        for w in words {
            let value = E::from_word(w).unwrap_or_else(|| panic!("{w:?} has no {}", E::PREFIX));
            assert_eq!(&value.word(), w);
        }
    }

    #[test]
    fn every_state_the_schema_allows_has_a_proto_value() {
        round_trips::<v1::TaskState>(&schema_words("FUNCTION tasker.tasks_guard()"));
        round_trips::<v1::StepState>(&schema_words("FUNCTION tasker.workflow_steps_guard()"));
        let statuses = [
            "has_ready_steps",
            "processing",
            "blocked_by_failures",
            "all_complete",
            "waiting_for_dependencies",
            "cancelled",
            "scheduled",
        ];
        round_trips::<v1::ExecutionStatus>(&statuses.map(String::from));
    }

    #[test]
    fn unspecified_and_unknown_words_have_no_value() {
        assert_eq!(v1::TaskState::from_word("unspecified"), None);
        assert_eq!(v1::TaskState::from_word(""), None);
        assert_eq!(v1::TaskState::from_word("done"), None);
        assert_eq!(v1::TaskState::Unspecified.word(), "unspecified");
        assert_eq!(v1::TaskState::word_of(99), "unknown(99)");
        assert_eq!(raw::<v1::StepState>("nope"), 0);
    }
}
