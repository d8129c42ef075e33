//! The job runner: a queue of prepared runs and the worker threads that execute them, one at a
//! time per worker, with cancel, shutdown and panic handling. The engine owns one runner for its
//! store; nothing else runs jobs in the background.
//!
//! A run enters the queue already recorded as `queued` ([`super::learn::prepare`],
//! [`super::synth::prepare`]) or `interrupted` (a resume). A worker takes the oldest run whose
//! device has a free slot in the runner's [`DevicePool`] (a run naming a busy device waits for
//! it; runs behind it may start elsewhere), executes it on that device with a
//! [`StoreSink`](super::sink::StoreSink) that reports every event to the runner's observer,
//! records the end and frees the slot, whatever the end (done, failed, cancelled, a panic). A
//! job that panics is recorded as failed and the worker goes on. There is one worker per slot.

use std::collections::VecDeque;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::learn::{self as learn_job, LearnJob, RunOptions};
use super::pool::{DevicePool, DeviceSlots};
use super::sink::{Observer, SinkEvent};
use super::synth::SynthJob;
use crate::error::{Error, Result};
use crate::store::{RunId, RunOutcome, Store};

/// A prepared run waiting for a worker.
pub enum Work {
    /// A learning run recorded as queued.
    Learn(RunId, Box<LearnJob>),
    /// A synthesis run recorded as queued.
    Synth(RunId, Box<SynthJob>),
    /// The continuation of an interrupted learning run from its checkpoint.
    Resume {
        /// The run.
        id: RunId,
        /// The model (its fingerprint was checked against the run's).
        model: crate::model::ModelSource,
        /// Device.
        device: String,
    },
}

impl Work {
    /// The run this work executes.
    pub fn id(&self) -> &RunId {
        match self {
            Work::Learn(id, _) | Work::Synth(id, _) | Work::Resume { id, .. } => id,
        }
    }

    /// The device it asked for (`auto`, or a device of the pool).
    pub fn device(&self) -> &str {
        match self {
            Work::Learn(_, j) => &j.device,
            Work::Synth(_, j) => &j.device,
            Work::Resume { device, .. } => device,
        }
    }

    /// The same work on `device` (the slot the pool gave it).
    fn on_device(&self, device: &str) -> Work {
        match self {
            Work::Learn(id, j) => Work::Learn(
                id.clone(),
                Box::new(LearnJob {
                    device: device.to_string(),
                    ..(**j).clone()
                }),
            ),
            Work::Synth(id, j) => Work::Synth(
                id.clone(),
                Box::new(SynthJob {
                    device: device.to_string(),
                    ..(**j).clone()
                }),
            ),
            Work::Resume { id, model, .. } => Work::Resume {
                id: id.clone(),
                model: model.clone(),
                device: device.to_string(),
            },
        }
    }
}

/// What the runner tells its observer about a run.
#[derive(Clone, Debug, PartialEq)]
pub enum RunnerEvent {
    /// The run's status changed to `running` (its record says so now).
    Started,
    /// A metric point, log line, progress report or output of the running run.
    Sink(SinkEvent),
    /// The run ended (its record holds the final status), or a queued run was cancelled.
    Ended,
}

/// Receives the runner's events; called from worker threads.
pub type RunnerObserver = Arc<dyn Fn(&RunId, RunnerEvent) + Send + Sync>;

/// A run a worker is executing.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningJob {
    /// The run.
    pub id: RunId,
    /// The device it holds (a slot of the pool).
    pub device: String,
    /// Its last progress report: (step, total, phase).
    pub progress: Option<(u64, u64, String)>,
}

/// What [`Runner::snapshot`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerSnapshot {
    /// The running jobs, in the order they started.
    pub running: Vec<RunningJob>,
    /// The pool's devices and their holders.
    pub slots: Vec<DeviceSlots>,
    /// Queued runs with the device each waits for, oldest first.
    pub waiting: Vec<(RunId, String)>,
}

/// What [`Runner::cancel`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The run is running: it stops at its next step (its checkpoint is kept).
    Stopping,
    /// The run was queued: it is out of the queue and recorded as cancelled.
    Dequeued,
}

struct Current {
    job: RunningJob,
    cancel: Arc<AtomicBool>,
}

/// A queued run and the device it waits for ([`DevicePool::resolve`]d: `auto` or a name).
struct Queued {
    work: Work,
    want: String,
}

/// The queue and the pool under one lock, so that taking a run and its slot is one step.
struct Sched {
    queue: VecDeque<Queued>,
    pool: DevicePool,
}

struct Inner {
    store: Store,
    sched: Mutex<Sched>,
    wake: Condvar,
    current: Mutex<Vec<Current>>,
    shutdown: Arc<AtomicBool>,
    observer: RunnerObserver,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The queue and its workers. Cloning shares them.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    worker_count: usize,
}

impl Runner {
    /// Starts one worker thread per slot of `pool` on `store`, reporting to `observer`.
    pub fn start(store: Store, pool: DevicePool, observer: RunnerObserver) -> Runner {
        let workers = pool.capacity();
        let inner = Arc::new(Inner {
            store,
            sched: Mutex::new(Sched {
                queue: VecDeque::new(),
                pool,
            }),
            wake: Condvar::new(),
            current: Mutex::new(Vec::new()),
            shutdown: Arc::new(AtomicBool::new(false)),
            observer,
        });
        let worker_count = workers.max(1);
        let handles = (0..worker_count)
            .map(|_| {
                let inner = inner.clone();
                std::thread::spawn(move || worker_loop(&inner))
            })
            .collect();
        Runner {
            inner,
            workers: Arc::new(Mutex::new(handles)),
            worker_count,
        }
    }

    /// How many jobs may run at once.
    pub fn workers(&self) -> usize {
        self.worker_count
    }

    /// What a run asking for `device` waits for in this runner's pool (see
    /// [`DevicePool::resolve`]), and the device to validate its job on before it is recorded
    /// ([`DevicePool::validation_device`]).
    pub fn check_device(&self, device: &str) -> Result<(String, String)> {
        let sched = lock(&self.inner.sched);
        let want = sched.pool.resolve(device)?;
        let check = sched.pool.validation_device(&want);
        Ok((want, check))
    }

    /// Queues `work` behind the jobs already waiting; refused when its device is not in the
    /// pool (check first with [`Self::check_device`]).
    pub fn submit(&self, work: Work) -> Result<()> {
        let mut sched = lock(&self.inner.sched);
        let want = sched.pool.resolve(work.device())?;
        sched.queue.push_back(Queued { work, want });
        drop(sched);
        self.inner.wake.notify_all();
        Ok(())
    }

    /// The pool's devices and the runs holding them.
    pub fn slots(&self) -> Vec<DeviceSlots> {
        lock(&self.inner.sched).pool.slots()
    }

    /// One consistent view: the running jobs, the pool's devices with their holders, and the
    /// queued runs with the device each waits for.
    pub fn snapshot(&self) -> RunnerSnapshot {
        let sched = lock(&self.inner.sched);
        let running = lock(&self.inner.current)
            .iter()
            .map(|c| c.job.clone())
            .collect();
        RunnerSnapshot {
            running,
            slots: sched.pool.slots(),
            waiting: sched
                .queue
                .iter()
                .map(|q| (q.work.id().clone(), q.want.clone()))
                .collect(),
        }
    }

    /// The queued runs with the device each waits for (`auto` or a name), oldest first.
    pub fn waiting(&self) -> Vec<(RunId, String)> {
        lock(&self.inner.sched)
            .queue
            .iter()
            .map(|q| (q.work.id().clone(), q.want.clone()))
            .collect()
    }

    /// Cancels run `id`: a running one stops at its next step, a queued one leaves the queue
    /// and is recorded as cancelled.
    pub fn cancel(&self, id: &RunId) -> Result<Cancelled> {
        if let Some(c) = lock(&self.inner.current).iter().find(|c| &c.job.id == id) {
            c.cancel.store(true, Ordering::SeqCst);
            return Ok(Cancelled::Stopping);
        }
        let mut sched = lock(&self.inner.sched);
        let Some(pos) = sched.queue.iter().position(|q| q.work.id() == id) else {
            return Err(Error::Input(format!("run {id} is not queued or running")));
        };
        sched.queue.remove(pos);
        drop(sched);
        // (A queued run takes no log lines: the store keeps them for running runs only.)
        self.inner.store.finish_run(id, RunOutcome::Cancelled)?;
        eprintln!("engine: run {id} cancelled before it started");
        Ok(Cancelled::Dequeued)
    }

    /// The queued runs, oldest first.
    pub fn queued(&self) -> Vec<RunId> {
        lock(&self.inner.sched)
            .queue
            .iter()
            .map(|q| q.work.id().clone())
            .collect()
    }

    /// The running jobs, in the order they started.
    pub fn running(&self) -> Vec<RunningJob> {
        lock(&self.inner.current)
            .iter()
            .map(|c| c.job.clone())
            .collect()
    }

    /// Whether run `id` is queued or running.
    pub fn is_pending(&self, id: &RunId) -> bool {
        // One lock at a time (a worker takes the queue's lock, then `current`'s).
        let running = lock(&self.inner.current).iter().any(|c| &c.job.id == id);
        running
            || lock(&self.inner.sched)
                .queue
                .iter()
                .any(|q| q.work.id() == id)
    }

    /// Whether any job is queued or running.
    pub fn is_busy(&self) -> bool {
        let running = !lock(&self.inner.current).is_empty();
        running || !lock(&self.inner.sched).queue.is_empty()
    }

    /// Whether any job is running.
    pub fn is_running(&self) -> bool {
        !lock(&self.inner.current).is_empty()
    }

    /// Asks every worker to stop: running jobs stop at their next step and stay resumable
    /// (`interrupted` when the store is next opened); queued jobs are not started.
    pub fn stop(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
    }

    /// Whether [`Self::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.inner.shutdown.load(Ordering::SeqCst)
    }

    /// Whether every worker thread has returned (after [`Self::stop`]).
    pub fn workers_finished(&self) -> bool {
        lock(&self.workers).iter().all(|w| w.is_finished())
    }

    /// Waits for the workers (call after [`Self::stop`]), then records the queued runs that
    /// never started as cancelled.
    pub fn join(&self) {
        let handles: Vec<_> = lock(&self.workers).drain(..).collect();
        for w in handles {
            let _ = w.join();
        }
        // The store keeps log lines of running runs only, so the reason goes to the engine's
        // own log (stderr).
        let queued: Vec<Work> = lock(&self.inner.sched)
            .queue
            .drain(..)
            .map(|q| q.work)
            .collect();
        for work in queued {
            match self
                .inner
                .store
                .finish_run(work.id(), RunOutcome::Cancelled)
            {
                Ok(_) => eprintln!(
                    "engine: run {} was still queued: marked cancelled",
                    work.id()
                ),
                Err(e) => eprintln!("engine: run {}: {e}", work.id()),
            }
        }
    }
}

/// Takes the oldest job that can have a slot of its device now, with that slot (the device's
/// name), or `None` once the runner is stopping. The job is in `current` before the lock is
/// released, so that it is never in neither list.
fn next_work(inner: &Inner) -> Option<(Work, String, Arc<AtomicBool>)> {
    let mut sched = lock(&inner.sched);
    loop {
        if inner.shutdown.load(Ordering::SeqCst) {
            return None;
        }
        let Sched { queue, pool } = &mut *sched;
        let taken = queue.iter().enumerate().find_map(|(i, q)| {
            pool.try_acquire(&q.want, q.work.id())
                .map(|device| (i, device))
        });
        if let Some(queued) = taken.and_then(|(i, device)| Some((queue.remove(i)?, device))) {
            let (queued, device) = queued;
            let cancel = Arc::new(AtomicBool::new(false));
            lock(&inner.current).push(Current {
                job: RunningJob {
                    id: queued.work.id().clone(),
                    device: device.clone(),
                    progress: None,
                },
                cancel: cancel.clone(),
            });
            return Some((queued.work.on_device(&device), device, cancel));
        }
        sched = inner
            .wake
            .wait_timeout(sched, Duration::from_millis(200))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

fn worker_loop(inner: &Arc<Inner>) {
    while let Some((work, device, cancel)) = next_work(inner) {
        let id = work.id().clone();
        let observer: Observer = {
            let inner = inner.clone();
            Arc::new(move |run: &RunId, ev: SinkEvent| {
                if let SinkEvent::Progress {
                    step, total, phase, ..
                } = &ev
                {
                    if let Some(c) = lock(&inner.current).iter_mut().find(|c| &c.job.id == run) {
                        c.job.progress = Some((*step, *total, phase.clone()));
                    }
                }
                (inner.observer)(run, RunnerEvent::Sink(ev));
            })
        };
        let opts = RunOptions {
            progress_bar: false,
            stop: cancel,
            shutdown: inner.shutdown.clone(),
            observer: Some(observer),
            progress_lines: true,
        };
        eprintln!("engine: starting run {id} on {device}");
        let started = || (inner.observer)(&id, RunnerEvent::Started);
        let store = &inner.store;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &work {
            Work::Learn(id, job) => {
                learn_job::start_with_hook(store, id, job, &opts, &started).map(|_| ())
            }
            Work::Synth(id, job) => {
                super::synth::start(store, id, job, &opts, &started).map(|_| ())
            }
            Work::Resume { id, model, device } => {
                learn_job::resume_with_hook(store, id, model, device, &opts, &started).map(|_| ())
            }
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("engine: run {id} failed: {e}"),
            Err(_) => {
                eprintln!("engine: run {id} panicked");
                let _ = store.finish_run(
                    &id,
                    RunOutcome::Failed("internal error (panic); see engine.log".into()),
                );
            }
        }
        // Whatever the end, the slot is free again before anyone hears of it.
        {
            let mut sched = lock(&inner.sched);
            sched.pool.release(&device, &id);
            lock(&inner.current).retain(|c| c.job.id != id);
        }
        inner.wake.notify_all();
        (inner.observer)(&id, RunnerEvent::Ended);
    }
}
