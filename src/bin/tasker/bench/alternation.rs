//! The remote benchmark's repeats, summed up: with `--repeat N` every scenario runs its
//! clients and the peer N times in turn (client, client, ..., peer, then again), each repeat
//! beside a notify floor measured just before it. A machine whose speed drifts over minutes
//! (a shared VM's disk and CPU do) then weighs on Tasker's runs and the peer's alike: each
//! comparison is made between neighbouring runs, and the summary gives, per scenario and
//! client, the median over the repeats of each figure and of each repeat's ratio to the peer
//! and to the floor.

use serde::Serialize;

use super::remote::{RemoteScenario, PEER};

/// One scenario and client over its repeats.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub scenario: String,
    pub client: String,
    pub mode: String,
    pub replicas: usize,
    pub repeats: usize,
    pub steps_per_sec: Spread,
    pub next_step_p50_ms: Spread,
    /// Each repeat's p50 over the floor measured before it.
    pub p50_vs_floor: Spread,
    /// Each repeat's steps/s over the peer's in the same repeat (none for the peer itself, or
    /// without it).
    pub steps_vs_peer: Option<Spread>,
    /// Each repeat's next-step p50 over the peer's in the same repeat.
    pub p50_vs_peer: Option<Spread>,
    /// Service + PostgreSQL CPU per step.
    pub cpu_ms_per_step: Spread,
    pub commits_per_step: Spread,
}

/// The median of a figure over the repeats, and its least and greatest.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Option<Self> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Per scenario and client (in the order they first ran), its repeats summed up.
pub fn summarize(runs: &[RemoteScenario]) -> Vec<Summary> {
    let mut keys: Vec<(&str, &str, &str, usize)> = Vec::new();
    for r in runs {
        let key = (
            r.scenario.as_str(),
            r.client.as_str(),
            r.mode.as_str(),
            r.replicas,
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|(scenario, client, mode, replicas)| {
            let mine: Vec<&RemoteScenario> = runs
                .iter()
                .filter(|r| {
                    (
                        r.scenario.as_str(),
                        r.client.as_str(),
                        r.mode.as_str(),
                        r.replicas,
                    ) == (scenario, client, mode, replicas)
                })
                .collect();
            let peer_of = |r: &RemoteScenario| {
                runs.iter()
                    .find(|p| p.client == PEER && p.scenario == r.scenario && p.repeat == r.repeat)
            };
            let versus = |f: fn(&RemoteScenario, &RemoteScenario) -> f64| {
                if client == PEER {
                    return None;
                }
                Spread::of(
                    mine.iter()
                        .filter_map(|r| peer_of(r).map(|p| f(r, p)))
                        .collect(),
                )
            };
            let spread = |f: fn(&RemoteScenario) -> f64| {
                Spread::of(mine.iter().map(|r| f(r)).collect()).unwrap_or(Spread {
                    median: f64::NAN,
                    min: f64::NAN,
                    max: f64::NAN,
                })
            };
            Summary {
                scenario: scenario.to_string(),
                client: client.to_string(),
                mode: mode.to_string(),
                replicas,
                repeats: mine.len(),
                steps_per_sec: spread(|r| r.steps_per_sec),
                next_step_p50_ms: spread(|r| latency(r).unwrap_or(f64::NAN)),
                p50_vs_floor: spread(|r| latency(r).unwrap_or(f64::NAN) / r.floor_p50_ms),
                steps_vs_peer: versus(|r, p| r.steps_per_sec / p.steps_per_sec),
                p50_vs_peer: versus(|r, p| {
                    latency(r).unwrap_or(f64::NAN) / latency(p).unwrap_or(f64::NAN)
                }),
                cpu_ms_per_step: spread(|r| r.cpu_ms_per_step.service_and_postgres),
                commits_per_step: spread(|r| r.budget.commits),
            }
        })
        .collect()
}

/// A run's next-step p50, when it measured one.
fn latency(r: &RemoteScenario) -> Option<f64> {
    (r.next_step.samples > 0).then_some(r.next_step.p50_ms)
}

/// The summary as a table: medians, with the least and greatest of the repeats.
pub fn render(rows: &[Summary]) -> String {
    let mut out = String::from(
        "Medians over the repeats (least - greatest); ratios are each repeat's own, to the peer's run and the floor measured beside it:\n\n| scenario | client | repeats | steps/s | vs peer | next step p50 (ms) | vs peer | vs floor | CPU ms/step (service + PostgreSQL) | commits/step |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let show = |s: &Spread, digits: usize| {
        if s.median.is_nan() {
            "-".to_string()
        } else {
            format!(
                "{:.d$} ({:.d$} - {:.d$})",
                s.median,
                s.min,
                s.max,
                d = digits
            )
        }
    };
    let ratio = |s: &Option<Spread>| match s {
        Some(s) => format!("{:.2}x ({:.2} - {:.2})", s.median, s.min, s.max),
        None => "-".into(),
    };
    for s in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.scenario,
            s.client,
            s.repeats,
            show(&s.steps_per_sec, 0),
            ratio(&s.steps_vs_peer),
            show(&s.next_step_p50_ms, 2),
            ratio(&s.p50_vs_peer),
            show(&s.p50_vs_floor, 2),
            show(&s.cpu_ms_per_step, 2),
            show(&s.commits_per_step, 2),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::remote::{Budget, CpuPerStep};
    use super::super::LatencyStats;
    use super::*;

    fn run(
        client: &str,
        repeat: usize,
        steps_per_sec: f64,
        p50: f64,
        floor: f64,
    ) -> RemoteScenario {
        RemoteScenario {
            scenario: "chains 8 x 10 steps".into(),
            client: client.into(),
            mode: "Hybrid".into(),
            replicas: 1,
            repeat,
            floor_p50_ms: floor,
            window_secs: 8.0,
            steps_per_sec,
            next_step: LatencyStats {
                samples: 100,
                p50_ms: p50,
                ..Default::default()
            },
            fan_out: LatencyStats::default(),
            fan_in: LatencyStats::default(),
            cpu_ms_per_step: CpuPerStep::default(),
            budget: Budget::default(),
            claims_lost_per_step: 0.0,
        }
    }

    /// Each repeat is compared with the peer's run of the same repeat, and the median of those
    /// ratios reported: a machine twice as slow in the second repeat changes no ratio.
    #[test]
    fn ratios_are_taken_within_a_repeat_and_their_median_reported() {
        let runs = vec![
            run("Rust", 1, 1200.0, 5.0, 0.5),
            run(PEER, 1, 1000.0, 6.0, 0.5),
            run("Rust", 2, 600.0, 10.0, 1.0),
            run(PEER, 2, 500.0, 12.0, 1.0),
            run("Rust", 3, 1100.0, 5.5, 0.5),
            run(PEER, 3, 1000.0, 6.0, 0.5),
        ];
        let s = summarize(&runs);
        assert_eq!(s.len(), 2);
        let rust = &s[0];
        assert_eq!((rust.client.as_str(), rust.repeats), ("Rust", 3));
        assert_eq!(
            rust.steps_per_sec,
            Spread {
                median: 1100.0,
                min: 600.0,
                max: 1200.0
            }
        );
        let vs = rust.steps_vs_peer.expect("a peer ran");
        assert!((vs.median - 1.2).abs() < 1e-9, "{vs:?}");
        assert!((vs.min - 1.1).abs() < 1e-9, "{vs:?}");
        let p50 = rust.p50_vs_peer.expect("a peer ran");
        assert!((p50.median - 5.0 / 6.0).abs() < 1e-9, "{p50:?}");
        assert!((rust.p50_vs_floor.median - 10.0).abs() < 1e-9);
        assert_eq!(s[1].client, PEER);
        assert_eq!(s[1].steps_vs_peer, None);
        let table = render(&s);
        assert!(
            table.contains(
                "| chains 8 x 10 steps | Rust | 3 | 1100 (600 - 1200) | 1.20x (1.10 - 1.20) |"
            ),
            "{table}"
        );
    }

    #[test]
    fn an_even_count_takes_the_middle_two() {
        assert_eq!(Spread::of(vec![4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(vec![]), None);
    }
}
