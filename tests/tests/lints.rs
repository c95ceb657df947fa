//! Rules the compiler does not keep. The agent's modules import only from their own layer or
//! the layers below it (`LAYERS`, as ARCHITECTURE.md draws them). No test waits on or asserts the
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

/// The layers of `lb-userspace/src`, from the bottom up, as ARCHITECTURE.md draws them: each is
/// a folder, and a module may use its own layer and the layers before it here, never one after.
const LAYERS: [&str; 7] = [
    "model", "kernel", "sources", "status", "observe", "agent", "cli",
];

/// What `lib.rs` itself defines, below every layer.
const ROOT_ITEMS: [&str; 1] = ["error_chain"];

/// The code of a source file: comment lines blanked (their `crate::` paths are doc links) and an
/// inline test module at the end cut off (a test may build what it tests from the layers above);
/// each line where it was.
fn code_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut code = String::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let test_module = lines.get(i + 1).is_some_and(|next| {
            next.trim_start().starts_with("mod ") && next.trim_end().ends_with('{')
        });
        if t == "#[cfg(test)]" && test_module {
            break;
        }
        if !t.starts_with("//") {
            code.push_str(line);
        }
        code.push('\n');
    }
    code
}

/// Each `crate::` path in `code` as (line, the first name after `crate::`); a group
/// `crate::{a::X, b}` gives each of its names.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let ident = |s: &str| s.chars().take_while(|&c| is_ident(c)).collect::<String>();
    let line_at = |at: usize| code[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push((line_at(at), ident(rest)));
            continue;
        };
        let group_at = at + "crate::{".len();
        let (mut depth, mut item_starts) = (0, true);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_starts = true,
                c if item_starts && is_ident(c) => {
                    item_starts = false;
                    out.push((line_at(group_at + i), ident(&group[i..])));
                }
                _ => {}
            }
        }
    }
    out
}

/// `file:line: ...` for each `crate::` path of `text` (the file `name` under
/// `lb-userspace/src`, whose layer is its first folder) that leads to a layer after the file's
/// own, or to no layer at all.
fn upward_imports(name: &str, text: &str) -> Vec<String> {
    let layer_of = |n: &str| LAYERS.iter().position(|l| *l == n);
    let own = layer_of(name.split('/').next().unwrap_or_default());
    let name = format!("lb-userspace/src/{name}");
    let Some(own) = own else {
        return vec![format!("{name}: not in a layer folder (one of {LAYERS:?})")];
    };
    let mut found = Vec::new();
    for (line, target) in crate_paths(&code_of(text)) {
        if ROOT_ITEMS.contains(&target.as_str()) {
            continue;
        }
        match layer_of(&target) {
            Some(to) if to <= own => {}
            Some(_) => found.push(format!(
                "{name}:{line}: {} imports crate::{target}, a layer above it",
                LAYERS[own]
            )),
            None => found.push(format!(
                "{name}:{line}: crate::{target} is not a layer (one of {LAYERS:?})"
            )),
        }
    }
    found
}

#[test]
fn lb_userspace_modules_import_only_from_their_own_layer_or_the_layers_below() {
    let src = crate_dir().join("../lb-userspace/src");
    let mut found = Vec::new();
    let mut scanned = 0;
    for path in sources(&src) {
        let name = path
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .into_owned();
        // The crate root and the binary name the layers; a test module (`tests.rs`,
        // `probe_tests.rs`) may build what it tests from above.
        if name == "lib.rs" || name == "main.rs" || name.ends_with("tests.rs") {
            continue;
        }
        scanned += 1;
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        found.extend(upward_imports(&name, &text));
    }
    assert!(
        scanned > 60,
        "only {scanned} files scanned under {}",
        src.display()
    );
    assert!(
        found.is_empty(),
        "imports go down the layers ({}; see ARCHITECTURE.md): move the type to the lower \
         layer, or the code that needs it up:\n{}",
        LAYERS.join(" < "),
        found.join("\n")
    );
}

#[test]
fn the_layer_lint_names_the_file_and_line_of_an_import_from_a_layer_above() {
    let text = "//! Uses [`crate::agent`] in a doc link only.\n\
                use crate::{\n    model::plan::Plan,\n    observe::show::table,\n};\n\
                fn f() -> crate::error_chain {}\n\
                #[cfg(test)]\nmod tests {\n    use crate::cli::main;\n}\n";
    assert_eq!(
        upward_imports("kernel/links.rs", text),
        ["lb-userspace/src/kernel/links.rs:4: kernel imports crate::observe, a layer above it"]
    );
    assert_eq!(
        upward_imports("agent/run.rs", "    let s = crate::cli::check::run();\n"),
        ["lb-userspace/src/agent/run.rs:1: agent imports crate::cli, a layer above it"]
    );
    assert!(upward_imports("cli/mod.rs", text).is_empty());
    assert_eq!(upward_imports("stray.rs", "").len(), 1);
}

#[test]
fn no_library_module_of_lb_userspace_or_lb_common_uses_anyhow() {
    let root = crate_dir().join("..");
    let needles = ["anyhow".to_string()];
    let mut found = Vec::new();
    for dir in ["lb-userspace/src", "lb-common/src"] {
        for path in sources(&root.join(dir)) {
            let name = path.strip_prefix(&root).expect("under the workspace");
            let name = name.to_string_lossy();
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            found.extend(uses(&name, &code_of(&text), &needles));
        }
    }
    assert!(
        found.is_empty(),
        "library modules return typed errors (thiserror, the cause as #[source]); anyhow is \
         for binaries (build.rs, xtask, the tests' tools):\n{}",
        found.join("\n")
    );
}
