//! The runs table's `/` filter and sort orders (pure functions, unit-tested).
//!
//! Filter syntax: whitespace-separated terms, all of which must match.
//! - `status:running` (a unique prefix such as `status:run` works; `status:done,failed` is either)
//! - `kind:learn` / `kind:synth`
//! - `tag:best` (exact tag; `tag:a,b` is either)
//! - any other word matches case-insensitively as a substring of the id, scene, parent, config
//!   deltas (`lr=0.001`) or tags.
//! - a leading `!` negates a term: `!status:failed`, `!coffee`.

use std::cmp::Ordering;

use crate::store::{RunKind, RunStatus};

use super::backend::RunRow;

/// One parsed filter term.
#[derive(Clone, Debug, PartialEq)]
pub enum Term {
    /// The run's status is one of these.
    Status(Vec<RunStatus>),
    /// The run's kind is one of these.
    Kind(Vec<RunKind>),
    /// The run has one of these tags.
    Tag(Vec<String>),
    /// Lowercase text found in the id, scene, parent, deltas or tags.
    Text(String),
    /// The term does not match.
    Not(Box<Term>),
}

/// A parsed filter: every term must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// The terms.
    pub terms: Vec<Term>,
}

fn parse_status(value: &str) -> Result<RunStatus, String> {
    let value = value.to_lowercase();
    let found: Vec<RunStatus> = RunStatus::ALL
        .into_iter()
        .filter(|s| s.as_str().starts_with(&value))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        _ if value.is_empty() => Err("status: needs a value".into()),
        [] => Err(format!(
            "unknown status `{value}` (queued, running, done, failed, cancelled, interrupted)"
        )),
        _ => Err(format!("status `{value}` is ambiguous")),
    }
}

fn parse_kind(value: &str) -> Result<RunKind, String> {
    match value.to_lowercase().as_str() {
        v if !v.is_empty() && "learn".starts_with(v) => Ok(RunKind::Learn),
        v if !v.is_empty() && "synth".starts_with(v) => Ok(RunKind::Synth),
        v => Err(format!("unknown kind `{v}` (learn or synth)")),
    }
}

fn parse_term(word: &str) -> Result<Term, String> {
    if let Some(rest) = word.strip_prefix('!') {
        return Ok(Term::Not(Box::new(parse_term(rest)?)));
    }
    let values = |v: &str| -> Vec<String> {
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    match word.split_once(':') {
        Some((key @ ("status" | "kind" | "tag"), "")) => Err(format!("{key}: needs a value")),
        Some(("status", v)) => Ok(Term::Status(
            values(v)
                .iter()
                .map(|s| parse_status(s))
                .collect::<Result<_, _>>()?,
        )),
        Some(("kind", v)) => Ok(Term::Kind(
            values(v)
                .iter()
                .map(|s| parse_kind(s))
                .collect::<Result<_, _>>()?,
        )),
        Some(("tag", v)) => Ok(Term::Tag(values(v))),
        _ => Ok(Term::Text(word.to_lowercase())),
    }
}

impl Filter {
    /// Parses `text`; the error names the first bad term.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let terms = text
            .split_whitespace()
            .map(parse_term)
            .collect::<Result<_, _>>()?;
        Ok(Filter { terms })
    }

    /// Parses what it can: good terms apply, and the first bad term's error is returned with
    /// them (so a half-typed `status:` does not hide every run).
    pub fn parse_lenient(text: &str) -> (Filter, Option<String>) {
        let mut terms = Vec::new();
        let mut error = None;
        for word in text.split_whitespace() {
            match parse_term(word) {
                Ok(t) => terms.push(t),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        (Filter { terms }, error)
    }

    /// Whether no term is set.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether `row` passes every term.
    pub fn matches(&self, row: &RunRow) -> bool {
        self.terms.iter().all(|t| term_matches(t, row))
    }
}

fn term_matches(term: &Term, row: &RunRow) -> bool {
    match term {
        Term::Status(list) => list.contains(&row.status),
        Term::Kind(list) => list.contains(&row.kind),
        Term::Tag(list) => row.tags.iter().any(|t| list.contains(t)),
        Term::Not(inner) => !term_matches(inner, row),
        Term::Text(text) => {
            let has = |s: &str| s.to_lowercase().contains(text.as_str());
            has(row.id.as_str())
                || has(row.kind.as_str())
                || has(row.status.as_str())
                || row.scene.as_deref().is_some_and(has)
                || row.parent.as_ref().is_some_and(|p| has(p.as_str()))
                || row
                    .config_deltas
                    .iter()
                    .any(|(k, v)| has(&format!("{}={v}", short_key(k))))
                || row.tags.iter().any(|t| has(t))
        }
    }
}

/// A config key without its `learn.` / `synth.` section (for listings).
pub fn short_key(key: &str) -> &str {
    key.strip_prefix("learn.")
        .or_else(|| key.strip_prefix("synth."))
        .unwrap_or(key)
}

/// Orders of the runs table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Creation time (id order).
    #[default]
    Created,
    /// Status, then creation time.
    Status,
    /// Kind, then creation time.
    Kind,
    /// Scene label, then creation time.
    Scene,
    /// Final loss (runs without one last), then creation time.
    Loss,
}

impl SortKey {
    /// All keys in the order `o` cycles through them.
    pub const ALL: [SortKey; 5] = [
        SortKey::Created,
        SortKey::Status,
        SortKey::Kind,
        SortKey::Scene,
        SortKey::Loss,
    ];

    /// The next key in the cycle.
    pub fn next(self) -> SortKey {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    /// Lowercase name for the title bar.
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Created => "created",
            SortKey::Status => "status",
            SortKey::Kind => "kind",
            SortKey::Scene => "scene",
            SortKey::Loss => "loss",
        }
    }
}

fn status_rank(s: RunStatus) -> usize {
    // Live runs first.
    match s {
        RunStatus::Running => 0,
        RunStatus::Queued => 1,
        RunStatus::Failed => 2,
        RunStatus::Interrupted => 3,
        RunStatus::Cancelled => 4,
        RunStatus::Done => 5,
    }
}

/// Compares two rows by `key` (ascending in the key's natural direction, `reverse` flips it);
/// ties break newest first.
pub fn compare_rows(a: &RunRow, b: &RunRow, key: SortKey, reverse: bool) -> Ordering {
    let newest_first = b.id.cmp(&a.id);
    let primary = match key {
        SortKey::Created => newest_first,
        SortKey::Status => status_rank(a.status).cmp(&status_rank(b.status)),
        SortKey::Kind => a.kind.cmp(&b.kind),
        SortKey::Scene => a
            .scene
            .as_deref()
            .unwrap_or("\u{10ffff}")
            .cmp(b.scene.as_deref().unwrap_or("\u{10ffff}")),
        SortKey::Loss => match (a.final_loss, b.final_loss) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        },
    };
    let primary = if reverse { primary.reverse() } else { primary };
    primary.then(newest_first)
}

/// Indices of `rows` that pass `filter`, in `key` order.
pub fn filter_and_sort(
    rows: &[RunRow],
    filter: &Filter,
    key: SortKey,
    reverse: bool,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..rows.len())
        .filter(|&i| filter.is_empty() || filter.matches(&rows[i]))
        .collect();
    // Rows come newest first from the backend: the default order needs no sort.
    if key != SortKey::Created || reverse {
        idx.sort_by(|&a, &b| compare_rows(&rows[a], &rows[b], key, reverse));
    }
    idx
}
