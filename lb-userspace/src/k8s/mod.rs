//! Kubernetes as a source of desired state (issue 6, in progress): so far the policy resource's
//! types and its CRD.

pub mod policy;
