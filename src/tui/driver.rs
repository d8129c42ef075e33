//! A synchronous driver: runs the app without threads or a terminal, carrying out every effect
//! inline against a backend and drawing into a ratatui `TestBackend`. The snapshot tests use it,
//! and so can scripted captures (README screenshots).

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver};

use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui_image::picker::Picker;

use super::action::{Action, Effect};
use super::app::{update, App};
use super::backend::Backend;
use super::images::{ImageCache, ResizeJob};
use super::worker::{perform, Outcome};

/// Drives an [`App`] over backend `B` synchronously.
pub struct SyncDriver<B: Backend> {
    /// The app.
    pub app: App,
    /// The backend.
    pub backend: B,
    /// The terminal (a `TestBackend`).
    pub terminal: Terminal<TestBackend>,
    picker: Option<Picker>,
    resize_rx: Receiver<ResizeJob>,
    /// Report 0 ms for backend timings, so frames are reproducible.
    pub deterministic: bool,
    /// Whether the app asked to quit.
    pub quit: bool,
}

impl<B: Backend> SyncDriver<B> {
    /// A driver with a `width`×`height` terminal at time `now_ms`; `images` draws images with
    /// halfblocks (else images are off and shown as text). Loads the runs and jobs.
    pub fn new(backend: B, width: u16, height: u16, now_ms: u64, images: bool) -> Self {
        let (tx, resize_rx) = mpsc::channel();
        let picker = images.then(Picker::halfblocks);
        let app = App::new(backend.info(), ImageCache::new(images, Some(tx)), now_ms);
        let terminal = match Terminal::new(TestBackend::new(width, height)) {
            Ok(t) => t,
            Err(e) => match e {},
        };
        let mut d = SyncDriver {
            app,
            backend,
            terminal,
            picker,
            resize_rx,
            deterministic: true,
            quit: false,
        };
        let fx = d.app.init();
        d.run_effects(fx);
        d
    }

    /// Applies `action` and carries out everything it leads to.
    pub fn send(&mut self, action: Action) {
        let fx = update(&mut self.app, action);
        self.run_effects(fx);
    }

    fn run_effects(&mut self, fx: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = fx.into();
        while let Some(effect) = queue.pop_front() {
            let action = match effect {
                Effect::Quit => {
                    self.quit = true;
                    continue;
                }
                Effect::Backend(request) => match perform(&self.backend, request) {
                    Outcome::Action(a) => *a,
                    Outcome::Decode(job) => match &self.picker {
                        Some(p) => job.run(p),
                        None => continue,
                    },
                },
            };
            let action = match action {
                Action::RunsLoaded { result, .. } if self.deterministic => Action::RunsLoaded {
                    result,
                    elapsed_ms: 0.0,
                },
                other => other,
            };
            queue.extend(update(&mut self.app, action));
        }
    }

    /// A key event.
    pub fn key(&mut self, key: KeyEvent) {
        self.send(Action::Key(key));
    }

    /// Keys in a small notation: characters as typed, plus `<Enter>`, `<Esc>`, `<Tab>`,
    /// `<BackTab>`, `<Space>`, `<Up>`, `<Down>`, `<Left>`, `<Right>`, `<Backspace>`, `<Del>`,
    /// `<PgUp>`, `<PgDn>`, `<Home>`, `<End>` and `<C-x>` (Ctrl + x).
    pub fn press(&mut self, keys: &str) {
        for key in parse_keys(keys) {
            self.key(key);
        }
    }

    /// Time passes to `now_ms` (polls fire).
    pub fn tick(&mut self, now_ms: u64) {
        self.send(Action::Tick { now_ms });
    }

    /// Resizes the terminal.
    pub fn resize(&mut self, width: u16, height: u16) {
        self.terminal.backend_mut().resize(width, height);
        let _ = self
            .terminal
            .resize(ratatui::layout::Rect::new(0, 0, width, height));
    }

    /// Draws a frame (and again after images have been resized), returning the screen text.
    pub fn draw(&mut self) -> String {
        for _ in 0..4 {
            let app = &mut self.app;
            let _ = self
                .terminal
                .draw(|f| super::views::render(app, f.area(), f.buffer_mut()));
            let jobs: Vec<ResizeJob> = self.resize_rx.try_iter().collect();
            if jobs.is_empty() {
                break;
            }
            for job in jobs {
                let action = job.run();
                self.send(action);
            }
        }
        buffer_text(self.terminal.backend().buffer())
    }
}

/// The text of a buffer, one line per row, trailing spaces trimmed.
pub fn buffer_text(buf: &Buffer) -> String {
    let area = buf.area;
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        for x in area.left()..area.right() {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Parses the key notation of [`SyncDriver::press`].
pub fn parse_keys(keys: &str) -> Vec<KeyEvent> {
    let mut out = Vec::new();
    let mut chars = keys.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '<' {
            let name: String = chars.clone().take_while(|&c| c != '>').collect();
            let named = match name.as_str() {
                "Enter" => Some(KeyCode::Enter),
                "Esc" => Some(KeyCode::Esc),
                "Tab" => Some(KeyCode::Tab),
                "BackTab" => Some(KeyCode::BackTab),
                "Space" => Some(KeyCode::Char(' ')),
                "Up" => Some(KeyCode::Up),
                "Down" => Some(KeyCode::Down),
                "Left" => Some(KeyCode::Left),
                "Right" => Some(KeyCode::Right),
                "Backspace" => Some(KeyCode::Backspace),
                "Del" => Some(KeyCode::Delete),
                "PgUp" => Some(KeyCode::PageUp),
                "PgDn" => Some(KeyCode::PageDown),
                "Home" => Some(KeyCode::Home),
                "End" => Some(KeyCode::End),
                _ => None,
            };
            let ctrl = name
                .strip_prefix("C-")
                .and_then(|r| r.chars().next().filter(|_| r.chars().count() == 1));
            if let Some(code) = named {
                out.push(KeyEvent::new(code, KeyModifiers::NONE));
                for _ in 0..=name.chars().count() {
                    chars.next();
                }
                continue;
            }
            if let Some(c) = ctrl {
                out.push(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL));
                for _ in 0..=name.chars().count() {
                    chars.next();
                }
                continue;
            }
        }
        let mods = if c.is_uppercase() {
            KeyModifiers::SHIFT
        } else {
            KeyModifiers::NONE
        };
        out.push(KeyEvent::new(KeyCode::Char(c), mods));
    }
    out
}
