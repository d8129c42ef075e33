//! The engine process: owns the store, queues and runs jobs, streams events, answers clients on
//! `<store>/engine.sock` (mode 0600, same-uid peers only).

use std::io::{BufReader, BufWriter};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::{
    read_frame, write_frame, EngineStatus, Event, EventKind, Request, Response, PROTOCOL_VERSION,
};
use super::socket_path;
use crate::error::{Error, Result};
use crate::jobs::learn as learn_job;
use crate::jobs::pool::{DevicePool, PoolOptions};
use crate::jobs::runner::{Cancelled, Runner, RunnerEvent, Work};
use crate::jobs::slurm::{SlurmExecutor, SlurmOptions};
use crate::jobs::sweep::{Planned, SweepEntry, SweepItem, SweepJob};
use crate::store::{RunId, RunOutcome, Store};

/// How the engine behaves.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Exit after this long with no job and no client (auto-started engines); `None` = never.
    pub idle_exit: Option<Duration>,
    /// The devices its runs may use and how many runs each holds at once (one per device is
    /// the sane default: two jobs on one GPU compete for its memory).
    pub pool: PoolOptions,
    /// Run learning and synthesis runs as Slurm jobs with these options (`--executor slurm`);
    /// `None` runs them on the pool. Either way the engine follows the Slurm runs a previous
    /// engine left.
    pub slurm: Option<SlurmOptions>,
}

struct Subscriber {
    run: Option<RunId>,
    tx: mpsc::Sender<Event>,
}

struct Shared {
    store: Store,
    /// The queue, the device pool and one worker per slot of the pool.
    runner: Runner,
    /// The runs that go (or went) through Slurm.
    slurm: SlurmExecutor,
    subscribers: Mutex<Vec<Subscriber>>,
    first_stop: Mutex<Option<Instant>>,
    started: Instant,
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

    /// Whether run `id` is queued or running, here or on Slurm.
    fn is_pending(&self, id: &RunId) -> bool {
        self.runner.is_pending(id) || self.slurm.is_pending(id)
    }

    /// Whether new runs go to Slurm (learning and synthesis runs alike).
    fn to_slurm(&self) -> bool {
        self.slurm.submits()
    }

    fn touch(&self) {
        *lock(&self.last_activity) = Instant::now();
    }

    fn status(&self, store_dir: &Path) -> EngineStatus {
        let snap = self.runner.snapshot();
        let running = &snap.running;
        let first = running.first();
        EngineStatus {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            store: store_dir.display().to_string(),
            queue: snap.waiting.iter().map(|(id, _)| id.to_string()).collect(),
            running: first.map(|c| c.id.to_string()),
            progress: first.and_then(|c| c.progress.clone()),
            device: first.map(|c| c.device.clone()),
            running_all: running
                .iter()
                .map(|c| (c.id.to_string(), c.device.clone(), c.progress.clone()))
                .collect(),
            workers: self.runner.workers(),
            pool: snap.slots,
            waiting: snap
                .waiting
                .into_iter()
                .map(|(id, want)| (id.to_string(), want))
                .collect(),
            executor: if self.slurm.submits() {
                "slurm".into()
            } else {
                "local".into()
            },
            slurm: self.slurm.jobs(),
            version: PROTOCOL_VERSION,
        }
    }

    /// What the runner reports, as events to the subscribers.
    fn on_runner_event(&self, run: &RunId, event: RunnerEvent) {
        match event {
            RunnerEvent::Started => self.publish_status(run),
            RunnerEvent::Sink(ev) => self.publish(Event {
                run: run.to_string(),
                kind: EventKind::Run(ev),
            }),
            RunnerEvent::Ended => {
                self.publish_status(run);
                self.touch();
            }
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
    // A pool that cannot be (`--gpus 7` on a 2-GPU machine) refuses to start before the store
    // is touched.
    let pool = DevicePool::new(&opts.pool)?;
    let store = Store::create(store_dir)?;
    let _ = std::fs::set_permissions(store_dir, std::fs::Permissions::from_mode(0o700));
    // Runs whose Slurm jobs a previous engine submitted go on without it: this engine takes
    // them over (they are neither stale nor cancelled below) and follows them again.
    let left = SlurmExecutor::left_behind(&store)?;
    for id in &left {
        if store.get_run(id)?.status == crate::store::RunStatus::Running {
            store.adopt_run(id)?;
        }
    }
    let stale = store.mark_stale_running_interrupted()?;
    for id in &stale {
        eprintln!("engine: run {id} was left running by a dead process: marked interrupted");
    }
    // Queued runs of a previous engine were never started: close them so they can be launched
    // again. (The store keeps log lines of running runs only, so the reason goes to the
    // engine's own log; a failed log write here used to stop the engine from starting.)
    for rec in store.runs() {
        let rec = rec?;
        if rec.status == crate::store::RunStatus::Queued && !left.contains(&rec.id) {
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
        "engine: pid {} serving {} (protocol {PROTOCOL_VERSION}), devices {}",
        std::process::id(),
        store_dir.display(),
        pool.slots()
            .iter()
            .map(|d| format!("{}×{}", d.device, d.capacity))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // The runner reports to the engine that holds it (no job is queued before both exist).
    let exe = std::env::current_exe().map_err(|e| Error::io(Path::new("mifo"), e))?;
    let shared = Arc::new_cyclic(|engine: &std::sync::Weak<Shared>| {
        let engine = engine.clone();
        let observer: crate::jobs::runner::RunnerObserver =
            Arc::new(move |run: &RunId, event: RunnerEvent| {
                if let Some(shared) = engine.upgrade() {
                    shared.on_runner_event(run, event);
                }
            });
        let runner = Runner::start(store.clone(), pool, observer.clone());
        let slurm = SlurmExecutor::new(store.clone(), exe, opts.slurm.clone(), observer);
        Shared {
            store,
            runner,
            slurm,
            subscribers: Mutex::new(Vec::new()),
            first_stop: Mutex::new(None),
            started: Instant::now(),
            clients: AtomicUsize::new(0),
            last_activity: Mutex::new(Instant::now()),
        }
    });
    for id in &left {
        if let Err(e) = shared.slurm.reattach(id) {
            eprintln!("engine: run {id}: cannot follow its Slurm job again: {e}");
        }
    }
    if shared.slurm.submits() {
        eprintln!("engine: learning and synthesis runs go to Slurm as `mifo worker` jobs");
    }
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
        if shared.runner.is_stopping()
            && shared.runner.workers_finished()
            && shared.slurm.finished()
        {
            break;
        }
        if let Some(idle) = opts.idle_exit {
            let busy = shared.runner.is_busy() || shared.slurm.is_busy();
            let quiet = shared.clients.load(Ordering::SeqCst) == 0
                && lock(&shared.last_activity).elapsed() >= idle;
            if !busy && quiet {
                eprintln!("engine: idle for {idle:?}, exiting");
                // No new client may reach an engine that is on its way out (it would answer
                // `Hello` and then exit under the client's request): the socket goes now, and
                // a client that comes later starts a new engine.
                let _ = std::fs::remove_file(&sock);
                shared.runner.stop();
                shared.slurm.stop();
                break;
            }
        }
    }
    // Queued jobs never started are recorded as cancelled.
    shared.runner.join();
    let _ = shared.store.flush();
    let _ = std::fs::remove_file(&sock);
    eprintln!("engine: stopped");
    Ok(())
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
            Request::Runs(request) => match crate::runs::execute(&shared.store, request) {
                Ok(reply) => Response::Runs(reply),
                Err(e) => Response::Error(e.to_string()),
            },
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
                let (model_dir, model_config) = match &spec {
                    Ok(s) => (
                        shared.store.model_dir_for(&s.model_fingerprint)?,
                        shared.store.model_config_for(&s.model_fingerprint)?,
                    ),
                    Err(_) => (None, None),
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
                    model_config,
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
                    if !shared.store.remove_tag(&id, &tag)? {
                        return Err(Error::Input(format!("run {id} has no tag {tag}")));
                    }
                } else {
                    shared.store.add_tag(&id, &tag)?;
                }
                Ok(Response::Ok)
            }),
            Request::Remove { run } => data(|| {
                let id = shared.store.resolve(&run)?;
                if shared.is_pending(&id) {
                    return Err(Error::Input(format!(
                        "run {id} is queued or running; cancel it first"
                    )));
                }
                shared.store.remove_run(&id)?;
                // The worker files of a run that went through Slurm go with it.
                let dir = crate::jobs::journal::run_dir(shared.store.root(), &id);
                if dir.is_dir() {
                    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                }
                Ok(Response::Ok)
            }),
            Request::SubmitLearn(job) => submit_one(
                shared,
                SweepEntry {
                    label: String::new(),
                    job: crate::jobs::sweep::SweepJob::Learn(job),
                },
            ),
            Request::SubmitSynth(job) => submit_one(
                shared,
                SweepEntry {
                    label: String::new(),
                    job: crate::jobs::sweep::SweepJob::Synth(job),
                },
            ),
            Request::SubmitSweep { name, entries } => submit_sweep(shared, &name, entries),
            Request::SweepTable { name, by } => data(|| {
                Ok(Response::SweepTable(crate::jobs::sweep::table(
                    &shared.store,
                    &name,
                    &by,
                )?))
            }),
            Request::ResumeLearn { run, model, .. } if shared.slurm.submits() => {
                match learn_job::check_resumable(&shared.store, &run, &model).and_then(|id| {
                    shared.slurm.submit_resume(&id, model)?;
                    Ok(id)
                }) {
                    Ok(id) => Response::Queued {
                        run: id.to_string(),
                        warnings: Vec::new(),
                    },
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::ResumeLearn { run, model, device } => {
                let checked = shared
                    .runner
                    .check_device(&device)
                    .and_then(|_| learn_job::check_resumable(&shared.store, &run, &model));
                match checked.and_then(|id| {
                    shared.runner.submit(Work::Resume {
                        id: id.clone(),
                        model,
                        device,
                    })?;
                    Ok(id)
                }) {
                    Ok(id) => Response::Queued {
                        run: id.to_string(),
                        warnings: Vec::new(),
                    },
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
                shared.runner.stop();
                // Slurm jobs go on; the next engine follows them again.
                shared.slurm.stop();
                Response::Ok
            }
        };
        write_frame(&mut writer, &reply)?;
    }
    Ok(())
}

/// Checks a learning or synthesis job against the pool and the store, records it as queued and
/// queues it (a spec that already finished is [`Response::AlreadyRan`]).
fn submit_one(shared: &Arc<Shared>, entry: SweepEntry) -> Response {
    if shared.runner.is_stopping() {
        return Response::Error("the engine is stopping; try again in a moment".into());
    }
    let checked = validation_device(shared, &entry.job)
        .and_then(|device| entry.job.check(&shared.store, &device));
    let checked = match checked {
        Ok(c) => c,
        Err(Error::AlreadyRan { run }) => return Response::AlreadyRan { run },
        Err(e) => return Response::Error(e.to_string()),
    };
    match queue_checked(shared, &checked, entry) {
        Ok(id) => Response::Queued {
            run: id.to_string(),
            warnings: checked.warnings,
        },
        Err(e) => Response::Error(e.to_string()),
    }
}

/// Records a checked job and queues it.
fn queue_checked(
    shared: &Arc<Shared>,
    checked: &crate::jobs::Checked,
    entry: SweepEntry,
) -> Result<RunId> {
    let rec = crate::jobs::record(&shared.store, checked)?;
    let submitted = match entry.job {
        SweepJob::Learn(job) if shared.to_slurm() => shared.slurm.submit(&rec.id, &job),
        SweepJob::Synth(job) if shared.to_slurm() => shared.slurm.submit_synth(&rec.id, &job),
        job => shared.runner.submit(job.into_work(rec.id.clone())),
    };
    if let Err(e) = submitted {
        // Checked against the same pool a moment ago; should it fail, the run must not stay
        // queued for ever.
        let _ = shared
            .store
            .finish_run(&rec.id, RunOutcome::Failed(e.to_string()));
        return Err(e);
    }
    shared.publish_status(&rec.id);
    Ok(rec.id)
}

/// Plans a sweep (every combination checked, nothing written when one fails), then records and
/// queues the combinations that have not run and tags every run of the sweep with `name`.
fn submit_sweep(shared: &Arc<Shared>, name: &str, entries: Vec<SweepEntry>) -> Response {
    if shared.runner.is_stopping() {
        return Response::Error("the engine is stopping; try again in a moment".into());
    }
    if let Err(e) = crate::store::validate_tag(name) {
        return Response::Error(format!("--name {name}: {e}"));
    }
    let slurm = shared.to_slurm();
    let check_device = |d: &str| {
        if slurm {
            Ok(SLURM_VALIDATION_DEVICE.to_string())
        } else {
            shared.runner.check_device(d).map(|(_, check)| check)
        }
    };
    let planned = match crate::jobs::sweep::plan(&shared.store, &entries, &check_device) {
        Ok(p) => p,
        Err(e) => return Response::Error(e.to_string()),
    };
    let mut items = Vec::with_capacity(planned.len());
    // Through Slurm, the sweep's new runs are recorded first and go as one job array.
    let mut array: Vec<(RunId, SweepJob)> = Vec::new();
    for (plan, entry) in planned.into_iter().zip(entries) {
        let queued =
            match plan {
                Planned::Skip(item) => Ok(item),
                Planned::Queue(checked) if slurm => crate::jobs::record(&shared.store, &checked)
                    .map(|rec| {
                        array.push((rec.id.clone(), entry.job));
                        SweepItem::Queued(rec.id.to_string())
                    }),
                Planned::Queue(checked) => queue_checked(shared, &checked, entry)
                    .map(|id| SweepItem::Queued(id.to_string())),
            };
        let item = match queued {
            Ok(item) => item,
            Err(e) => {
                fail_unsubmitted(shared, &array, &e);
                let done = items.iter().filter_map(SweepItem::run).count();
                return Response::Error(format!(
                    "{e} (after {done} runs of the sweep were queued or skipped, tagged {name})"
                ));
            }
        };
        if let Some(run) = item.run() {
            let tagged = shared
                .store
                .resolve(run)
                .and_then(|id| shared.store.add_tag(&id, name));
            if let Err(e) = tagged {
                let e = Error::Input(format!("tagging run {run} with {name}: {e}"));
                fail_unsubmitted(shared, &array, &e);
                return Response::Error(e.to_string());
            }
        }
        items.push(item);
    }
    if !array.is_empty() {
        let ids: Vec<RunId> = array.iter().map(|(id, _)| id.clone()).collect();
        if let Err(e) = shared.slurm.submit_array(array) {
            fail_unfollowed(shared, ids.iter(), &e);
            return Response::Error(format!("the sweep's Slurm job array: {e}"));
        }
        for id in &ids {
            shared.publish_status(id);
        }
    }
    Response::Sweep(items)
}

/// Marks failed the recorded runs of `runs` that no Slurm job follows (their array was never
/// submitted), so that none stays queued for ever.
fn fail_unsubmitted(shared: &Arc<Shared>, runs: &[(RunId, SweepJob)], why: &Error) {
    fail_unfollowed(shared, runs.iter().map(|(id, _)| id), why);
}

fn fail_unfollowed<'a>(shared: &Arc<Shared>, runs: impl Iterator<Item = &'a RunId>, why: &Error) {
    for id in runs {
        if !shared.slurm.is_pending(id) {
            let _ = shared.store.finish_run(
                id,
                RunOutcome::Failed(format!("not submitted to Slurm: {why}")),
            );
            shared.publish_status(id);
        }
    }
}

/// The device a job is checked on before it is recorded: one of the pool's for a job the
/// engine runs, the CPU for one that goes to Slurm (its device is the node's).
const SLURM_VALIDATION_DEVICE: &str = "cpu";

fn validation_device(shared: &Arc<Shared>, job: &SweepJob) -> Result<String> {
    if shared.to_slurm() {
        return Ok(SLURM_VALIDATION_DEVICE.to_string());
    }
    shared
        .runner
        .check_device(job.device())
        .map(|(_, device)| device)
}

fn cancel(shared: &Arc<Shared>, run: &str) -> Response {
    let result = shared
        .store
        .resolve(run)
        .map_err(Error::from)
        .and_then(|id| {
            if shared.slurm.cancel(&id) {
                return Ok((Cancelled::Stopping, id));
            }
            Ok((shared.runner.cancel(&id)?, id))
        });
    match result {
        Ok((Cancelled::Stopping, _)) => Response::Ok,
        Ok((Cancelled::Dequeued, id)) => {
            shared.publish_status(&id);
            Response::Ok
        }
        Err(e) => Response::Error(e.to_string()),
    }
}

/// Runs a data request, turning its error into a one-line [`Response::Error`].
fn data(f: impl FnOnce() -> Result<Response>) -> Response {
    f().unwrap_or_else(|e| Response::Error(e.to_string()))
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
        let pending = shared.is_pending(id);
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
                if shared.runner.is_stopping()
                    && !shared.runner.is_running()
                    && shared.slurm.finished()
                {
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
