//! One model of a scrape (families of samples, read once) and its two wire formats, each
//! written by a crate made for it: Prometheus text 0.0.4 (the `prometheus` crate's encoder) and
//! OpenMetrics 1.0.0 (`prometheus-client`'s); and which of the two a scraper's `Accept` asks for.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// A sample's labels: name, value.
pub type Labels = Vec<(&'static str, String)>;

/// The samples of a family, typed by what the family is.
#[derive(Clone, Debug, PartialEq)]
pub enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, f64)>),
}

/// A metric family. `name` is the base name: a counter's samples are `<name>_total` in both
/// formats (its HELP and TYPE lines say `<name>_total` in text 0.0.4, `<name>` in OpenMetrics).
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Samples,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str, rows: Vec<(Labels, u64)>) -> Self {
        Self {
            name,
            help,
            samples: Samples::Counter(rows),
        }
    }

    pub fn gauge(name: &'static str, help: &'static str, rows: Vec<(Labels, f64)>) -> Self {
        Self {
            name,
            help,
            samples: Samples::Gauge(rows),
        }
    }

    fn is_empty(&self) -> bool {
        match &self.samples {
            Samples::Counter(r) => r.is_empty(),
            Samples::Gauge(r) => r.is_empty(),
        }
    }
}

/// The two exposition formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what Prometheus reads by default, and what `promtool check
    /// metrics` lints.
    Text,
    OpenMetrics,
}

impl Format {
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for, as Prometheus's own exporters choose: the
    /// acceptable media ranges by falling quality (`q`, 1 if absent; 0 is "not acceptable"),
    /// the first one served wins; OpenMetrics only when asked for by name (any version lb
    /// writes, or none); otherwise, and without the header, text 0.0.4.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut ranges: Vec<(f32, mime::Mime)> = accept
            .unwrap_or("")
            .split(',')
            .filter_map(|r| r.trim().parse::<mime::Mime>().ok())
            .map(|m| {
                let q = m
                    .get_param("q")
                    .and_then(|q| q.as_str().parse::<f32>().ok())
                    .unwrap_or(1.0);
                (q, m)
            })
            .filter(|(q, _)| *q > 0.0)
            .collect();
        // Stable: among equal qualities the header's order stands.
        ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, m) in &ranges {
            let version = m.get_param("version").map(|v| v.as_str().to_string());
            let version = version.as_deref();
            match (m.type_().as_str(), m.subtype().as_str()) {
                ("application", "openmetrics-text")
                    if matches!(version, None | Some("1.0.0") | Some("0.0.1")) =>
                {
                    return Format::OpenMetrics;
                }
                ("text", "plain") if matches!(version, None | Some("0.0.4")) => {
                    return Format::Text;
                }
                _ => {}
            }
        }
        Format::Text
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExpositionError {
    #[error("writing the text format")]
    Text(#[source] prometheus::Error),
    #[error("writing OpenMetrics")]
    OpenMetrics,
}

/// `families` in `format`.
pub fn encode(families: Vec<Family>, format: Format) -> Result<String, ExpositionError> {
    match format {
        Format::Text => text(&families),
        Format::OpenMetrics => openmetrics(families),
    }
}

fn text(families: &[Family]) -> Result<String, ExpositionError> {
    use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

    let labels = |l: &Labels| -> Vec<LabelPair> {
        l.iter()
            .map(|(k, v)| {
                let mut p = LabelPair::default();
                p.set_name(k.to_string());
                p.set_value(v.clone());
                p
            })
            .collect()
    };
    // The encoder refuses a family without samples; such a family has nothing to say anyway.
    let mfs: Vec<MetricFamily> = families
        .iter()
        .filter(|f| !f.is_empty())
        .map(|f| {
            let mut mf = MetricFamily::default();
            mf.set_help(f.help.to_string());
            let metrics = match &f.samples {
                Samples::Counter(rows) => {
                    mf.set_name(format!("{}_total", f.name));
                    mf.set_field_type(MetricType::COUNTER);
                    rows.iter()
                        .map(|(l, v)| {
                            let mut c = proto::Counter::default();
                            c.set_value(*v as f64);
                            let mut m = Metric::from_label(labels(l));
                            m.set_counter(c);
                            m
                        })
                        .collect()
                }
                Samples::Gauge(rows) => {
                    mf.set_name(f.name.to_string());
                    mf.set_field_type(MetricType::GAUGE);
                    rows.iter()
                        .map(|(l, v)| {
                            let mut g = proto::Gauge::default();
                            g.set_value(*v);
                            let mut m = Metric::from_label(labels(l));
                            m.set_gauge(g);
                            m
                        })
                        .collect()
                }
            };
            mf.set_metric(metrics);
            mf
        })
        .collect();
    let mut out = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&mfs, &mut out)
        .map_err(ExpositionError::Text)?;
    Ok(out)
}

/// A scrape's families, handed to prometheus-client's OpenMetrics encoder.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        for f in &self.0 {
            let kind = match f.samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
            };
            let mut m = enc.encode_descriptor(f.name, f.help, None, kind)?;
            match &f.samples {
                Samples::Counter(rows) => {
                    for (l, v) in rows {
                        ConstCounter::new(*v).encode(m.encode_family(&owned(l))?)?;
                    }
                }
                Samples::Gauge(rows) => {
                    for (l, v) in rows {
                        ConstGauge::new(*v).encode(m.encode_family(&owned(l))?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn owned(labels: &Labels) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn openmetrics(families: Vec<Family>) -> Result<String, ExpositionError> {
    let mut r = Registry::default();
    r.register_collector(Box::new(Snapshot(families)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)
        .map_err(|_| ExpositionError::OpenMetrics)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.x sends when it scrapes.
    const PROMETHEUS_2: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn accept_headers_choose_the_format_by_quality_then_order() {
        for (accept, want) in [
            (None, Format::Text),
            (Some(""), Format::Text),
            (Some("*/*"), Format::Text),
            (Some("text/plain"), Format::Text),
            (Some("text/plain; version=0.0.4"), Format::Text),
            (Some(PROMETHEUS_2), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                Format::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0.2, text/plain;q=0.8"),
                Format::Text,
            ),
            (
                Some("text/plain;q=0.5, application/openmetrics-text;q=0.9"),
                Format::OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text),
            (
                Some("application/openmetrics-text;version=2.0.0"),
                Format::Text,
            ),
            (Some("application/json, not a media type"), Format::Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "Accept: {accept:?}");
        }
    }

    fn families() -> Vec<Family> {
        vec![
            Family::counter(
                "lb_x_packets",
                "Packets",
                vec![(vec![("verdict", "tx".into())], 7)],
            ),
            Family::gauge("lb_y", "A level", vec![(vec![], 1.5)]),
            Family::gauge("lb_none", "No samples", vec![]),
        ]
    }

    #[test]
    fn counters_are_named_with_total_in_both_formats() {
        let t = encode(families(), Format::Text).unwrap();
        assert_eq!(
            t,
            "# HELP lb_x_packets_total Packets\n# TYPE lb_x_packets_total counter\n\
             lb_x_packets_total{verdict=\"tx\"} 7\n\
             # HELP lb_y A level\n# TYPE lb_y gauge\nlb_y 1.5\n"
        );
        let om = encode(families(), Format::OpenMetrics).unwrap();
        assert!(om.contains("# TYPE lb_x_packets counter\n"), "{om}");
        assert!(
            om.contains("lb_x_packets_total{verdict=\"tx\"} 7\n"),
            "{om}"
        );
        // prometheus-client writes an empty label set as `{}` (valid OpenMetrics).
        assert!(om.contains("lb_y{} 1.5\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
