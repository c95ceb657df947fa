//! Reading the config's YAML so that every mistake in its shape is reported at once, with its
//! path, in the config's own words.
//!
//! serde stops at the first error and speaks Rust (`invalid type: string "ten", expected i64`).
//! So the text is first read into a [`Node`] tree, every key kept (bad YAML syntax is then the
//! only mistake that stops everything, with its line and column); duplicate keys are found in the
//! tree; then the `Raw*` structs are deserialized from the tree by [`De`], which says what it
//! expected and found in YAML's terms (a number, a string, a list, a map) and where. After a
//! mistake the key or item at fault is set aside ([`Node::Gone`]) and deserialization starts
//! again, until the tree deserializes: each round finds one more mistake, and a config has few.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer as _, Visitor};

use super::Problem;

/// At most this many shape problems are reported (each costs one pass over the tree).
const MAX_PROBLEMS: usize = 50;

/// A YAML document as a tree, keeping every key of a map in order (duplicates too).
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// `~`, `null` or nothing.
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
    /// Set aside after a problem: an absent key, or an empty item of a list.
    Gone,
}

/// Where a node is: `vips[1].backends[0].weight`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Path(Vec<Seg>);

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Path {
    fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }

    fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Reads YAML `text` into `T`, or says everything wrong with its shape.
pub fn read<T: DeserializeOwned>(text: &str) -> Result<T, Vec<Problem>> {
    let mut root = parse(text).map_err(|p| vec![p])?;
    let mut problems = Vec::new();
    duplicates(&mut root, &Path::default(), &mut problems);
    loop {
        match T::deserialize(De::new(&root, Path::default())) {
            Ok(v) if problems.is_empty() => return Ok(v),
            Ok(_) => return Err(problems),
            Err(m) => {
                let path = m.path.clone().unwrap_or_default();
                problems.push(m.problem());
                // Nothing is left to read once the whole document is set aside.
                if path.0.is_empty() || !root.set_aside(&path.0) || problems.len() >= MAX_PROBLEMS {
                    return Err(problems);
                }
            }
        }
    }
}

/// The tree of `text`; a syntax error is the one problem, at its line and column.
fn parse(text: &str) -> Result<Node, Problem> {
    let mut options = serde_saphyr::options::Options::default();
    // Repeated keys reach the tree, where they are reported with their path.
    options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::PassThrough;
    // `yes`, `on`, ... stay strings in the tree (a bool target still takes them, see
    // `yaml11_bool`), so a name spelt `on` is not read as `true`.
    options.strict_booleans = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| {
        let path = match e.location() {
            Some(l) => format!("line {}, column {}", l.line(), l.column()),
            None => "(top level)".to_string(),
        };
        Problem {
            path,
            message: format!("not YAML: {}", syntax_message(&e)),
        }
    })
}

/// serde-saphyr's message without the location it appends (the problem's path holds it).
fn syntax_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let text = match text.rsplit_once(" at line ") {
        Some((head, _)) => head.to_string(),
        None => text,
    };
    text.trim().to_string()
}

/// Reports every repeated key of every map, and sets the repeats aside (the first one stands).
fn duplicates(node: &mut Node, path: &Path, problems: &mut Vec<Problem>) {
    match node {
        Node::Map(entries) => {
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in entries.iter_mut() {
                if !seen.insert(k.clone()) {
                    problems.push(Problem {
                        path: path.to_string(),
                        message: format!("duplicate key {k}"),
                    });
                    *v = Node::Gone;
                } else {
                    duplicates(v, &path.key(k), problems);
                }
            }
        }
        Node::Seq(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                duplicates(v, &path.index(i), problems);
            }
        }
        _ => {}
    }
}

impl Node {
    /// Sets the node at `path` aside; false if there is none (or it already is).
    fn set_aside(&mut self, path: &[Seg]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return !matches!(std::mem::replace(self, Node::Gone), Node::Gone);
        };
        let child = match (self, first) {
            (Node::Map(entries), Seg::Key(k)) => entries
                .iter_mut()
                .find(|(key, v)| key == k && *v != Node::Gone)
                .map(|(_, v)| v),
            (Node::Seq(items), Seg::Index(i)) => items.get_mut(*i),
            _ => None,
        };
        child.is_some_and(|c| c.set_aside(rest))
    }

    /// The node as a problem names what it found: `"ten"`, `1.5`, `a list`.
    fn found(&self) -> String {
        match self {
            Node::Null | Node::Gone => "nothing".into(),
            Node::Bool(b) => b.to_string(),
            Node::Int(n) => n.to_string(),
            Node::Float(x) => x.to_string(),
            Node::Str(s) => format!("{s:?}"),
            Node::Seq(_) => "a list".into(),
            Node::Map(_) => "a map".into(),
        }
    }

    /// A scalar as text, for a key or a string field (`name: 2024` is the string "2024").
    fn text(&self) -> Option<String> {
        match self {
            Node::Str(s) => Some(s.clone()),
            Node::Int(n) => Some(n.to_string()),
            Node::Float(x) => Some(x.to_string()),
            Node::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

impl<'de> de::Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = a.next_element()? {
            items.push(v);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = a.next_entry::<Node, Node>()? {
            let key = k.text().unwrap_or_else(|| k.found());
            entries.push((key, v));
        }
        Ok(Node::Map(entries))
    }
}

/// A mistake in the shape of the config, and where (filled in on the way out).
#[derive(Debug)]
pub struct Mistake {
    path: Option<Path>,
    what: What,
}

#[derive(Debug)]
enum What {
    /// A node of the wrong kind: `expected a number, found "ten"`.
    Kind {
        expected: &'static str,
        found: String,
    },
    /// A key the struct does not have (the last segment of the path), and those it has.
    UnknownKey {
        known: &'static [&'static str],
    },
    /// A key the struct needs (`node`), under the path.
    Missing(&'static str),
    Other(String),
}

impl Mistake {
    fn at(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.clone());
        }
        self
    }

    fn kind(path: &Path, expected: &'static str, node: &Node) -> Self {
        let expected = match (expected, node) {
            ("a number", Node::Float(_)) => "a whole number",
            (e, _) => e,
        };
        Self {
            path: Some(path.clone()),
            what: What::Kind {
                expected,
                found: node.found(),
            },
        }
    }

    fn problem(&self) -> Problem {
        let path = self.path.clone().unwrap_or_default();
        let message = match &self.what {
            What::Kind { expected, found } => format!("expected {expected}, found {found}"),
            What::UnknownKey { known } => {
                let key = match path.0.last() {
                    Some(Seg::Key(k)) => k.as_str(),
                    _ => "",
                };
                match suggest(key, known) {
                    Some(s) => format!("unknown key (did you mean {s}?)"),
                    None => format!("unknown key (the keys here are {})", known.join(", ")),
                }
            }
            What::Missing(_) => "missing".to_string(),
            What::Other(m) => m.clone(),
        };
        Problem {
            path: path.to_string(),
            message,
        }
    }
}

impl fmt::Display for Mistake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.problem())
    }
}

impl std::error::Error for Mistake {}

impl de::Error for Mistake {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            path: None,
            what: What::Other(msg.to_string()),
        }
    }

    fn invalid_value(unexp: de::Unexpected, _exp: &dyn de::Expected) -> Self {
        // Only a number out of the target's range gets here (the kinds are checked before).
        Self::custom(format!("{} is out of range", unexpected(unexp)))
    }

    fn unknown_field(_field: &str, known: &'static [&'static str]) -> Self {
        Self {
            path: None,
            what: What::UnknownKey { known },
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Self {
            path: None,
            what: What::Missing(field),
        }
    }
}

fn unexpected(u: de::Unexpected) -> String {
    match u {
        de::Unexpected::Signed(n) => n.to_string(),
        de::Unexpected::Unsigned(n) => n.to_string(),
        de::Unexpected::Float(x) => x.to_string(),
        de::Unexpected::Str(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// The known key closest to `key`, if it is close: one edit (a letter added, dropped, changed,
/// or two swapped) for short keys, two for keys of five letters or more.
fn suggest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let budget = if key.chars().count() >= 5 { 2 } else { 1 };
    known
        .iter()
        .map(|k| (edits(key, k), *k))
        .filter(|(d, _)| *d <= budget)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edits between `a` and `b`: insertions, deletions, substitutions and swaps of neighbours
/// (the optimal string alignment distance).
fn edits(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// YAML 1.1's other spellings of true and false, which a bool field takes (the tree keeps them
/// as strings).
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// Deserializes a `Raw*` struct from a [`Node`], checking each node's kind against what the
/// struct asks for. A node set aside reads as absent (a key) or empty (an item of a list).
pub struct De<'a> {
    node: &'a Node,
    path: Path,
}

impl<'a> De<'a> {
    fn new(node: &'a Node, path: Path) -> Self {
        Self { node, path }
    }

    fn integer<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        let n = match self.node {
            Node::Int(n) => *n,
            Node::Gone => 0,
            // A quoted number is still the number.
            Node::Str(s) => match s.trim().parse::<i128>() {
                Ok(n) => n,
                Err(_) => return Err(Mistake::kind(&self.path, "a number", self.node)),
            },
            other => return Err(Mistake::kind(&self.path, "a number", other)),
        };
        let r = match (i64::try_from(n), u64::try_from(n)) {
            (Ok(i), _) => v.visit_i64(i),
            (_, Ok(u)) => v.visit_u64(u),
            _ => v.visit_i128(n),
        };
        r.map_err(|e: Mistake| e.at(&self.path))
    }

    fn float<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        match self.node {
            Node::Float(x) => v.visit_f64(*x),
            Node::Int(n) => v.visit_f64(*n as f64),
            Node::Gone => v.visit_f64(0.0),
            other => Err(Mistake::kind(&self.path, "a number", other)),
        }
    }

    fn string<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        match (self.node, self.node.text()) {
            (Node::Gone, _) => v.visit_str(""),
            (_, Some(s)) => v.visit_string(s),
            (other, None) => Err(Mistake::kind(&self.path, "a string", other)),
        }
        .map_err(|e| e.at(&self.path))
    }

    fn map<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        const NONE: &[(String, Node)] = &[];
        let entries = match self.node {
            Node::Map(entries) => entries.as_slice(),
            // `node:` with nothing after it, like `node: {}`.
            Node::Null | Node::Gone => NONE,
            other => return Err(Mistake::kind(&self.path, "a map", other)),
        };
        let access = MapAccess {
            entries: entries.iter().filter(|(_, v)| *v != Node::Gone),
            value: None,
            path: &self.path,
        };
        v.visit_map(access).map_err(|e| match e.what {
            What::Missing(field) if e.path.is_none() => e.at(&self.path.key(field)),
            _ => e.at(&self.path),
        })
    }
}

impl<'de> de::Deserializer<'de> for De<'_> {
    type Error = Mistake;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        match self.node {
            Node::Null | Node::Gone => v.visit_unit(),
            Node::Bool(b) => v.visit_bool(*b),
            Node::Int(_) => self.integer(v),
            Node::Float(x) => v.visit_f64(*x),
            Node::Str(s) => v.visit_str(s),
            Node::Seq(_) => self.deserialize_seq(v),
            Node::Map(_) => self.map(v),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        match self.node {
            Node::Bool(b) => v.visit_bool(*b),
            Node::Str(s) if yaml11_bool(s).is_some() => v.visit_bool(yaml11_bool(s) == Some(true)),
            Node::Gone => v.visit_bool(false),
            other => Err(Mistake::kind(&self.path, "true or false", other)),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_i128<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_u128<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.integer(v)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.float(v)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.float(v)
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.string(v)
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.string(v)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.string(v)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.string(v)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.string(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        match self.node {
            Node::Null | Node::Gone => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Mistake> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Mistake> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        let items = match self.node {
            Node::Seq(items) => items.as_slice(),
            Node::Null | Node::Gone => &[],
            other => return Err(Mistake::kind(&self.path, "a list", other)),
        };
        let access = SeqAccess {
            items: items.iter().enumerate(),
            path: &self.path,
        };
        v.visit_seq(access).map_err(|e| e.at(&self.path))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, Mistake> {
        self.deserialize_seq(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, Mistake> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.map(v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Mistake> {
        self.map(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Mistake> {
        match self.node.text() {
            Some(s) => v.visit_enum(s.into_deserializer()),
            None => Err(Mistake::kind(&self.path, "a string", self.node)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        self.string(v)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mistake> {
        v.visit_unit()
    }
}

struct MapAccess<'a, I> {
    entries: I,
    value: Option<(&'a Node, Path)>,
    path: &'a Path,
}

impl<'de, 'a, I: Iterator<Item = &'a (String, Node)>> de::MapAccess<'de> for MapAccess<'a, I> {
    type Error = Mistake;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Mistake> {
        let Some((k, v)) = self.entries.next() else {
            return Ok(None);
        };
        let path = self.path.key(k);
        let key = seed
            .deserialize(k.as_str().into_deserializer())
            .map_err(|e: Mistake| e.at(&path))?;
        self.value = Some((v, path));
        Ok(Some(key))
    }

    fn next_value_seed<S: de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, Mistake> {
        let (node, path) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value without its key"))?;
        seed.deserialize(De::new(node, path.clone()))
            .map_err(|e| e.at(&path))
    }
}

struct SeqAccess<'a, I> {
    items: I,
    path: &'a Path,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a Node)>> de::SeqAccess<'de> for SeqAccess<'a, I> {
    type Error = Mistake;

    fn next_element_seed<S: de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, Mistake> {
        let Some((i, node)) = self.items.next() else {
            return Ok(None);
        };
        let path = self.path.index(i);
        seed.deserialize(De::new(node, path.clone()))
            .map(Some)
            .map_err(|e| e.at(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};

    /// Valid: each test breaks it in one or more places.
    const GOOD: &str = "node:
  interfaces: [eth0]
  source_v4: 10.0.0.1
  table_size: 1009
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    health_check: { type: tcp, interval: 2s }
    backends:
      - { address: 10.1.0.1, weight: 2 }
      - { address: 10.1.0.2, weight: 1 }
";

    /// GOOD with `from` replaced by `to` (which must be there).
    fn edit(from: &str, to: &str) -> String {
        assert!(
            GOOD.contains(from),
            "the test edits text that is not there: {from:?}"
        );
        GOOD.replacen(from, to, 1)
    }

    /// The shape problems of `text`, as `lb check` prints them.
    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "t.yaml") {
            Err(ConfigError::Parse { problems, .. }) => {
                let got: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                for p in &got {
                    for rust in [
                        "i64",
                        "u16",
                        "Option",
                        "struct",
                        "Raw",
                        "Policy",
                        "invalid type",
                    ] {
                        assert!(!p.contains(rust), "Rust's words in {p:?}");
                    }
                }
                got
            }
            other => panic!("expected shape problems, got {other:?}"),
        }
    }

    #[test]
    fn the_sample_parses() {
        Config::parse(GOOD, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_string_where_a_number_goes_says_both() {
        assert_eq!(
            problems(&edit("weight: 1 }", "weight: ten }")),
            ["vips[0].backends[1].weight: expected a number, found \"ten\""]
        );
    }

    #[test]
    fn a_fraction_where_a_whole_number_goes_says_whole() {
        assert_eq!(
            problems(&edit("port: 80", "port: 80.5")),
            ["vips[0].port: expected a whole number, found 80.5"]
        );
    }

    #[test]
    fn a_list_where_a_map_goes_says_both() {
        assert_eq!(
            problems(&edit(
                "health_check: { type: tcp, interval: 2s }",
                "health_check: [tcp]"
            )),
            ["vips[0].health_check: expected a map, found a list"]
        );
    }

    #[test]
    fn a_map_where_a_list_goes_says_both() {
        assert_eq!(
            problems(&edit("interfaces: [eth0]", "interfaces: { name: eth0 }")),
            ["node.interfaces: expected a list, found a map"]
        );
    }

    #[test]
    fn a_list_where_a_string_goes_says_both() {
        assert_eq!(
            problems(&edit("name: web", "name: [web]")),
            ["vips[0].name: expected a string, found a list"]
        );
    }

    #[test]
    fn a_word_where_true_or_false_goes_says_both() {
        assert_eq!(
            problems(&edit(
                "  table_size: 1009",
                "  table_size: 1009\n  nexthop_check: maybe"
            )),
            ["node.nexthop_check: expected true or false, found \"maybe\""]
        );
    }

    #[test]
    fn a_misspelt_key_is_unknown_and_the_key_meant_is_suggested() {
        assert_eq!(
            problems(&edit("  table_size: 1009", "  tabel_size: 1009")),
            ["node.tabel_size: unknown key (did you mean table_size?)"]
        );
        assert_eq!(
            problems(&edit(
                "{ type: tcp, interval: 2s }",
                "{ type: tcp, intreval: 2s }"
            )),
            ["vips[0].health_check.intreval: unknown key (did you mean interval?)"]
        );
    }

    #[test]
    fn an_unknown_key_like_no_other_lists_the_keys_there() {
        assert_eq!(
            problems(&edit(
                "    protocol: tcp\n",
                "    protocol: tcp\n    colour: blue\n"
            )),
            [
                "vips[0].colour: unknown key (the keys here are name, address, port, port_range, protocol, mode, hash, affinity_timeout, table_size, backends, health_check, passive_health, source_ranges, new_flow_budget, algorithm)"
            ]
        );
    }

    #[test]
    fn a_repeated_key_is_named_at_its_map() {
        assert_eq!(
            problems(&edit("    port: 80\n", "    port: 80\n    port: 81\n")),
            ["vips[0]: duplicate key port"]
        );
        assert_eq!(
            problems(&edit(
                "{ address: 10.1.0.1, weight: 2 }",
                "{ address: 10.1.0.1, address: 10.1.0.9 }"
            )),
            ["vips[0].backends[0]: duplicate key address"]
        );
    }

    #[test]
    fn a_missing_node_section_is_missing() {
        assert_eq!(problems("vips: []\n"), ["node: missing"]);
        assert_eq!(problems(""), ["node: missing"], "an empty file");
    }

    #[test]
    fn bad_yaml_is_one_problem_at_its_line_and_column() {
        let got = problems("node:\n  interfaces: [eth0\n  x: 1\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("line 3, column 4: not YAML: "),
            "{got:?}"
        );
    }

    #[test]
    fn a_config_that_is_not_a_map_is_one_problem() {
        assert_eq!(
            problems("- node\n"),
            ["(top level): expected a map, found a list"]
        );
    }

    #[test]
    fn four_mistakes_are_four_problems_each_with_its_path() {
        // A string where a number goes, an unknown key in a VIP, an unknown key in a backend, a
        // list where a map goes; then the same with a repeated key for the list.
        let four = edit("weight: 1 }", "weight: ten }")
            .replace(
                "    protocol: tcp\n",
                "    protocol: tcp\n    colour: blue\n",
            )
            .replace(
                "{ address: 10.1.0.1, weight: 2 }",
                "{ address: 10.1.0.1, wieght: 2 }",
            );
        let want = [
            "vips[0].backends[1].weight: expected a number, found \"ten\"",
            "vips[0].colour: unknown key (the keys here are name, ",
            "vips[0].backends[0].wieght: unknown key (did you mean weight?)",
        ];
        let list = four.replace(
            "health_check: { type: tcp, interval: 2s }",
            "health_check: [tcp]",
        );
        let repeated = four.replace("    port: 80\n", "    port: 80\n    port: 81\n");
        for (text, fourth) in [
            (list, "vips[0].health_check: expected a map, found a list"),
            (repeated, "vips[0]: duplicate key port"),
        ] {
            let got = problems(&text);
            assert_eq!(got.len(), 4, "{got:#?}");
            for w in want.iter().chain([&fourth]) {
                assert_eq!(
                    got.iter().filter(|g| g.starts_with(w)).count(),
                    1,
                    "{w:?} in {got:#?}"
                );
            }
        }
    }

    #[test]
    fn scalars_are_read_as_the_field_wants_them() {
        // A number is a string where a string goes, a quoted number a number where a number
        // goes, and YAML 1.1's yes and no are true and false where those go but words elsewhere.
        let text = edit("name: web", "name: 2024")
            .replace("port: 80", "port: \"80\"")
            .replace(
                "  table_size: 1009",
                "  table_size: 1009\n  nexthop_check: yes",
            )
            .replace("interfaces: [eth0]", "interfaces: [on]");
        let c = Config::parse(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.vips[0].spec.name, "2024");
        assert_eq!(c.vips[0].spec.port, 80);
        assert!(c.node.spec.nexthop_check);
        assert_eq!(c.node.interfaces, ["on"]);
    }

    #[test]
    fn keys_are_suggested_within_one_edit_or_two_for_long_keys() {
        use super::suggest;
        let known = &["port", "protocol", "table_size", "weight"];
        assert_eq!(suggest("prot", known), Some("port"), "a swap is one edit");
        assert_eq!(suggest("tabel_size", known), Some("table_size"));
        assert_eq!(suggest("tablesize", known), Some("table_size"));
        assert_eq!(suggest("colour", known), None);
        assert_eq!(suggest("pt", known), None, "two edits in a short key");
    }
}
