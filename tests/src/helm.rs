//! lb's Helm chart (deploy/helm/lb) rendered and linted by Helm's own engine, through the
//! helm-python-sdk package (Helm v4's Go SDK) that `cargo xtask setup` installs into the tools
//! virtualenv; and the rendered manifests checked with kubernetes-validate --strict.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The chart's directory.
pub fn chart() -> PathBuf {
    root().join("deploy/helm/lb")
}

/// A tool from the tools virtualenv, failing the test with the way out when setup has not run.
pub fn tool(name: &str) -> PathBuf {
    let p = root().join("target/tools/venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask setup` installs it",
        p.display()
    );
    p
}

/// A YAML file of the chart (`Chart.yaml`, `values.yaml`), as JSON.
pub fn chart_file(name: &str) -> Value {
    let path = chart().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The image repository the tests install with, as docs/kubernetes.md's `helm install` does: the
/// chart has no default (no image is published) and refuses to render without one.
pub const IMAGE_REPOSITORY: &str = "registry.example/lb";

/// The image the chart runs with [`IMAGE_REPOSITORY`] and no tag: `Chart.yaml`'s appVersion.
pub fn default_image() -> String {
    let app = chart_file("Chart.yaml")["appVersion"]
        .as_str()
        .expect("Chart.yaml sets appVersion (a string)")
        .to_string();
    format!("{IMAGE_REPOSITORY}:{app}")
}

/// What Helm made of the chart with some values.
#[derive(Debug)]
pub struct Rendered {
    /// `helm lint --strict`'s findings: (severity 1 info, 2 warning, 3 error; path; message).
    pub lint: Vec<(u64, String, String)>,
    /// Each template's output, by its path in the chart (`lb/templates/daemonset.yaml`).
    pub manifests: BTreeMap<String, String>,
    /// The CRDs of the chart's crds/ directory (installed before the templates).
    pub crds: Vec<String>,
    /// `templates/NOTES.txt` rendered (what `helm install` prints; not a manifest).
    pub notes: String,
}

impl Rendered {
    /// Every rendered document, as JSON values (empty documents left out).
    pub fn docs(&self) -> Vec<Value> {
        self.manifests
            .values()
            .chain(&self.crds)
            .flat_map(|text| {
                serde_saphyr::from_multiple::<Value>(text)
                    .unwrap_or_else(|e| panic!("a rendered manifest is not YAML: {e}\n{text}"))
            })
            .filter(|d| !d.is_null())
            .collect()
    }

    /// The one rendered document of `kind`.
    pub fn one(&self, kind: &str) -> Value {
        let mut all: Vec<Value> = self
            .docs()
            .into_iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(all.len(), 1, "one {kind} rendered");
        all.remove(0)
    }
}

/// Renders the chart as `helm install lb --namespace lb-system --set
/// image.repository=registry.example/lb` would with `values` (which may set another repository):
/// Ok with the manifests, or Err with Helm's message (a value the schema refuses, a template's
/// `fail`).
pub fn render(values: &Value) -> Result<Rendered, String> {
    let mut values = values.clone();
    if values["image"]["repository"].is_null() {
        json_patch::merge(
            &mut values,
            &json!({ "image": { "repository": IMAGE_REPOSITORY } }),
        );
    }
    render_release("lb", "lb-system", &values)
}

/// Renders the chart as `helm install RELEASE --namespace NAMESPACE` would with `values` and
/// nothing else.
pub fn render_release(release: &str, namespace: &str, values: &Value) -> Result<Rendered, String> {
    let mut child = Command::new(tool("python"))
        .arg(root().join("tests/helm/render.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tests/helm/render.py");
    let req =
        json!({ "chart": chart(), "values": values, "release": release, "namespace": namespace });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tests/helm/render.py failed (is helm-python-sdk installed? `cargo xtask setup`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("render.py writes JSON");
    if let Some(e) = v["error"].as_str() {
        return Err(e.to_string());
    }
    let lint = v["lint"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["severity"].as_u64().unwrap(),
                m["path"].as_str().unwrap().to_string(),
                m["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut manifests: BTreeMap<String, String> =
        serde_json::from_value(v["manifests"].clone()).unwrap();
    let notes = manifests
        .remove(&format!(
            "{}/templates/NOTES.txt",
            chart_file("Chart.yaml")["name"].as_str().unwrap()
        ))
        .unwrap_or_default();
    let crds = serde_json::from_value(v["crds"].clone()).unwrap();
    Ok(Rendered {
        lint,
        manifests,
        crds,
        notes,
    })
}

/// Runs kubernetes-validate --strict over `files`; returns how many resources passed against a
/// built-in schema, failing on any error.
pub fn validate(files: &[PathBuf]) -> usize {
    let out = Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("ERROR") && !text.contains("failed"),
        "{text}"
    );
    text.lines()
        .filter(|l| l.contains(" passed for resource "))
        .count()
}

/// Whether kubernetes-validate has a schema for this document's kind (built-in kinds only:
/// lb's own, the Gateway API's and the Prometheus Operator's are checked by the tests instead).
pub fn is_builtin(doc: &Value) -> bool {
    let v = doc["apiVersion"].as_str().unwrap_or("");
    !(v.starts_with("lb.dev/")
        || v.starts_with("gateway.networking.k8s.io/")
        || v.starts_with("monitoring.coreos.com/"))
}

/// Checks that the chart refuses `values` and that Helm's message names `path` (the value's
/// place, as the schema or a template's `fail` says it).
pub fn assert_refused_naming(values: &serde_json::Value, path: &str) {
    match render(values) {
        Ok(_) => panic!("{values} was accepted"),
        Err(e) => assert!(
            e.contains(path),
            "refusing {values}, Helm's message names {path}: {e}"
        ),
    }
}

/// The chart's values schema, from the repository's root.
pub const VALUES_SCHEMA: &str = "deploy/helm/lb/values.schema.json";

/// The node keys the chart's schema leaves out, and why.
pub const NODE_KEYS_SET_BY_THE_CHART: &[(&str, &str)] =
    &[("metrics_listen", "the templates set it from metrics.port")];

/// The `node` section of the chart's values schema, generated: the config types' schema of `node`
/// ([`lb_userspace::sources::config::reference::node_schema`]) with what only the chart knows:
/// - the keys of [`NODE_KEYS_SET_BY_THE_CHART`] left out;
/// - the keys `values.yaml` sets are required: the templates compute the container's memory
///   from the sizes, and a value set to `null` would drop them.
pub fn node_schema() -> Value {
    let mut node = lb_userspace::sources::config::reference::node_schema();
    let props = node["properties"]
        .as_object_mut()
        .expect("node has properties");
    for (key, _) in NODE_KEYS_SET_BY_THE_CHART {
        props.remove(*key);
    }
    let defaults = chart_file("values.yaml");
    let set: Vec<&String> = defaults["node"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    node["required"] = json!(set);
    node
}

/// `text` (the values schema) with its `node` section replaced by `node`, the rest as it was.
pub fn with_node_schema(text: &str, node: &Value) -> String {
    const KEY: &str = "\n    \"node\": ";
    let start = text
        .find(KEY)
        .expect("the values schema has a node section")
        + KEY.len();
    let end = start + json_value_len(&text[start..]);
    let pretty = serde_json::to_string_pretty(node).expect("a JSON value");
    format!(
        "{}{}{}",
        &text[..start],
        pretty.replace('\n', "\n    "),
        &text[end..]
    )
}

/// The length of the JSON object or array `text` starts with.
fn json_value_len(text: &str) -> usize {
    let (mut depth, mut in_string, mut escaped) = (0i32, false, false);
    for (i, c) in text.char_indices() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, '{' | '[') => depth += 1,
            (false, _, '}' | ']') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("the values schema's node section does not end");
}
