//! How `ctl` prints: JSON or an aligned table (JSON lines for streams), timestamps as RFC 3339,
//! enum values as words, and nothing from the server that could drive the terminal.

use serde_json::{Map, Value};
use tasker::proto::{v1, Vocabulary};

use super::{CtlError, Output};

pub(super) fn print_value(v: &Value, output: Output) {
    match output {
        Output::Dot => print!("{}", table(v)),
        Output::Json => println!(
            "{}",
            terminal_safe(
                &serde_json::to_string_pretty(v).expect("JSON values serialize"),
                true
            )
        ),
        Output::Table => print!("{}", table(v)),
    }
}

/// Scalars as `key  value` lines; arrays of objects as aligned tables under their key.
pub(super) fn table(v: &Value) -> String {
    let Value::Object(map) = v else {
        return format!("{v}\n");
    };
    let mut out = String::new();
    let width = map.keys().map(String::len).max().unwrap_or(0);
    let scalar = |v: &Value| match v {
        Value::String(s) => terminal_safe(s, false),
        Value::Null => "-".into(),
        other => terminal_safe(&other.to_string(), false),
    };
    let mut tables = Vec::new();
    for (k, val) in map {
        let k = terminal_safe(k, false);
        match val {
            Value::Array(rows) if rows.iter().all(Value::is_object) && !rows.is_empty() => {
                tables.push((k, rows))
            }
            Value::Object(inner) => {
                let flat: Vec<String> = inner
                    .iter()
                    .map(|(ik, iv)| format!("{}={}", terminal_safe(ik, false), scalar(iv)))
                    .collect();
                out.push_str(&format!("{k:width$}  {}\n", flat.join(" ")));
            }
            other => out.push_str(&format!("{k:width$}  {}\n", scalar(other))),
        }
    }
    for (k, rows) in tables {
        let cols: Vec<String> = rows[0]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let o: &Map<String, Value> = r.as_object().expect("checked above");
                cols.iter()
                    .map(|c| o.get(c).map(scalar).unwrap_or_default())
                    .collect()
            })
            .collect();
        let header: Vec<String> = cols.iter().map(|c| terminal_safe(c, false)).collect();
        let widths: Vec<usize> = header
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cells
                    .iter()
                    .map(|r| r[i].len())
                    .chain([c.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        out.push_str(&format!("\n{k}:\n"));
        let line = |vals: &[String]| {
            vals.iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        out.push_str(&line(&header));
        out.push('\n');
        for r in &cells {
            out.push_str(&line(r));
            out.push('\n');
        }
    }
    out
}

/// Text from the server made safe to print: control characters (terminal escape sequences,
/// carriage returns, C1 controls) and Unicode bidirectional controls are shown as `\u001b`
/// escapes instead of acting on the terminal. `keep_newlines` spares the line breaks of
/// pretty-printed JSON, whose string values never contain a raw one.
pub(super) fn terminal_safe(s: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if (c.is_control() && !(keep_newlines && c == '\n')) || tasker::limits::is_bidi_control(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn ts(t: Option<prost_types::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|d| Value::String(d.to_rfc3339()))
        .unwrap_or(Value::Null)
}

/// A duration as people write it: `90s`, `2m`, `12h`, `7d`, `1500ms` (a whole number and a
/// unit).
pub(super) fn parse_duration(flag: &str, text: &str) -> Result<std::time::Duration, CtlError> {
    let bad = || {
        CtlError::Usage(format!(
            "{flag} {text:?}: not a duration; expected a whole number and a unit (ms, s, m, h, d), as in 90s or 7d"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = text[..split].parse().map_err(|_| bad())?;
    let unit_ms: u64 = match &text[split..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    Ok(std::time::Duration::from_millis(
        n.checked_mul(unit_ms).ok_or_else(bad)?,
    ))
}

/// A protobuf duration the way [`parse_duration`] reads one: its largest whole unit.
pub(super) fn duration_text(d: Option<prost_types::Duration>) -> Value {
    let Some(d) = d else { return Value::Null };
    let ms = d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000);
    let (n, unit) = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ]
    .into_iter()
    .find(|(u, _)| ms % u == 0 && ms >= *u)
    .map_or((ms, "ms"), |(u, name)| (ms / u, name));
    Value::String(format!("{n}{unit}"))
}

/// A repeatable flag's values as the enum's raw values: each a word or a value's name.
pub(super) fn enum_flags<E>(flag: &str, values: &[String]) -> Result<Vec<i32>, CtlError>
where
    E: Vocabulary + TryFrom<i32> + Into<i32>,
{
    values
        .iter()
        .map(|v| {
            E::from_input(v).map(Into::into).ok_or_else(|| {
                CtlError::Usage(format!(
                    "{flag} {v:?}: not a {}; expected one of {}",
                    E::TYPE,
                    E::words().join(", ")
                ))
            })
        })
        .collect()
}

pub(super) fn mode_name(raw: i32) -> &'static str {
    match v1::DeploymentMode::try_from(raw) {
        Ok(v1::DeploymentMode::EventDrivenOnly) => "EventDrivenOnly",
        Ok(v1::DeploymentMode::Hybrid) => "Hybrid",
        Ok(v1::DeploymentMode::PollingOnly) => "PollingOnly",
        _ => "Unspecified",
    }
}
