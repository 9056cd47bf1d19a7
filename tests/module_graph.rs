//! The library's subsystems (the folders of `src/`) are layered: each may use the ones below
//! it in [`LAYERS`] and none above. Reading `src/`, this builds the graph of `crate::<subsystem>`
//! references between subsystems and fails on a back edge (a subsystem naming one above it),
//! on a top-level entry missing from the layering, and, as a second line, on any cycle. Run
//! with `--nocapture` to print the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The subsystems, bottom first. A subsystem may name only the ones before it.
const LAYERS: &[&str] = &[
    "proto",     // the generated tasker.v1 types and their conversions
    "model",     // the domain's words and rules: DAGs, limits, namespace names, commands
    "config",    // TaskerConfig: sections, defaults, loading, validation
    "telemetry", // logs, traces, metrics by name
    "store",     // the pool, migrations and every SQL statement; the local database
    "cluster",   // the replica registry, the claim split, the heartbeat
    "dispatch",  // claim-and-enqueue, parked fetches, announcements, the workers' side
    "readiness", // listener, classifier, event system, poller, deadlines, commands, mode
    "api",       // the gRPC services, auth, connections, the worker client
    "app",       // the composition root: the engine assembled, build, run, shutdown
];

/// Top-level module -> the top-level modules its code names as `crate::<module>`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        // the crate root declares everything, and the binary is a separate crate
        if first == "lib.rs" || first == "bin" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let deps = graph.entry(module.clone()).or_default();
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module && name != "MIGRATOR" {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    node: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in graph.get(node).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_string());
            return Some(cycle);
        }
        if seen.insert(next.clone()) {
            path.push(next.clone());
            if let Some(c) = cycle_from(graph, start, next, path, seen) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| *l == module)
        .unwrap_or_else(|| panic!("src/{module} is not in LAYERS: place it in the layering"))
}

#[test]
fn subsystems_use_only_the_layers_below_them() {
    let graph = graph();
    let mut back_edges = Vec::new();
    for (module, deps) in &graph {
        println!(
            "{module} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        for dep in deps {
            if layer(dep) >= layer(module) {
                back_edges.push(format!("{module} -> {dep}"));
            }
        }
    }
    assert!(
        back_edges.is_empty(),
        "back edges (a subsystem naming one at or above its own layer): {}",
        back_edges.join(", ")
    );
}

#[test]
fn subsystems_do_not_import_each_other_in_a_cycle() {
    let graph = graph();
    for module in graph.keys() {
        let mut path = vec![module.clone()];
        let cycle = cycle_from(&graph, module, module, &mut path, &mut BTreeSet::new());
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
}
