//! The keymap: one table of bindings that drives key handling, the `?` help and the hint bar.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Where a binding applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ctx {
    /// Everywhere (unless a text field takes the key).
    Global,
    /// The runs table.
    Runs,
    /// The run detail view.
    Detail,
    /// The compare view.
    Compare,
    /// A sweep's table.
    Sweep,
    /// The launch form.
    Launch,
    /// The jobs view.
    Jobs,
    /// The synthesis form.
    Synth,
}

impl Ctx {
    /// Heading in the help.
    pub fn title(self) -> &'static str {
        match self {
            Ctx::Global => "Everywhere",
            Ctx::Runs => "Runs",
            Ctx::Detail => "Run detail",
            Ctx::Compare => "Compare",
            Ctx::Sweep => "Sweep table",
            Ctx::Launch => "Launch form",
            Ctx::Jobs => "Jobs",
            Ctx::Synth => "Synthesis form",
        }
    }

    /// All contexts, in help order.
    pub const ALL: [Ctx; 8] = [
        Ctx::Global,
        Ctx::Runs,
        Ctx::Detail,
        Ctx::Compare,
        Ctx::Sweep,
        Ctx::Launch,
        Ctx::Synth,
        Ctx::Jobs,
    ];
}

/// What a key asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// Quit (runs in an engine go on).
    Quit,
    /// Quit at once.
    ForceQuit,
    /// Show the help.
    Help,
    /// Close / go back.
    Back,
    /// Show the runs table.
    ShowRuns,
    /// Show the jobs.
    ShowJobs,
    /// Open the learning launch form.
    NewLearn,
    /// Move up.
    Up,
    /// Move down.
    Down,
    /// Half a page up.
    PageUp,
    /// Half a page down.
    PageDown,
    /// To the top.
    Top,
    /// To the bottom.
    Bottom,
    /// Edit the filter.
    Filter,
    /// Next sort key.
    Sort,
    /// Reverse the sort.
    SortReverse,
    /// Mark / unmark the selected run.
    Mark,
    /// Unmark all.
    UnmarkAll,
    /// Open the selected item.
    Open,
    /// Tag the run(s).
    Tag,
    /// Compare the marked runs.
    Diff,
    /// Re-run the run.
    Rerun,
    /// Edit and re-run.
    EditRerun,
    /// Resume an interrupted run.
    Resume,
    /// Cancel the running run / job.
    Cancel,
    /// Delete the run(s).
    Delete,
    /// Synthesise from a learned run.
    Synth,
    /// Show the sweep (a tag) of the run(s) as a table.
    Sweep,
    /// Toggle log-y.
    LogY,
    /// Toggle EMA smoothing.
    Smooth,
    /// Next metric group / metric.
    NextMetric,
    /// Previous metric.
    PrevMetric,
    /// Previous output image.
    PrevImage,
    /// Next output image.
    NextImage,
    /// Focus the next pane.
    FocusNext,
    /// Show all keys, not only differing ones.
    ToggleAll,
    /// Next field (form).
    NextField,
    /// Previous field (form).
    PrevField,
    /// Complete a path (form).
    Complete,
    /// Launch (form).
    Submit,
    /// New random seed (form).
    NewSeed,
    /// Move the current box (synthesis form; help only: the form reads the key).
    MoveBox,
    /// Resize the current box (help only).
    ResizeBox,
    /// Add a box for the next placeholder (help only).
    NewBox,
    /// Remove the current box (help only).
    RemoveBox,
}

/// A key pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// A printable character (shift is part of the character).
    Ch(char),
    /// A special key.
    Code(KeyCode),
    /// Ctrl + character.
    Ctrl(char),
}

impl Key {
    /// Whether `ev` is this key.
    pub fn matches(self, ev: &KeyEvent) -> bool {
        let ctrl = ev.modifiers.contains(KeyModifiers::CONTROL);
        match self {
            Key::Ch(c) => !ctrl && ev.code == KeyCode::Char(c),
            Key::Ctrl(c) => ctrl && ev.code == KeyCode::Char(c),
            Key::Code(code) => ev.code == code,
        }
    }
}

/// One binding.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    /// Where it applies.
    pub ctx: Ctx,
    /// Its keys.
    pub keys: &'static [Key],
    /// The keys as shown (`j/↓`).
    pub label: &'static str,
    /// What it does.
    pub desc: &'static str,
    /// The command.
    pub cmd: Cmd,
    /// Shown in the hint bar.
    pub hint: bool,
}

use Key::{Ch, Code, Ctrl};

const fn b(
    ctx: Ctx,
    keys: &'static [Key],
    label: &'static str,
    desc: &'static str,
    cmd: Cmd,
    hint: bool,
) -> Binding {
    Binding {
        ctx,
        keys,
        label,
        desc,
        cmd,
        hint,
    }
}

const UP: &[Key] = &[Ch('k'), Code(KeyCode::Up)];
const DOWN: &[Key] = &[Ch('j'), Code(KeyCode::Down)];

/// Every binding. Context bindings win over global ones.
pub const BINDINGS: &[Binding] = &[
    // Global
    b(Ctx::Global, &[Ch('q')], "q", "quit", Cmd::Quit, true),
    b(
        Ctx::Global,
        &[Ctrl('c')],
        "C-c",
        "quit now",
        Cmd::ForceQuit,
        false,
    ),
    b(Ctx::Global, &[Ch('?')], "?", "help", Cmd::Help, true),
    b(
        Ctx::Global,
        &[Code(KeyCode::Esc)],
        "Esc",
        "back / close",
        Cmd::Back,
        false,
    ),
    b(Ctx::Global, &[Ch('1')], "1", "runs", Cmd::ShowRuns, false),
    b(Ctx::Global, &[Ch('2')], "2", "jobs", Cmd::ShowJobs, false),
    b(
        Ctx::Global,
        &[Ch('L')],
        "L",
        "new learning run",
        Cmd::NewLearn,
        false,
    ),
    // Runs
    b(Ctx::Runs, UP, "k/↑", "up", Cmd::Up, false),
    b(Ctx::Runs, DOWN, "j/↓", "down", Cmd::Down, false),
    b(
        Ctx::Runs,
        &[Code(KeyCode::PageUp), Ctrl('u')],
        "PgUp/C-u",
        "page up",
        Cmd::PageUp,
        false,
    ),
    b(
        Ctx::Runs,
        &[Code(KeyCode::PageDown), Ctrl('d')],
        "PgDn/C-d",
        "page down",
        Cmd::PageDown,
        false,
    ),
    b(
        Ctx::Runs,
        &[Ch('g'), Code(KeyCode::Home)],
        "g/Home",
        "top",
        Cmd::Top,
        false,
    ),
    b(
        Ctx::Runs,
        &[Ch('G'), Code(KeyCode::End)],
        "G/End",
        "bottom",
        Cmd::Bottom,
        false,
    ),
    b(
        Ctx::Runs,
        &[Code(KeyCode::Enter)],
        "Enter",
        "open",
        Cmd::Open,
        true,
    ),
    b(Ctx::Runs, &[Ch('/')], "/", "filter", Cmd::Filter, true),
    b(Ctx::Runs, &[Ch('o')], "o", "sort by", Cmd::Sort, false),
    b(
        Ctx::Runs,
        &[Ch('O')],
        "O",
        "reverse sort",
        Cmd::SortReverse,
        false,
    ),
    b(Ctx::Runs, &[Ch(' ')], "Space", "mark", Cmd::Mark, true),
    b(
        Ctx::Runs,
        &[Ch('u')],
        "u",
        "unmark all",
        Cmd::UnmarkAll,
        false,
    ),
    b(
        Ctx::Runs,
        &[Ch('d')],
        "d",
        "compare marked",
        Cmd::Diff,
        true,
    ),
    b(
        Ctx::Runs,
        &[Ch('t')],
        "t",
        "tag (-tag removes)",
        Cmd::Tag,
        false,
    ),
    b(Ctx::Runs, &[Ch('r')], "r", "re-run", Cmd::Rerun, true),
    b(
        Ctx::Runs,
        &[Ch('e')],
        "e",
        "edit & re-run",
        Cmd::EditRerun,
        false,
    ),
    b(
        Ctx::Runs,
        &[Ch('R')],
        "R",
        "resume interrupted",
        Cmd::Resume,
        false,
    ),
    b(Ctx::Runs, &[Ch('x')], "x", "cancel", Cmd::Cancel, false),
    b(Ctx::Runs, &[Ch('D')], "D", "delete", Cmd::Delete, false),
    b(
        Ctx::Runs,
        &[Ch('S')],
        "S",
        "synthesise from run",
        Cmd::Synth,
        false,
    ),
    b(
        Ctx::Runs,
        &[Ch('w')],
        "w",
        "sweep table (tag: filter, else the run's tag)",
        Cmd::Sweep,
        false,
    ),
    b(
        Ctx::Runs,
        &[Ch('L')],
        "L",
        "new learning run",
        Cmd::NewLearn,
        true,
    ),
    // Detail
    b(
        Ctx::Detail,
        &[Code(KeyCode::Tab)],
        "Tab",
        "focus next pane",
        Cmd::FocusNext,
        true,
    ),
    b(Ctx::Detail, UP, "k/↑", "scroll up", Cmd::Up, false),
    b(Ctx::Detail, DOWN, "j/↓", "scroll down", Cmd::Down, false),
    b(Ctx::Detail, &[Ch('l')], "l", "log-y", Cmd::LogY, true),
    b(Ctx::Detail, &[Ch('s')], "s", "smoothing", Cmd::Smooth, true),
    b(
        Ctx::Detail,
        &[Ch('c')],
        "c",
        "next chart",
        Cmd::NextMetric,
        true,
    ),
    b(
        Ctx::Detail,
        &[Code(KeyCode::Left)],
        "←",
        "previous output",
        Cmd::PrevImage,
        false,
    ),
    b(
        Ctx::Detail,
        &[Code(KeyCode::Right)],
        "→",
        "next output",
        Cmd::NextImage,
        true,
    ),
    b(Ctx::Detail, &[Ch('t')], "t", "tag", Cmd::Tag, false),
    b(Ctx::Detail, &[Ch('r')], "r", "re-run", Cmd::Rerun, true),
    b(
        Ctx::Detail,
        &[Ch('e')],
        "e",
        "edit & re-run",
        Cmd::EditRerun,
        false,
    ),
    b(Ctx::Detail, &[Ch('R')], "R", "resume", Cmd::Resume, false),
    b(Ctx::Detail, &[Ch('x')], "x", "cancel", Cmd::Cancel, false),
    b(
        Ctx::Detail,
        &[Ch('S')],
        "S",
        "synthesise",
        Cmd::Synth,
        false,
    ),
    b(
        Ctx::Detail,
        &[Ch('w')],
        "w",
        "sweep table of the run's tag",
        Cmd::Sweep,
        false,
    ),
    // Compare
    b(Ctx::Compare, UP, "k/↑", "scroll up", Cmd::Up, false),
    b(Ctx::Compare, DOWN, "j/↓", "scroll down", Cmd::Down, false),
    b(
        Ctx::Compare,
        &[Ch('a')],
        "a",
        "all keys / diff only",
        Cmd::ToggleAll,
        true,
    ),
    b(
        Ctx::Compare,
        &[Ch('m')],
        "m",
        "next metric",
        Cmd::NextMetric,
        true,
    ),
    b(
        Ctx::Compare,
        &[Ch('M')],
        "M",
        "previous metric",
        Cmd::PrevMetric,
        false,
    ),
    b(Ctx::Compare, &[Ch('l')], "l", "log-y", Cmd::LogY, true),
    b(
        Ctx::Compare,
        &[Ch('s')],
        "s",
        "smoothing",
        Cmd::Smooth,
        false,
    ),
    b(
        Ctx::Compare,
        &[Code(KeyCode::Left)],
        "←",
        "previous output",
        Cmd::PrevImage,
        false,
    ),
    b(
        Ctx::Compare,
        &[Code(KeyCode::Right)],
        "→",
        "next output",
        Cmd::NextImage,
        true,
    ),
    b(
        Ctx::Compare,
        &[Ch('w')],
        "w",
        "sweep table of the runs' common tag",
        Cmd::Sweep,
        false,
    ),
    // Sweep table
    b(Ctx::Sweep, UP, "k/↑", "up", Cmd::Up, false),
    b(Ctx::Sweep, DOWN, "j/↓", "down", Cmd::Down, false),
    b(
        Ctx::Sweep,
        &[Ch('m')],
        "m",
        "order by the next metric",
        Cmd::NextMetric,
        true,
    ),
    b(
        Ctx::Sweep,
        &[Ch('M')],
        "M",
        "order by the previous metric",
        Cmd::PrevMetric,
        false,
    ),
    b(
        Ctx::Sweep,
        &[Ch('o')],
        "o",
        "flip lower/higher is better",
        Cmd::SortReverse,
        true,
    ),
    b(
        Ctx::Sweep,
        &[Code(KeyCode::Enter)],
        "Enter",
        "open run",
        Cmd::Open,
        true,
    ),
    b(Ctx::Sweep, &[Ch(' ')], "Space", "mark", Cmd::Mark, true),
    b(
        Ctx::Sweep,
        &[Ch('d')],
        "d",
        "compare marked",
        Cmd::Diff,
        true,
    ),
    // Launch
    b(
        Ctx::Launch,
        &[Code(KeyCode::Down)],
        "↓",
        "next field",
        Cmd::NextField,
        true,
    ),
    b(
        Ctx::Launch,
        &[Code(KeyCode::Up), Code(KeyCode::BackTab)],
        "↑/S-Tab",
        "previous field",
        Cmd::PrevField,
        false,
    ),
    b(
        Ctx::Launch,
        &[Code(KeyCode::Tab)],
        "Tab",
        "complete path / next field",
        Cmd::Complete,
        true,
    ),
    b(
        Ctx::Launch,
        &[Ctrl('r')],
        "C-r",
        "new random seed",
        Cmd::NewSeed,
        true,
    ),
    b(
        Ctx::Launch,
        &[Code(KeyCode::Enter)],
        "Enter",
        "launch",
        Cmd::Submit,
        true,
    ),
    b(
        Ctx::Launch,
        &[Code(KeyCode::Esc)],
        "Esc",
        "cancel",
        Cmd::Back,
        true,
    ),
    // Synthesis form
    b(
        Ctx::Synth,
        &[Code(KeyCode::Down)],
        "↓",
        "next field (in Boxes: move down)",
        Cmd::NextField,
        false,
    ),
    b(
        Ctx::Synth,
        &[Code(KeyCode::Up), Code(KeyCode::BackTab)],
        "↑/S-Tab",
        "previous field (S-Tab leaves Boxes)",
        Cmd::PrevField,
        false,
    ),
    b(
        Ctx::Synth,
        &[Code(KeyCode::Tab)],
        "Tab",
        "next field / next box",
        Cmd::Complete,
        true,
    ),
    b(
        Ctx::Synth,
        &[
            Ch('h'),
            Ch('j'),
            Ch('k'),
            Ch('l'),
            Code(KeyCode::Left),
            Code(KeyCode::Right),
        ],
        "hjkl/←→",
        "move box",
        Cmd::MoveBox,
        true,
    ),
    b(
        Ctx::Synth,
        &[Ch('H'), Ch('J'), Ch('K'), Ch('L')],
        "HJKL",
        "resize box",
        Cmd::ResizeBox,
        true,
    ),
    b(
        Ctx::Synth,
        &[Ch('n')],
        "n",
        "new box for the next <vK>",
        Cmd::NewBox,
        true,
    ),
    b(
        Ctx::Synth,
        &[Code(KeyCode::Delete), Ch('x')],
        "Del/x",
        "remove box",
        Cmd::RemoveBox,
        false,
    ),
    b(
        Ctx::Synth,
        &[Ctrl('r')],
        "C-r",
        "new random seed",
        Cmd::NewSeed,
        false,
    ),
    b(
        Ctx::Synth,
        &[Code(KeyCode::Enter)],
        "Enter",
        "launch",
        Cmd::Submit,
        true,
    ),
    b(
        Ctx::Synth,
        &[Code(KeyCode::Esc)],
        "Esc",
        "cancel",
        Cmd::Back,
        true,
    ),
    // Jobs
    b(Ctx::Jobs, UP, "k/↑", "up", Cmd::Up, false),
    b(Ctx::Jobs, DOWN, "j/↓", "down", Cmd::Down, false),
    b(
        Ctx::Jobs,
        &[Code(KeyCode::Enter)],
        "Enter",
        "open run",
        Cmd::Open,
        true,
    ),
    b(Ctx::Jobs, &[Ch('x')], "x", "cancel job", Cmd::Cancel, true),
];

/// The command for `ev` in `ctx` (context bindings first, then global ones unless `ctx` is a
/// text form, where printable keys belong to the focused field).
pub fn lookup(ctx: Ctx, ev: &KeyEvent) -> Option<Cmd> {
    let find = |c: Ctx| {
        BINDINGS
            .iter()
            .find(|b| b.ctx == c && b.keys.iter().any(|k| k.matches(ev)))
            .map(|b| b.cmd)
    };
    find(ctx).or_else(|| {
        let printable =
            matches!(ev.code, KeyCode::Char(_)) && !ev.modifiers.contains(KeyModifiers::CONTROL);
        if matches!(ctx, Ctx::Launch | Ctx::Synth) && printable {
            None
        } else {
            find(Ctx::Global)
        }
    })
}

/// Hint-bar entries for `ctx`: its hinted bindings, then the global ones.
pub fn hints(ctx: Ctx) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = BINDINGS
        .iter()
        .filter(|b| b.ctx == ctx && b.hint)
        .map(|b| (b.label, b.desc))
        .collect();
    if !matches!(ctx, Ctx::Launch | Ctx::Synth) {
        out.extend(
            BINDINGS
                .iter()
                .filter(|b| b.ctx == Ctx::Global && b.hint)
                .map(|b| (b.label, b.desc)),
        );
    }
    out
}

/// Help lines: per context, `label  desc`.
pub fn help_sections() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    Ctx::ALL
        .iter()
        .map(|&ctx| {
            (
                ctx.title(),
                BINDINGS
                    .iter()
                    .filter(|b| b.ctx == ctx)
                    .map(|b| (b.label, b.desc))
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn context_wins_and_forms_keep_printables() {
        assert_eq!(lookup(Ctx::Runs, &key(KeyCode::Char('d'))), Some(Cmd::Diff));
        assert_eq!(lookup(Ctx::Runs, &key(KeyCode::Char('q'))), Some(Cmd::Quit));
        assert_eq!(lookup(Ctx::Launch, &key(KeyCode::Char('q'))), None);
        assert_eq!(lookup(Ctx::Launch, &key(KeyCode::Esc)), Some(Cmd::Back));
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(lookup(Ctx::Launch, &ctrl_c), Some(Cmd::ForceQuit));
        let shift_d = KeyEvent::new(KeyCode::Char('D'), KeyModifiers::SHIFT);
        assert_eq!(lookup(Ctx::Runs, &shift_d), Some(Cmd::Delete));
    }

    #[test]
    fn no_key_is_bound_twice_in_a_context() {
        for a in BINDINGS {
            for b in BINDINGS {
                if std::ptr::eq(a, b) || a.ctx != b.ctx {
                    continue;
                }
                for k in a.keys {
                    assert!(!b.keys.contains(k), "{k:?} bound twice in {:?}", a.ctx);
                }
            }
        }
    }
}
