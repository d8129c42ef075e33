//! The learning launch form (new run, or edit-and-rerun of a stored one), validated as
//! `mifo learn` validates, with the config diff shown before launch and a path completer.

use std::path::{Path, PathBuf};

use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget, Wrap};

use crate::learn::{scene_files, LearnConfig};
use crate::store::RunId;
use crate::tui::action::{Effect, Request};
use crate::tui::app::{short_id, App, View};
use crate::tui::backend::{
    apply_learn_sets, resolve_learn_config, stored_learn_config, LearnLaunch, LearnSource,
    RerunRequest, RunDetail,
};
use crate::tui::keymap::Cmd;
use crate::tui::theme;
use crate::tui::widgets::input::TextInput;

/// Presets the form offers: MIFO's `paper` and `official`, then each baseline method's own
/// (`break-a-scene`, `ti-m`, `db-m`: `learn.method` with its published values).
pub use crate::learn::PRESETS;
/// Dtypes the form offers.
pub const DTYPES: [&str; 4] = ["f32", "tf32", "f16", "bf16"];

/// A form field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// Scene folder or image + masks.
    Source,
    /// Scene folder.
    Scene,
    /// Image file.
    Image,
    /// Mask files.
    Masks,
    /// Model folder.
    Model,
    /// Preset.
    Preset,
    /// Seed.
    Seed,
    /// Device.
    Device,
    /// Dtype.
    Dtype,
    /// `--set` overrides.
    Sets,
    /// Allow overlapping masks.
    Overlap,
}

impl Field {
    fn label(self) -> &'static str {
        match self {
            Field::Source => "Source",
            Field::Scene => "Scene dir",
            Field::Image => "Image",
            Field::Masks => "Masks",
            Field::Model => "Model",
            Field::Preset => "Preset",
            Field::Seed => "Seed",
            Field::Device => "Device",
            Field::Dtype => "Dtype",
            Field::Sets => "--set",
            Field::Overlap => "Overlap",
        }
    }

    fn is_path(self) -> bool {
        matches!(
            self,
            Field::Scene | Field::Image | Field::Masks | Field::Model
        )
    }

    fn is_choice(self) -> bool {
        matches!(
            self,
            Field::Source | Field::Preset | Field::Dtype | Field::Overlap
        )
    }
}

/// What the stored run of an edit-and-rerun holds.
#[derive(Clone, Debug, PartialEq)]
pub struct RerunBase {
    /// Its preset.
    pub preset: String,
    /// Its dtype.
    pub dtype: String,
    /// Its resolved config.
    pub config: LearnConfig,
    /// Its seed.
    pub seed: u64,
    /// `image + N masks` of which scene.
    pub inputs: String,
}

/// New run or edit-and-rerun.
#[derive(Clone, Debug, PartialEq)]
pub enum FormMode {
    /// A new learning run.
    New,
    /// A re-run of `from` with changes (`base` once its detail has arrived).
    Rerun {
        /// The run repeated.
        from: RunId,
        /// What it holds.
        base: Option<Box<RerunBase>>,
    },
}

/// The result of validating the form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Check {
    /// Problems, by field.
    pub errors: Vec<(Field, String)>,
    /// Config changes (`key`, from, to): from the preset (new run) or from the stored run.
    pub diff: Vec<(String, String, String)>,
    /// Steps the run will take.
    pub steps: Option<u64>,
    /// What the inputs resolve to (`img.png + 2 masks`).
    pub inputs: Option<String>,
}

/// The launch form.
pub struct LaunchForm {
    /// New or re-run.
    pub mode: FormMode,
    /// Scene folder (true) or image + masks (false).
    pub use_scene: bool,
    /// Scene folder.
    pub scene: TextInput,
    /// Image file.
    pub image: TextInput,
    /// Mask files, space-separated, in token order.
    pub masks: TextInput,
    /// Model folder.
    pub model: TextInput,
    /// Preset index in [`PRESETS`].
    pub preset: usize,
    /// Seed.
    pub seed: TextInput,
    /// Device.
    pub device: TextInput,
    /// Dtype index in [`DTYPES`].
    pub dtype: usize,
    /// `--set` overrides, space-separated.
    pub sets: TextInput,
    /// Allow overlapping masks.
    pub allow_overlap: bool,
    /// Focused field index in [`Self::fields`].
    pub focus: usize,
    /// Path completions of the last Tab.
    pub completions: Vec<String>,
    /// Validation of the current values.
    pub check: Check,
}

fn random_seed() -> u64 {
    u64::from(rand::random::<u32>())
}

impl LaunchForm {
    fn blank(mode: FormMode, model: &str, device: &str) -> Self {
        LaunchForm {
            mode,
            use_scene: true,
            scene: TextInput::default(),
            image: TextInput::default(),
            masks: TextInput::default(),
            model: TextInput::new(model),
            preset: 0,
            seed: TextInput::new(random_seed().to_string()),
            device: TextInput::new(device),
            dtype: 0,
            sets: TextInput::default(),
            allow_overlap: false,
            focus: 0,
            completions: Vec::new(),
            check: Check::default(),
        }
    }

    /// The fields shown, in order.
    pub fn fields(&self) -> Vec<Field> {
        match self.mode {
            FormMode::Rerun { .. } => vec![Field::Seed, Field::Sets],
            FormMode::New => {
                let mut f = vec![Field::Source];
                if self.use_scene {
                    f.push(Field::Scene);
                } else {
                    f.extend([Field::Image, Field::Masks]);
                }
                f.extend([
                    Field::Model,
                    Field::Preset,
                    Field::Seed,
                    Field::Device,
                    Field::Dtype,
                    Field::Sets,
                    Field::Overlap,
                ]);
                f
            }
        }
    }

    /// The focused field.
    pub fn focused(&self) -> Field {
        let f = self.fields();
        f[self.focus.min(f.len() - 1)]
    }

    fn input_mut(&mut self, field: Field) -> Option<&mut TextInput> {
        Some(match field {
            Field::Scene => &mut self.scene,
            Field::Image => &mut self.image,
            Field::Masks => &mut self.masks,
            Field::Model => &mut self.model,
            Field::Seed => &mut self.seed,
            Field::Device => &mut self.device,
            Field::Sets => &mut self.sets,
            _ => return None,
        })
    }

    fn input(&self, field: Field) -> Option<&TextInput> {
        Some(match field {
            Field::Scene => &self.scene,
            Field::Image => &self.image,
            Field::Masks => &self.masks,
            Field::Model => &self.model,
            Field::Seed => &self.seed,
            Field::Device => &self.device,
            Field::Sets => &self.sets,
            _ => return None,
        })
    }

    fn cycle(&mut self, field: Field, forward: bool) {
        let step = |i: usize, n: usize| cycled(i, n, forward);
        match field {
            Field::Source => self.use_scene = !self.use_scene,
            Field::Preset => self.preset = step(self.preset, PRESETS.len()),
            Field::Dtype => self.dtype = step(self.dtype, DTYPES.len()),
            Field::Overlap => self.allow_overlap = !self.allow_overlap,
            _ => {}
        }
    }

    /// The `--set` entries typed (split on spaces outside quotes and brackets).
    pub fn set_entries(&self) -> Vec<String> {
        split_sets(self.sets.text())
    }

    /// Validates the values (as `mifo learn` does) and computes the config diff.
    pub fn validate(&mut self) {
        let mut check = Check::default();
        let sets = self.set_entries();
        let seed = self.seed.text().trim().parse::<u64>();
        if seed.is_err() {
            check
                .errors
                .push((Field::Seed, "a whole number (0 to 2^64-1)".into()));
        }
        match &self.mode {
            FormMode::New => {
                let preset = PRESETS[self.preset];
                match resolve_learn_config(preset, &sets) {
                    Ok(cfg) => {
                        check.steps = Some(cfg.total_steps());
                        if let Ok(base) = LearnConfig::preset(preset) {
                            check.diff = config_diff(&base, &cfg);
                        }
                    }
                    Err(e) => check.errors.push((Field::Sets, e.to_string())),
                }
                if self.use_scene {
                    let dir = self.scene.text().trim();
                    if dir.is_empty() {
                        check
                            .errors
                            .push((Field::Scene, "give a scene folder".into()));
                    } else {
                        match scene_files(&expand(dir)) {
                            Ok(files) => {
                                check.inputs = Some(format!(
                                    "{} + {} mask{}",
                                    files
                                        .image
                                        .file_name()
                                        .map(|n| n.to_string_lossy().into_owned())
                                        .unwrap_or_default(),
                                    files.masks.len(),
                                    if files.masks.len() == 1 { "" } else { "s" }
                                ))
                            }
                            Err(e) => check.errors.push((Field::Scene, e.to_string())),
                        }
                    }
                } else {
                    let image = self.image.text().trim();
                    if image.is_empty() || !expand(image).is_file() {
                        check.errors.push((Field::Image, "no such file".into()));
                    }
                    let masks: Vec<&str> = self.masks.text().split_whitespace().collect();
                    if masks.is_empty() {
                        check
                            .errors
                            .push((Field::Masks, "one mask per instance".into()));
                    } else if let Some(m) = masks.iter().find(|m| !expand(m).is_file()) {
                        check
                            .errors
                            .push((Field::Masks, format!("{m}: no such file")));
                    } else {
                        check.inputs = Some(format!("image + {} masks", masks.len()));
                    }
                }
                let model = self.model.text().trim();
                if model.is_empty() {
                    check.errors.push((
                        Field::Model,
                        "give a model folder (or set MIFO_MODEL)".into(),
                    ));
                } else if !expand(model).is_dir() {
                    check.errors.push((Field::Model, "no such folder".into()));
                }
                if self.device.text().trim().is_empty() {
                    check
                        .errors
                        .push((Field::Device, "auto, cpu, cuda or cuda:N".into()));
                }
            }
            FormMode::Rerun { base: None, .. } => {
                check
                    .errors
                    .push((Field::Sets, "loading the run's config…".into()));
            }
            FormMode::Rerun {
                base: Some(base), ..
            } => {
                match apply_learn_sets(&base.config, &sets) {
                    Ok(cfg) => {
                        check.steps = Some(cfg.total_steps());
                        check.diff = config_diff(&base.config, &cfg);
                    }
                    Err(e) => check.errors.push((Field::Sets, e.to_string())),
                }
                if let Ok(s) = seed {
                    if s != base.seed {
                        check
                            .diff
                            .insert(0, ("seed".into(), base.seed.to_string(), s.to_string()));
                    }
                }
                check.inputs = Some(base.inputs.clone());
            }
        }
        self.check = check;
    }

    fn error_for(&self, field: Field) -> Option<&str> {
        self.check
            .errors
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, e)| e.as_str())
    }
}

/// `(key, from, to)` for the keys whose values differ.
pub fn config_diff(a: &LearnConfig, b: &LearnConfig) -> Vec<(String, String, String)> {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    crate::config::changed_keys(a, b)
        .into_iter()
        .map(|k| {
            let show = |v: &serde_json::Value| v.get(&k).map(|x| x.to_string()).unwrap_or_default();
            let (from, to) = (show(&va), show(&vb));
            (format!("learn.{k}"), from, to)
        })
        .collect()
}

/// Choice `i` of `n` moved one forward or back, wrapping around.
pub(super) fn cycled(i: usize, n: usize, forward: bool) -> usize {
    if forward {
        (i + 1) % n
    } else {
        (i + n - 1) % n
    }
}

/// The spans of a choice field: every option, the chosen one in ‹brackets›.
pub(super) fn choice(options: &[&str], chosen: usize) -> Vec<Span<'static>> {
    options
        .iter()
        .enumerate()
        .flat_map(|(j, o)| {
            let s = if j == chosen {
                Span::styled(format!("‹{o}›"), theme::changed())
            } else {
                Span::styled(format!(" {o} "), theme::dim())
            };
            [s, Span::raw(" ")]
        })
        .collect()
}

/// Splits `--set` text on whitespace outside double quotes and brackets.
pub fn split_sets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut depth) = (String::new(), false, 0i32);
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            '[' if !quoted => {
                depth += 1;
                cur.push(c);
            }
            ']' if !quoted => {
                depth -= 1;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted && depth <= 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `~/x` → `$HOME/x`.
fn expand(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Completes the path `word`: the completed word (longest common prefix of the matches, with
/// `/` after a single folder) and the matching names.
pub fn complete_path(word: &str) -> (String, Vec<String>) {
    let (dir_part, prefix) = match word.rfind('/') {
        Some(i) => (&word[..=i], &word[i + 1..]),
        None => ("", word),
    };
    let dir = if dir_part.is_empty() {
        PathBuf::from(".")
    } else {
        expand(dir_part)
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (word.to_string(), Vec::new());
    };
    let mut matches: Vec<(String, bool)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(prefix) && (!name.starts_with('.') || prefix.starts_with('.')))
                .then(|| (name, e.path().is_dir()))
        })
        .collect();
    matches.sort();
    let names: Vec<String> = matches
        .iter()
        .map(|(n, d)| if *d { format!("{n}/") } else { n.clone() })
        .collect();
    let completed = match matches.as_slice() {
        [] => word.to_string(),
        [(name, is_dir)] => format!("{dir_part}{name}{}", if *is_dir { "/" } else { "" }),
        _ => {
            let first = &matches[0].0;
            let mut common = first.len();
            for (n, _) in &matches[1..] {
                common = first
                    .char_indices()
                    .zip(n.chars())
                    .take_while(|((_, a), b)| a == b)
                    .map(|((i, a), _)| i + a.len_utf8())
                    .last()
                    .unwrap_or(0)
                    .min(common);
            }
            format!("{dir_part}{}", &first[..common])
        }
    };
    (completed, names)
}

/// Opens the form for a new learning run.
pub fn open_new(app: &mut App) {
    let model = app
        .info
        .default_model
        .as_ref()
        .map(|m| m.display().to_string())
        .unwrap_or_default();
    let mut form = LaunchForm::blank(FormMode::New, &model, &app.info.default_device);
    form.validate();
    app.launch = Some(form);
    app.go(View::Launch);
}

/// Opens the form to edit and re-run `id` (filled in when its detail arrives).
pub fn open_rerun(app: &mut App, id: &RunId, fx: &mut Vec<Effect>) {
    let form = LaunchForm::blank(
        FormMode::Rerun {
            from: id.clone(),
            base: None,
        },
        "",
        &app.info.default_device,
    );
    app.launch = Some(form);
    app.go(View::Launch);
    // Use the open detail when it is this run's; else ask.
    let detail = app
        .detail
        .as_ref()
        .filter(|d| d.id == *id)
        .and_then(|d| d.detail.clone());
    match detail {
        Some(d) => on_detail(app, id, &Ok(d)),
        None => {
            app.request_run(id, false, fx);
            if let Some(f) = app.launch.as_mut() {
                f.validate();
            }
        }
    }
}

/// A detail answer: fills an edit-and-rerun form waiting for it.
pub fn on_detail(app: &mut App, id: &RunId, result: &Result<Box<RunDetail>, String>) {
    let Some(form) = app.launch.as_mut() else {
        return;
    };
    let FormMode::Rerun { from, base } = &mut form.mode else {
        return;
    };
    if from != id || base.is_some() {
        return;
    }
    let loaded = result.as_ref().map_err(Clone::clone).and_then(|d| {
        let spec = d
            .spec
            .as_ref()
            .ok_or_else(|| d.spec_error.clone().unwrap_or_else(|| "no spec".into()))?;
        let (preset, dtype, config) = stored_learn_config(spec).map_err(|e| e.to_string())?;
        let masks = spec.inputs.keys().filter(|k| k.starts_with("mask")).count();
        Ok(RerunBase {
            inputs: format!(
                "image + {masks} masks of {}",
                d.row.scene.clone().unwrap_or_else(|| "the run".into())
            ),
            preset,
            dtype,
            config,
            seed: spec.seed,
        })
    });
    match loaded {
        Ok(b) => {
            // Prefill: the run's own changes from its preset, and its seed.
            let sets: Vec<String> = LearnConfig::preset(&b.preset)
                .map(|p| config_diff(&p, &b.config))
                .unwrap_or_default()
                .into_iter()
                .map(|(k, _, to)| format!("{k}={to}"))
                .collect();
            form.sets.set(sets.join(" "));
            form.seed.set(b.seed.to_string());
            *base = Some(Box::new(b));
            form.validate();
        }
        Err(e) => {
            app.launch = None;
            app.go_back();
            app.error(format!("cannot re-run {}: {e}", short_id(id)));
        }
    }
}

/// A key in the form (`cmd` is its keymap command, if any).
pub fn on_key(app: &mut App, key: KeyEvent, cmd: Option<Cmd>, fx: &mut Vec<Effect>) {
    let Some(form) = app.launch.as_mut() else {
        app.go_back();
        return;
    };
    let field = form.focused();
    let n = form.fields().len();
    match cmd {
        Some(Cmd::Back) => {
            app.go_back();
            return;
        }
        Some(Cmd::ForceQuit) => {
            app.quit = true;
            fx.push(Effect::Quit);
            return;
        }
        Some(Cmd::NextField) => form.focus = (form.focus + 1) % n,
        Some(Cmd::PrevField) => form.focus = (form.focus + n - 1) % n,
        Some(Cmd::NewSeed) => form.seed.set(random_seed().to_string()),
        Some(Cmd::Complete) => {
            if field.is_path() {
                complete(form, field);
                return;
            }
            form.focus = (form.focus + 1) % n;
        }
        Some(Cmd::Submit) => {
            submit(app, fx);
            return;
        }
        _ => {
            if field.is_choice() {
                match key.code {
                    KeyCode::Left => form.cycle(field, false),
                    KeyCode::Right | KeyCode::Char(' ') => form.cycle(field, true),
                    _ => return,
                }
            } else if let Some(input) = form.input_mut(field) {
                if !input.handle(&key) {
                    return;
                }
            }
        }
    }
    form.completions.clear();
    form.validate();
}

fn complete(form: &mut LaunchForm, field: Field) {
    let Some(input) = form.input_mut(field) else {
        return;
    };
    let text = input.text().to_string();
    let (head, word) = match text.rfind(' ') {
        Some(i) if field == Field::Masks => (&text[..=i], &text[i + 1..]),
        _ => ("", text.as_str()),
    };
    let (completed, names) = complete_path(word);
    input.set(format!("{head}{completed}"));
    form.completions = if names.len() > 1 { names } else { Vec::new() };
    form.validate();
}

fn submit(app: &mut App, fx: &mut Vec<Effect>) {
    let Some(form) = app.launch.as_mut() else {
        return;
    };
    form.validate();
    if let Some((field, e)) = form.check.errors.first() {
        let msg = format!("{}: {e}", field.label());
        app.error(msg);
        return;
    }
    let seed = form.seed.text().trim().parse::<u64>().unwrap_or(0);
    let sets = form.set_entries();
    let request = match &form.mode {
        FormMode::New => {
            let source = if form.use_scene {
                LearnSource::Scene(expand(form.scene.text().trim()))
            } else {
                LearnSource::Files {
                    image: expand(form.image.text().trim()),
                    masks: form.masks.text().split_whitespace().map(expand).collect(),
                }
            };
            Request::LaunchLearn(Box::new(LearnLaunch {
                source,
                model: Some(expand(form.model.text().trim())),
                preset: PRESETS[form.preset].to_string(),
                sets,
                seed,
                device: form.device.text().trim().to_string(),
                dtype: DTYPES[form.dtype].to_string(),
                allow_overlap: form.allow_overlap,
                rerun: false,
            }))
        }
        FormMode::Rerun { from, .. } => Request::Rerun {
            id: from.clone(),
            request: RerunRequest {
                sets,
                seed: Some(seed),
            },
        },
    };
    fx.push(Effect::Backend(request));
    app.launch = None;
    app.view = View::Jobs;
    app.back = vec![View::Runs];
    app.request_jobs(fx);
}

/// Draws the form.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let Some(form) = app.launch.as_ref() else {
        return;
    };
    let title = match &form.mode {
        FormMode::New => " New learning run ".to_string(),
        FormMode::Rerun { from, .. } => format!(" Edit and re-run {} ", short_id(from)),
    };
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(area);
    let mut lines: Vec<Line> = Vec::new();
    if let FormMode::Rerun { base, .. } = &form.mode {
        let info = match base {
            Some(b) => format!(
                "inputs: {} · preset {} · dtype {}",
                b.inputs, b.preset, b.dtype
            ),
            None => "loading the run…".into(),
        };
        lines.push(Line::styled(info, theme::dim()));
        lines.push(Line::raw(""));
    }
    let focused = form.focused();
    for field in form.fields() {
        let is_focused = field == focused;
        let label_style = if is_focused {
            theme::focus()
        } else {
            theme::dim()
        };
        let mut spans = vec![
            Span::styled(if is_focused { "▸ " } else { "  " }, theme::focus()),
            Span::styled(format!("{:<10}", field.label()), label_style),
        ];
        match field {
            Field::Source => spans.extend(choice(
                &["scene folder", "image + masks"],
                usize::from(!form.use_scene),
            )),
            Field::Preset => spans.extend(choice(&PRESETS, form.preset)),
            Field::Dtype => spans.extend(choice(&DTYPES, form.dtype)),
            Field::Overlap => spans.push(Span::raw(if form.allow_overlap {
                "[x] allow masks that overlap by more than 5%"
            } else {
                "[ ] allow masks that overlap by more than 5%"
            })),
            other => {
                if let Some(input) = form.input(other) {
                    spans.extend(input.line(is_focused, Style::new()).spans);
                }
                if other == Field::Seed {
                    spans.push(Span::styled("  (C-r: new random seed)", theme::dim()));
                }
            }
        }
        lines.push(Line::from(spans));
        if let Some(e) = form.error_for(field) {
            lines.push(Line::styled(format!("            ✗ {e}"), theme::error()));
        }
    }
    lines.push(Line::raw(""));
    if form.check.errors.is_empty() {
        lines.push(Line::styled(
            "✓ ready — Enter launches",
            theme::status_style(crate::store::RunStatus::Done),
        ));
    } else {
        lines.push(Line::styled(
            format!(
                "{} problem(s) to fix before launch",
                form.check.errors.len()
            ),
            theme::error(),
        ));
    }
    if !form.completions.is_empty() {
        lines.push(Line::raw(""));
        lines.push(Line::styled(
            format!("completions: {}", form.completions.join("  ")),
            theme::dim(),
        ));
    }
    Paragraph::new(lines)
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(Line::styled(title, theme::title())))
        .render(left, buf);

    let mut diff: Vec<Line> = Vec::new();
    let against = match &form.mode {
        FormMode::New => format!("preset {}", PRESETS[form.preset]),
        FormMode::Rerun { from, .. } => format!("run {}", short_id(from)),
    };
    if form.check.diff.is_empty() {
        diff.push(Line::styled(
            format!("same config as {against}"),
            theme::dim(),
        ));
    }
    for (k, from, to) in &form.check.diff {
        diff.push(Line::from(vec![
            Span::styled(k.clone(), theme::changed()),
            Span::raw(format!(" {from} → {to}")),
        ]));
    }
    diff.push(Line::raw(""));
    if let Some(s) = form.check.steps {
        diff.push(Line::raw(format!("{s} steps")));
    }
    if let Some(i) = &form.check.inputs {
        diff.push(Line::raw(i.clone()));
    }
    Paragraph::new(diff)
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(format!(" Changes vs {against} ")))
        .render(right, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_split_outside_quotes_and_brackets() {
        assert_eq!(
            split_sets(
                r#"learn.lr=0.001  learn.class_prompt="a dog" learn.attn_layers=["a", "b"]"#
            ),
            vec![
                "learn.lr=0.001",
                r#"learn.class_prompt="a dog""#,
                r#"learn.attn_layers=["a", "b"]"#
            ]
        );
    }
}
