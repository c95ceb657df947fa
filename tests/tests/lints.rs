//! Rules of the test code that the compiler does not keep: no test waits on or asserts the
//! agent's log text. Tests wait on state (the status file, `/metrics`, `lb ... -o json`, the
//! maps) with a deadline, and assert on it or on a failing command's answer
//! (`Agent::refusal`); the log only prints in a failing test's message (`Agent::log_dump`).
//! The tests of the log format itself (`logs.rs`) read the log: it is their subject. Plain std,
//! no root.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// What reads or waits on the log, as names: the old harness's wait and text, and the log file
/// itself. (Spelt in two parts so that this file does not name them.)
const ON_LOG_TEXT: [[&str; 2]; 3] = [["wait", "_for"], ["log", "_text"], ["log", "_file"]];

/// The files allowed to: the log format's tests, and the harness that offers the log file.
const ALLOWED: [&str; 2] = ["tests/logs.rs", "src/agent.rs"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir` (recursively), sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    lb_tests::files_under(dir, "rs")
}

/// Whether `line` has `name` as a whole identifier (not inside a longer one).
fn names(line: &str, name: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    line.match_indices(name).any(|(at, _)| {
        !ident(line[..at].chars().next_back()) && !ident(line[at + name.len()..].chars().next())
    })
}

/// `file:line: text` for each line of `text` (the file `name`) that names one of `needles`.
fn uses(name: &str, text: &str, needles: &[String]) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| needles.iter().any(|n| names(l, n)))
        .map(|(i, l)| format!("{name}:{}: {}", i + 1, l.trim()))
        .collect()
}

#[test]
fn no_test_outside_logs_rs_waits_on_or_asserts_log_text() {
    let root = crate_dir();
    let needles: Vec<String> = ON_LOG_TEXT.iter().map(|p| p.concat()).collect();
    let mut found = Vec::new();
    let mut scanned = 0;
    for dir in ["tests", "src"] {
        for path in sources(&root.join(dir)) {
            let name = path
                .strip_prefix(&root)
                .expect("under the crate")
                .to_string_lossy()
                .into_owned();
            scanned += 1;
            if ALLOWED.contains(&name.as_str()) {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            found.extend(uses(&format!("tests/{name}"), &text, &needles));
        }
    }
    assert!(
        scanned > 40,
        "only {scanned} files scanned under {}",
        root.display()
    );
    assert!(
        found.is_empty(),
        "tests wait on and assert state (status.json, /metrics, `lb ... -o json`, the maps), \
         not log text; use Agent::wait_status and the waits built on it, or Agent::refusal for \
         a start that fails (see docs/tests.md):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_log_text_lint_names_the_file_and_line_of_a_wait_on_the_log() {
    let needles: Vec<String> = ON_LOG_TEXT.iter().map(|p| p.concat()).collect();
    let wait = format!("    agent.{}(\"running\", 1, T);", needles[0]);
    let text = format!("fn t() {{\n{wait}\n}}\n");
    assert_eq!(
        uses("tests/tests/x.rs", &text, &needles),
        [format!("tests/tests/x.rs:2: {}", wait.trim())]
    );
    // A name inside a longer one is not a use; a path to the function is.
    let clean = format!(
        "fn t_asserts_{}() {{\n    agent.wait_running(&ns, &dirs, T);\n}}\n",
        needles[1]
    );
    assert!(uses("x.rs", &clean, &needles).is_empty());
    let by_path = format!("    .map(Agent::{})", needles[1]);
    assert_eq!(uses("x.rs", &by_path, &needles).len(), 1);
}
