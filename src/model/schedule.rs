//! Cron schedules: when a schedule's ticks fall (a cron expression read in an IANA time zone,
//! with daylight-saving changes as `croner` defines them) and what one wake-up of the deadline
//! scheduler does with the ticks that came due (catch-up after downtime, overlap with a task
//! still running). Pure: the store applies the plan in the schedule row's transaction.

use std::str::FromStr;

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

use crate::model::dag::{NewTask, TaskSpec, Violation};
use crate::model::states::text_enum;
use crate::proto::v1;

text_enum! {
    /// What a tick does while the schedule's previous task still runs.
    pub enum Overlap {
        /// Start another task anyway.
        Allow = "allow",
        /// Make nothing for this tick.
        Skip = "skip",
        /// Keep this tick (one at most) and start its task when the previous one finishes.
        BufferOne = "buffer_one",
    }
}

text_enum! {
    /// What the ticks missed while no replica ran (older than the misfire grace) become.
    pub enum CatchUp {
        /// Nothing: the schedule goes on from the next tick.
        Skip = "skip",
        /// The most recent missed tick runs, once.
        RunLatest = "run_latest",
    }
}

/// The most ticks one wake-up looks at; beyond them (a per-second schedule after a long
/// outage) the rest are missed ticks, handled by the catch-up policy without being listed.
const MAX_TICKS_PER_WAKE: usize = 1000;

/// A parsed cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    tz: Tz,
}

impl CronSpec {
    /// `cron`: 5 fields, or 6 with seconds first; `time_zone`: an IANA name (empty: UTC).
    /// Every problem, by field; an expression that never fires is one.
    pub fn parse(cron: &str, time_zone: &str) -> Result<Self, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let fields = cron.split_whitespace().count();
        let parsed = if cron.trim_start().starts_with('@') || (5..=6).contains(&fields) {
            CronParser::builder()
                .seconds(Seconds::Optional)
                .build()
                .parse(cron)
                .map_err(|e| {
                    problems.push((
                        "cron".to_string(),
                        format!("is not a cron expression ({e}): {cron:?}"),
                    ))
                })
                .ok()
        } else {
            problems.push((
                "cron".to_string(),
                format!(
                    "must have 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first; {cron:?} has {fields}"
                ),
            ));
            None
        };
        let tz = if time_zone.is_empty() {
            Some(Tz::UTC)
        } else {
            Tz::from_str(time_zone)
                .map_err(|_| {
                    problems.push((
                        "time_zone".to_string(),
                        format!(
                            "is not an IANA time zone (like Europe/Paris or America/New_York): {time_zone:?}"
                        ),
                    ))
                })
                .ok()
        };
        match (parsed, tz) {
            (Some(cron), Some(tz)) if problems.is_empty() => {
                let spec = Self { cron, tz };
                if spec.next_after(Utc::now()).is_none() {
                    return Err(vec![(
                        "cron".to_string(),
                        format!(
                            "never fires from now on: {:?}",
                            spec.cron.pattern.to_string()
                        ),
                    )]);
                }
                Ok(spec)
            }
            _ => Err(problems),
        }
    }

    /// The first tick strictly after `t`; `None` if there is none (before year 5000).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// The first tick at or after `t`. Ticks fall on whole seconds, and croner reads a time
    /// with a fraction as its whole second: such a `t` is past that second's tick.
    fn next_from(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if t.timestamp_subsec_nanos() != 0 {
            return self.next_after(t);
        }
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// The last tick strictly before `t` (with a fraction, its whole second's tick counts).
    fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let whole = t.timestamp_subsec_nanos() != 0;
        let t = t.with_nanosecond(0).unwrap_or(t);
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), whole)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// The first `n` ticks after `t`.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        std::iter::successors(self.next_after(t), |&at| self.next_after(at))
            .take(n)
            .collect()
    }
}

/// What one wake-up does with a schedule whose next tick is due.
#[derive(Debug, Clone, PartialEq)]
pub struct TickPlan {
    /// Ticks to run, oldest first: each gets a task unless the overlap policy says otherwise.
    pub run: Vec<Tick>,
    /// Missed ticks dropped by the catch-up policy (after a long outage, at least this many).
    pub missed: u64,
    /// The next tick after now (`None`: the expression fires no more).
    pub next: Option<DateTime<Utc>>,
}

/// A tick to run, and whether it is a missed one run by the catch-up policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub at: DateTime<Utc>,
    pub catch_up: bool,
}

/// The ticks from `due` (the schedule's next tick, at or before `now`) up to `now`: those
/// within `grace` of now run; older ones were missed (no replica ran) and follow `catch_up`.
pub fn plan_ticks(
    spec: &CronSpec,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    catch_up: CatchUp,
) -> TickPlan {
    let on_time_from = now - grace;
    let mut run = Vec::new();
    let mut missed = 0u64;
    let mut latest_missed = None;
    let mut at = Some(due);
    let mut seen = 0;
    while let Some(t) = at.filter(|t| *t <= now) {
        seen += 1;
        if seen > MAX_TICKS_PER_WAKE && t < on_time_from {
            // too many to list: jump to the last missed tick (those between count as one)
            // and go on from the first tick within the grace
            missed += 1;
            latest_missed = spec.previous_before(on_time_from).or(Some(t));
            at = spec.next_from(on_time_from);
            continue;
        }
        if t < on_time_from {
            missed += 1;
            latest_missed = Some(t);
        } else {
            run.push(Tick {
                at: t,
                catch_up: false,
            });
        }
        at = spec.next_after(t);
    }
    if catch_up == CatchUp::RunLatest {
        if let Some(t) = latest_missed {
            missed -= 1;
            run.insert(
                0,
                Tick {
                    at: t,
                    catch_up: true,
                },
            );
        }
    }
    TickPlan {
        run,
        missed,
        next: at,
    }
}

/// A schedule whose wake-up came, as the store read it (its row locked).
#[derive(Debug, Clone)]
pub struct DueSchedule {
    pub namespace: String,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    /// The CreateTaskRequest each tick makes, protobuf-encoded.
    pub template: Vec<u8>,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub buffered_fire_at: Option<DateTime<Utc>>,
    /// The last task a tick made is pending or in progress.
    pub previous_running: bool,
    /// The database's clock when the row was read.
    pub now: DateTime<Utc>,
}

/// What became of one tick.
#[derive(Debug, Clone)]
pub enum TickOutcome {
    /// A task to create (its idempotency key names the schedule and the tick).
    Create(NewTask),
    /// Overlap SKIP with the previous task running, or BUFFER_ONE with a tick already kept.
    Skipped,
    /// Kept until the previous task finishes (BUFFER_ONE).
    Buffered,
    /// The latest of the ticks no replica was up for, dropped by the catch-up policy
    /// (`FiredTick::missed` counts them).
    Missed,
}

#[derive(Debug, Clone)]
pub struct FiredTick {
    pub at: DateTime<Utc>,
    pub catch_up: bool,
    pub outcome: TickOutcome,
    /// Missed ticks dropped by the catch-up policy, recorded with this one (the `Missed` record,
    /// or the latest missed tick a RUN_LATEST catch-up runs); otherwise 0.
    pub missed: u64,
}

/// What one wake-up does with a schedule: its ticks' outcomes and the schedule's state after.
#[derive(Debug, Clone)]
pub struct WakePlan {
    pub ticks: Vec<FiredTick>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub buffered_fire_at: Option<DateTime<Utc>>,
}

/// The idempotency key of the task a tick makes: one task per schedule and tick, however many
/// replicas try.
pub fn tick_key(schedule: &str, at: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule}:{}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

/// The task a tick (or a trigger, with its own key) makes from the schedule's template.
pub fn task_for_tick(
    namespace: &str,
    template: &[u8],
    idempotency_key: String,
) -> Result<NewTask, String> {
    let request = <v1::CreateTaskRequest as prost::Message>::decode(template)
        .map_err(|e| format!("the stored task does not decode: {e}"))?;
    let (mut spec, problems) = TaskSpec::from_request(request);
    spec.namespace = namespace.to_string();
    spec.idempotency_key = Some(idempotency_key);
    spec.start_at = None;
    let mut all = problems;
    match spec.into_new_task() {
        Ok(task) if all.is_empty() => Ok(task),
        Ok(_) => Err(describe(&all)),
        Err(v) => {
            all.extend(v);
            Err(describe(&all))
        }
    }
}

fn describe(v: &[Violation]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The plan of one wake-up: a buffered tick whose previous task finished runs first; then the
/// ticks due up to now (`grace`: how late a tick may be and still run as on time), each as the
/// overlap policy says, a task made here counting as running for the ticks after it.
pub fn plan_wake(d: &DueSchedule, grace: chrono::Duration) -> Result<WakePlan, String> {
    let spec = CronSpec::parse(&d.cron, &d.time_zone).map_err(|p| {
        p.iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let make = |at| task_for_tick(&d.namespace, &d.template, tick_key(&d.name, at));
    let mut running = d.previous_running;
    let mut buffered = d.buffered_fire_at;
    let mut ticks = Vec::new();
    if let Some(at) = buffered.filter(|_| !running) {
        ticks.push(FiredTick {
            at,
            catch_up: false,
            outcome: TickOutcome::Create(make(at)?),
            missed: 0,
        });
        running = true;
        buffered = None;
    }
    let mut next_fire_at = d.next_fire_at;
    if let Some(due) = d.next_fire_at.filter(|t| *t <= d.now) {
        let plan = plan_ticks(&spec, due, d.now, grace, d.catch_up);
        if plan.missed > 0 {
            // recorded at the latest tick dropped; a run-latest catch-up runs that one instead
            let latest = spec
                .previous_before(d.now - grace)
                .filter(|t| *t >= due)
                .unwrap_or(due);
            if !plan.run.iter().any(|t| t.at == latest) {
                ticks.push(FiredTick {
                    at: latest,
                    catch_up: false,
                    outcome: TickOutcome::Missed,
                    missed: plan.missed,
                });
            }
        }
        for tick in plan.run {
            let outcome = match (d.overlap, running) {
                (Overlap::Allow, _) | (_, false) => TickOutcome::Create(make(tick.at)?),
                (Overlap::Skip, true) => TickOutcome::Skipped,
                (Overlap::BufferOne, true) if buffered.is_none() => {
                    buffered = Some(tick.at);
                    TickOutcome::Buffered
                }
                (Overlap::BufferOne, true) => TickOutcome::Skipped,
            };
            if matches!(outcome, TickOutcome::Create(_)) {
                running = true;
            }
            ticks.push(FiredTick {
                at: tick.at,
                catch_up: tick.catch_up,
                outcome,
                missed: if tick.catch_up { plan.missed } else { 0 },
            });
        }
        next_fire_at = plan.next;
    }
    Ok(WakePlan {
        ticks,
        next_fire_at,
        buffered_fire_at: buffered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Daylight-saving changes in a named zone: Europe/Berlin springs forward on 2026-03-29
    /// (02:00 -> 03:00 local) and falls back on 2026-10-25 (03:00 -> 02:00 local).
    #[test]
    fn daylight_saving_transitions_in_a_named_time_zone() {
        // daily at 02:30 local: the day of the gap runs at 03:00 CEST (01:00 UTC), the first
        // valid minute after the gap; the days around it at 02:30 local (01:30 / 00:30 UTC)
        let daily = CronSpec::parse("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            daily.upcoming(utc("2026-03-27T12:00:00Z"), 3),
            vec![
                utc("2026-03-28T01:30:00Z"),
                utc("2026-03-29T01:00:00Z"),
                utc("2026-03-30T00:30:00Z"),
            ]
        );
        // the day the hour 02:00-03:00 happens twice: once, at its first pass (CEST)
        assert_eq!(
            daily.upcoming(utc("2026-10-24T12:00:00Z"), 2),
            vec![utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]
        );
        // every 30 minutes: none in the gap (02:00 and 02:30 local do not exist), both passes
        // of the repeated hour
        let half_hourly = CronSpec::parse("*/30 * * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            half_hourly.upcoming(utc("2026-03-29T00:15:00Z"), 3),
            vec![
                utc("2026-03-29T00:30:00Z"), // 01:30 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST
                utc("2026-03-29T01:30:00Z"), // 03:30 CEST
            ]
        );
        assert_eq!(
            half_hourly.upcoming(utc("2026-10-24T23:45:00Z"), 4),
            vec![
                utc("2026-10-25T00:00:00Z"), // 02:00 CEST
                utc("2026-10-25T00:30:00Z"), // 02:30 CEST
                utc("2026-10-25T01:00:00Z"), // 02:00 CET
                utc("2026-10-25T01:30:00Z"), // 02:30 CET
            ]
        );
        // in UTC nothing moves
        let utc_daily = CronSpec::parse("30 2 * * *", "").unwrap();
        assert_eq!(
            utc_daily.next_after(utc("2026-03-29T00:00:00Z")),
            Some(Utc.with_ymd_and_hms(2026, 3, 29, 2, 30, 0).unwrap())
        );
    }

    /// The API's policy values and the model's are one vocabulary, both ways.
    #[test]
    fn every_policy_is_a_word_of_the_api() {
        use crate::proto::Vocabulary;
        for o in Overlap::ALL {
            let value = v1::OverlapPolicy::from_word(o.as_str()).expect("an OverlapPolicy");
            assert_eq!(value.word().parse::<Overlap>().unwrap(), *o);
        }
        for c in CatchUp::ALL {
            let value = v1::CatchUpPolicy::from_word(c.as_str()).expect("a CatchUpPolicy");
            assert_eq!(value.word().parse::<CatchUp>().unwrap(), *c);
        }
        assert_eq!(v1::OverlapPolicy::words().len(), Overlap::ALL.len());
        assert_eq!(v1::CatchUpPolicy::words().len(), CatchUp::ALL.len());
    }

    #[test]
    fn six_fields_have_seconds_first() {
        let every_second = CronSpec::parse("* * * * * *", "UTC").unwrap();
        assert_eq!(
            every_second.next_after(utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-01-01T00:00:01Z"))
        );
        let at_15s = CronSpec::parse("15 * * * * *", "UTC").unwrap();
        assert_eq!(
            at_15s.next_after(utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-01-01T00:00:15Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_named() {
        let fields = |r: Result<CronSpec, Vec<(String, String)>>| {
            r.unwrap_err()
                .into_iter()
                .map(|(f, _)| f)
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(CronSpec::parse("61 * * * *", "UTC")), ["cron"]);
        assert_eq!(fields(CronSpec::parse("* * *", "UTC")), ["cron"]);
        assert_eq!(fields(CronSpec::parse("* * * * * * *", "UTC")), ["cron"]);
        assert_eq!(
            fields(CronSpec::parse("* * * * *", "Mars/Olympus")),
            ["time_zone"]
        );
        assert_eq!(
            fields(CronSpec::parse("nonsense", "Mars/Olympus")),
            ["cron", "time_zone"]
        );
        // February 30th never comes
        let never = CronSpec::parse("0 0 30 2 *", "UTC").unwrap_err();
        assert!(never[0].1.contains("never fires"), "{never:?}");
    }

    #[test]
    fn missed_ticks_follow_the_catch_up_policy() {
        let every_second = CronSpec::parse("* * * * * *", "UTC").unwrap();
        let now = utc("2026-01-01T00:00:10.500Z");
        let due = utc("2026-01-01T00:00:05Z");
        let grace = chrono::Duration::seconds(2);
        // 05..=08 are older than the grace: missed; 09 and 10 run
        let skip = plan_ticks(&every_second, due, now, grace, CatchUp::Skip);
        assert_eq!(skip.missed, 4);
        assert_eq!(
            skip.run.iter().map(|t| t.at).collect::<Vec<_>>(),
            [utc("2026-01-01T00:00:09Z"), utc("2026-01-01T00:00:10Z")]
        );
        assert_eq!(skip.next, Some(utc("2026-01-01T00:00:11Z")));
        let latest = plan_ticks(&every_second, due, now, grace, CatchUp::RunLatest);
        assert_eq!(latest.missed, 3);
        assert_eq!(
            latest.run,
            vec![
                Tick {
                    at: utc("2026-01-01T00:00:08Z"),
                    catch_up: true
                },
                Tick {
                    at: utc("2026-01-01T00:00:09Z"),
                    catch_up: false
                },
                Tick {
                    at: utc("2026-01-01T00:00:10Z"),
                    catch_up: false
                },
            ]
        );
        // a long outage is not listed tick by tick
        let long = plan_ticks(
            &every_second,
            utc("2025-12-01T00:00:00Z"),
            now,
            grace,
            CatchUp::RunLatest,
        );
        assert_eq!(long.run.len(), 3, "{long:?}");
        assert!(long.run[0].catch_up && long.run[0].at < now - grace);
        assert_eq!(long.next, Some(utc("2026-01-01T00:00:11Z")));
    }
}
