//! Kubernetes as a source of desired state: Services, EndpointSlices and `UpstreamPolicy`
//! objects become the same VIPs a config file describes.

pub mod gateway;
pub mod kong;
pub mod lease;
pub mod nodes;
pub mod policy;
pub mod programmed;
pub mod rollout;
pub mod slices;
pub mod source;
pub mod status;
pub mod topology;
pub mod translate;

pub use lease::{Leadership, LeaseFlags};
pub use source::{Kube, KubeOptions};
