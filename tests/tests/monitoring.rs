//! The chart's alerts (a PrometheusRule) and Grafana dashboard (a ConfigMap for Grafana's
//! sidecar): rendered by Helm's engine only when asked for, every rule and every dashboard
//! query accepted by `promtool check rules`, and every metric, label and label value they name
//! one that a real agent's `/metrics` serves.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::{
    agent::{Agent, Dirs, metrics_text},
    config::{RawConfig, RawHealthCheck, RawNode, RawVip, backend, lab_node, some, vip, yaml},
    harness::{FibNet, net::*},
    helm::{self, Rendered},
    promql,
    scrape::samples,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lb-under-test");
const T: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:19437";

/// The VIP label `$vip` stands for in the dashboard's queries: one the agent's config serves.
const VIP: &str = "192.0.2.10:80/tcp";

/// Labels Prometheus gives every series of a target (job, instance, and the Prometheus
/// Operator's from the pod and Service): an expression may match and group on them, and lb
/// does not export them.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "service",
    "endpoint",
];

/// Series Prometheus makes itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// Both monitoring objects, in other namespaces than the agents', with the labels a
/// kube-prometheus-stack installation selects on.
fn both_values() -> Value {
    json!({ "metrics": { "serviceMonitor": { "enabled": true } },
            "monitoring": {
                "prometheusRule": { "enabled": true, "namespace": "monitoring", "labels": { "release": "prom" } },
                "dashboard": { "enabled": true, "namespace": "grafana",
                               "annotations": { "grafana_folder": "Networking" } } } })
}

fn render_ok(name: &str, values: &Value) -> Rendered {
    helm::render(values).unwrap_or_else(|e| panic!("{name}: Helm refused the chart: {e}"))
}

fn of_kind(r: &Rendered, kind: &str) -> Vec<Value> {
    r.docs().into_iter().filter(|d| d["kind"] == kind).collect()
}

fn dashboard_configmaps(r: &Rendered) -> Vec<Value> {
    of_kind(r, "ConfigMap")
        .into_iter()
        .filter(|d| d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect()
}

/// The chart's PrometheusRule, rendered with both objects on.
fn prometheus_rule() -> Value {
    let mut rules = of_kind(&render_ok("both", &both_values()), "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules.remove(0)
}

/// The chart's dashboard, as its file holds it.
fn dashboard() -> Value {
    let path = helm::chart().join("dashboards/lb.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-monitoring-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `promtool check rules` on a rules file of `groups` (written as JSON, which is YAML);
/// panics with promtool's words and the file if it refuses it.
fn promtool_check_rules(groups: &Value, tag: &str) {
    let dir = tmp_dir(tag);
    let file = dir.join("rules.yaml");
    let text = serde_json::to_string_pretty(&json!({ "groups": groups })).unwrap();
    std::fs::write(&file, &text).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("starting promtool ({e}): `cargo xtask setup` installs it"));
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool check rules refused {tag}: {said}\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every panel of the dashboard, those inside rows too.
fn panels(dash: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(&p["panels"], out);
        }
    }
    let mut out = vec![];
    walk(&dash["panels"], &mut out);
    out
}

/// The dashboard's queries as Prometheus would get them: (where, PromQL), each target's `expr`
/// and each template variable's `label_values(SELECTOR, label)` selector, with the template
/// variables replaced by a value (`$vip` by [`VIP`]) and Grafana's intervals by `5m`.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let vars: Vec<String> = dash["templating"]["list"]
        .as_array()
        .expect("the dashboard has template variables")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let fill = |e: &str| {
        let mut e = e
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "5m")
            .replace("$__range", "5m");
        for v in &vars {
            let value = if v == "vip" { VIP } else { "node-1:9477" };
            e = e
                .replace(&format!("${{{v}}}"), value)
                .replace(&format!("${v}"), value);
        }
        assert!(
            !e.contains('$'),
            "a variable the dashboard does not define: {e}"
        );
        e
    };
    let mut out = vec![];
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {}: a target without expr", p["title"]));
            out.push((format!("panel {:?} {}", p["title"], t["refId"]), fill(expr)));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: not label_values(SELECTOR, label): {q}",
                    v["name"]
                )
            });
        // The label must come out of the selector: `count by (label) (SELECTOR)` names both.
        out.push((
            format!("variable ${}", v["name"].as_str().unwrap()),
            fill(&format!("count by ({}) ({})", inner.1.trim(), inner.0)),
        ));
    }
    out
}

/// The rule's expressions: (alert name, PromQL).
fn rule_exprs(rule: &Value) -> Vec<(String, String)> {
    rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                format!("alert {}", r["alert"].as_str().unwrap()),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_chart_renders_neither_by_default_and_both_when_enabled_lint_clean_where_asked() {
    let default = render_ok("defaults", &json!({}));
    assert!(
        of_kind(&default, "PrometheusRule").is_empty(),
        "no PrometheusRule by default"
    );
    assert!(
        dashboard_configmaps(&default).is_empty(),
        "no dashboard by default"
    );

    let r = render_ok("both", &both_values());
    let problems: Vec<_> = r.lint.iter().filter(|(sev, _, _)| *sev >= 2).collect();
    assert!(problems.is_empty(), "helm lint --strict: {problems:?}");
    let rules = of_kind(&r, "PrometheusRule");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rules[0]["metadata"]["namespace"], "monitoring");
    assert_eq!(rules[0]["metadata"]["labels"]["release"], "prom");
    let maps = dashboard_configmaps(&r);
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert_eq!(maps[0]["metadata"]["namespace"], "grafana");
    assert_eq!(
        maps[0]["metadata"]["annotations"]["grafana_folder"],
        "Networking"
    );
    // The ConfigMap carries the chart's dashboard file, unchanged.
    let shipped: Value = serde_json::from_str(maps[0]["data"]["lb.json"].as_str().unwrap())
        .expect("the ConfigMap's lb.json is JSON");
    assert_eq!(
        shipped,
        dashboard(),
        "the ConfigMap holds dashboards/lb.json"
    );
    // The ConfigMap, and everything else built in, against the Kubernetes schemas.
    let dir = tmp_dir("validate");
    let files: Vec<PathBuf> = r
        .manifests
        .iter()
        .map(|(n, t)| (n.replace('/', "_"), t))
        .chain(
            r.crds
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("crd-{i}.yaml"), t)),
        )
        .map(|(n, text)| {
            let p = dir.join(n);
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect();
    let builtin = r.docs().iter().filter(|d| helm::is_builtin(d)).count();
    assert_eq!(helm::validate(&files), builtin);
    let _ = std::fs::remove_dir_all(&dir);

    // Each alone.
    let rule_only = render_ok(
        "rule only",
        &json!({ "monitoring": { "prometheusRule": { "enabled": true } } }),
    );
    assert_eq!(of_kind(&rule_only, "PrometheusRule").len(), 1);
    assert!(dashboard_configmaps(&rule_only).is_empty());
    assert_eq!(
        of_kind(&rule_only, "PrometheusRule")[0]["metadata"]["namespace"],
        "lb-system",
        "the chart's namespace when none is given"
    );
    let dashboard_only = render_ok(
        "dashboard only",
        &json!({ "monitoring": { "dashboard": { "enabled": true } } }),
    );
    assert!(of_kind(&dashboard_only, "PrometheusRule").is_empty());
    assert_eq!(dashboard_configmaps(&dashboard_only).len(), 1);
}

#[test]
fn a_bad_monitoring_value_is_refused_with_its_path() {
    for (values, path) in [
        (
            json!({ "monitoring": { "prometheusRule": { "enable": true } } }),
            "enable",
        ),
        (
            json!({ "monitoring": { "dashboard": { "namespace": "Not A Namespace" } } }),
            "/monitoring/dashboard/namespace",
        ),
        (
            json!({ "monitoring": { "prometheusRule": { "labels": { "release": 1 } } } }),
            "/monitoring/prometheusRule/labels/release",
        ),
    ] {
        helm::assert_refused_naming(&values, path);
    }
}

#[test]
fn promtool_check_rules_accepts_the_rendered_prometheus_rule() {
    let rule = prometheus_rule();
    promtool_check_rules(&rule["spec"]["groups"], "prometheusrule");
}

/// What an SRE needs of each alert: how long before it fires, how bad it is, and words that
/// name the thing by the labels its expression keeps.
#[test]
fn every_alert_has_a_for_a_severity_and_annotations_naming_labels_its_expression_keeps() {
    let rule = prometheus_rule();
    let mut alerts = BTreeSet::new();
    for r in rule["spec"]["groups"][0]["rules"].as_array().unwrap() {
        let alert = r["alert"].as_str().expect("alerting rules only");
        alerts.insert(alert.to_string());
        assert!(r["for"].as_str().is_some(), "{alert}: no for");
        assert!(
            ["critical", "warning"].contains(&r["labels"]["severity"].as_str().unwrap_or("")),
            "{alert}: severity {}",
            r["labels"]["severity"]
        );
        let grouping = promql::names(r["expr"].as_str().unwrap()).grouping;
        for key in ["summary", "description"] {
            let text = r["annotations"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: no {key}"));
            // `{{ $labels.x }}`: after `sum by (a, b)` only a and b are left to name.
            for named in text.split("$labels.").skip(1) {
                let label: String = named
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    grouping.iter().all(|g| g.contains(&label)),
                    "{alert}: {key} names {label}, which {:?} drops",
                    grouping
                );
            }
        }
    }
    for want in [
        "LbAgentDown",
        "LbAgentAbsent",
        "LbConfigReloadRejected",
        "LbInterfaceNotAttached",
        "LbTableNearlyFull",
        "LbDroppingForWantOfBackend",
        "LbNatPortsExhausted",
        "LbBackendUnhealthy",
    ] {
        assert!(alerts.contains(want), "no {want}: {alerts:?}");
    }
}

#[test]
fn promtool_parses_every_query_of_the_dashboard() {
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| json!({ "record": format!("lb_dashboard:query_{i}"), "expr": expr }))
        .collect();
    promtool_check_rules(
        &json!([{ "name": "lb-dashboard", "rules": rules }]),
        "dashboard",
    );
}

/// What the agent exports: metric name -> label -> values seen.
type Exported = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// A real agent's `/metrics`: one VIP ([`VIP`]) of two health-checked backends, attached to
/// lb0, so every family but the announcement's has series (`node.announce` is off).
fn exported() -> Exported {
    lb_tests::require_root();
    let net = FibNet::new("mon-names");
    let dirs = Dirs::new(Path::new(BIN), "mon-names");
    let web = RawVip {
        health_check: Some(RawHealthCheck {
            kind: some("tcp"),
            ..RawHealthCheck::default()
        }),
        ..vip(
            "web",
            "192.0.2.10",
            80,
            "tcp",
            &[backend(TX_V4), backend(TX_V4_B)],
        )
    };
    dirs.write_config(&yaml(&RawConfig {
        node: RawNode {
            metrics_listen: some(METRICS),
            ..lab_node(&["lb0"])
        },
        vips: vec![web],
    }));
    let mut agent = Agent::start(&net.ns, &dirs);
    agent.wait_serving(&net.ns, &dirs, T);
    // The status says it serves; /metrics answers once its listener is up.
    let deadline = std::time::Instant::now() + T;
    let response = loop {
        match metrics_text(&net.ns, METRICS) {
            Some(r) => break r,
            None if std::time::Instant::now() > deadline => {
                panic!("the agent does not serve /metrics on {METRICS}")
            }
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let mut out = Exported::new();
    for s in samples(body) {
        let labels = out.entry(s.name).or_default();
        for (k, v) in s.labels {
            labels.entry(k).or_default().insert(v);
        }
    }
    assert!(
        out.contains_key(VIP_FAMILY),
        "the scrape has the VIPs:\n{body}"
    );
    out
}

const VIP_FAMILY: &str = "lb_vip_packets_total";

/// What in `expr` the agent does not export: metrics, labels of the metric, values of an
/// equality matcher, regexes that match no value, grouping labels no metric of it carries.
fn unexported(expr: &str, exported: &Exported) -> Vec<String> {
    let names = promql::names(expr);
    let mut problems = vec![];
    let mut labels_here: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
    for s in &names.selectors {
        if PROMETHEUS_SERIES.contains(&s.name.as_str()) {
            for (label, _, _) in &s.matchers {
                if !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!("{}: {label} is not a target label", s.name));
                }
            }
            continue;
        }
        let Some(labels) = exported.get(&s.name) else {
            problems.push(format!("{} is not exported", s.name));
            continue;
        };
        labels_here.extend(labels.keys().map(String::as_str));
        for (label, op, value) in &s.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            let Some(values) = labels.get(label) else {
                problems.push(format!("{} has no label {label}", s.name));
                continue;
            };
            let matched = match op.as_str() {
                "=" => values.contains(value),
                // A list of values (`a|b`): each of them.
                "=~" if value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-|".contains(c)) =>
                {
                    value.split('|').all(|v| values.contains(v))
                }
                "=~" => {
                    let re = regex::Regex::new(&format!("^(?:{value})$"))
                        .unwrap_or_else(|e| panic!("{expr}: {value}: {e}"));
                    values.iter().any(|v| re.is_match(v))
                }
                _ => true,
            };
            if !matched {
                problems.push(format!(
                    "{}{{{label}{op}{value:?}}} matches none of {values:?}",
                    s.name
                ));
            }
        }
    }
    for list in &names.grouping {
        for label in list {
            if !labels_here.contains(label.as_str()) {
                problems.push(format!("grouping by {label}, which no metric here has"));
            }
        }
    }
    problems
}

#[test]
fn every_metric_label_and_value_the_alerts_and_the_dashboard_name_is_one_the_agent_exports() {
    let exported = exported();
    let mut all = rule_exprs(&prometheus_rule());
    all.extend(dashboard_queries(&dashboard()));
    let problems: Vec<String> = all
        .iter()
        .flat_map(|(at, expr)| {
            unexported(expr, &exported)
                .into_iter()
                .map(move |p| format!("{at}: {p}\n    {expr}"))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "not exported by /metrics (it has {:?}):\n{}",
        exported.keys().collect::<Vec<_>>(),
        problems.join("\n")
    );
    // The check can fail: a misspelt metric, label value, label or grouping label in a real
    // query is caught.
    for (from, to) in [
        ("lb_table_capacity", "lb_table_capacty"),
        ("drop_no_backend", "drop_no_backends"),
        ("lb_vip_packets_total{", "lb_vip_packets{"),
        ("by (vip, backend)", "by (vip, backends)"),
        ("outcome!=", "outcomes!="),
        ("flows_ipv4|flows_ipv6", "flows_v4|flows_ipv6"),
    ] {
        let (at, expr) = all
            .iter()
            .find(|(_, e)| e.contains(from))
            .unwrap_or_else(|| panic!("no query has {from}"));
        let broken = expr.replacen(from, to, 1);
        assert!(
            !unexported(&broken, &exported).is_empty(),
            "{at} with {to} for {from} passed the check: {broken}"
        );
    }
}
