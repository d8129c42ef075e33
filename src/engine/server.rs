//! The engine process: owns the store, queues and runs jobs, streams events, answers clients on
//! `<store>/engine.sock` (mode 0600, same-uid peers only).

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clap::Parser;

use super::protocol::{
    read_frame, write_frame, EngineStatus, Event, EventKind, Request, Response, PROTOCOL_VERSION,
};
use super::socket_path;
use crate::error::{Error, Result};
use crate::jobs::learn::{self as learn_job, LearnJob, RunOptions};
use crate::jobs::sink::{Observer, SinkEvent};
use crate::store::{RunId, RunOutcome, Store};

/// How the engine behaves.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Exit after this long with no job and no client (auto-started engines); `None` = never.
    pub idle_exit: Option<Duration>,
    /// Jobs run at the same time (0 is taken as 1). One per device is the sane default: two
    /// jobs on one GPU compete for its memory.
    pub jobs: usize,
}

enum Job {
    Learn(RunId, Box<LearnJob>),
    Synth(RunId, Box<crate::jobs::synth::SynthJob>),
    Resume {
        id: RunId,
        model: PathBuf,
        device: String,
    },
}

impl Job {
    fn id(&self) -> &RunId {
        match self {
            Job::Learn(id, _) => id,
            Job::Synth(id, _) => id,
            Job::Resume { id, .. } => id,
        }
    }
}

struct Current {
    id: RunId,
    cancel: Arc<AtomicBool>,
    device: String,
    progress: Option<(u64, u64, String)>,
}

struct Subscriber {
    run: Option<RunId>,
    tx: mpsc::Sender<Event>,
}

struct Shared {
    store: Store,
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    /// The running jobs (at most `EngineOptions::jobs`).
    current: Mutex<Vec<Current>>,
    subscribers: Mutex<Vec<Subscriber>>,
    shutdown: Arc<AtomicBool>,
    first_stop: Mutex<Option<Instant>>,
    started: Instant,
    workers: usize,
    clients: AtomicUsize,
    last_activity: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn publish(&self, event: Event) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|s| {
            let wanted = s.run.as_ref().is_none_or(|r| r.as_str() == event.run);
            !wanted || s.tx.send(event.clone()).is_ok()
        });
    }

    fn publish_status(&self, id: &RunId) {
        if let Ok(r) = self.store.get_run(id) {
            self.publish(Event {
                run: id.to_string(),
                kind: EventKind::Status {
                    status: r.status.as_str().to_string(),
                    error: r.error.clone(),
                },
            });
        }
    }

    fn touch(&self) {
        *lock(&self.last_activity) = Instant::now();
    }

    fn status(&self, store_dir: &Path) -> EngineStatus {
        let cur = lock(&self.current);
        let first = cur.first();
        EngineStatus {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            store: store_dir.display().to_string(),
            queue: lock(&self.queue)
                .iter()
                .map(|j| j.id().to_string())
                .collect(),
            running: first.map(|c| c.id.to_string()),
            progress: first.and_then(|c| c.progress.clone()),
            device: first.map(|c| c.device.clone()),
            running_all: cur
                .iter()
                .map(|c| (c.id.to_string(), c.device.clone(), c.progress.clone()))
                .collect(),
            workers: self.workers,
            version: PROTOCOL_VERSION,
        }
    }
}

/// The uid of the peer of a unix stream (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a properly sized ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// Runs the engine on `store_dir` until it is stopped (or idle past `idle_exit`).
pub fn serve(store_dir: &Path, opts: EngineOptions) -> Result<()> {
    let store = Store::create(store_dir)?;
    let _ = std::fs::set_permissions(store_dir, std::fs::Permissions::from_mode(0o700));
    let stale = store.mark_stale_running_interrupted()?;
    for id in &stale {
        eprintln!("engine: run {id} was left running by a dead process: marked interrupted");
    }
    // Queued runs of a previous engine were never started: close them so they can be launched
    // again. (The store keeps log lines of running runs only, so the reason goes to the
    // engine's own log; a failed log write here used to stop the engine from starting.)
    for rec in store.runs() {
        let rec = rec?;
        if rec.status == crate::store::RunStatus::Queued {
            store.finish_run(&rec.id, RunOutcome::Cancelled)?;
            eprintln!(
                "engine: run {} was queued when the last engine stopped: marked cancelled",
                rec.id
            );
        }
    }
    let sock = socket_path(store_dir);
    if sock.exists() {
        if UnixStream::connect(&sock).is_ok() {
            return Err(Error::Input(format!(
                "an engine is already running on {} (see `mifo engine status`)",
                store_dir.display()
            )));
        }
        std::fs::remove_file(&sock).map_err(|e| Error::io(&sock, e))?;
    }
    let listener = UnixListener::bind(&sock).map_err(|e| Error::io(&sock, e))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&sock, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(&sock, e))?;
    eprintln!(
        "engine: pid {} serving {} (protocol {PROTOCOL_VERSION})",
        std::process::id(),
        store_dir.display()
    );

    let shared = Arc::new(Shared {
        store,
        queue: Mutex::new(VecDeque::new()),
        wake: Condvar::new(),
        current: Mutex::new(Vec::new()),
        workers: opts.jobs.max(1),
        subscribers: Mutex::new(Vec::new()),
        shutdown: Arc::new(AtomicBool::new(false)),
        first_stop: Mutex::new(None),
        started: Instant::now(),
        clients: AtomicUsize::new(0),
        last_activity: Mutex::new(Instant::now()),
    });
    let workers: Vec<_> = (0..shared.workers)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || worker_loop(&shared))
        })
        .collect();
    let store_dir = store_dir.to_path_buf();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if peer_uid(&stream) != Some(my_uid()) {
                    let mut w = BufWriter::new(&stream);
                    let _ = write_frame(
                        &mut w,
                        &Response::Error(
                            "connection refused: the engine serves its own user only".into(),
                        ),
                    );
                    continue;
                }
                let shared = shared.clone();
                let dir = store_dir.clone();
                shared.clients.fetch_add(1, Ordering::SeqCst);
                shared.touch();
                std::thread::spawn(move || {
                    if let Err(e) = handle_client(&shared, &dir, stream) {
                        eprintln!("engine: client error: {e}");
                    }
                    shared.clients.fetch_sub(1, Ordering::SeqCst);
                    shared.touch();
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => eprintln!("engine: accept failed: {e}"),
        }
        if shared.shutdown.load(Ordering::SeqCst) && workers.iter().all(|w| w.is_finished()) {
            break;
        }
        if let Some(idle) = opts.idle_exit {
            let busy = !lock(&shared.current).is_empty() || !lock(&shared.queue).is_empty();
            let quiet = shared.clients.load(Ordering::SeqCst) == 0
                && lock(&shared.last_activity).elapsed() >= idle;
            if !busy && quiet {
                eprintln!("engine: idle for {idle:?}, exiting");
                shared.shutdown.store(true, Ordering::SeqCst);
                shared.wake.notify_all();
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
    // Queued jobs never started (the store keeps no log lines for them: the reason goes to the
    // engine's log).
    for job in lock(&shared.queue).drain(..) {
        match shared.store.finish_run(job.id(), RunOutcome::Cancelled) {
            Ok(_) => eprintln!(
                "engine: run {} was still queued: marked cancelled",
                job.id()
            ),
            Err(e) => eprintln!("engine: run {}: {e}", job.id()),
        }
    }
    let _ = shared.store.flush();
    let _ = std::fs::remove_file(&sock);
    eprintln!("engine: stopped");
    Ok(())
}

fn worker_loop(shared: &Arc<Shared>) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(j) = q.pop_front() {
                    break j;
                }
                q = shared
                    .wake
                    .wait_timeout(q, Duration::from_millis(200))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        let id = job.id().clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let device = match &job {
            Job::Learn(_, j) => j.device.clone(),
            Job::Synth(_, j) => j.device.clone(),
            Job::Resume { device, .. } => device.clone(),
        };
        lock(&shared.current).push(Current {
            id: id.clone(),
            cancel: cancel.clone(),
            device,
            progress: None,
        });
        let observer: Observer = {
            let shared = shared.clone();
            Arc::new(move |run: &RunId, ev: SinkEvent| {
                if let SinkEvent::Progress {
                    step, total, phase, ..
                } = &ev
                {
                    if let Some(c) = lock(&shared.current).iter_mut().find(|c| &c.id == run) {
                        c.progress = Some((*step, *total, phase.clone()));
                    }
                }
                shared.publish(Event {
                    run: run.to_string(),
                    kind: EventKind::Run(ev),
                });
            })
        };
        let opts = RunOptions {
            progress_bar: false,
            stop: cancel,
            shutdown: shared.shutdown.clone(),
            observer: Some(observer),
            progress_lines: true,
        };
        eprintln!("engine: starting run {id}");
        let store = shared.store.clone();
        let status_shared = shared.clone();
        let status_id = id.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &job {
            Job::Learn(id, j) => {
                // start_run happens inside; announce running right after.
                let r = learn_job::start_with_hook(&store, id, j, &opts, &|| {
                    status_shared.publish_status(&status_id)
                });
                r.map(|_| ())
            }
            Job::Synth(id, j) => crate::jobs::synth::start(&store, id, j, &opts, &|| {
                status_shared.publish_status(&status_id)
            })
            .map(|_| ()),
            Job::Resume { id, model, device } => {
                learn_job::resume_with_hook(&store, id, model, device, &opts, &|| {
                    status_shared.publish_status(&status_id)
                })
                .map(|_| ())
            }
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("engine: run {id} failed: {e}"),
            Err(_) => {
                eprintln!("engine: run {id} panicked");
                let _ = shared.store.finish_run(
                    &id,
                    RunOutcome::Failed("internal error (panic); see engine.log".into()),
                );
            }
        }
        lock(&shared.current).retain(|c| c.id != id);
        shared.publish_status(&id);
        shared.touch();
    }
}

/// `mifo runs …` parsed on the engine side.
#[derive(Parser)]
#[command(name = "mifo runs", no_binary_name = true)]
struct RunsArgv {
    #[command(subcommand)]
    cmd: crate::cli::runs::RunsCommand,
}

/// How long a new connection may take to send its `Hello`: a client that connects and never
/// sends would otherwise count as a client for ever and keep the engine from its idle exit.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

fn handle_client(
    shared: &Arc<Shared>,
    store_dir: &Path,
    stream: UnixStream,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let hello = read_frame::<Request>(&mut reader);
    // Greeted clients may stay quiet between requests (a workbench left open).
    writer.get_ref().set_read_timeout(None)?;
    match hello {
        Ok(Some(Request::Hello { version })) if version == PROTOCOL_VERSION => {
            write_frame(
                &mut writer,
                &Response::Hello {
                    version: PROTOCOL_VERSION,
                    pid: std::process::id(),
                },
            )?;
        }
        Ok(Some(Request::Hello { version })) => {
            return write_frame(
                &mut writer,
                &Response::Error(format!(
                    "protocol mismatch: the engine speaks version {PROTOCOL_VERSION}, this client {version}; stop it with `mifo engine stop` (same binary as the engine) and retry"
                )),
            );
        }
        Ok(Some(_)) | Ok(None) => {
            return write_frame(
                &mut writer,
                &Response::Error("expected a Hello first".into()),
            )
        }
        Err(e) => {
            let why = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!("no Hello within {} s", HELLO_TIMEOUT.as_secs())
            } else {
                format!("bad frame: {e}")
            };
            let _ = write_frame(&mut writer, &Response::Error(why));
            return Ok(());
        }
    }
    while let Some(req) = match read_frame::<Request>(&mut reader) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_frame(&mut writer, &Response::Error(format!("bad frame: {e}")));
            return Ok(());
        }
    } {
        shared.touch();
        let reply = match req {
            Request::Hello { .. } => Response::Error("already greeted".into()),
            Request::Status => Response::Status(shared.status(store_dir)),
            Request::Runs { argv } => run_runs_command(shared, argv),
            Request::Output { run, name } => output_bytes(shared, &run, &name),
            Request::ListRecords => data(|| {
                let tags = shared.store.all_tags()?;
                let mut out = Vec::new();
                for r in shared.store.runs() {
                    let r = r?;
                    let t = tags.get(&r.id).cloned().unwrap_or_default();
                    out.push((r, t));
                }
                Ok(Response::Records(out))
            }),
            Request::ListSummaries => data(|| {
                let tags = shared.store.all_tags()?;
                let mut out = Vec::new();
                for r in shared.store.runs() {
                    let r = r?;
                    let t = tags.get(&r.id).cloned().unwrap_or_default();
                    out.push(super::protocol::RunSummary::from_record(r, t));
                }
                Ok(Response::Summaries(out))
            }),
            Request::Detail { run } => data(|| {
                let id = shared.store.resolve(&run)?;
                let record = shared.store.get_run(&id)?;
                let spec = shared.store.spec(&record.spec_hash);
                let model_dir = match &spec {
                    Ok(s) => shared.store.model_dir_for(&s.model_fingerprint)?,
                    Err(_) => None,
                };
                let spec_json = spec
                    .map_err(|e| e.to_string())
                    .and_then(|s| serde_json::to_string(&s).map_err(|e| e.to_string()));
                Ok(Response::Detail {
                    logs: shared.store.logs(&id)?,
                    tags: shared.store.tags(&id)?,
                    record: Box::new(record),
                    spec_json,
                    model_dir,
                })
            }),
            Request::Metrics { run } => data(|| {
                let id = shared.store.resolve(&run)?;
                Ok(Response::Metrics(shared.store.metrics(&id)?))
            }),
            Request::Blob { hash } => data(|| {
                let hash: crate::store::BlobHash = hash
                    .parse()
                    .map_err(|_| Error::Input(format!("`{hash}` is not a blob hash")))?;
                Ok(Response::Bytes(shared.store.read_blob(&hash)?))
            }),
            Request::Tag { run, tag, remove } => data(|| {
                let id = shared.store.resolve(&run)?;
                if remove {
                    shared.store.remove_tag(&id, &tag)?;
                } else {
                    shared.store.add_tag(&id, &tag)?;
                }
                Ok(Response::Ok)
            }),
            Request::Remove { run } => data(|| {
                let id = shared.store.resolve(&run)?;
                let busy = lock(&shared.current).iter().any(|c| c.id == id)
                    || lock(&shared.queue).iter().any(|j| *j.id() == id);
                if busy {
                    return Err(Error::Input(format!(
                        "run {id} is queued or running; cancel it first"
                    )));
                }
                shared.store.remove_run(&id)?;
                Ok(Response::Ok)
            }),
            Request::SubmitLearn(job) => {
                if shared.shutdown.load(Ordering::SeqCst) {
                    Response::Error("the engine is stopping; try again in a moment".into())
                } else {
                    match learn_job::prepare(&shared.store, &job) {
                        Ok(rec) => {
                            lock(&shared.queue).push_back(Job::Learn(rec.id.clone(), job));
                            shared.wake.notify_all();
                            shared.publish_status(&rec.id);
                            Response::Queued {
                                run: rec.id.to_string(),
                                warnings: Vec::new(),
                            }
                        }
                        Err(Error::AlreadyRan { run }) => Response::AlreadyRan { run },
                        Err(e) => Response::Error(e.to_string()),
                    }
                }
            }
            Request::SubmitSynth(job) => {
                if shared.shutdown.load(Ordering::SeqCst) {
                    Response::Error("the engine is stopping; try again in a moment".into())
                } else {
                    match crate::jobs::synth::prepare(&shared.store, &job) {
                        Ok((rec, warnings)) => {
                            lock(&shared.queue).push_back(Job::Synth(rec.id.clone(), job));
                            shared.wake.notify_all();
                            shared.publish_status(&rec.id);
                            Response::Queued {
                                run: rec.id.to_string(),
                                warnings,
                            }
                        }
                        Err(Error::AlreadyRan { run }) => Response::AlreadyRan { run },
                        Err(e) => Response::Error(e.to_string()),
                    }
                }
            }
            Request::ResumeLearn { run, model, device } => {
                match learn_job::check_resumable(&shared.store, &run, &model) {
                    Ok(id) => {
                        lock(&shared.queue).push_back(Job::Resume {
                            id: id.clone(),
                            model,
                            device,
                        });
                        shared.wake.notify_all();
                        Response::Queued {
                            run: id.to_string(),
                            warnings: Vec::new(),
                        }
                    }
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::Cancel { run } => cancel(shared, &run),
            Request::RecordScores { run, scores, note } => data(|| {
                let id = shared.store.resolve(&run)?;
                let prefix = score_prefix(&scores)?;
                shared.store.record_scores(&id, prefix, &scores, &note)?;
                Ok(Response::Ok)
            }),
            Request::Subscribe { run } => {
                let run = match run.map(|r| shared.store.resolve(&r)).transpose() {
                    Ok(r) => r,
                    Err(e) => {
                        write_frame(&mut writer, &Response::Error(e.to_string()))?;
                        continue;
                    }
                };
                write_frame(&mut writer, &Response::Ok)?;
                return stream_events(shared, run, &mut writer);
            }
            Request::Stop { force } => {
                let mut first = lock(&shared.first_stop);
                let again = first.is_some_and(|t| t.elapsed() < Duration::from_secs(5));
                if force || again {
                    eprintln!("engine: forced stop");
                    let _ = shared.store.flush();
                    let _ = std::fs::remove_file(socket_path(store_dir));
                    write_frame(&mut writer, &Response::Ok)?;
                    std::process::exit(0);
                }
                *first = Some(Instant::now());
                eprintln!("engine: stopping after the current step");
                shared.shutdown.store(true, Ordering::SeqCst);
                shared.wake.notify_all();
                Response::Ok
            }
        };
        write_frame(&mut writer, &reply)?;
    }
    Ok(())
}

fn cancel(shared: &Arc<Shared>, run: &str) -> Response {
    let id = match shared.store.resolve(run) {
        Ok(id) => id,
        Err(e) => return Response::Error(e.to_string()),
    };
    if let Some(c) = lock(&shared.current).iter().find(|c| c.id == id) {
        c.cancel.store(true, Ordering::SeqCst);
        return Response::Ok;
    }
    let mut q = lock(&shared.queue);
    if let Some(pos) = q.iter().position(|j| *j.id() == id) {
        q.remove(pos);
        drop(q);
        let _ = shared.store.append_log(&id, "cancelled before it started");
        return match shared.store.finish_run(&id, RunOutcome::Cancelled) {
            Ok(_) => {
                shared.publish_status(&id);
                Response::Ok
            }
            Err(e) => Response::Error(e.to_string()),
        };
    }
    Response::Error(format!("run {id} is not queued or running"))
}

/// Runs a data request, turning its error into a one-line [`Response::Error`].
fn data(f: impl FnOnce() -> Result<Response>) -> Response {
    f().unwrap_or_else(|e| Response::Error(e.to_string()))
}

fn output_bytes(shared: &Arc<Shared>, run: &str, name: &str) -> Response {
    let result = (|| -> Result<Vec<u8>> {
        let id = shared.store.resolve(run)?;
        let rec = shared.store.get_run(&id)?;
        let hash = rec.outputs.get(name).ok_or_else(|| {
            let names: Vec<&str> = rec.outputs.keys().map(String::as_str).collect();
            Error::Input(format!(
                "run {id} has no output named '{name}' (outputs: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?;
        Ok(shared.store.read_blob(hash)?)
    })();
    match result {
        Ok(b) => Response::Bytes(b),
        Err(e) => Response::Error(e.to_string()),
    }
}

fn run_runs_command(shared: &Arc<Shared>, argv: Vec<String>) -> Response {
    let parsed = match RunsArgv::try_parse_from(&argv) {
        Ok(p) => p,
        Err(e) => {
            return Response::Runs {
                stdout: Vec::new(),
                error: Some(
                    e.to_string()
                        .lines()
                        .next()
                        .unwrap_or("bad arguments")
                        .to_string(),
                ),
            }
        }
    };
    let mut out = Vec::new();
    let result = {
        let mut console = crate::cli::runs::Console {
            out: &mut out,
            confirm: None,
        };
        crate::cli::runs::run_on(parsed.cmd, &shared.store, &mut console)
    };
    Response::Runs {
        stdout: out,
        error: result.err().map(|e| format!("{e:#}")),
    }
}

/// Whether the client closed its end: a non-blocking peek reads end-of-file.
fn peer_gone(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv into one valid byte of our own, on a socket we own; MSG_PEEK leaves the
    // data in place and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

fn stream_events(
    shared: &Arc<Shared>,
    run: Option<RunId>,
    writer: &mut BufWriter<UnixStream>,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel();
    lock(&shared.subscribers).push(Subscriber {
        run: run.clone(),
        tx,
    });
    // A run that already ended (and is not queued to resume) gets its final status at once.
    if let Some(id) = &run {
        let pending = lock(&shared.queue).iter().any(|j| j.id() == id)
            || lock(&shared.current).iter().any(|c| &c.id == id);
        if let Ok(r) = shared.store.get_run(id) {
            if r.status.is_final() && !pending {
                write_frame(
                    writer,
                    &Response::Event(Event {
                        run: id.to_string(),
                        kind: EventKind::Status {
                            status: r.status.as_str().into(),
                            error: r.error.clone(),
                        },
                    }),
                )?;
            }
        }
    }
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(ev) => write_frame(writer, &Response::Event(ev))?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if shared.shutdown.load(Ordering::SeqCst) && lock(&shared.current).is_empty() {
                    return Ok(());
                }
                // A subscriber that went away between events must not keep the engine alive.
                if peer_gone(writer.get_ref()) {
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// The family of a set of scores: `eval/` (CLIP/DINO evaluation) or `oracle/` (the world's
/// oracle), read from the first score's name; [`Store::record_scores`] checks the rest.
fn score_prefix(scores: &[(String, f64)]) -> Result<&'static str> {
    let first = scores.first().map(|(n, _)| n.as_str()).unwrap_or("");
    crate::store::SCORE_PREFIXES
        .into_iter()
        .find(|p| first.starts_with(p))
        .ok_or_else(|| {
            Error::Input(format!(
                "score {first:?} is neither an eval/ nor an oracle/ score"
            ))
        })
}
