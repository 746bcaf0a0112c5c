//! Diagnostics: one problem in a pipeline file, printed `file:line:col: message`.

use std::fmt;

/// A position in a source file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// One problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The file as the user named it.
    pub file: String,
    /// Where in the file.
    pub pos: Pos,
    /// What is wrong, lowercase, naming the field.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.pos.line, self.pos.col, self.message
        )
    }
}

/// Collects diagnostics for one file.
#[derive(Debug, Default)]
pub struct Diagnostics {
    file: String,
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Starts an empty collection for `file`.
    pub fn new(file: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            items: Vec::new(),
        }
    }

    /// Records a problem at `pos`.
    pub fn push(&mut self, pos: Pos, message: impl Into<String>) {
        self.items.push(Diagnostic {
            file: self.file.clone(),
            pos,
            message: message.into(),
        });
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The diagnostics, sorted by position.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by_key(|d| d.pos);
        self.items.dedup();
        self.items
    }
}
