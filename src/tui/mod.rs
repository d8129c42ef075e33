//! The workbench: a terminal UI to launch, watch, compare, diff and re-run runs.
//!
//! Layout (TEA at the top):
//! - [`app`]: the one [`App`] state and the pure `update(&mut App, Action) -> Vec<Effect>`;
//! - [`action`]: [`Action`]s in (keys, ticks, backend answers), [`Effect`]s out;
//! - [`backend`]: the [`Backend`] trait (all the UI may ask of runs and jobs);
//! - [`engine_backend`]: the backend the workbench runs on, a client of the store's engine;
//! - [`worker`]: carries out requests against a backend (worker thread or inline);
//! - [`keymap`]: the binding table behind key handling, `?` help and the hint bar;
//! - [`views`]: one module per view (runs, detail, compare, launch, synth, jobs, help);
//! - [`widgets`]: text input, loss chart, image pane, hints, popups;
//! - [`filter`], [`series`]: pure helpers (filter/sort, chart data);
//! - [`images`]: protocol choice, decoding/tinting, off-thread resize;
//! - [`driver`]: a synchronous driver for tests and scripted captures.
//!
//! Threads in [`run`]: the UI loop (update + draw), an input reader, a ticker, one backend
//! worker (every backend call), an image decoder and an image resizer. The UI thread never
//! touches the store.

pub mod action;
pub mod app;
pub mod backend;
pub mod driver;
pub mod engine_backend;
pub mod filter;
pub mod images;
pub mod keymap;
pub mod series;
pub mod theme;
pub mod views;
pub mod widgets;
pub mod worker;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ratatui::crossterm::event::{self, Event};

pub use action::{Action, Effect, Request};
pub use app::{update, App, View};
pub use backend::Backend;
pub use engine_backend::EngineBackend;
pub use images::ImageMode;

use images::{ImageCache, ResizeJob};
use worker::{perform, DecodeJob, Outcome};

/// How the workbench starts.
#[derive(Clone, Debug)]
pub struct TuiOptions {
    /// The run store folder.
    pub store: PathBuf,
    /// Default model for launches (the CLI resolves `--model`, else `$MIFO_MODEL`).
    pub model: Option<crate::model::ModelSource>,
    /// Default device for launches.
    pub device: String,
    /// `--image-protocol`.
    pub image_protocol: ImageMode,
}

impl Default for TuiOptions {
    fn default() -> Self {
        TuiOptions {
            store: PathBuf::from("runs"),
            model: None,
            device: "cpu".into(),
            image_protocol: ImageMode::Auto,
        }
    }
}

/// Opens the workbench on the engine of the store of `opts` (starting the engine if needed)
/// until the user quits. Set `MIFO_TUI_STATS=1` to print startup and frame timings on exit.
pub fn run(opts: TuiOptions) -> Result<()> {
    let started = Instant::now();
    if !std::io::stdout().is_terminal() {
        bail!("the workbench needs a terminal (for scripts use `mifo runs ls`)");
    }
    let backend = EngineBackend::connect_source(opts.store, opts.model, &opts.device)?;
    run_with(Box::new(backend), opts.image_protocol, started)
}

enum WorkerMsg {
    Request(Request),
    Shutdown(Sender<()>),
}

/// Timings of a session (printed with `MIFO_TUI_STATS=1`).
#[derive(Debug, Default)]
struct Stats {
    first_frame_ms: Option<f64>,
    first_list_frame_ms: Option<f64>,
    frames: u64,
    draw_total_ms: f64,
    draw_max_ms: f64,
}

/// Runs the workbench over any backend. `started` is when startup began (for the stats).
pub fn run_with(backend: Box<dyn Backend>, mode: ImageMode, started: Instant) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!("the workbench needs a terminal (for scripts use `mifo runs ls`)");
    }
    let info = backend.info();
    let mut terminal = ratatui::init();
    // Ask the terminal about graphics once, before the input thread starts reading stdin.
    let picker = mode.picker();
    let (tx, rx) = mpsc::channel::<Action>();

    // Input.
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("mifo-input".into())
            .spawn(move || loop {
                let action = match event::read() {
                    Ok(Event::Key(k)) => Action::Key(k),
                    Ok(Event::Resize(..)) => Action::Tick {
                        now_ms: crate::store::now_ms(),
                    },
                    Ok(_) => continue,
                    Err(_) => break,
                };
                if tx.send(action).is_err() {
                    break;
                }
            })?;
    }
    // Ticks.
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("mifo-tick".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                if tx
                    .send(Action::Tick {
                        now_ms: crate::store::now_ms(),
                    })
                    .is_err()
                {
                    break;
                }
            })?;
    }
    // Images: decode on one thread, resize/encode on another.
    let (decode_tx, decode_rx) = mpsc::channel::<DecodeJob>();
    let (resize_tx, resize_rx) = mpsc::channel::<ResizeJob>();
    if let Some(picker) = picker.clone() {
        let decode_out = tx.clone();
        std::thread::Builder::new()
            .name("mifo-decode".into())
            .spawn(move || {
                for job in decode_rx {
                    if decode_out.send(job.run(&picker)).is_err() {
                        break;
                    }
                }
            })?;
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("mifo-resize".into())
            .spawn(move || resize_loop(resize_rx, tx))?;
    }
    // The backend worker.
    let (work_tx, work_rx) = mpsc::channel::<WorkerMsg>();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("mifo-worker".into())
            .spawn(move || worker_loop(backend, work_rx, tx, decode_tx))?;
    }

    let mut app = App::new(
        info,
        ImageCache::new(picker.is_some(), Some(resize_tx)),
        crate::store::now_ms(),
    );
    let mut stats = Stats::default();
    let result = ui_loop(&mut terminal, &mut app, &rx, &work_tx, &mut stats, started);
    ratatui::restore();

    let active = app.jobs_active();
    if active > 0 && !app.info.jobs_survive_quit {
        eprintln!("mifo: stopping {active} job(s) at their next step…");
    }
    let (done_tx, done_rx) = mpsc::channel();
    if work_tx.send(WorkerMsg::Shutdown(done_tx)).is_ok() {
        let _ = done_rx.recv_timeout(Duration::from_secs(40));
    }
    if std::env::var_os("MIFO_TUI_STATS").is_some() {
        eprintln!(
            "mifo workbench: first frame {:.1} ms, runs listed and drawn {:.1} ms after start, \
             {} frames, mean draw {:.2} ms, max draw {:.2} ms",
            stats.first_frame_ms.unwrap_or(f64::NAN),
            stats.first_list_frame_ms.unwrap_or(f64::NAN),
            stats.frames,
            stats.draw_total_ms / stats.frames.max(1) as f64,
            stats.draw_max_ms
        );
    }
    result
}

fn resize_loop(rx: Receiver<ResizeJob>, tx: Sender<Action>) {
    while let Ok(first) = rx.recv() {
        // Keep only the newest request per slot (a terminal being resized sends many).
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut latest: Vec<ResizeJob> = Vec::new();
        for job in jobs.into_iter().rev() {
            if !latest.iter().any(|j| j.key == job.key) {
                latest.push(job);
            }
        }
        for job in latest {
            if tx.send(job.run()).is_err() {
                return;
            }
        }
    }
}

fn worker_loop(
    backend: Box<dyn Backend>,
    rx: Receiver<WorkerMsg>,
    tx: Sender<Action>,
    decode: Sender<DecodeJob>,
) {
    for msg in rx {
        match msg {
            WorkerMsg::Request(request) => match perform(backend.as_ref(), request) {
                Outcome::Action(a) => {
                    let _ = tx.send(*a);
                }
                Outcome::Decode(job) => {
                    let _ = decode.send(job);
                }
            },
            WorkerMsg::Shutdown(done) => {
                backend.shutdown();
                let _ = done.send(());
                return;
            }
        }
    }
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    rx: &Receiver<Action>,
    work_tx: &Sender<WorkerMsg>,
    stats: &mut Stats,
    started: Instant,
) -> Result<()> {
    let dispatch = |fx: Vec<Effect>| -> bool {
        let mut quit = false;
        for effect in fx {
            match effect {
                Effect::Quit => quit = true,
                Effect::Backend(r) => {
                    let _ = work_tx.send(WorkerMsg::Request(r));
                }
            }
        }
        quit
    };
    if dispatch(app.init()) {
        return Ok(());
    }
    loop {
        let t = Instant::now();
        terminal.draw(|f| views::render(app, f.area(), f.buffer_mut()))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        stats.frames += 1;
        stats.draw_total_ms += ms;
        stats.draw_max_ms = stats.draw_max_ms.max(ms);
        let since_start = started.elapsed().as_secs_f64() * 1000.0;
        stats.first_frame_ms.get_or_insert(since_start);
        if app.runs.loaded && stats.first_list_frame_ms.is_none() {
            stats.first_list_frame_ms = Some(since_start);
        }
        // Wait for something to happen, then take everything that is waiting.
        let first = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let mut quit = dispatch(update(app, first));
        while let Ok(a) = rx.try_recv() {
            quit |= dispatch(update(app, a));
        }
        if quit || app.quit {
            return Ok(());
        }
    }
}
