//! The manifests in deploy/ (the Helm chart's default rendering, tests/tests/helm.rs, and the
//! examples): valid against the Kubernetes schemas (kubernetes-validate, offline), and meaning
//! what docs/kubernetes.md says when the agent reads them.

use std::{path::PathBuf, process::Command};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_tests::deploy_docs;
use lb_userspace::sources::k8s::{
    policy::UpstreamPolicy,
    translate::{Objects, Settings, Translator, evaluate},
};
use serde_json::json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    let validator = root().join("target/tools/venv/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: `cargo xtask setup` installs it",
        validator.display()
    );
    let files = [
        "helm/lb/crds/upstreampolicies.yaml",
        "namespace.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "example.yaml",
        "gatewayclass.yaml",
        "gateway-example.yaml",
    ];
    let out = Command::new(&validator)
        .arg("--strict")
        .args(files.iter().map(|f| root().join("deploy").join(f)))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let builtin: usize = files
        .iter()
        .map(|f| {
            deploy_docs(f)
                .iter()
                // kubernetes-validate has schemas for built-in kinds only: lb's own and the
                // Gateway API's are decoded and translated by the tests below instead.
                .filter(|d| {
                    let v = d["apiVersion"].as_str().unwrap_or("");
                    v != "lb.dev/v1alpha1" && !v.starts_with("gateway.networking.k8s.io/")
                })
                .count()
        })
        .sum();
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" passed for resource "))
            .count(),
        builtin,
        "every built-in resource is checked against its schema:\n{text}"
    );
    assert!(
        !text.contains("ERROR") && !text.contains("failed"),
        "{text}"
    );
}

#[test]
fn the_example_service_and_policy_mean_what_docs_kubernetes_says() {
    let docs = deploy_docs("example.yaml");
    let svc: Service = serde_json::from_value(docs[0].clone()).unwrap();
    let policy: UpstreamPolicy = serde_json::from_value(docs[1].clone()).unwrap();
    let (effect, notes) = evaluate(&policy.spec, 65537).expect("the example policy is accepted");
    assert_eq!(effect.table_size, Some(10007));
    assert!(
        notes[0].message.contains("cannot be seen at L4"),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.message.contains("slots 10000: 10007 used")),
        "Kong's default slots, rounded up and reported: {notes:?}"
    );
    let mut svc_v = docs[0].clone();
    svc_v["status"] = json!({ "loadBalancer": { "ingress": [ { "ip": "192.0.2.80" } ] } });
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": "default", "name": "web-1", "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "ports": [ { "name": "http", "port": 8080, "protocol": "TCP" } ],
        "endpoints": [ { "addresses": ["10.244.1.5"], "conditions": { "ready": true } } ]
    }))
    .unwrap();
    let t = Translator::default().translate(
        &Objects {
            services: vec![serde_json::from_value(svc_v).unwrap()],
            slices: vec![slice],
            policies: vec![policy],
            invalid_policies: vec![],
        },
        &Settings {
            class: "default".into(),
            node_name: "n".into(),
            zone: None,
            table_size: 65537,
            max_vips: 8,
            max_backends: 8,
            source_v4: true,
            source_v6: true,
        },
    );
    assert_eq!(svc.metadata.name.as_deref(), Some("web"));
    let v = &t.vips[0];
    assert_eq!(v.spec.label(), "192.0.2.80:80/tcp");
    assert_eq!(v.spec.affinity_timeout_s, 3600);
    assert_eq!(v.spec.table_size, Some(10007));
    assert_eq!(
        (
            v.spec.backends[0].address.to_string(),
            v.spec.backends[0].port
        ),
        ("10.244.1.5".into(), 8080)
    );
    assert!(v.health_check.is_some() && v.passive_health.is_some());
}

#[test]
fn the_daemonset_runs_lb_as_docs_kubernetes_says() {
    let ds = deploy_docs("daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert!(env.contains(&("NODE_NAME", "spec.nodeName")), "{env:?}");
    assert!(
        c["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--kubernetes"))
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf"));
    let bpffs = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "bpffs")
        .unwrap();
    assert_eq!(bpffs["hostPath"]["path"], "/sys/fs/bpf");
    // The probes' port is where the ConfigMap's node settings serve them.
    let cm = deploy_docs("daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap();
    let node = cm["data"]["node.yaml"].as_str().unwrap();
    let port = c["readinessProbe"]["httpGet"]["port"].as_u64().unwrap();
    assert!(
        node.contains(&format!("metrics_listen: 0.0.0.0:{port}")),
        "{node}"
    );
    lb_userspace::sources::config::Config::parse(node, "the ConfigMap's node.yaml")
        .expect("the ConfigMap is a valid node config");
}

#[test]
fn the_gateway_example_is_served_by_the_gatewayclass_and_splits_two_to_one() {
    use lb_userspace::sources::k8s::gateway::{self, Objects as GatewayObjects, Room, types::*};
    let class: GatewayClass =
        serde_json::from_value(deploy_docs("gatewayclass.yaml")[0].clone()).unwrap();
    let docs = deploy_docs("gateway-example.yaml");
    let gw: Gateway = serde_json::from_value(docs[0].clone()).unwrap();
    let route: TCPRoute = serde_json::from_value(docs[1].clone()).unwrap();
    let mut services: Vec<Service> = docs[2..]
        .iter()
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect();
    // Two pods each; the LoadBalancer Service lb asks for, once an address is allocated.
    let slices: Vec<EndpointSlice> = ["web-v1", "web-v2"]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::from_value(json!({
                "metadata": { "namespace": "shop", "name": s, "labels": { "kubernetes.io/service-name": s } },
                "addressType": "IPv4",
                "ports": [ { "port": 8080, "protocol": "TCP" } ],
                "endpoints": [ { "addresses": [format!("10.244.{i}.1")] }, { "addresses": [format!("10.244.{i}.2")] } ]
            }))
            .unwrap()
        })
        .collect();
    let settings = Settings {
        class: "default".into(),
        node_name: "n".into(),
        zone: None,
        table_size: 65537,
        max_vips: 8,
        max_backends: 16,
        source_v4: true,
        source_v6: true,
    };
    let objects = GatewayObjects {
        classes: vec![class],
        gateways: vec![gw],
        routes: vec![route.into()],
        ..Default::default()
    };
    let run = |services: &[Service]| {
        gateway::translate(
            &objects,
            services,
            &slices,
            &settings,
            gateway::DEFAULT_CONTROLLER,
            Room::default(),
        )
    };
    let first = run(&services);
    assert!(first.vips.is_empty(), "no address yet");
    let mut lb_svc = first.lb_services[0].clone();
    assert_eq!(lb_svc["metadata"]["name"], "shop-lb");
    lb_svc["status"] = json!({ "loadBalancer": { "ingress": [ { "ip": "192.0.2.80" } ] } });
    services.push(serde_json::from_value(lb_svc).unwrap());
    let out = run(&services);
    let v = &out.vips[0].spec;
    assert_eq!(v.label(), "192.0.2.80:80/tcp");
    let weight = |prefix: &str| -> u32 {
        v.backends
            .iter()
            .filter(|b| b.address.to_string().starts_with(prefix))
            .map(|b| b.weight)
            .sum()
    };
    assert_eq!(
        weight("10.244.0."),
        2 * weight("10.244.1."),
        "{:?}",
        v.backends
    );
}
