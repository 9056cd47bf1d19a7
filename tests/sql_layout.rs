//! Every SQL function has one readable current definition, in `sql/*.sql`, and it is the one
//! that runs: a fresh database is migrated (the test harness does that), the files are
//! created in a scratch schema, and each function's signature, result, settings, language,
//! volatility and body are compared with the live one's. A function live but not in the
//! files, in the files but not live, or different, fails (naming it).

use std::collections::BTreeMap;

use sqlx::PgPool;

/// One function as the catalogue has it.
#[derive(sqlx::FromRow)]
struct Function {
    name: String,
    args: String,
    result: String,
    body: String,
    config: Vec<String>,
    volatility: String,
    language: String,
}

/// Per function (name and argument types): what defines its behaviour.
async fn functions(pool: &PgPool, schema: &str) -> BTreeMap<String, String> {
    let rows: Vec<Function> = sqlx::query_as(
        "SELECT p.proname::text AS name, pg_get_function_identity_arguments(p.oid) AS args,
                pg_get_function_result(p.oid) AS result, p.prosrc AS body,
                coalesce(p.proconfig, '{}') AS config, p.provolatile::text AS volatility,
                l.lanname::text AS language
         FROM pg_proc p
         JOIN pg_namespace n ON n.oid = p.pronamespace
         JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname = $1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap();
    let ours = format!("{schema}.");
    let unqualify = |s: &str| s.replace(&ours, "tasker.");
    rows.into_iter()
        .map(|f| {
            (
                format!("{}({})", f.name, f.args),
                format!(
                    "returns {}; {} {} {:?}\n{}",
                    unqualify(&f.result),
                    f.language,
                    f.volatility,
                    f.config,
                    unqualify(&f.body)
                ),
            )
        })
        .collect()
}

#[sqlx::test(migrator = "tasker::MIGRATOR")]
async fn every_function_runs_as_its_readable_definition_says(pool: PgPool) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "sql/ holds the definitions");
    sqlx::raw_sql("CREATE SCHEMA tasker_readable")
        .execute(&pool)
        .await
        .unwrap();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // the bodies are checked by the comparison, not by creating them against tables
        let script = format!(
            "SET check_function_bodies = off;\n{}",
            text.replace("tasker.", "tasker_readable.")
        );
        sqlx::raw_sql(&script)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    let live = functions(&pool, "tasker").await;
    let readable = functions(&pool, "tasker_readable").await;
    let mut problems = Vec::new();
    for (f, def) in &live {
        match readable.get(f) {
            None => problems.push(format!("{f}: runs, but has no definition in sql/")),
            Some(r) if r != def => problems.push(format!(
                "{f}: the definition in sql/ is not the one that runs\n--- running:\n{def}\n--- sql/:\n{r}"
            )),
            Some(_) => {}
        }
    }
    for f in readable.keys().filter(|f| !live.contains_key(*f)) {
        problems.push(format!("{f}: defined in sql/, but no migration makes it"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert!(live.len() > 40, "{} functions", live.len());
}
