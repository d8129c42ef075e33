//! The synthesis launch form: a learned run, a prompt with its placeholders, seed, samples,
//! `--set synth.*` overrides, and a keyboard box editor over the learned run's preview (Tab
//! cycles boxes, hjkl/arrows move, HJKL resize, `n` adds a box for the next placeholder, Del
//! removes one; boxes are labelled and coloured per token).

use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget, Wrap};

use crate::config::{apply_overrides, check_sections, parse_override};
use crate::store::{BlobHash, RunId, RunKind, RunStatus};
use crate::synth::config::PRESETS;
use crate::synth::{SynthConfig, SynthMethod};
use crate::tui::action::{Effect, Request};
use crate::tui::app::{short_id, App, View};
use crate::tui::backend::{synth_sets, RunDetail, SynthLaunch};
use crate::tui::images::ImageKey;
use crate::tui::keymap::Cmd;
use crate::tui::theme;
use crate::tui::widgets::image::{image_area, render_image};
use crate::tui::widgets::input::TextInput;

use super::launch::{choice, cycled, split_sets};

/// Box moves and resizes go in steps of this fraction of the image.
pub const STEP: f32 = 0.05;
/// Smallest box side.
pub const MIN_SIDE: f32 = 0.05;

/// A field of the form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthField {
    /// The prompt.
    Prompt,
    /// The seed.
    Seed,
    /// Number of images.
    Samples,
    /// The preset (`paper`, `official`).
    Preset,
    /// The synthesis method (`synth.method`).
    Method,
    /// `--set synth.*` overrides.
    Sets,
    /// The box editor.
    Boxes,
}

const FIELDS: [SynthField; 7] = [
    SynthField::Prompt,
    SynthField::Seed,
    SynthField::Samples,
    SynthField::Preset,
    SynthField::Method,
    SynthField::Sets,
    SynthField::Boxes,
];

impl SynthField {
    fn label(self) -> &'static str {
        match self {
            SynthField::Prompt => "Prompt",
            SynthField::Seed => "Seed",
            SynthField::Samples => "Samples",
            SynthField::Preset => "Preset",
            SynthField::Method => "Method",
            SynthField::Sets => "--set",
            SynthField::Boxes => "Boxes",
        }
    }
}

/// The synthesis form.
pub struct SynthForm {
    /// The learned run.
    pub from: RunId,
    /// Its placeholder count (masks), once its detail has arrived.
    pub tokens: Option<usize>,
    /// The image the boxes are drawn over (its preview, else its input image).
    pub preview: Option<BlobHash>,
    /// Prompt.
    pub prompt: TextInput,
    /// Seed.
    pub seed: TextInput,
    /// Number of images.
    pub samples: TextInput,
    /// The chosen preset, an index into [`crate::synth::config::PRESETS`].
    pub preset: usize,
    /// The chosen method, an index into [`SynthMethod::NAMES`].
    pub method: usize,
    /// `--set synth.*` overrides.
    pub sets: TextInput,
    /// Boxes: (`<vK>`, `[x0, y0, x1, y1]`).
    pub boxes: Vec<(String, [f32; 4])>,
    /// The box being edited.
    pub current: usize,
    /// Focused field.
    pub focus: SynthField,
    /// Problems with the current values.
    pub errors: Vec<String>,
}

/// Default boxes for `n` tokens: side by side across the middle.
pub fn default_boxes(n: usize) -> Vec<(String, [f32; 4])> {
    let w = 0.9 / n.max(1) as f32;
    (0..n)
        .map(|i| {
            let x0 = 0.05 + i as f32 * w;
            (
                format!("<v{i}>"),
                [round(x0), 0.3, round(x0 + w - 0.05), 0.85],
            )
        })
        .collect()
}

fn round(v: f32) -> f32 {
    (v * 100.0).round() / 100.0
}

/// Token index of `<vK>`.
fn token_index(token: &str) -> Option<usize> {
    token.strip_prefix("<v")?.strip_suffix('>')?.parse().ok()
}

impl SynthForm {
    fn new(from: RunId) -> Self {
        SynthForm {
            from,
            tokens: None,
            preview: None,
            prompt: TextInput::default(),
            seed: TextInput::new(u64::from(rand::random::<u32>()).to_string()),
            samples: TextInput::new("1"),
            preset: 0,
            method: 0,
            sets: TextInput::default(),
            boxes: Vec::new(),
            current: 0,
            focus: SynthField::Prompt,
            errors: Vec::new(),
        }
    }

    fn input_mut(&mut self, f: SynthField) -> Option<&mut TextInput> {
        match f {
            SynthField::Prompt => Some(&mut self.prompt),
            SynthField::Seed => Some(&mut self.seed),
            SynthField::Samples => Some(&mut self.samples),
            SynthField::Sets => Some(&mut self.sets),
            SynthField::Preset | SynthField::Method | SynthField::Boxes => None,
        }
    }

    fn input(&self, f: SynthField) -> Option<&TextInput> {
        match f {
            SynthField::Prompt => Some(&self.prompt),
            SynthField::Seed => Some(&self.seed),
            SynthField::Samples => Some(&self.samples),
            SynthField::Sets => Some(&self.sets),
            SynthField::Preset | SynthField::Method | SynthField::Boxes => None,
        }
    }

    /// The chosen preset's name.
    pub fn preset_name(&self) -> &'static str {
        PRESETS[self.preset % PRESETS.len()]
    }

    /// The chosen method's name.
    pub fn method_name(&self) -> &'static str {
        SynthMethod::NAMES[self.method % SynthMethod::NAMES.len()]
    }

    /// Cycles a choice field (`Preset`, `Method`) forward or back.
    fn cycle(&mut self, field: SynthField, forward: bool) {
        let step = |i: usize, n: usize| cycled(i, n, forward);
        match field {
            SynthField::Preset => self.preset = step(self.preset, PRESETS.len()),
            SynthField::Method => self.method = step(self.method, SynthMethod::NAMES.len()),
            _ => {}
        }
    }

    /// Moves (`dx`, `dy`) or resizes (`dw`, `dh`) the current box, keeping it inside the image.
    pub fn adjust(&mut self, dx: f32, dy: f32, dw: f32, dh: f32) {
        let Some((_, r)) = self.boxes.get_mut(self.current) else {
            return;
        };
        let (w, h) = (
            (r[2] - r[0] + dw).clamp(MIN_SIDE, 1.0),
            (r[3] - r[1] + dh).clamp(MIN_SIDE, 1.0),
        );
        let x0 = (r[0] + dx).clamp(0.0, 1.0 - w);
        let y0 = (r[1] + dy).clamp(0.0, 1.0 - h);
        *r = [round(x0), round(y0), round(x0 + w), round(y0 + h)];
    }

    /// Adds a box for the first placeholder without one.
    pub fn add_box(&mut self) -> Result<(), String> {
        let n = self.tokens.unwrap_or(0);
        let next = (0..n).find(|i| !self.boxes.iter().any(|(t, _)| token_index(t) == Some(*i)));
        match next {
            Some(i) => {
                self.boxes
                    .push((format!("<v{i}>"), [0.35, 0.35, 0.65, 0.65]));
                self.current = self.boxes.len() - 1;
                Ok(())
            }
            None => Err(format!(
                "every placeholder (<v0>…<v{}>) has a box",
                n.saturating_sub(1)
            )),
        }
    }

    /// Removes the current box.
    pub fn remove_box(&mut self) {
        if self.current < self.boxes.len() {
            self.boxes.remove(self.current);
            self.current = self.current.min(self.boxes.len().saturating_sub(1));
        }
    }

    /// Checks the values as `mifo synth` does.
    pub fn validate(&mut self) {
        let mut errors = Vec::new();
        let prompt = self.prompt.text().trim();
        if prompt.is_empty() {
            errors.push("Prompt: give a prompt with the placeholders, e.g. a photo of <v0>".into());
        }
        for (token, r) in &self.boxes {
            if !prompt.contains(token.as_str()) {
                errors.push(format!("Boxes: {token} has a box but is not in the prompt"));
            }
            let spec = format!("{token}={},{},{},{}", r[0], r[1], r[2], r[3]);
            if let Err(e) = crate::synth::parse_box(&spec) {
                errors.push(format!("Boxes: {e}"));
            }
        }
        if let Some(n) = self.tokens {
            for i in 0..n {
                let t = format!("<v{i}>");
                if prompt.contains(&t) && !self.boxes.iter().any(|(b, _)| *b == t) {
                    errors.push(format!(
                        "Boxes: {t} is in the prompt but has no box (n adds one)"
                    ));
                }
            }
        }
        if self.seed.text().trim().parse::<u64>().is_err() {
            errors.push("Seed: a whole number".into());
        }
        if !matches!(self.samples.text().trim().parse::<usize>(), Ok(1..=64)) {
            errors.push("Samples: 1 to 64".into());
        }
        let sets = synth_sets(self.method_name(), &split_sets(self.sets.text()));
        let checked = sets
            .iter()
            .map(|s| parse_override(s))
            .collect::<crate::Result<Vec<_>>>()
            .and_then(|o| {
                check_sections(&o, &["synth"])?;
                let base = SynthConfig::preset(self.preset_name())?;
                let cfg = apply_overrides(&base, "synth", &o)?;
                cfg.check()
            });
        if let Err(e) = checked {
            errors.push(format!("--set: {e}"));
        }
        if self.tokens.is_none() {
            errors.push("loading the learned run…".into());
        }
        self.errors = errors;
    }
}

/// Opens the form for learned run `id` (filled in when its detail arrives).
pub fn open(app: &mut App, id: &RunId, fx: &mut Vec<Effect>) {
    if let Some(row) = app.row(id) {
        if row.kind != RunKind::Learn || row.status != RunStatus::Done {
            app.error("synthesis needs a finished learning run");
            return;
        }
    }
    app.synth = Some(SynthForm::new(id.clone()));
    app.go(View::Synth);
    let detail = app
        .detail
        .as_ref()
        .filter(|d| d.id == *id)
        .and_then(|d| d.detail.clone());
    match detail {
        Some(d) => on_detail(app, id, &Ok(d), fx),
        None => app.request_run(id, false, fx),
    }
}

/// A detail answer: fills the form waiting for it and asks for the preview image.
pub fn on_detail(
    app: &mut App,
    id: &RunId,
    result: &Result<Box<RunDetail>, String>,
    fx: &mut Vec<Effect>,
) {
    let Some(form) = app
        .synth
        .as_mut()
        .filter(|f| f.from == *id && f.tokens.is_none())
    else {
        return;
    };
    let detail = match result {
        Ok(d) => d,
        Err(e) => {
            let msg = format!("cannot synthesise from {}: {e}", short_id(id));
            app.synth = None;
            app.go_back();
            app.error(msg);
            return;
        }
    };
    let n = detail.spec.as_ref().map_or(0, |s| {
        s.inputs.keys().filter(|k| k.starts_with("mask")).count()
    });
    form.tokens = Some(n);
    form.preview = detail.outputs.get("preview.png").copied().or_else(|| {
        detail
            .spec
            .as_ref()
            .and_then(|s| s.inputs.get("image").copied())
    });
    let tokens: Vec<String> = (0..n).map(|i| format!("<v{i}>")).collect();
    form.prompt
        .set(format!("a photo of {} on a table", tokens.join(" and ")));
    form.boxes = default_boxes(n);
    form.validate();
    if let Some(hash) = form.preview {
        let key = ImageKey::Output(id.clone(), hash);
        if app.images.begin(&key) {
            fx.push(Effect::Backend(Request::Image {
                key,
                image: hash,
                masks: Vec::new(),
            }));
        }
    }
}

/// A key in the form (`cmd` is its keymap command, if any).
pub fn on_key(app: &mut App, key: KeyEvent, cmd: Option<Cmd>, fx: &mut Vec<Effect>) {
    let Some(form) = app.synth.as_mut() else {
        app.go_back();
        return;
    };
    let i = FIELDS.iter().position(|f| *f == form.focus).unwrap_or(0);
    match cmd {
        Some(Cmd::Back) => {
            app.synth = None;
            app.go_back();
            return;
        }
        Some(Cmd::ForceQuit) => {
            app.quit = true;
            fx.push(Effect::Quit);
            return;
        }
        Some(Cmd::Submit) => {
            submit(app, fx);
            return;
        }
        Some(Cmd::NewSeed) => form.seed.set(u64::from(rand::random::<u32>()).to_string()),
        Some(Cmd::PrevField) if key.code == KeyCode::BackTab || form.focus != SynthField::Boxes => {
            form.focus = FIELDS[(i + FIELDS.len() - 1) % FIELDS.len()];
        }
        _ if form.focus == SynthField::Boxes => {
            let n = form.boxes.len().max(1);
            let mut error = None;
            match key.code {
                KeyCode::Tab => form.current = (form.current + 1) % n,
                KeyCode::Char('h') | KeyCode::Left => form.adjust(-STEP, 0.0, 0.0, 0.0),
                KeyCode::Char('l') | KeyCode::Right => form.adjust(STEP, 0.0, 0.0, 0.0),
                KeyCode::Char('k') | KeyCode::Up => form.adjust(0.0, -STEP, 0.0, 0.0),
                KeyCode::Char('j') | KeyCode::Down => form.adjust(0.0, STEP, 0.0, 0.0),
                KeyCode::Char('H') => form.adjust(0.0, 0.0, -STEP, 0.0),
                KeyCode::Char('L') => form.adjust(0.0, 0.0, STEP, 0.0),
                KeyCode::Char('K') => form.adjust(0.0, 0.0, 0.0, -STEP),
                KeyCode::Char('J') => form.adjust(0.0, 0.0, 0.0, STEP),
                KeyCode::Char('n') => error = form.add_box().err(),
                KeyCode::Delete | KeyCode::Char('x') => form.remove_box(),
                _ => return,
            }
            if let Some(e) = error {
                app.error(e);
                if let Some(f) = app.synth.as_mut() {
                    f.validate();
                }
                return;
            }
        }
        Some(Cmd::NextField | Cmd::Complete) => form.focus = FIELDS[(i + 1) % FIELDS.len()],
        _ if matches!(form.focus, SynthField::Preset | SynthField::Method) => match key.code {
            KeyCode::Left => form.cycle(form.focus, false),
            KeyCode::Right | KeyCode::Char(' ') => form.cycle(form.focus, true),
            _ => return,
        },
        _ => {
            let focus = form.focus;
            let used = form
                .input_mut(focus)
                .is_some_and(|input| input.handle(&key));
            if !used {
                return;
            }
        }
    }
    form.validate();
}

fn submit(app: &mut App, fx: &mut Vec<Effect>) {
    let Some(form) = app.synth.as_mut() else {
        return;
    };
    form.validate();
    if let Some(e) = form.errors.first() {
        let e = e.clone();
        app.error(e);
        return;
    }
    let launch = SynthLaunch {
        from: form.from.clone(),
        prompt: form.prompt.text().trim().to_string(),
        boxes: form.boxes.clone(),
        seed: form.seed.text().trim().parse().unwrap_or(0),
        samples: form.samples.text().trim().parse().unwrap_or(1),
        preset: form.preset_name().to_string(),
        method: form.method_name().to_string(),
        sets: split_sets(form.sets.text()),
    };
    fx.push(Effect::Backend(Request::LaunchSynth(Box::new(launch))));
    app.synth = None;
    app.view = View::Jobs;
    app.back = vec![View::Runs];
    app.request_jobs(fx);
}

/// Draws the form.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let Some(form) = app.synth.as_ref() else {
        return;
    };
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(area);
    let mut lines = vec![
        Line::styled(
            format!(
                "from learned run {} · {} placeholder(s)",
                short_id(&form.from),
                form.tokens
                    .map_or_else(|| "…".to_string(), |n| n.to_string())
            ),
            theme::dim(),
        ),
        Line::raw(""),
    ];
    for field in FIELDS {
        let focused = field == form.focus;
        let mut spans = vec![
            Span::styled(if focused { "▸ " } else { "  " }, theme::focus()),
            Span::styled(
                format!("{:<8}", field.label()),
                if focused {
                    theme::focus()
                } else {
                    theme::dim()
                },
            ),
        ];
        match (field, form.input(field)) {
            (SynthField::Preset, _) => spans.extend(choice(PRESETS, form.preset)),
            (SynthField::Method, _) => spans.extend(choice(&SynthMethod::NAMES, form.method)),
            (_, Some(input)) => spans.extend(input.line(focused, Style::new()).spans),
            (_, None) => spans.push(Span::styled(
                format!("{} box(es) — edit them on the right", form.boxes.len()),
                theme::dim(),
            )),
        }
        lines.push(Line::from(spans));
    }
    lines.push(Line::raw(""));
    for (i, (token, r)) in form.boxes.iter().enumerate() {
        let color =
            token_index(token).map_or(theme::dim(), |k| Style::new().fg(theme::token_color(k)));
        let mark = if i == form.current { "▸" } else { " " };
        lines.push(Line::from(vec![
            Span::raw(format!("  {mark} ")),
            Span::styled(token.clone(), color),
            Span::raw(format!(
                " = {:.2},{:.2},{:.2},{:.2}",
                r[0], r[1], r[2], r[3]
            )),
        ]));
    }
    lines.push(Line::raw(""));
    if form.errors.is_empty() {
        lines.push(Line::styled(
            "✓ ready — Enter launches",
            theme::status_style(RunStatus::Done),
        ));
    }
    for e in &form.errors {
        lines.push(Line::styled(format!("✗ {e}"), theme::error()));
    }
    Paragraph::new(lines)
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(Line::styled(" New synthesis run ", theme::title())))
        .render(left, buf);

    let editing = form.focus == SynthField::Boxes;
    let block = Block::bordered()
        .border_style(if editing {
            theme::focus()
        } else {
            Style::new()
        })
        .title(" Boxes · Tab next · hjkl move · HJKL size · n new · Del remove ");
    let inner = block.inner(right);
    block.render(right, buf);
    let boxes = form.boxes.clone();
    let current = form.current;
    let key = form.preview.map(|h| ImageKey::Output(form.from.clone(), h));
    let canvas = match &key {
        Some(key) => {
            render_image(&mut app.images, key, "preview", inner, buf);
            image_area(&app.images, key, inner).unwrap_or(inner)
        }
        None => inner,
    };
    draw_boxes(&boxes, current, editing, canvas, buf);
}

/// Draws each box's outline in its token's colour over `canvas` (the image's cells), with its
/// label at the top-left corner; the current box is bold.
pub fn draw_boxes(
    boxes: &[(String, [f32; 4])],
    current: usize,
    editing: bool,
    canvas: Rect,
    buf: &mut Buffer,
) {
    if canvas.width < 2 || canvas.height < 2 {
        return;
    }
    let to_x = |v: f32| {
        canvas.x + ((v * f32::from(canvas.width - 1)).round() as u16).min(canvas.width - 1)
    };
    let to_y = |v: f32| {
        canvas.y + ((v * f32::from(canvas.height - 1)).round() as u16).min(canvas.height - 1)
    };
    for (i, (token, r)) in boxes.iter().enumerate() {
        let color = theme::token_color(token_index(token).unwrap_or(i));
        let mut style = Style::new().fg(color);
        if i == current && editing {
            style = style.add_modifier(Modifier::BOLD | Modifier::REVERSED);
        }
        let (x0, y0, x1, y1) = (to_x(r[0]), to_y(r[1]), to_x(r[2]), to_y(r[3]));
        for x in x0..=x1 {
            buf[(x, y0)].set_symbol("─").set_style(style);
            buf[(x, y1)].set_symbol("─").set_style(style);
        }
        for y in y0..=y1 {
            buf[(x0, y)].set_symbol("│").set_style(style);
            buf[(x1, y)].set_symbol("│").set_style(style);
        }
        buf[(x0, y0)].set_symbol("┌");
        buf[(x1, y0)].set_symbol("┐");
        buf[(x0, y1)].set_symbol("└");
        buf[(x1, y1)].set_symbol("┘");
        let room = x1.saturating_sub(x0).saturating_sub(1);
        let label: String = token.chars().take(room as usize).collect();
        buf.set_string(x0 + 1, y0, label, style);
    }
}
