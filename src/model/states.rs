//! The states of tasks and steps, typed. The database keeps each vocabulary closed (one CHECK
//! constraint per table, `migrations/..._baseline.sql`) and stores the words as `text`; these
//! enums are the same words in Rust, read and written through sqlx as text, so no Rust code
//! compares a state as a string. [`text_enum!`] also types the answer words of the SQL
//! functions (`store`'s `answers`).
//!
//! Why not PostgreSQL enum types: the state columns are on the two hottest tables, and every
//! SQL function compares them with text literals; retyping them would rewrite both tables and
//! every function for no gain in what can be stored (the CHECK already closes the vocabulary).

/// An enum whose values are fixed words, stored as `text`: `as_str`, `FromStr` (refusing an
/// unknown word by name), `Display`, serde as the word, and sqlx's `Type`, `Encode` and
/// `Decode` for PostgreSQL as text (a word the enum does not know fails the row's decoding
/// with the word and the vocabulary named).
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in the vocabulary's order.
            #[allow(dead_code)]
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The word stored and shown for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $word ),+
                }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::model::states::UnknownWord;

            fn from_str(word: &str) -> Result<Self, Self::Err> {
                match word {
                    $( $word => Ok(Self::$variant), )+
                    _ => Err($crate::model::states::UnknownWord {
                        vocabulary: stringify!($name),
                        word: word.to_string(),
                    }),
                }
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = <::std::borrow::Cow<'de, str>>::deserialize(d)?;
                word.parse().map_err(::serde::de::Error::custom)
            }
        }

        impl ::sqlx::Type<::sqlx::Postgres> for $name {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }

        impl ::sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl<'r> ::sqlx::Decode<'r, ::sqlx::Postgres> for $name {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                let word = <&str as ::sqlx::Decode<::sqlx::Postgres>>::decode(value)?;
                Ok(word.parse::<Self>()?)
            }
        }

        impl ::sqlx::Encode<'_, ::sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                <&str as ::sqlx::Encode<::sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}

pub(crate) use text_enum;

/// A word that is not one of a vocabulary's: a bug (the database's vocabulary and this build's
/// disagree), reported with both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{word:?} is not a word of {vocabulary}")]
pub struct UnknownWord {
    pub vocabulary: &'static str,
    pub word: String,
}

text_enum! {
    /// A task's state (`tasker.tasks.state`):
    /// `pending -> in_progress -> complete | error | cancelled`, and back to `in_progress`
    /// from `error` when an operator resolves or retries.
    pub enum TaskState {
        Pending = "pending",
        InProgress = "in_progress",
        Complete = "complete",
        Error = "error",
        Cancelled = "cancelled",
    }
}

impl TaskState {
    /// Whether nothing more can happen to the task: complete or cancelled. (A task in error
    /// can still be resolved or retried by an operator.)
    pub fn is_final(self) -> bool {
        matches!(self, Self::Complete | Self::Cancelled)
    }
}

text_enum! {
    /// A step's state (`tasker.workflow_steps.state`); `tasker.step_transition_allowed`
    /// (`sql/states.sql`) holds the legal moves.
    pub enum StepState {
        Pending = "pending",
        Enqueued = "enqueued",
        InProgress = "in_progress",
        Complete = "complete",
        WaitingForRetry = "waiting_for_retry",
        Error = "error",
        Cancelled = "cancelled",
        ResolvedManually = "resolved_manually",
    }
}

text_enum! {
    /// What a task's execution is doing, as `tasker.task_execution_context` sums it up
    /// (`sql/readiness.sql`).
    pub enum ExecutionStatus {
        HasReadySteps = "has_ready_steps",
        Processing = "processing",
        BlockedByFailures = "blocked_by_failures",
        AllComplete = "all_complete",
        WaitingForDependencies = "waiting_for_dependencies",
        Cancelled = "cancelled",
        /// Waits for its start time: nothing is ready before it.
        Scheduled = "scheduled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;
    use crate::proto::words::Vocabulary;

    /// The database's words and the API's values are one vocabulary: each state has its proto
    /// value and back, and the proto has no state these enums lack.
    #[test]
    fn every_state_is_a_word_of_the_api_and_back() {
        for s in TaskState::ALL {
            let v = v1::TaskState::from_word(s.as_str()).unwrap();
            assert_eq!(v.word().parse::<TaskState>().unwrap(), *s);
        }
        for s in StepState::ALL {
            let v = v1::StepState::from_word(s.as_str()).unwrap();
            assert_eq!(v.word().parse::<StepState>().unwrap(), *s);
        }
        for s in ExecutionStatus::ALL {
            let v = v1::ExecutionStatus::from_word(s.as_str()).unwrap();
            assert_eq!(v.word().parse::<ExecutionStatus>().unwrap(), *s);
        }
        assert_eq!(v1::TaskState::words().len(), TaskState::ALL.len());
        assert_eq!(
            v1::ExecutionStatus::words().len(),
            ExecutionStatus::ALL.len()
        );
        assert_eq!(v1::StepState::words().len(), StepState::ALL.len());
        let e = "done".parse::<TaskState>().unwrap_err();
        assert_eq!(e.to_string(), "\"done\" is not a word of TaskState");
    }
}
