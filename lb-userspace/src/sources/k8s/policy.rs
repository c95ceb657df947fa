//! `UpstreamPolicy` (`lb.dev/v1alpha1`): how lb balances a Service, attached to it by the
//! annotation `lb.dev/upstream-policy: <name>`. Modelled on Kong's `KongUpstreamPolicy`: the same
//! field names and values, so a policy written for Kong reads the same here. Values Kong accepts
//! that an L4 balancer cannot honour (header, cookie or path hashing, least connections, ...)
//! are accepted by the schema and reported in the policy's status instead of being refused by
//! the API server, so the reason reaches the user.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The annotation that attaches a policy (in the Service's namespace) to a Service.
pub const POLICY_ANNOTATION: &str = "lb.dev/upstream-policy";

/// How lb balances the Services that name this policy.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "lb.dev",
    version = "v1alpha1",
    kind = "UpstreamPolicy",
    namespaced,
    status = "UpstreamPolicyStatus",
    shortname = "lbup",
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.algorithm"}"#,
    printcolumn = r#"{"name":"Hash On","type":"string","jsonPath":".spec.hashOn.input"}"#,
    printcolumn = r#"{"name":"Slots","type":"integer","jsonPath":".spec.slots"}"#,
    printcolumn = r#"{"name":"Health Check","type":"string","jsonPath":".spec.healthchecks.active.type"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    // Columns of our own replace kubectl's default ones: Age has to be asked for.
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamPolicySpec {
    /// `consistent-hashing` or `round-robin` (both weighted Maglev; round-robin hashes the
    /// 5-tuple). Kong's other algorithms are reported as not supported in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// What consistent hashing hashes. At L4 only `input: ip` (the client address) can be seen;
    /// without `hashOn` the 5-tuple is hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashInput>,
    /// Used when `hashOn` names something L4 cannot see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on_fallback: Option<HashInput>,
    /// Maglev table size, Kong's range 10..65536: rounded up to the next prime (Maglev needs
    /// one; 10000 becomes 10007), at most the node's table size; the size used is in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 65536))]
    pub slots: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthchecks: Option<Healthchecks>,
    /// Kong's cookie-based stickiness: L7, not applicable at L4 (reported in the status; use
    /// `hashOn: {input: ip}` for client affinity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_sessions: Option<StickySessions>,
    /// Client-IP persistence, in the shape the Gateway API proposes (GEP-1619's
    /// `sessionPersistence`, with GEP-3798's `ClientIP` type; experimental in lb as upstream):
    /// each client address keeps its backend while it keeps connecting, for the Service's VIPs
    /// and for the TCPRoutes and UDPRoutes whose backends use this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_persistence: Option<SessionPersistence>,
}

/// `sessionPersistence`: GEP-1619's fields; `type: ClientIP` (GEP-3798) is the one an L4
/// balancer can honour.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionPersistence {
    /// `ClientIP`. `Cookie` and `Header` (GEP-1619) are in the payload: reported in the status.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// How long a client keeps its backend after its last new connection, a Gateway API
    /// duration (`1h`, `30m`, `90s`), at most 24h. Default 3h (Kubernetes' `ClientIP` default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// GEP-1619's absolute lifetime: lb keeps persistence while a client keeps connecting, so
    /// it applies this as the idle timeout when `idleTimeout` is not given (the status says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute_timeout: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StickySessions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_path: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    RoundRobin,
    ConsistentHashing,
    LeastConnections,
    Latency,
    StickySessions,
}

/// One thing to hash on; set exactly one field.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashInput {
    /// `ip` (the client address), or Kong's `consumer` / `path` (not visible at L4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<HashInputKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_arg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_capture: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HashInputKind {
    Ip,
    Consumer,
    Path,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Healthchecks {
    /// Percentage of the Service's weight that must stay healthy: below it health is ignored
    /// and the VIP balances over all its endpoints (at L4 failing open beats dropping all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveHealthcheck>,
    /// NAT mode's signals: connection attempts refused, unreachable or unanswered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<PassiveHealthcheck>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveHealthcheck {
    /// `tcp`, `http` or `https` (Kong's `grpc`, `grpcs` are reported as not supported).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// At most this many of the Service's endpoints probed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
    /// Sent with every http/https probe (a header may have several values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, Vec<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// The server name https probes send (SNI) and verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_sni: Option<String>,
    /// Verify the endpoint's certificate (system roots); Kong's default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_verify_certificate: Option<bool>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<ActiveHealthy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<ActiveUnhealthy>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveHealthy {
    /// Seconds between probes of a healthy backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_statuses: Option<Vec<u16>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveUnhealthy {
    /// Seconds between probes of an unhealthy backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_statuses: Option<Vec<u16>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassiveHealthcheck {
    /// Kong's `tcp`, `http`, `https`, `grpc`, `grpcs`: at L4 the signals are TCP's whatever
    /// the type; HTTP status fields are reported as not applicable.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Kong counts proxied successes to bring a target back; lb probes it back (TCP connect):
    /// reported as not applicable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<ActiveHealthy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<PassiveUnhealthy>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassiveUnhealthy {
    /// Connection attempts refused (RST) or unreachable (ICMP) in a row that take a backend out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_failures: Option<u32>,
    /// SYNs unanswered in a row that take a backend out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<u32>,
    /// HTTP replies are not parsed at L4: reported as not applicable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_statuses: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u32>,
}

/// `Accepted` (the spec makes sense at L4, possibly with a fallback) and `Programmed` (in the
/// maps), each with a reason and a message.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The CRD as YAML, as `lb crd` prints it and the Helm chart's
/// `deploy/helm/lb/crds/upstreampolicies.yaml` holds it.
pub fn crd_yaml() -> String {
    serde_saphyr::to_string(&UpstreamPolicy::crd()).expect("the CRD serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kong_style_policy_reads_back() {
        let p: UpstreamPolicySpec = serde_json::from_value(serde_json::json!({
            "algorithm": "consistent-hashing",
            "hashOn": { "header": "x-user" },
            "hashOnFallback": { "input": "ip" },
            "slots": 65537,
            "healthchecks": {
                "active": { "type": "http", "httpPath": "/healthz", "healthy": { "interval": 5, "successes": 2 } },
                "passive": { "unhealthy": { "tcpFailures": 3, "timeouts": 2 } }
            }
        }))
        .unwrap();
        assert_eq!(p.algorithm, Some(Algorithm::ConsistentHashing));
        assert_eq!(p.hash_on.unwrap().header.as_deref(), Some("x-user"));
        assert_eq!(p.hash_on_fallback.unwrap().input, Some(HashInputKind::Ip));
        let h = p.healthchecks.unwrap();
        assert_eq!(h.passive.unwrap().unhealthy.unwrap().tcp_failures, Some(3));
        assert_eq!(h.active.unwrap().kind.as_deref(), Some("http"));
    }

    #[test]
    fn the_checked_in_crd_is_what_lb_crd_prints() {
        let checked_in = include_str!("../../../../deploy/helm/lb/crds/upstreampolicies.yaml");
        assert_eq!(
            checked_in,
            crd_yaml(),
            "the chart's CRD is stale: regenerate it with \
             `lb crd > deploy/helm/lb/crds/upstreampolicies.yaml`"
        );
    }
}
