//! lb's Helm chart: rendered and linted by Helm's own engine for the default values and other
//! value sets, every manifest valid against the Kubernetes schemas, bad values refused with
//! their path, and deploy/ holding exactly the default rendering.

use std::path::PathBuf;

use lb_tests::helm::{self, Rendered};
use serde_json::{Value, json};

/// Value sets a user would plausibly install with, beyond the defaults.
fn value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        (
            "metrics Service and ServiceMonitor on another port",
            json!({ "metrics": { "port": 9500, "service": { "enabled": true },
                    "serviceMonitor": { "enabled": true, "interval": "15s", "labels": { "release": "prom" } } } }),
        ),
        (
            "the release's namespace, text logs, own image, no GatewayClass, no cleanup, a node pool",
            json!({ "namespace": { "create": false }, "logFormat": "text", "logLevel": "debug",
                    "image": { "repository": "registry.example/lb", "tag": "dev" },
                    "gatewayClass": { "create": false }, "cleanupOnUninstall": false,
                    "nodeSelector": { "node-role.kubernetes.io/lb": "true" } }),
        ),
        (
            "small sizes, two uplinks, generic XDP, memory set by hand, a kernel memory limit",
            json!({ "node": { "interfaces": ["ens5", "bond0"], "xdp_mode": "generic", "table_size": 16381,
                    "max_vips": 16, "max_backends": 256, "flow_table_size": 65536,
                    "affinity_table_size": 1024, "nat_table_size": 16384, "source_v4": "10.0.0.1",
                    "kernel_memory_limit": "1GiB" },
                    "resources": { "memoryMiB": 512 } }),
        ),
    ]
}

fn render_ok(name: &str, values: &Value) -> Rendered {
    helm::render(values).unwrap_or_else(|e| panic!("{name}: Helm refused the chart: {e}"))
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-helm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_chart_lints_and_renders_manifests_that_pass_the_kubernetes_schemas_for_each_value_set() {
    for (i, (name, values)) in value_sets().into_iter().enumerate() {
        let r = render_ok(name, &values);
        let problems: Vec<_> = r.lint.iter().filter(|(sev, _, _)| *sev >= 2).collect();
        assert!(
            problems.is_empty(),
            "{name}: helm lint --strict: {problems:?}"
        );
        let dir = tmp_dir(&i.to_string());
        let mut files = Vec::new();
        for (n, text) in r
            .manifests
            .iter()
            .map(|(n, t)| (n.replace('/', "_"), t))
            .chain(
                r.crds
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("crd-{i}.yaml"), t)),
            )
        {
            let p = dir.join(n);
            std::fs::write(&p, text).unwrap();
            files.push(p);
        }
        let builtin = r.docs().iter().filter(|d| helm::is_builtin(d)).count();
        assert_eq!(
            helm::validate(&files),
            builtin,
            "{name}: every built-in resource is checked against its schema"
        );
        let _ = std::fs::remove_dir_all(&dir);
        check_meaning(name, &values, &r);
    }
}

/// What each value set must mean in the rendered objects.
fn check_meaning(name: &str, values: &Value, r: &Rendered) {
    let ns_create = values["namespace"]["create"].as_bool().unwrap_or(true);
    let port = values["metrics"]["port"].as_u64().unwrap_or(9477);
    let ds = r.one("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // Every namespaced object in one namespace; the chart's own carries the PSA label.
    let namespaces: Vec<Value> = r
        .docs()
        .iter()
        .filter_map(|d| d["metadata"].get("namespace").cloned())
        .collect();
    assert!(
        namespaces.iter().all(|n| n == "lb-system"),
        "{name}: {namespaces:?}"
    );
    let created: Vec<Value> = r
        .docs()
        .into_iter()
        .filter(|d| d["kind"] == "Namespace")
        .collect();
    match ns_create {
        true => assert_eq!(
            created[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "{name}"
        ),
        false => assert!(created.is_empty(), "{name}: {created:?}"),
    }
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux", "{name}");
    for (k, v) in values["nodeSelector"].as_object().into_iter().flatten() {
        assert_eq!(&pod["nodeSelector"][k], v, "{name}");
    }
    // The metrics port: one value for the agent's listener, its probes and the Service.
    let cm = r.one("ConfigMap");
    let node_yaml = cm["data"]["node.yaml"].as_str().unwrap();
    let config =
        lb_userspace::sources::config::Config::parse(node_yaml, "the ConfigMap's node.yaml")
            .unwrap_or_else(|e| panic!("{name}: the ConfigMap is not a valid node config: {e:#}"));
    assert_eq!(
        config.node.metrics_listen.map(|a| a.port() as u64),
        Some(port),
        "{name}"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], port, "{name}");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], port, "{name}");
    assert_eq!(c["ports"][0]["containerPort"], port, "{name}");
    if let Some(limit) = values["node"]["kernel_memory_limit"].as_str() {
        assert_eq!(
            Some(config.node.kernel_memory_limit),
            lb_userspace::kernel::mapmem::parse_bytes(limit),
            "{name}"
        );
    }
    if let Some(sizes) = values["node"].as_object() {
        assert_eq!(
            config.node.sizes.table_size as u64,
            sizes["table_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(config.node.interfaces.len(), 2, "{name}");
    }
    // Logs and image.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let format = values["logFormat"].as_str().unwrap_or("json");
    assert!(
        args.contains(&format!("--log-format={format}").as_str()),
        "{name}: {args:?}"
    );
    // Uninstall: the agents clean up when their DaemonSet goes, allowed to read it.
    let cleanup = values["cleanupOnUninstall"].as_bool().unwrap_or(true);
    assert_eq!(
        args.contains(&"--down-when-deleted=lb"),
        cleanup,
        "{name}: {args:?}"
    );
    assert_eq!(ds["metadata"]["name"], "lb", "{name}");
    let roles: Vec<Value> = r
        .docs()
        .into_iter()
        .filter(|d| d["kind"] == "Role" && d["metadata"]["name"] == "lb-uninstall")
        .collect();
    assert_eq!(roles.len(), cleanup as usize, "{name}");
    if cleanup {
        assert_eq!(
            roles[0]["rules"],
            json!([{ "apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["lb"], "verbs": ["get"] }]),
            "{name}"
        );
    }
    let image = match values["image"]["tag"].as_str() {
        Some(t) => format!("{}:{t}", values["image"]["repository"].as_str().unwrap()),
        None => helm::default_image(),
    };
    assert_eq!(c["image"], image.as_str(), "{name}");
    // Memory: request and limit equal (a node never over-commits map memory).
    let mem = &c["resources"];
    assert_eq!(mem["requests"]["memory"], mem["limits"]["memory"], "{name}");
    if let Some(mib) = values["resources"]["memoryMiB"].as_u64() {
        assert_eq!(
            mem["limits"]["memory"],
            format!("{mib}Mi").as_str(),
            "{name}"
        );
    }
    // Optional objects.
    let gc: Vec<Value> = r
        .docs()
        .into_iter()
        .filter(|d| d["kind"] == "GatewayClass")
        .collect();
    assert_eq!(
        gc.len(),
        values["gatewayClass"]["create"].as_bool().unwrap_or(true) as usize,
        "{name}"
    );
    let monitor = values["metrics"]["serviceMonitor"]["enabled"]
        .as_bool()
        .unwrap_or(false);
    let services: Vec<Value> = r
        .docs()
        .into_iter()
        .filter(|d| d["kind"] == "Service")
        .collect();
    let monitors: Vec<Value> = r
        .docs()
        .into_iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), monitor as usize, "{name}");
    if monitor {
        let svc = &services[0];
        // The Service selects the agents' pods and the ServiceMonitor selects the Service, by
        // the port's name.
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                &ds["spec"]["template"]["metadata"]["labels"][k], v,
                "{name}"
            );
        }
        for (k, v) in monitors[0]["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(&svc["metadata"]["labels"][k], v, "{name}");
        }
        assert_eq!(svc["spec"]["ports"][0]["port"], port, "{name}");
        assert_eq!(
            monitors[0]["spec"]["endpoints"][0]["port"], svc["spec"]["ports"][0]["name"],
            "{name}"
        );
        assert_eq!(
            monitors[0]["metadata"]["labels"]["release"], "prom",
            "{name}"
        );
    }
}

#[test]
fn a_bad_value_is_refused_with_a_message_naming_its_path() {
    let cases = [
        (json!({ "node": { "max_vips": 0 } }), "/node/max_vips"),
        (json!({ "metrics": { "port": 70000 } }), "/metrics/port"),
        (json!({ "metrics": { "port": "9477" } }), "/metrics/port"),
        (json!({ "logFormat": "xml" }), "/logFormat"),
        (
            json!({ "node": { "interfaces": ["a/b"] } }),
            "/node/interfaces/0",
        ),
        (
            json!({ "node": { "xdp_mode": "offload" } }),
            "/node/xdp_mode",
        ),
        (
            json!({ "node": { "kernel_memory_limit": "4GB" } }),
            "/node/kernel_memory_limit",
        ),
        (json!({ "nodes": { "max_vips": 8 } }), "nodes"),
        // The pod values keep their Kubernetes shapes.
        (
            json!({ "imagePullSecrets": ["regcred"] }),
            "/imagePullSecrets/0",
        ),
        (json!({ "podLabels": { "team": 1 } }), "/podLabels/team"),
        (json!({ "podAnnotations": "a=b" }), "/podAnnotations"),
        (json!({ "affinity": [] }), "/affinity"),
        (json!({ "priorityClassName": 1 }), "/priorityClassName"),
        (
            json!({ "updateStrategy": { "type": "Recreate" } }),
            "/updateStrategy/type",
        ),
        (json!({ "extraArgs": "--lease-duration=30s" }), "/extraArgs"),
        (json!({ "extraEnv": [{ "value": "1" }] }), "/extraEnv/0"),
        (
            json!({ "fullnameOverride": "Not_A_Name" }),
            "/fullnameOverride",
        ),
        (json!({ "image": { "repository": 5 } }), "/image/repository"),
        // What JSON schema cannot say, the templates do.
        (
            json!({ "node": { "table_size": 65536 } }),
            "node.table_size",
        ),
        (
            json!({ "resources": { "memoryMiB": 100 } }),
            "resources.memoryMiB",
        ),
    ];
    for (values, path) in cases {
        helm::assert_refused_naming(&values, path);
    }
}

/// The chart's `node` values become the agent's `node:` config: the `node` section of its
/// schema is generated from the config types (see [`helm::node_schema`]), so that it takes every
/// key the agent takes, with the same ranges and patterns, and no other.
/// `LB_BLESS=1 cargo test -p lb-tests --test helm node_schema` writes it again.
#[test]
fn the_charts_node_schema_is_what_the_config_types_generate() {
    let path = helm::root().join(helm::VALUES_SCHEMA);
    let generated = helm::node_schema();
    let mut text = std::fs::read_to_string(&path).unwrap();
    if std::env::var_os("LB_BLESS").is_some() {
        text = helm::with_node_schema(&text, &generated);
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk: Value = serde_json::from_str(&text).unwrap();
    assert!(
        on_disk["properties"]["node"] == generated,
        "{}: node is not what the config types generate: run \
         `LB_BLESS=1 cargo test -p lb-tests --test helm node_schema` and commit it\n\
         generated:\n{}",
        helm::VALUES_SCHEMA,
        serde_json::to_string_pretty(&generated).unwrap()
    );
}

/// A release bumps the chart with the workspace: the chart's version and its appVersion (the
/// image tag by default) are the agent's.
#[test]
fn the_charts_version_and_app_version_are_the_workspaces_version() {
    let chart = helm::chart_file("Chart.yaml");
    let want = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"], want, "Chart.yaml version");
    assert_eq!(chart["appVersion"], want, "Chart.yaml appVersion");
}

/// deploy/'s plain manifests are the chart rendered with its defaults and the tests' image
/// repository (one source: they cannot drift). `LB_WRITE_DEPLOY=1 cargo test -p lb-tests --test helm deploy` writes them.
#[test]
fn deploy_holds_the_charts_default_rendering() {
    let r = render_ok("defaults", &json!({}));
    let write = std::env::var_os("LB_WRITE_DEPLOY").is_some();
    for (path, text) in &r.manifests {
        if text.trim().is_empty() {
            continue;
        }
        let file = helm::root()
            .join("deploy")
            .join(path.rsplit('/').next().unwrap());
        let want = format!(
            "# Generated from deploy/helm/lb ({path}) with its default values and\n\
             # image.repository={}: edit the chart, then\n\
             # `LB_WRITE_DEPLOY=1 cargo test -p lb-tests --test helm deploy`.\n{}\n",
            helm::IMAGE_REPOSITORY,
            text.trim()
        );
        if write {
            std::fs::write(&file, &want).unwrap();
        }
        let have =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            have == want,
            "{} differs from the chart's rendering: run `LB_WRITE_DEPLOY=1 cargo test -p lb-tests --test helm deploy`",
            file.display()
        );
    }
}

/// The agent's memory as the chart renders it: the limit (MiB) and the node config.
fn memory_and_node_config(values: &Value) -> (u64, String) {
    let r = render_ok("memory", values);
    let c = &r.one("DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let limit = c["resources"]["limits"]["memory"].as_str().unwrap();
    let mib = limit
        .strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the limit {limit} is in Mi"));
    let node = r.one("ConfigMap")["data"]["node.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    (mib, node)
}

/// `lb check` under a memory cgroup of `mib` MiB: it creates every map of the config's sizes and
/// loads the program, all charged to the cgroup, as the agent's start is.
fn check_under(mib: u64, node: &str, tag: &str) -> std::process::Output {
    let path = std::env::temp_dir().join(format!("lb-helm-node-{}-{tag}.yaml", std::process::id()));
    std::fs::write(&path, node).unwrap();
    let cg = lb_tests::memcg::MemCgroup::new(tag, mib << 20);
    let out = cg.run(
        std::process::Command::new(env!("CARGO_BIN_EXE_lb-under-test"))
            .arg("check")
            .arg("--config")
            .arg(&path),
    );
    let _ = std::fs::remove_file(&path);
    out
}

#[test]
fn the_default_sizes_load_under_the_charts_memory_limit_and_not_under_a_third_of_it() {
    lb_tests::require_root();
    // The default values; only the interface is this host's (check looks it up), not the sizes.
    let (mib, node) = memory_and_node_config(&json!({ "node": { "interfaces": ["lo"] } }));
    let (default_mib, _) = memory_and_node_config(&json!({}));
    assert_eq!(mib, default_mib, "the interface does not change the memory");
    let text = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    };
    let fits = check_under(mib, &node, "fits");
    assert!(
        fits.status.success(),
        "the program and the default sizes' maps load under the chart's {mib} MiB:\n{}",
        text(&fits)
    );
    // Well below, map creation fails: the limit is what decides, so this test can fail.
    let short = check_under(mib / 3, &node, "short");
    assert!(
        !short.status.success(),
        "under {} MiB the default sizes cannot load:\n{}",
        mib / 3,
        text(&short)
    );
}

/// Every object a rendering claims: (kind, namespace, name); the namespace is empty for a
/// cluster-scoped one. Not the CRD: crds/ is shared by design (Helm installs it when absent and
/// never upgrades or deletes it).
fn claims(r: &Rendered) -> Vec<(String, String, String)> {
    r.docs()
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
        .map(|d| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            (
                s(&d["kind"]),
                s(&d["metadata"]["namespace"]),
                s(&d["metadata"]["name"]),
            )
        })
        .collect()
}

/// Whether `selector` (a label map) selects an object labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

fn arg_value<'a>(args: &'a Value, flag: &str) -> Option<&'a str> {
    args.as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix(flag)?.strip_prefix('='))
}

/// Two (here three) releases in the namespace lb-system: the first as docs/kubernetes.md installs
/// it (it creates the namespace and the GatewayClass), a second of the same load balancer for
/// another node pool (the namespace and GatewayClass are the first's), and a second load
/// balancer with its own class and GatewayClass. With everything optional switched on, no
/// object is claimed twice, each release's selectors pick only its own pods, and what refers
/// to an object by name (the pod's ServiceAccount and ConfigMap, the bindings, the uninstall
/// Role, the alerts' job) names the release's own.
#[test]
fn releases_in_one_namespace_claim_no_name_twice_and_select_only_their_own_pods() {
    let all_on = json!({ "metrics": { "serviceMonitor": { "enabled": true } },
        "monitoring": { "prometheusRule": { "enabled": true }, "dashboard": { "enabled": true } },
        "image": { "repository": helm::IMAGE_REPOSITORY } });
    let with = |extra: Value| {
        let mut v = all_on.clone();
        json_patch::merge(&mut v, &extra);
        v
    };
    let releases = [
        ("lb", with(json!({}))),
        (
            "pool-b",
            with(
                json!({ "namespace": { "create": false }, "gatewayClass": { "create": false },
                         "nodeSelector": { "pool": "b" } }),
            ),
        ),
        (
            "internal",
            with(
                json!({ "namespace": { "create": false }, "class": "internal",
                         "gatewayClass": { "name": "lb-internal", "controllerName": "lb.dev/internal" } }),
            ),
        ),
    ];
    let rendered: Vec<(&str, Rendered)> = releases
        .iter()
        .map(|(release, values)| {
            let r = helm::render_release(release, "lb-system", values)
                .unwrap_or_else(|e| panic!("{release}: Helm refused the chart: {e}"));
            let problems: Vec<_> = r.lint.iter().filter(|(sev, _, _)| *sev >= 2).collect();
            assert!(
                problems.is_empty(),
                "{release}: helm lint --strict: {problems:?}"
            );
            (*release, r)
        })
        .collect();

    let mut seen = std::collections::BTreeMap::new();
    for (release, r) in &rendered {
        for claim in claims(r) {
            if let Some(first) = seen.insert(claim.clone(), *release) {
                panic!("{claim:?} is claimed by both {first} and {release}");
            }
        }
    }
    // Each kind the chart renders is there for every release (the check above saw them all).
    for kind in [
        "DaemonSet",
        "ConfigMap",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        for (release, r) in &rendered {
            assert!(
                claims(r).iter().any(|c| c.0 == kind),
                "{release} renders a {kind}"
            );
        }
    }

    for (release, r) in &rendered {
        let ds = r.one("DaemonSet");
        let ds_name = ds["metadata"]["name"].as_str().unwrap();
        let pod = &ds["spec"]["template"];
        let spec = &pod["spec"];
        let named = |kind: &str, name: &str| {
            claims(r)
                .iter()
                .any(|c| c.0 == kind && c.1 == "lb-system" && c.2 == name)
        };
        for (other, o) in &rendered {
            let theirs = &o.one("DaemonSet")["spec"]["template"]["metadata"]["labels"];
            let svc = &o
                .docs()
                .into_iter()
                .find(|d| d["kind"] == "Service")
                .unwrap();
            assert_eq!(
                selects(&ds["spec"]["selector"]["matchLabels"], theirs),
                release == other,
                "{release}'s DaemonSet selects {other}'s pods only if they are its own"
            );
            assert_eq!(
                selects(&svc["spec"]["selector"], &pod["metadata"]["labels"]),
                release == other,
                "{other}'s metrics Service selects {release}'s pods only if they are its own"
            );
        }
        let sa = spec["serviceAccountName"].as_str().unwrap();
        assert!(named("ServiceAccount", sa), "{release}: {sa}");
        let cm = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap();
        assert!(named("ConfigMap", cm), "{release}: {cm}");
        for binding in r
            .docs()
            .into_iter()
            .filter(|d| d["kind"].as_str().unwrap().ends_with("Binding"))
        {
            assert_eq!(binding["subjects"][0]["name"], sa, "{release}: {binding}");
            let role = binding["roleRef"]["name"].as_str().unwrap();
            let kind = binding["roleRef"]["kind"].as_str().unwrap();
            assert!(
                claims(r).iter().any(|c| c.0 == kind && c.2 == role),
                "{release}: {binding} refers to its own {kind}"
            );
        }
        let args = &spec["containers"][0]["args"];
        assert_eq!(
            arg_value(args, "--down-when-deleted"),
            Some(ds_name),
            "{release}"
        );
        let uninstall = r
            .docs()
            .into_iter()
            .find(|d| d["kind"] == "Role" && d["rules"][0]["resources"] == json!(["daemonsets"]))
            .unwrap();
        assert_eq!(
            uninstall["rules"][0]["resourceNames"],
            json!([ds_name]),
            "{release}"
        );
        // The alerts watch the job the ServiceMonitor makes: the release's metrics Service.
        let svc_name = r
            .docs()
            .into_iter()
            .find(|d| d["kind"] == "Service")
            .unwrap()["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let rule = r.one("PrometheusRule");
        let up = &rule["spec"]["groups"][0]["rules"][0]["expr"];
        assert_eq!(
            up,
            &json!(format!("up{{job=\"{svc_name}\"}} == 0")),
            "{release}"
        );
    }

    // One status writer per load balancer (class): the node pools of one share the Lease, the
    // other load balancer has its own.
    let lease = |i: usize| {
        arg_value(
            &rendered[i].1.one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"],
            "--lease-name",
        )
        .unwrap()
        .to_string()
    };
    assert_eq!(
        lease(0),
        "lb-status-writer",
        "the class default keeps 0.3.0's Lease"
    );
    assert_eq!(lease(1), lease(0));
    assert_ne!(lease(2), lease(0));
}

/// The usual names: the release's, <release>-lb, the overrides, and 63 characters at most even
/// with a suffix.
#[test]
fn names_come_from_the_release_and_the_overrides() {
    let repo = json!({ "image": { "repository": helm::IMAGE_REPOSITORY } });
    let names = |release: &str, extra: Value| {
        let mut values = repo.clone();
        json_patch::merge(&mut values, &extra);
        let r = helm::render_release(release, "lb-system", &values)
            .unwrap_or_else(|e| panic!("{release} {extra}: {e}"));
        let ds = r.one("DaemonSet")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let cm = r.one("ConfigMap")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let label = r.one("DaemonSet")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
            .as_str()
            .unwrap()
            .to_string();
        (ds, cm, label)
    };
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(names("lb", json!({})), s("lb", "lb-node", "lb"));
    assert_eq!(names("edge", json!({})), s("edge-lb", "edge-lb-node", "lb"));
    assert_eq!(
        names("lb-edge", json!({})),
        s("lb-edge", "lb-edge-node", "lb")
    );
    assert_eq!(
        names("edge", json!({ "fullnameOverride": "xdp" })),
        s("xdp", "xdp-node", "lb")
    );
    assert_eq!(
        names("edge", json!({ "nameOverride": "l4" })),
        s("edge-l4", "edge-l4-node", "l4")
    );
    // A name of 63 characters fits as it is; a suffixed one is cut before its suffix.
    let long = "f".repeat(63);
    let (ds, cm, _) = names("edge", json!({ "fullnameOverride": long }));
    assert_eq!(ds, long);
    assert_eq!(cm, format!("{}-node", "f".repeat(58)));
}

/// No lb image is published: without image.repository the chart refuses to render and says
/// which value to set, rather than default to an image no node can pull.
#[test]
fn without_an_image_repository_the_chart_refuses_naming_the_value() {
    for values in [json!({}), json!({ "image": { "repository": "" } })] {
        let e = helm::render_release("lb", "lb-system", &values)
            .err()
            .unwrap_or_else(|| panic!("{values} rendered without an image"));
        assert!(
            e.contains("image.repository") && e.contains("Dockerfile"),
            "{e}"
        );
    }
    assert_eq!(
        helm::chart_file("values.yaml")["image"]["repository"],
        "",
        "values.yaml has no default image"
    );
}

/// The pod values users of other charts expect each reach the DaemonSet, as given; the chart's
/// own labels and annotations stay (a podLabel cannot take the selector's).
#[test]
fn the_pod_values_reach_the_daemonset() {
    let affinity = json!({ "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "pool", "operator": "In", "values": ["edge"] }] }] } } });
    let values = json!({
        "image": { "tag": "0.3.1" },
        "imagePullSecrets": [{ "name": "regcred" }],
        "podAnnotations": { "example.com/owner": "net" },
        "podLabels": { "team": "net", "app.kubernetes.io/instance": "not-this" },
        "affinity": affinity,
        "priorityClassName": "lb-critical",
        "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": "10%" } },
        "extraArgs": ["--lease-duration=30s"],
        "extraEnv": [{ "name": "RUST_BACKTRACE", "value": "1" }],
        "nodeSelector": { "pool": "edge" },
        "tolerations": [{ "key": "edge", "operator": "Exists", "effect": "NoSchedule" }],
    });
    let r = render_ok("pod values", &values);
    let ds = r.one("DaemonSet");
    let meta = &ds["spec"]["template"]["metadata"];
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], format!("{}:0.3.1", helm::IMAGE_REPOSITORY));
    assert_eq!(pod["imagePullSecrets"], values["imagePullSecrets"]);
    assert_eq!(meta["annotations"]["example.com/owner"], "net");
    assert!(
        meta["annotations"]["lb.dev/node-config"].is_string(),
        "{meta}"
    );
    assert_eq!(meta["labels"]["team"], "net");
    assert_eq!(meta["labels"]["app.kubernetes.io/instance"], "lb");
    assert!(selects(
        &ds["spec"]["selector"]["matchLabels"],
        &meta["labels"]
    ));
    assert_eq!(pod["affinity"], affinity);
    assert_eq!(pod["priorityClassName"], "lb-critical");
    assert_eq!(ds["spec"]["updateStrategy"], values["updateStrategy"]);
    assert_eq!(pod["nodeSelector"]["pool"], "edge");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"], values["tolerations"]);
    let args = c["args"].as_array().unwrap();
    assert_eq!(
        args.last().unwrap(),
        "--lease-duration=30s",
        "after the chart's own: {args:?}"
    );
    let env = c["env"].as_array().unwrap();
    assert_eq!(env.last().unwrap(), &values["extraEnv"][0], "{env:?}");
    assert!(env.iter().any(|e| e["name"] == "NODE_NAME"), "{env:?}");

    // The defaults: the node-critical priority and one node at a time; nothing else added.
    let d = render_ok("defaults", &json!({})).one("DaemonSet");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        d["spec"]["updateStrategy"],
        json!({ "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1 } })
    );
    assert!(
        pod.get("affinity").is_none() && pod.get("imagePullSecrets").is_none(),
        "{pod}"
    );
    // An empty priorityClassName leaves the field out.
    let none = render_ok("no priority", &json!({ "priorityClassName": "" })).one("DaemonSet");
    assert!(
        none["spec"]["template"]["spec"]
            .get("priorityClassName")
            .is_none()
    );
}

/// What `helm install` prints: how to check the release's own agents.
#[test]
fn the_notes_say_how_to_check_the_agents() {
    let r = helm::render_release(
        "edge",
        "lb-system",
        &json!({ "image": { "repository": helm::IMAGE_REPOSITORY }, "metrics": { "port": 9500 } }),
    )
    .expect("renders");
    for want in [
        "kubectl -n lb-system rollout status daemonset/edge-lb",
        "-l app.kubernetes.io/name=lb,app.kubernetes.io/instance=edge",
        "-- lb --state-dir=/var/run/lb status",
        "localhost:9500/metrics",
    ] {
        assert!(
            r.notes.contains(want),
            "NOTES.txt says {want:?}:\n{}",
            r.notes
        );
    }
}

/// `kubectl get upstreampolicies` shows what a policy asks for and whether it is served: each
/// column's path names a field of the CRD's schema (a renamed field would leave it empty), and
/// Age is there (columns of our own replace kubectl's default ones).
#[test]
fn upstream_policies_have_printer_columns_on_fields_of_the_crd() {
    let r = render_ok("defaults", &json!({}));
    let crd = r.one("CustomResourceDefinition");
    let version = &crd["spec"]["versions"][0];
    let columns = version["additionalPrinterColumns"].as_array().unwrap();
    let names: Vec<&str> = columns
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Algorithm",
            "Hash On",
            "Slots",
            "Health Check",
            "Accepted",
            "Programmed",
            "Age"
        ]
    );
    let schema = &version["schema"]["openAPIV3Schema"];
    for c in columns {
        let path = c["jsonPath"].as_str().unwrap();
        if path == ".metadata.creationTimestamp" {
            assert_eq!(c["type"], "date");
            continue;
        }
        // Each step is a property of the one before; a filter ([?(...)]) steps into the items.
        let mut at = schema;
        let (head, filtered) = path.split_once("[?").unwrap_or((path, ""));
        let tail = filtered.split_once(")]").map_or("", |(_, t)| t);
        for (i, part) in [head, tail].iter().enumerate() {
            if i == 1 && !filtered.is_empty() {
                at = &at["items"];
            }
            for step in part.split('.').filter(|s| !s.is_empty()) {
                at = &at["properties"][step];
                assert!(!at.is_null(), "{path}: no {step} in the CRD's schema");
            }
        }
        assert_eq!(c["type"], at["type"], "{path}");
    }
}

/// The node config of `memory_and_node_config` with `vips` VIPs in NAT mode (as under
/// Kubernetes) sharing `backends` backends evenly, each backend's weight `weight(index)`.
fn full_config(node: &str, vips: u64, backends: u64, weight: impl Fn(u64) -> u64) -> String {
    let per_vip = backends / vips;
    let mut text = format!("{node}\nvips:\n");
    for v in 0..vips {
        let members: Vec<String> = (0..per_vip)
            .map(|b| {
                let i = v * per_vip + b;
                format!(
                    "{{ address: 10.64.{}.{}, port: 8080, weight: {} }}",
                    i / 256,
                    i % 256,
                    weight(i)
                )
            })
            .collect();
        text += &format!(
            "  - {{ name: v{v}, address: 198.18.{}.{}, port: 80, protocol: tcp, mode: nat, backends: [{}] }}\n",
            v / 256,
            v % 256,
            members.join(", ")
        );
    }
    text
}

/// The agent at its fullest for the chart's default sizes: the real `lb run` holding as many
/// VIPs as the maps take (max_vips) and every backend they take (max_backends), synced, then
/// every VIP's weights changed at once (a resync that rebuilds every Maglev table while the
/// old ones are still held). Its memory cgroup has no limit of its own, so the peak the kernel
/// records is what the agent needs (the maps, the program's verification, its heap, its
/// binary's pages): that peak must fit the chart's limit.
#[test]
fn the_agent_synced_at_the_default_sizes_peaks_within_the_charts_memory_limit() {
    lb_tests::require_root();
    let (mib, node) = memory_and_node_config(
        &json!({ "node": { "interfaces": ["lb0"], "xdp_mode": "generic", "source_v4": "10.0.0.1" } }),
    );
    let (default_mib, _) = memory_and_node_config(&json!({}));
    assert_eq!(
        mib, default_mib,
        "the interface and source do not change the memory"
    );
    let sizes = &helm::chart_file("values.yaml")["node"];
    let vips = sizes["max_vips"].as_u64().unwrap();
    let backends = sizes["max_backends"].as_u64().unwrap();

    let net = lb_tests::harness::FibNet::new("helm-mem");
    let dirs = lb_tests::agent::Dirs::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_lb-under-test")),
        "helm-mem",
    );
    dirs.write_config(&full_config(&node, vips, backends, |_| 1));
    let cg = lb_tests::memcg::MemCgroup::new("agent", 64 << 30);
    // The shell joins the group, then becomes the agent: everything the agent allocates, from
    // its first page on, is charged there.
    let join = format!("echo $$ > {} && exec \"$@\"", cg.procs().display());
    let mut agent =
        lb_tests::agent::Agent::start_under(&net.ns, &dirs, &["sh", "-c", &join, "sh"], &[], &[]);
    let full = |s: &Value| s["maps"]["vips"] == vips && s["maps"]["backends"] == backends;
    let synced = agent.wait_status(&net.ns, &dirs, std::time::Duration::from_secs(600), full);
    let applied = synced["agent"]["reloads_applied"].as_u64().unwrap();
    dirs.write_config(&full_config(&node, vips, backends, |i| 1 + i % 7));
    agent.wait_status(&net.ns, &dirs, std::time::Duration::from_secs(600), |s| {
        s["agent"]["reloads_applied"].as_u64() > Some(applied) && full(s)
    });
    let peak = cg.peak().expect("the memory cgroup's peak");
    assert!(agent.stop().success(), "{}", agent.log_dump());
    let peak_mib = peak.div_ceil(1 << 20);
    eprintln!(
        "the agent with {vips} VIPs and {backends} backends at the default sizes peaked at {peak_mib} MiB; the chart allows {mib} MiB"
    );
    assert!(
        peak_mib <= mib,
        "the agent at the default sizes, synced and resynced, peaked at {peak_mib} MiB: more than the chart's {mib} MiB"
    );
}
