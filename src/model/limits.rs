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
/// The longest execution limit (StepDefinition.timeout) or wait for a worker
/// (StepDefinition.schedule_to_start) a step may declare: 7 days, as the database's checks.
pub const MAX_STEP_TIMEOUT_MS: i64 = 7 * 86_400_000;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

/// The Unicode characters that reorder how text is displayed (Bidi_Control, as in U+202E):
/// refused in names, and escaped by `tasker ctl` along with control characters.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// How deeply a document (inputs, context, results, error details) may nest, counting each
/// object or array as one level (a flat object is 1). What is delivered nests deeper than what
/// was accepted: a step's results reach its children inside `FetchStepsResponse ->
/// LeasedStep -> parent_results -> <parent name>`, and each JSON level costs protobuf up to
/// three nested messages (map entry, `Value`, `Struct`). The decoders of the common clients
/// (prost, Python's protobuf) stop at 100 nested messages: at this depth the deepest delivery
/// nests 3 x 24 + 4 = 76, leaving room for any envelope the API adds.
pub const MAX_DOCUMENT_DEPTH: usize = 24;

/// What is wrong with a document a client sends (inputs, context, results, error details),
/// or `None`: it must be a JSON object, nest at most [`MAX_DOCUMENT_DEPTH`] levels, hold no NUL
/// character (PostgreSQL cannot store one), and take at most [`MAX_DOCUMENT_BYTES`] both as
/// JSON (what is stored) and as protobuf (what is sent: an array of numbers takes up to 5.5
/// times more as protobuf than as JSON).
pub fn document_problem(doc: &serde_json::Value) -> Option<String> {
    if !doc.is_object() {
        return Some("must be a JSON object".into());
    }
    let depth = document_depth(doc);
    if depth > MAX_DOCUMENT_DEPTH {
        return Some(format!(
            "must nest at most {MAX_DOCUMENT_DEPTH} levels of objects and arrays, nests {depth}"
        ));
    }
    if let Some(path) = nul_in(doc, &mut String::new()) {
        return Some(format!(
            "must not contain the NUL character (U+0000); found in {path}"
        ));
    }
    let json = json_len(doc);
    let sent = crate::proto::struct_encoded_len(doc);
    if json.max(sent) > MAX_DOCUMENT_BYTES {
        return Some(format!(
            "must be at most {MAX_DOCUMENT_BYTES} bytes as JSON and as sent (protobuf), is {json} as JSON and {sent} as protobuf"
        ));
    }
    None
}

/// Bytes of `doc` as JSON, counted without writing it out.
fn json_len(doc: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, doc).map_or(usize::MAX, |()| count.0)
}

/// What is wrong with free text a client sends (a reason, an error message, a key), or
/// `None`: PostgreSQL cannot store the NUL character.
pub fn text_problem(text: &str) -> Option<String> {
    text.contains('\0')
        .then(|| "must not contain the NUL character (U+0000)".to_string())
}

/// A stored document as a response may carry it: itself, or, when it nests deeper than any
/// document accepted today may (it was stored before the limit), a small object saying so,
/// since clients could not decode the response that carried it.
pub fn deliverable_document(doc: &serde_json::Value) -> std::borrow::Cow<'_, serde_json::Value> {
    if document_depth(doc) <= MAX_DOCUMENT_DEPTH + 1 {
        return std::borrow::Cow::Borrowed(doc);
    }
    std::borrow::Cow::Owned(serde_json::json!({
        "omitted": format!(
            "this document nests deeper than {MAX_DOCUMENT_DEPTH} levels, more than clients can decode"
        )
    }))
}

/// Levels of objects and arrays in `v` (a scalar is 0, a flat object 1).
pub fn document_depth(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::Object(m) => 1 + m.values().map(document_depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(document_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The path (`a.b[2]`) of the first key or string holding a NUL character.
fn nul_in(v: &serde_json::Value, path: &mut String) -> Option<String> {
    use serde_json::Value;
    let at = |path: &str| {
        if path.is_empty() {
            "the document".to_string()
        } else {
            path.to_string()
        }
    };
    match v {
        Value::String(s) if s.contains('\0') => Some(at(path)),
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&k.replace('\0', "\\u0000"));
            let found = if k.contains('\0') {
                Some(format!("a key of {}", at(&path[..len])))
            } else {
                nul_in(v, path)
            };
            path.truncate(len);
            found
        }),
        Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = nul_in(v, path);
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> serde_json::Value {
        (1..depth).fold(json!({"leaf": 1}), |inner, _| json!({ "n": inner }))
    }

    #[test]
    fn documents_are_held_to_depth_nul_and_size_as_sent() {
        assert_eq!(document_depth(&nested(24)), 24);
        assert_eq!(document_problem(&nested(24)), None);
        assert!(document_problem(&nested(25))
            .unwrap()
            .contains("at most 24 levels"));
        assert!(document_problem(&json!({"a": [1, {"b": "x\u{0}y"}]}))
            .unwrap()
            .contains("a[1].b"));
        assert!(document_problem(&json!({"k\u{0}": 1}))
            .unwrap()
            .contains("a key of the document"));
        assert_eq!(
            document_problem(&json!([1])).unwrap(),
            "must be a JSON object"
        );
        // 120,000 zeros: 240 KB of JSON, 1.3 MB as protobuf
        let zeros = json!({ "x": vec![0; 120_000] });
        assert!(serde_json::to_vec(&zeros).unwrap().len() < MAX_DOCUMENT_BYTES);
        assert!(document_problem(&zeros).unwrap().contains("as protobuf"));
        assert_eq!(text_problem("fine\nline"), None);
        assert!(text_problem("bad\0").is_some());
    }
}
