//! What the agent's DaemonSet says as the agent stops (SIGTERM, `--down-when-deleted`): gone
//! (an uninstall: `lb down`), or still there, asking for some image (a rolling update). When
//! that image's tag names an older release than the one running, the rollout is a rollback, and
//! this agent leaves its pins as that release reads them before it exits.
//!
//! Pure: the DaemonSet is read by [`super::Kube::own_daemonset`].

use k8s_openapi::api::apps::v1::DaemonSet;
use semver::Version;

/// The name of the agent's container in the chart's pod template.
pub const CONTAINER: &str = "lb";

/// The agent's DaemonSet as the agent stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnDaemonSet {
    /// Gone or being deleted: an uninstall.
    Gone,
    /// Still there (a rolling update, or the pod alone restarting); the image its pod template
    /// runs the agent from, if it names one.
    Present { image: Option<String> },
    /// The API server could not say.
    Unknown,
}

impl OwnDaemonSet {
    /// What `ds` (None: not found) says.
    pub fn of(ds: Option<&DaemonSet>) -> Self {
        match ds {
            None => Self::Gone,
            Some(ds) if ds.metadata.deletion_timestamp.is_some() => Self::Gone,
            Some(ds) => Self::Present {
                image: agent_image(ds),
            },
        }
    }

    /// The older release the pod template now asks for, if it does: the rollout under way is a
    /// rollback from `running`.
    pub fn rollback_from(&self, running: &Version) -> Option<Version> {
        match self {
            Self::Present { image: Some(image) } => image_version(image).filter(|v| v < running),
            _ => None,
        }
    }
}

/// The image of the agent's container in `ds`'s pod template: the container named
/// [`CONTAINER`], else the only one.
pub fn agent_image(ds: &DaemonSet) -> Option<String> {
    let containers = &ds.spec.template.spec.as_ref()?.containers;
    let c = containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .or(match containers.as_slice() {
            [only] => Some(only),
            _ => None,
        })?;
    c.image.clone()
}

/// The release an image reference names by its tag (`registry:5000/lb:0.1.0`, `lb:v0.1.0`,
/// `lb:0.1.0@sha256:...`); None without a tag (`lb`, `lb@sha256:...`) or when the tag is no
/// version (`latest`, `dev`).
pub fn image_version(image: &str) -> Option<Version> {
    let name = image.split('@').next()?;
    // The tag follows the last ':' of the last path segment (a registry's port is before a '/').
    let last = name.rsplit('/').next()?;
    let (_, tag) = last.rsplit_once(':')?;
    Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ds(extra: serde_json::Value) -> DaemonSet {
        let mut v = json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": { "namespace": "lb-system", "name": "lb" },
            "spec": {
                "selector": { "matchLabels": { "app": "lb" } },
                "template": { "metadata": { "labels": { "app": "lb" } },
                              "spec": { "containers": [ { "name": "lb", "image": "ghcr.io/lb-dev/lb:0.1.0" } ] } }
            }
        });
        json_patch::merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn an_image_names_a_release_by_a_semver_tag_only() {
        for (image, want) in [
            ("ghcr.io/lb-dev/lb:0.1.0", Some("0.1.0")),
            ("registry.example:5000/lb:0.1.0", Some("0.1.0")),
            ("lb:v0.2.0", Some("0.2.0")),
            ("lb:0.3.0-rc.1", Some("0.3.0-rc.1")),
            ("lb:0.1.0@sha256:0123abcd", Some("0.1.0")),
            ("registry.example:5000/lb", None),
            ("lb@sha256:0123abcd", None),
            ("lb:latest", None),
            ("lb:0.1", None),
            ("lb", None),
        ] {
            assert_eq!(image_version(image), want.map(v), "{image}");
        }
    }

    #[test]
    fn a_template_at_an_older_tag_is_a_rollback_and_not_at_the_same_or_a_newer_one() {
        let running = v("0.2.0");
        let at = |image: &str| OwnDaemonSet::Present {
            image: Some(image.to_string()),
        };
        assert_eq!(
            at("ghcr.io/lb-dev/lb:0.1.0").rollback_from(&running),
            Some(v("0.1.0"))
        );
        assert_eq!(at("ghcr.io/lb-dev/lb:0.2.0").rollback_from(&running), None);
        assert_eq!(at("ghcr.io/lb-dev/lb:0.3.0").rollback_from(&running), None);
        assert_eq!(at("ghcr.io/lb-dev/lb:dev").rollback_from(&running), None);
        // A pre-release of this version is older than it.
        assert_eq!(
            at("lb:0.2.0-rc.1").rollback_from(&running),
            Some(v("0.2.0-rc.1"))
        );
        for other in [OwnDaemonSet::Gone, OwnDaemonSet::Unknown] {
            assert_eq!(other.rollback_from(&running), None);
        }
        assert_eq!(
            OwnDaemonSet::Present { image: None }.rollback_from(&running),
            None
        );
    }

    #[test]
    fn the_agents_image_is_the_lb_containers_else_the_only_ones() {
        assert_eq!(
            OwnDaemonSet::of(Some(&ds(json!({})))),
            OwnDaemonSet::Present {
                image: Some("ghcr.io/lb-dev/lb:0.1.0".into())
            }
        );
        let two = ds(json!({ "spec": { "template": { "spec": { "containers": [
            { "name": "sidecar", "image": "busybox:1.36" },
            { "name": "lb", "image": "lb:0.1.0" } ] } } } }));
        assert_eq!(agent_image(&two).as_deref(), Some("lb:0.1.0"));
        let renamed = ds(json!({ "spec": { "template": { "spec": { "containers": [
            { "name": "agent", "image": "lb:0.1.0" } ] } } } }));
        assert_eq!(agent_image(&renamed).as_deref(), Some("lb:0.1.0"));
        let ambiguous = ds(json!({ "spec": { "template": { "spec": { "containers": [
            { "name": "a", "image": "lb:0.1.0" }, { "name": "b", "image": "x:1.0.0" } ] } } } }));
        assert_eq!(agent_image(&ambiguous), None);
    }

    #[test]
    fn a_daemonset_not_found_or_being_deleted_is_gone() {
        assert_eq!(OwnDaemonSet::of(None), OwnDaemonSet::Gone);
        let deleting = ds(json!({ "metadata": { "deletionTimestamp": "2026-12-07T08:00:00Z" } }));
        assert_eq!(OwnDaemonSet::of(Some(&deleting)), OwnDaemonSet::Gone);
    }
}
