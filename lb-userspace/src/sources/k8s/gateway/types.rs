//! The Gateway API kinds lb reads (`gateway.networking.k8s.io`), derived with kube's
//! `CustomResource`: only the fields lb uses, so that objects written for any Gateway API
//! release decode (unknown fields are ignored).
//!
//! The `gateway-api` crate (0.22) is built on kube 4 / k8s-openapi 0.28 and has TCPRoute only
//! among its experimental APIs, so it does not fit lb's kube 5. TCPRoute and UDPRoute are the same
//! shape in `v1` (Standard channel since Gateway API v1.6) and `v1alpha2` (experimental): one type
//! each, watched at whichever version the API server serves (see [`super::super::source`]).
//! Status is written as JSON merge patches (see [`super::status`]), so no status types here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "gateway.networking.k8s.io";

/// A class of Gateways and the controller that implements them.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GatewayClass"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    /// lb implements the classes whose controller name is its own (`--gateway-controller`).
    pub controller_name: String,
}

/// Listeners on addresses.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Addresses asked for; lb takes those of type `IPAddress`.
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub port: i32,
    /// `TCP` and `UDP` are served; anything else is `Accepted=False` (`UnsupportedProtocol`).
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    pub kinds: Option<Vec<RouteGroupKind>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(
    Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupKind {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    /// `IPAddress` when absent.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub value: String,
}

/// What TCPRoute and UDPRoute have in common (all lb reads of either).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

/// A TCP route: its rules' backendRefs share the listeners it attaches to.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "TCPRoute",
    namespaced
)]
pub struct TCPRouteSpec {
    #[serde(flatten)]
    pub route: RouteSpec,
}

/// A UDP route.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "UDPRoute",
    namespaced
)]
pub struct UDPRouteSpec {
    #[serde(flatten)]
    pub route: RouteSpec,
}

#[derive(
    Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl ParentRef {
    /// This reference with the `group` and `kind` its CRD defaults them to
    /// (`gateway.networking.k8s.io`, `Gateway`) where absent: what a route's status echoes is then
    /// what the API server stores, and clients that compare it (the conformance suite does) find
    /// it, also where nothing defaulted the route's spec.
    pub fn defaulted(&self) -> ParentRef {
        ParentRef {
            group: Some(self.group.clone().unwrap_or_else(|| GROUP.into())),
            kind: Some(self.kind.clone().unwrap_or_else(|| "Gateway".into())),
            ..self.clone()
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// `""` (core) when absent.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` when absent.
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    /// 0..1,000,000; 1 when absent.
    #[serde(default)]
    pub weight: Option<i32>,
}

/// Lets objects in other namespaces refer to objects in this one.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    namespaced
)]
pub struct ReferenceGrantSpec {
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// A TCPRoute or a UDPRoute, as the translation sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub kind: RouteKind,
    pub meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: RouteSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Tcp,
    Udp,
}

impl RouteKind {
    pub const fn name(self) -> &'static str {
        match self {
            RouteKind::Tcp => "TCPRoute",
            RouteKind::Udp => "UDPRoute",
        }
    }
}

impl From<TCPRoute> for Route {
    fn from(r: TCPRoute) -> Self {
        Self {
            kind: RouteKind::Tcp,
            meta: r.metadata,
            spec: r.spec.route,
        }
    }
}

impl From<UDPRoute> for Route {
    fn from(r: UDPRoute) -> Self {
        Self {
            kind: RouteKind::Udp,
            meta: r.metadata,
            spec: r.spec.route,
        }
    }
}
