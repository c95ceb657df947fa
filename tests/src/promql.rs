//! Which metrics and labels a PromQL expression names: its vector selectors (metric name and
//! label matchers) and its grouping labels (`by`, `without`, `on`, `ignoring`, `group_left`,
//! `group_right`). Enough of PromQL's lexer to find them (strings, ranges and durations
//! skipped; function and aggregation names told apart); whether the expression parses at all is
//! promtool's to say (`promtool check rules`), and the tests ask it first.

/// A metric named in an expression, with its matchers `(label, op, value)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub name: String,
    pub matchers: Vec<(String, String, String)>,
}

/// The selectors and grouping label lists of one expression.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub selectors: Vec<Selector>,
    pub grouping: Vec<Vec<String>>,
}

/// Aggregation operators: followed by `by`/`without` or `(`, never metrics.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords that take a label list in parentheses.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Other keywords (binary operators, modifiers, literals).
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// The metrics and labels `expr` names. Panics on what this lexer does not follow (a selector
/// without a metric name, an unterminated string), so a test cannot pass by misreading.
pub fn names(expr: &str) -> Names {
    let b: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut out = Names::default();
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = string(&b, i, expr).1;
        } else if c == '[' {
            // A range or a subquery's: durations only.
            while i < b.len() && b[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            panic!("a selector without a metric name is not followed: {expr}");
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == ':') {
                i += 1;
            }
            let word: String = b[start..i].iter().collect();
            let next = skip_ws(i);
            let paren = next < b.len() && b[next] == '(';
            if GROUPING.contains(&word.as_str()) {
                if paren {
                    let (labels, end) = label_list(&b, next, expr);
                    out.grouping.push(labels);
                    i = end;
                }
            } else if paren
                || AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.as_str())
            {
                // A function call, an aggregation, a keyword.
            } else {
                let mut sel = Selector {
                    name: word,
                    matchers: vec![],
                };
                if next < b.len() && b[next] == '{' {
                    let (matchers, end) = matchers(&b, next, expr);
                    sel.matchers = matchers;
                    i = end;
                }
                out.selectors.push(sel);
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`5m`, `1h30m`, `0x1f`, `1e3`).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The string literal at `b[i]`: (its value, the index after it).
fn string(b: &[char], i: usize, expr: &str) -> (String, usize) {
    let quote = b[i];
    let mut j = i + 1;
    let mut v = String::new();
    while j < b.len() && b[j] != quote {
        if b[j] == '\\' && quote != '`' && j + 1 < b.len() {
            j += 1;
        }
        v.push(b[j]);
        j += 1;
    }
    assert!(j < b.len(), "unterminated string in {expr}");
    (v, j + 1)
}

/// The label list in parentheses at `b[i]` (`(job, instance)`): (labels, index after it).
fn label_list(b: &[char], i: usize, expr: &str) -> (Vec<String>, usize) {
    let end = (i..b.len())
        .find(|j| b[*j] == ')')
        .unwrap_or_else(|| panic!("unclosed label list in {expr}"));
    let inner: String = b[i + 1..end].iter().collect();
    let labels = inner
        .split(',')
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    (labels, end + 1)
}

/// The matchers in braces at `b[i]`: (`(label, op, value)`s, index after the closing brace).
fn matchers(b: &[char], i: usize, expr: &str) -> (Vec<(String, String, String)>, usize) {
    let mut j = i + 1;
    let mut out = vec![];
    loop {
        while j < b.len() && (b[j].is_whitespace() || b[j] == ',') {
            j += 1;
        }
        assert!(j < b.len(), "unclosed selector in {expr}");
        if b[j] == '}' {
            return (out, j + 1);
        }
        let start = j;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == '_') {
            j += 1;
        }
        let label: String = b[start..j].iter().collect();
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        let op_start = j;
        while j < b.len() && matches!(b[j], '=' | '!' | '~') {
            j += 1;
        }
        let op: String = b[op_start..j].iter().collect();
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        assert!(
            !label.is_empty() && ["=", "!=", "=~", "!~"].contains(&op.as_str()) && j < b.len(),
            "a matcher this lexer does not follow at {} in {expr}",
            start
        );
        let (value, end) = string(b, j, expr);
        out.push((label, op, value));
        j = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(name: &str, m: &[(&str, &str, &str)]) -> Selector {
        Selector {
            name: name.into(),
            matchers: m
                .iter()
                .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                .collect(),
        }
    }

    #[test]
    fn selectors_and_grouping_are_found_and_functions_strings_and_durations_are_not() {
        let n = names(
            r#"sum by (vip, backend) (rate(lb_backend_packets_total{vip=~"a|b", job="x"}[5m]))
               / on (vip) group_left () sum without(instance)(rate(lb_x[1m] offset 5m)) > 0.8
               or vector(0) and absent(up{job="lb-metrics"})"#,
        );
        assert_eq!(
            n.selectors,
            vec![
                sel(
                    "lb_backend_packets_total",
                    &[("vip", "=~", "a|b"), ("job", "=", "x")]
                ),
                sel("lb_x", &[]),
                sel("up", &[("job", "=", "lb-metrics")]),
            ]
        );
        assert_eq!(
            n.grouping,
            vec![
                vec!["vip".to_string(), "backend".into()],
                vec!["vip".to_string()],
                vec![],
                vec!["instance".to_string()],
            ]
        );
    }

    #[test]
    fn an_aggregation_with_its_grouping_after_the_parentheses_is_no_metric() {
        let n = names(r#"count(lb_up{state!="a,b}"}) by (job)"#);
        assert_eq!(n.selectors, vec![sel("lb_up", &[("state", "!=", "a,b}")])]);
        assert_eq!(n.grouping, vec![vec!["job".to_string()]]);
    }
}
