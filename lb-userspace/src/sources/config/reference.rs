//! The configuration reference (`docs/config-reference.md`), generated from the config file's
//! schema: the `Raw*` types' fields and doc comments, read through their JSON schema
//! (schemars). A unit test fails when the file in `docs/` differs from what this generates, so a
//! key added to the types without a word in the docs cannot land.

use serde_json::Value;

use super::RawConfig;

/// Where the reference lives, from the workspace root.
pub const PATH: &str = "docs/config-reference.md";

/// One table of the reference: the keys of one map of the file.
struct Section {
    /// The map's path in the file (`node`, `vips[i].backends[j]`); empty for the top level.
    path: String,
    /// The schema definition describing it.
    schema: Value,
}

/// The config file's JSON schema, and its definitions (`$defs`: one per `Raw*` struct).
fn schema() -> (Value, Value) {
    let root = serde_json::to_value(schemars::schema_for!(RawConfig)).expect("a JSON schema");
    let defs = root.get("$defs").cloned().unwrap_or(Value::Null);
    (root, defs)
}

/// The reference, as Markdown: a table per map of the file, breadth first.
pub fn markdown() -> String {
    let (root, defs) = schema();
    let mut out = String::from(HEADER);
    let mut queue = std::collections::VecDeque::from([Section {
        path: String::new(),
        schema: root,
    }]);
    while let Some(section) = queue.pop_front() {
        let (text, nested) = table(&section, &defs);
        out.push_str(&text);
        queue.extend(nested);
    }
    out
}

/// The JSON schema of `node`, standalone: what the config types say of each key (type, range,
/// pattern, doc comment), the nested maps written in place, an unset key being no value of its
/// own (`null` is left out), Rust's integer widths dropped and each description on one line. The Helm chart's
/// `values.schema.json` holds it as its `node` (tests/tests/helm.rs checks that it does).
pub fn node_schema() -> Value {
    let (_, defs) = schema();
    let mut node = defs.get("RawNode").cloned().unwrap_or(Value::Null);
    standalone(&mut node, &defs);
    node
}

/// `v` with its `$ref`s replaced by the definitions they name, `Option`'s `null` alternative
/// dropped, and no `format: int64`.
fn standalone(v: &mut Value, defs: &Value) {
    let Some(map) = v.as_object_mut() else {
        return;
    };
    if let Some(any) = map.get("anyOf").and_then(Value::as_array) {
        let some: Vec<&Value> = any.iter().filter(|s| s["type"] != "null").collect();
        if let [one] = some[..] {
            let mut one = one.clone();
            for (k, val) in map.iter().filter(|(k, _)| *k != "anyOf") {
                one[k] = val.clone();
            }
            *v = one;
            return standalone(v, defs);
        }
    }
    if let Some(r) = map.remove("$ref") {
        let name = r.as_str().unwrap_or("").trim_start_matches("#/$defs/");
        for (k, val) in defs[name].as_object().into_iter().flatten() {
            map.entry(k.clone()).or_insert_with(|| val.clone());
        }
    }
    if let Some(Value::Array(types)) = map.get("type") {
        let mut some: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        let one = match some.len() {
            1 => some.remove(0),
            _ => Value::Array(some),
        };
        map.insert("type".into(), one);
    }
    if map
        .get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| f.contains("int"))
    {
        map.remove("format");
    }
    if let Some(Value::String(d)) = map.get_mut("description") {
        *d = one_line(d);
    }
    for child in map.values_mut() {
        match child {
            Value::Array(items) => items.iter_mut().for_each(|i| standalone(i, defs)),
            _ => standalone(child, defs),
        }
    }
}

const HEADER: &str = "# Configuration reference\n\n\
Every key of an lb config file (`lb run --config FILE`, `lb check --config FILE`). This page is \
generated from the config types (`lb-userspace/src/sources/config.rs`, the `Raw*` structs and their doc \
comments): edit them, then run `LB_BLESS=1 cargo test -p lb-userspace --lib config::reference` \
to write it again. Durations are written like `500ms`, `2s`, `10m` or `1h`. A key that is not \
listed is an error. How the settings work together: [Configuration](configuration.md); a \
documented sample: [`lb.example.yaml`](../lb.example.yaml).\n";

/// The table of one section, and the sections of the maps its keys hold.
fn table(section: &Section, defs: &Value) -> (String, Vec<Section>) {
    let title = match section.path.as_str() {
        "" => "Top level".to_string(),
        p => format!("`{p}`"),
    };
    let mut out = format!("\n## {title}\n\n");
    if let Some(d) = section.schema.get("description").and_then(Value::as_str) {
        out.push_str(&format!("{}\n\n", without_path(&one_line(d))));
    }
    out.push_str("| key | type | meaning |\n|---|---|---|\n");
    let mut nested = Vec::new();
    let props = section.schema.get("properties").and_then(Value::as_object);
    for (key, prop) in props.into_iter().flatten() {
        let path = match section.path.as_str() {
            "" => key.clone(),
            p => format!("{p}.{key}"),
        };
        let (kind, inner) = type_of(prop, defs);
        if let Some(def) = inner {
            let child = match kind.starts_with("list") {
                true => format!("{path}[{}]", index_name(&path)),
                false => path.clone(),
            };
            nested.push(Section {
                path: child,
                schema: def,
            });
        }
        let meaning = prop
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("");
        out.push_str(&format!(
            "| `{path}` | {kind} | {} |\n",
            one_line(meaning).replace('|', "\\|")
        ));
    }
    (out, nested)
}

/// The type of a property in the file's words, and the definition of the map it holds, if any.
fn type_of(prop: &Value, defs: &Value) -> (String, Option<Value>) {
    // Option<T> is `anyOf: [T, null]` for a map, `type: [T, "null"]` otherwise.
    if let Some(any) = prop.get("anyOf").and_then(Value::as_array) {
        let some = any
            .iter()
            .find(|s| s.get("type") != Some(&Value::from("null")));
        return some.map_or(("any".into(), None), |s| type_of(s, defs));
    }
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        let def = defs.get(r.trim_start_matches("#/$defs/")).cloned();
        return ("map (below)".into(), def);
    }
    let ty = match prop.get("type") {
        Some(Value::Array(types)) => types.iter().find(|t| *t != "null").cloned(),
        t => t.cloned(),
    };
    match ty.as_ref().and_then(Value::as_str) {
        Some("array") => {
            let (item, def) = prop
                .get("items")
                .map_or(("any".into(), None), |i| type_of(i, defs));
            (format!("list of {}", plural(&item)), def)
        }
        Some("integer") => ("integer".into(), None),
        Some(t) => (t.to_string(), None),
        None => ("any".into(), None),
    }
}

fn plural(kind: &str) -> String {
    match kind {
        "map (below)" => "maps (below)".into(),
        k => format!("{k}s"),
    }
}

/// The index letter of a list's items: `vips[i]`, then `backends[j]` inside it.
fn index_name(path: &str) -> char {
    match path.matches('[').count() {
        0 => 'i',
        _ => 'j',
    }
}

/// A struct's doc without the path it starts with in the code (`` `node`: settings ``), which
/// the section's title already gives.
fn without_path(doc: &str) -> String {
    let rest = match doc.starts_with('`') {
        true => doc.split_once("`: ").map_or(doc, |(_, r)| r),
        false => doc,
    };
    let mut chars = rest.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A doc comment's paragraphs on one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn docs_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(PATH)
    }

    /// docs/config-reference.md is what the config types generate (LB_BLESS=1 writes it).
    #[test]
    fn config_reference_in_docs_matches_the_config_types() {
        let generated = markdown();
        if std::env::var_os("LB_BLESS").is_some() {
            std::fs::write(docs_file(), &generated).expect("writing the reference");
        }
        let on_disk = std::fs::read_to_string(docs_file()).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{PATH} is not what the config types generate: run \
             `LB_BLESS=1 cargo test -p lb-userspace --lib config::reference` and commit it"
        );
    }

    /// Every key the file may hold has a row with a meaning, the nested maps' keys too.
    #[test]
    fn every_config_key_has_a_documented_row() {
        let md = markdown();
        for key in [
            "node.interfaces",
            "node.announce.table",
            "vips[i].backends[j].weight",
            "vips[i].health_check.type",
            "vips[i].passive_health.failures",
            "vips[i].new_flow_budget.burst",
        ] {
            assert!(md.contains(&format!("| `{key}` |")), "no row for {key}");
        }
        for row in md.lines().filter(|l| l.starts_with("| `")) {
            let meaning = row.rsplit('|').nth(1).unwrap_or("").trim();
            assert!(!meaning.is_empty(), "a row without a meaning: {row}");
        }
    }
}
