//! A YAML tree that remembers where every node came from, so that validation can name
//! the line and column of each problem (serde-based YAML loaders stop at the first error
//! and lose positions). Built on `yaml-rust2`'s event parser.

use crate::diag::Pos;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub pos: Pos,
    /// What it is.
    pub kind: NodeKind,
}

/// The shape of a YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `quoted` is true when it was written in quotes or as a block.
    Scalar {
        /// The text.
        text: String,
        /// Whether it was quoted (then it is always a string).
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order; keys are scalars with their positions.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The scalar text when this node is a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// True for an unquoted `~`, `null`, or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, quoted: false } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A short name for the node's kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }

    /// Converts to JSON with YAML 1.2 core-schema scalar resolution.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            NodeKind::Scalar { text, quoted } => {
                if *quoted {
                    return Value::String(text.clone());
                }
                resolve_plain(text)
            }
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

fn resolve_plain(text: &str) -> serde_json::Value {
    use serde_json::Value;
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::from(i);
    }
    let looks_numeric = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && text.chars().any(|c| c.is_ascii_digit());
    if looks_numeric && let Ok(f) = text.parse::<f64>() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string()));
    }
    Value::String(text.to_string())
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    /// Where the parser stopped.
    pub pos: Pos,
    /// What it said.
    pub message: String,
}

fn pos_of(m: Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

/// The most aliases one document may use.
pub const MAX_ALIASES: u64 = 10_000;
/// The most that aliases may add to a document once expanded, weighed as one per node
/// plus one per byte of scalar text (what the file itself holds is bounded by its size).
/// Shared parameter blocks weigh hundreds; an alias bomb (anchors 10 wide, 8 deep)
/// weighs billions.
pub const MAX_ALIAS_EXPANSION: u64 = 1 << 21;

enum Frame {
    Seq(Pos, Vec<Node>, u64),
    Map(Pos, Vec<(Node, Node)>, Option<Node>, u64),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    /// Anchored nodes with their weights.
    anchors: HashMap<usize, (Node, u64)>,
    pending_anchor: Vec<usize>,
    root: Option<Node>,
    error: Option<SyntaxError>,
    aliases: u64,
    /// What aliases added so far.
    expanded: u64,
}

impl Builder {
    fn finish_node(&mut self, node: Node, anchor: usize, weight: u64) {
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), weight));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(_, items, w)) => {
                items.push(node);
                *w += weight;
            }
            Some(Frame::Map(_, entries, key, w)) => {
                *w += weight;
                match key.take() {
                    None => *key = Some(node),
                    Some(k) => entries.push((k, node)),
                }
            }
        }
    }

    /// Adds an alias's weight `w` to what aliases expanded; false (and an error at `pos`)
    /// when that passes the limit.
    fn weigh(&mut self, w: u64, pos: Pos) -> bool {
        self.expanded = self.expanded.saturating_add(w);
        if self.expanded > MAX_ALIAS_EXPANSION {
            self.error.get_or_insert(SyntaxError {
                pos,
                message: format!(
                    "aliases expand past {MAX_ALIAS_EXPANSION} nodes and bytes (an alias bomb?)"
                ),
            });
            return false;
        }
        true
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // After an error nothing more is built (an alias bomb stops growing here).
        if self.error.is_some() {
            return;
        }
        let pos = pos_of(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let w = 1 + text.len() as u64;
                self.finish_node(
                    Node {
                        pos,
                        kind: NodeKind::Scalar { text, quoted },
                    },
                    anchor,
                    w,
                );
            }
            Event::SequenceStart(anchor, _) => {
                self.pending_anchor.push(anchor);
                self.stack.push(Frame::Seq(pos, Vec::new(), 1));
            }
            Event::MappingStart(anchor, _) => {
                self.pending_anchor.push(anchor);
                self.stack.push(Frame::Map(pos, Vec::new(), None, 1));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let anchor = self.pending_anchor.pop().unwrap_or(0);
                let (node, w) = match self.stack.pop() {
                    Some(Frame::Seq(p, items, w)) => (
                        Node {
                            pos: p,
                            kind: NodeKind::Seq(items),
                        },
                        w,
                    ),
                    Some(Frame::Map(p, entries, _, w)) => (
                        Node {
                            pos: p,
                            kind: NodeKind::Map(entries),
                        },
                        w,
                    ),
                    None => return,
                };
                self.finish_node(node, anchor, w);
            }
            Event::Alias(id) => match self.anchors.get(&id).map(|(_, w)| *w) {
                Some(w) => {
                    self.aliases += 1;
                    if self.aliases > MAX_ALIASES {
                        self.error.get_or_insert(SyntaxError {
                            pos,
                            message: format!("more than {MAX_ALIASES} aliases"),
                        });
                        return;
                    }
                    // The expansion is weighed before it is copied.
                    if !self.weigh(w, pos) {
                        return;
                    }
                    let Some((mut node, _)) = self.anchors.get(&id).cloned() else {
                        return;
                    };
                    node.pos = pos;
                    self.finish_node(node, 0, w);
                }
                None => {
                    self.error.get_or_insert(SyntaxError {
                        pos,
                        message: "unknown alias".into(),
                    });
                }
            },
            _ => {}
        }
    }
}

/// Parses one YAML document into a positioned tree. An empty document is `None`.
pub fn parse(src: &str) -> Result<Option<Node>, SyntaxError> {
    // yaml-rust2 stops at a NUL as if the document ended there: a file would lose every
    // step after it without a word.
    if let Some(at) = src.find('\0') {
        let before = &src[..at];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        return Err(SyntaxError {
            pos: Pos { line, col },
            message: "a NUL byte is not allowed in a pipeline file".into(),
        });
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    parser.load(&mut builder, false).map_err(|e| SyntaxError {
        pos: pos_of(*e.marker()),
        message: e.info().to_string(),
    })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let node = parse("a:\n  b: 1\n  c: [x, 'y']\n")
            .expect("parses")
            .expect("not empty");
        let NodeKind::Map(entries) = &node.kind else {
            panic!("map expected")
        };
        let (k, v) = &entries[0];
        assert_eq!(k.pos, Pos { line: 1, col: 1 });
        let NodeKind::Map(inner) = &v.kind else {
            panic!("inner map")
        };
        assert_eq!(inner[1].0.pos, Pos { line: 3, col: 3 });
        assert_eq!(
            node.to_json(),
            serde_json::json!({"a": {"b": 1, "c": ["x", "y"]}})
        );
    }

    #[test]
    fn an_alias_bomb_is_refused_with_its_position_before_it_grows() {
        // 10 wide, 9 deep: 10^9 nodes once expanded.
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = format!("*a{}", i - 1);
            let row = [p.as_str(); 10].join(", ");
            src.push_str(&format!("a{i}: &a{i} [{row}]\n"));
        }
        let err = parse(&src).expect_err("bomb");
        assert!(err.message.contains("alias bomb"), "{}", err.message);
        // Refused at the alias that passes the limit (line 6: each weighs ~2 * 10^5).
        assert_eq!(err.pos.line, 6, "{:?}", err.pos);
        // Many small aliases are fine up to the count limit, then refused.
        let mut many = String::from("a: &a x\nl:\n");
        for _ in 0..MAX_ALIASES + 1 {
            many.push_str("  - *a\n");
        }
        let err = parse(&many).expect_err("too many");
        assert!(err.message.contains("aliases"), "{}", err.message);
        assert_eq!(err.pos.line as u64, MAX_ALIASES + 3);
    }

    #[test]
    fn a_nul_byte_is_refused_with_its_position() {
        let err = parse("a: 1\nb: x\0y\n").expect_err("nul");
        assert_eq!(err.pos, Pos { line: 2, col: 5 });
        assert!(err.message.contains("NUL"));
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [1, 2\nb: 3\n").expect_err("unclosed list");
        assert!(err.pos.line >= 1);
    }

    #[test]
    fn quoted_numbers_stay_strings_and_anchors_resolve() {
        let node = parse("x: &a {k: '1'}\ny: *a\nz: 1.5\nw: yes\n")
            .expect("parses")
            .expect("not empty");
        assert_eq!(
            node.to_json(),
            serde_json::json!({"x": {"k": "1"}, "y": {"k": "1"}, "z": 1.5, "w": "yes"})
        );
    }
}
