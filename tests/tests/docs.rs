//! README.md and the pages under docs/: the README stays short and its table of contents names
//! only its own headings; every relative link in them names a file that exists and, with an
//! anchor, a heading of that file. External (http, https, mailto) links are not followed. Plain
//! std, no root.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// README.md, ARCHITECTURE.md and every Markdown file under docs/ (recursively), sorted.
fn pages() -> Vec<PathBuf> {
    let root = root();
    let mut pages = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    pages.extend(lb_tests::files_under(&root.join("docs"), "md"));
    pages.sort();
    pages
}

/// The lines of a Markdown text outside fenced code blocks, with their numbers (from 1).
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The heading text of an ATX heading line (`## Text`), if it is one.
fn heading(line: &str) -> Option<&str> {
    let hashes = line.len() - line.trim_start_matches('#').len();
    if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
        Some(line[hashes..].trim().trim_end_matches('#').trim())
    } else {
        None
    }
}

/// GitHub's anchor for a heading: lowercase, spaces to '-', every other character dropped
/// unless it is alphanumeric, '-' or '_'.
fn anchor_of(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor a Markdown text's headings give, a repeated one with GitHub's `-1`, `-2` ...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (_, line) in prose_lines(text) {
        if let Some(h) = heading(line) {
            let a = anchor_of(h);
            let n = seen.entry(a.clone()).or_insert(0);
            out.push(if *n == 0 { a } else { format!("{a}-{n}") });
            *n += 1;
        }
    }
    out
}

/// A line with its inline code spans blanked, so that `[a](b)` in backticks is not a link.
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        } else {
            out.push_str("code");
        }
    }
    out
}

/// The targets of the inline links (`[text](target)`) on a line.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after
            .find(|c: char| c == ')' || c.is_whitespace())
            .unwrap_or(after.len());
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

fn is_external(target: &str) -> bool {
    let scheme_end = target.find(':');
    let path_start = target.find(['/', '#']);
    match (scheme_end, path_start) {
        (Some(c), Some(p)) => c < p,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Every relative link of a page: (line, target).
fn relative_links(page: &Path) -> Vec<(usize, String)> {
    let text = read(page);
    prose_lines(&text)
        .into_iter()
        .flat_map(|(n, line)| link_targets(line).into_iter().map(move |t| (n, t)))
        .filter(|(_, t)| !is_external(t))
        .collect()
}

fn shown(page: &Path) -> String {
    page.strip_prefix(root())
        .unwrap_or(page)
        .display()
        .to_string()
}

#[test]
fn readme_has_fewer_than_300_lines() {
    let lines = read(&root().join("README.md")).lines().count();
    assert!(
        lines < 300,
        "README.md has {lines} lines: move reference material to docs/"
    );
}

#[test]
fn readme_has_a_table_of_contents_whose_every_link_is_a_heading_of_the_readme() {
    let text = read(&root().join("README.md"));
    let own = anchors(&text);
    let lines = prose_lines(&text);
    let start = lines
        .iter()
        .position(|(_, l)| heading(l).is_some_and(|h| h.eq_ignore_ascii_case("contents")))
        .expect("README.md has a heading \"Contents\"");
    let toc: Vec<(usize, String)> = lines[start + 1..]
        .iter()
        .take_while(|(_, l)| heading(l).is_none())
        .flat_map(|(n, l)| link_targets(l).into_iter().map(move |t| (*n, t)))
        .collect();
    assert!(
        toc.len() >= 5,
        "the table of contents has {} links: {toc:?}",
        toc.len()
    );
    let wrong: Vec<String> = toc
        .iter()
        .filter(|(_, t)| {
            t.strip_prefix('#')
                .is_none_or(|a| !own.contains(&a.to_string()))
        })
        .map(|(n, t)| format!("README.md:{n}: {t}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "table of contents entries that are not headings of README.md (headings: {own:?}):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_relative_link_in_readme_and_docs_names_an_existing_file() {
    let mut missing = Vec::new();
    for page in pages() {
        let dir = page.parent().expect("a page's directory");
        for (n, target) in relative_links(&page) {
            let path = target.split('#').next().unwrap_or_default();
            if !path.is_empty() && !dir.join(path).exists() {
                missing.push(format!("{}:{n}: {target}", shown(&page)));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "links to files that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_anchor_in_a_relative_link_of_readme_and_docs_is_a_heading_of_its_file() {
    let mut wrong = Vec::new();
    for page in pages() {
        let dir = page.parent().expect("a page's directory");
        for (n, target) in relative_links(&page) {
            let Some((path, anchor)) = target.split_once('#') else {
                continue;
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                dir.join(path)
            };
            let is_md = file.extension().is_some_and(|e| e == "md");
            // A missing file is the other test's failure.
            if file.exists() && (!is_md || !anchors(&read(&file)).iter().any(|a| a == anchor)) {
                wrong.push(format!("{}:{n}: {target}", shown(&page)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "links whose anchor is no heading of the file they name:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_anchor_rule_is_githubs() {
    assert_eq!(anchor_of("dsr or nat?"), "dsr-or-nat");
    assert_eq!(anchor_of("Gateway API (L4)"), "gateway-api-l4");
    assert_eq!(
        anchor_of("Upgrades, rollbacks and size changes"),
        "upgrades-rollbacks-and-size-changes"
    );
    assert_eq!(anchor_of("The `lb_decap` program"), "the-lb_decap-program");
    assert_eq!(
        anchors("# A\n```\n# not a heading\n```\n## A\n"),
        ["a", "a-1"]
    );
    assert_eq!(
        link_targets("see [x](a.md#b), `[y](c)` and [z](https://e/f)"),
        ["a.md#b", "https://e/f"]
    );
    assert!(is_external("https://aya-rs.dev"));
    assert!(!is_external("docs/upgrades.md#a:b"));
}
