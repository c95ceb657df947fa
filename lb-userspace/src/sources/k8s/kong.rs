//! The parts of Kong's `KongUpstreamPolicy` (configuration.konghq.com/v1beta1) that need a
//! decision at L4: how `slots` maps to a Maglev table, what `healthchecks.threshold` means, the
//! extras of active checks (https, headers, concurrency, unhealthy interval), and the fields
//! that only mean something to an L7 proxy, which are reported in the status rather than
//! silently dropped.

use std::time::Duration;

use super::policy::{ActiveHealthcheck, Healthchecks, UpstreamPolicySpec};
use crate::{model::maglev, sources::config::TlsCheck};

/// Kong's range for `slots`.
pub const SLOTS_MIN: u32 = 10;
pub const SLOTS_MAX: u32 = 65_536;

/// Something the status says about an accepted policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The `Accepted` reason it calls for: `AcceptedWithFallback` (a hash L4 cannot see was
    /// replaced) or `AcceptedWithNotes` (a value adjusted, a field not applicable).
    pub reason: &'static str,
    pub message: String,
}

pub fn note(message: impl Into<String>) -> Note {
    Note {
        reason: "AcceptedWithNotes",
        message: message.into(),
    }
}

/// The smallest prime at least `n`.
pub fn next_prime(n: u32) -> u32 {
    (n.max(2)..)
        .find(|&p| maglev::is_prime(p))
        .expect("a prime exists")
}

/// The table size `slots` asks for on a node of `table_size` slots per VIP, with a note when
/// it is not the number written.
pub fn slots(asked: u32, table_size: u32) -> Result<(u32, Option<Note>), (&'static str, String)> {
    if !(SLOTS_MIN..=SLOTS_MAX).contains(&asked) {
        return Err((
            "InvalidSlots",
            format!("slots {asked} is outside Kong's range {SLOTS_MIN}..{SLOTS_MAX}"),
        ));
    }
    let prime = next_prime(asked);
    Ok(match (prime == asked, prime <= table_size) {
        (true, true) => (prime, None),
        (false, true) => (
            prime,
            Some(note(format!(
                "slots {asked}: {prime} used (Maglev needs a prime: the next one up)"
            ))),
        ),
        (_, false) => (
            table_size,
            Some(note(format!(
                "slots {asked}{}: {table_size} used, the most each VIP has on this node (node.table_size)",
                if prime == asked {
                    String::new()
                } else {
                    format!(" (prime: {prime})")
                }
            ))),
        ),
    })
}

/// `healthchecks.threshold` as a whole percentage (rounded up: a threshold is a floor).
pub fn threshold(h: &Healthchecks) -> Result<u8, (&'static str, String)> {
    match h.threshold {
        None => Ok(0),
        Some(t) if (0.0..=100.0).contains(&t) => Ok(t.ceil() as u8),
        Some(t) => Err((
            "InvalidHealthcheck",
            format!("healthchecks.threshold {t} is not a percentage (0..100)"),
        )),
    }
}

/// What an https check's TLS is, and the headers of http(s) checks, as the agent's check.
pub fn http_extras(
    a: &ActiveHealthcheck,
    https: bool,
) -> (Vec<(String, String)>, Option<TlsCheck>) {
    let headers = a
        .headers
        .iter()
        .flatten()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
        .collect();
    let tls = https.then(|| TlsCheck {
        sni: a.https_sni.clone().filter(|s| !s.is_empty()),
        verify: a.https_verify_certificate.unwrap_or(true),
    });
    (headers, tls)
}

/// Refuses header names and values HTTP cannot carry.
pub fn check_headers(a: &ActiveHealthcheck) -> Result<(), (&'static str, String)> {
    for (k, vs) in a.headers.iter().flatten() {
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err((
                "InvalidHealthcheck",
                format!("healthchecks.active.headers: {k:?} is not a header name"),
            ));
        }
        if let Some(v) = vs
            .iter()
            .find(|v| reqwest::header::HeaderValue::from_str(v).is_err())
        {
            return Err((
                "InvalidHealthcheck",
                format!("healthchecks.active.headers.{k}: {v:?} is not a header value"),
            ));
        }
    }
    Ok(())
}

/// Seconds between probes of an unhealthy backend, if set apart from the healthy interval.
pub fn unhealthy_interval(a: &ActiveHealthcheck) -> Option<Duration> {
    a.unhealthy
        .as_ref()
        .and_then(|u| u.interval)
        .filter(|i| *i > 0)
        .map(|i| Duration::from_secs(u64::from(i)))
}

/// Fields given that an L4 balancer cannot honour, each with what happens instead.
pub fn not_applicable(spec: &UpstreamPolicySpec) -> Vec<Note> {
    let mut out = Vec::new();
    let mut na = |field: &str, why: &str| {
        out.push(note(format!("{field} is not applicable at L4: {why}")));
    };
    if spec.sticky_sessions.is_some() {
        na(
            "stickySessions",
            "cookies are in the payload (hashOn: {input: ip} keeps a client on one pod)",
        );
    }
    let Some(h) = &spec.healthchecks else {
        return out;
    };
    if let Some(a) = &h.active {
        let kind = a.kind.as_deref().unwrap_or("http");
        let http = kind == "http" || kind == "https";
        if !http && a.headers.as_ref().is_some_and(|m| !m.is_empty()) {
            na("healthchecks.active.headers", "tcp checks send no request");
        }
        if !http && a.http_path.is_some() {
            na("healthchecks.active.httpPath", "tcp checks send no request");
        }
        if kind != "https" && a.https_sni.is_some() {
            na("healthchecks.active.httpsSni", "only https checks use it");
        }
        if kind != "https" && a.https_verify_certificate.is_some() {
            na(
                "healthchecks.active.httpsVerifyCertificate",
                "only https checks use it",
            );
        }
        if a.unhealthy
            .as_ref()
            .is_some_and(|u| u.http_statuses.is_some())
        {
            na(
                "healthchecks.active.unhealthy.httpStatuses",
                "every status outside healthy.httpStatuses counts as a failure",
            );
        }
        if a.healthy.as_ref().and_then(|h| h.interval) == Some(0) {
            na(
                "healthchecks.active.healthy.interval 0 (in Kong: no probes of healthy targets)",
                "lb probes every 5 s",
            );
        }
    }
    if let Some(p) = &h.passive {
        if p.kind.as_deref().is_some_and(|k| k != "tcp") {
            na(
                "healthchecks.passive.type other than tcp",
                "the signals are TCP's (refused, unreachable, unanswered)",
            );
        }
        if p.healthy.is_some() {
            na(
                "healthchecks.passive.healthy",
                "a backend passive checks took out comes back when a TCP probe connects",
            );
        }
        if let Some(u) = &p.unhealthy {
            if u.http_failures.is_some() || u.http_statuses.is_some() {
                na(
                    "healthchecks.passive.unhealthy.httpFailures/httpStatuses",
                    "replies are not parsed",
                );
            }
            if u.interval.is_some() {
                na(
                    "healthchecks.passive.unhealthy.interval",
                    "a backend taken out is probed every 10 s",
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kongs_default_of_10000_slots_becomes_the_next_prime() {
        // 10001 = 73 * 137, 10003 = 7 * 1429, 10005 = 3 * 5 * 23 * 29, 10007 is prime.
        assert_eq!(next_prime(10_000), 10_007);
        let (used, n) = slots(10_000, 65_537).unwrap();
        assert_eq!(used, 10_007);
        assert!(n.unwrap().message.contains("10007 used"));
    }

    #[test]
    fn a_prime_within_the_table_is_used_as_is() {
        assert_eq!(slots(251, 1009).unwrap(), (251, None));
    }

    #[test]
    fn the_ends_of_kongs_range() {
        // 10 -> 11; 65536 -> 65537 (a Fermat prime).
        assert_eq!(slots(10, 65_537).unwrap().0, 11);
        assert_eq!(slots(65_536, 65_537).unwrap().0, 65_537);
        assert_eq!(slots(9, 65_537).unwrap_err().0, "InvalidSlots");
        assert_eq!(slots(65_537, 65_537).unwrap_err().0, "InvalidSlots");
    }

    #[test]
    fn slots_past_the_nodes_table_use_the_table() {
        let (used, n) = slots(10_000, 1009).unwrap();
        assert_eq!(used, 1009);
        let m = n.unwrap().message;
        assert!(m.contains("1009 used") && m.contains("prime: 10007"), "{m}");
    }

    #[test]
    fn the_threshold_is_a_percentage_rounded_up() {
        let h = |t: f64| Healthchecks {
            threshold: Some(t),
            ..Default::default()
        };
        assert_eq!(threshold(&Healthchecks::default()), Ok(0));
        assert_eq!(threshold(&h(50.0)), Ok(50));
        assert_eq!(threshold(&h(33.3)), Ok(34));
        assert_eq!(threshold(&h(101.0)).unwrap_err().0, "InvalidHealthcheck");
    }
}

#[cfg(test)]
mod policy_tests {
    //! A policy with every field of KongUpstreamPolicy's spec, through `evaluate`.

    use std::time::Duration;

    use serde_json::json;

    use super::super::{policy::UpstreamPolicySpec, translate::evaluate};
    use crate::sources::config::{CheckKind, TlsCheck};

    /// Every field of configuration.konghq.com/v1beta1 KongUpstreamPolicy's spec.
    fn every_field() -> serde_json::Value {
        json!({
            "algorithm": "consistent-hashing",
            "slots": 10000,
            "hashOn": { "input": "ip" },
            "hashOnFallback": { "input": "ip" },
            "stickySessions": { "cookie": "session", "cookiePath": "/" },
            "healthchecks": {
                "threshold": 50.0,
                "active": {
                    "type": "https", "concurrency": 2,
                    "headers": { "x-a": ["1", "2"], "x-b": ["3"] },
                    "httpPath": "/healthz", "httpsSni": "web.example", "httpsVerifyCertificate": false,
                    "timeout": 1,
                    "healthy": { "interval": 5, "successes": 2, "httpStatuses": [200] },
                    "unhealthy": { "interval": 1, "httpFailures": 4, "tcpFailures": 2, "timeouts": 3, "httpStatuses": [500] }
                },
                "passive": {
                    "type": "http",
                    "healthy": { "successes": 3, "httpStatuses": [200], "interval": 0 },
                    "unhealthy": { "tcpFailures": 3, "timeouts": 4, "httpFailures": 2, "httpStatuses": [503], "interval": 1 }
                }
            }
        })
    }

    #[test]
    fn every_kong_field_is_read_none_is_dropped() {
        let spec: UpstreamPolicySpec = serde_json::from_value(every_field()).unwrap();
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            every_field(),
            "a field the types do not hold would be lost here"
        );
    }

    #[test]
    fn a_policy_copied_from_kong_is_accepted_with_what_l4_makes_of_each_field() {
        let spec: UpstreamPolicySpec = serde_json::from_value(every_field()).unwrap();
        let (effect, notes) = evaluate(&spec, 65_537).expect("accepted");
        assert_eq!(
            effect.table_size,
            Some(10_007),
            "10000 rounded up to a prime"
        );
        assert_eq!(effect.health_threshold, 50);
        let h = effect.health_check.expect("an active check");
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                statuses: vec![200],
                headers: [("x-a", "1"), ("x-a", "2"), ("x-b", "3")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .to_vec(),
                tls: Some(TlsCheck {
                    sni: Some("web.example".into()),
                    verify: false
                }),
            }
        );
        assert_eq!(h.concurrency, 2);
        assert_eq!(
            (h.interval, h.unhealthy_interval),
            (Duration::from_secs(5), Some(Duration::from_secs(1)))
        );
        assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (2, 2));
        assert_eq!(effect.passive_health.expect("passive").failures, 3);
        let said: Vec<&str> = notes.iter().map(|n| n.message.as_str()).collect();
        for expected in [
            "slots 10000: 10007 used",
            "stickySessions is not applicable at L4",
            "healthchecks.active.unhealthy.httpStatuses is not applicable at L4",
            "healthchecks.passive.type other than tcp is not applicable at L4",
            "healthchecks.passive.healthy is not applicable at L4",
            "healthchecks.passive.unhealthy.httpFailures/httpStatuses is not applicable at L4",
            "healthchecks.passive.unhealthy.interval is not applicable at L4",
        ] {
            assert!(
                said.iter().any(|m| m.contains(expected)),
                "{expected:?} missing from {said:#?}"
            );
        }
        assert!(notes.iter().all(|n| n.reason == "AcceptedWithNotes"));
    }

    #[test]
    fn an_https_check_verifies_by_default_as_kongs_does() {
        let spec: UpstreamPolicySpec =
            serde_json::from_value(json!({ "healthchecks": { "active": { "type": "https" } } }))
                .unwrap();
        let (effect, notes) = evaluate(&spec, 65_537).unwrap();
        let CheckKind::Http { tls, .. } = effect.health_check.unwrap().kind else {
            panic!("an http check");
        };
        assert_eq!(
            tls,
            Some(TlsCheck {
                sni: None,
                verify: true
            })
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn tls_fields_on_a_tcp_check_are_reported_not_applicable() {
        let spec: UpstreamPolicySpec = serde_json::from_value(json!({ "healthchecks": { "active": {
            "type": "tcp", "httpsSni": "a.example", "httpsVerifyCertificate": true, "headers": { "x": ["1"] } } } }))
        .unwrap();
        let (effect, notes) = evaluate(&spec, 65_537).unwrap();
        assert_eq!(effect.health_check.unwrap().kind, CheckKind::Tcp);
        let said: Vec<&str> = notes.iter().map(|n| n.message.as_str()).collect();
        for field in [
            "healthchecks.active.httpsSni",
            "healthchecks.active.httpsVerifyCertificate",
            "healthchecks.active.headers",
        ] {
            assert!(
                said.iter()
                    .any(|m| m.starts_with(field) && m.contains("not applicable")),
                "{field} missing from {said:#?}"
            );
        }
    }
}
