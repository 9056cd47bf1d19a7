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
