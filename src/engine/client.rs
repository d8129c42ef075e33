//! Talking to the engine: connect (starting it in the background when none answers), send
//! requests, follow a run's events.

use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{read_frame, write_frame, Event, Request, Response, PROTOCOL_VERSION};
use super::socket_path;
use crate::error::{Error, Result};
use crate::runs::{RunsReply, RunsRequest};

/// A connection to the engine of one store.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    /// The engine's pid.
    pub engine_pid: u32,
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Input(format!("engine: {what}: {e}"))
}

/// What [`Client::stored_run`] returns.
#[derive(Debug)]
pub struct StoredRun {
    /// The run's record.
    pub record: crate::store::RunRecord,
    /// Its spec.
    pub spec: crate::store::RunSpec,
    /// The model folder (or single file) the store noted for its model, while it still holds
    /// that model.
    pub model_dir: Option<PathBuf>,
    /// The `--model-config` folder noted with a single-file model.
    pub model_config: Option<PathBuf>,
}

impl StoredRun {
    /// The model the store knows for this run, as a source for a new job.
    pub fn known_model(&self) -> Option<crate::model::ModelSource> {
        self.model_dir
            .clone()
            .map(|dir| crate::model::ModelSource::local(dir, self.model_config.clone()))
    }
}

impl Client {
    /// Connects to a running engine; `Ok(None)` when none answers.
    pub fn try_connect(store_dir: &Path) -> Result<Option<Client>> {
        let sock = socket_path(store_dir);
        let stream = match UnixStream::connect(&sock) {
            Ok(s) => s,
            Err(_) => return Ok(None),
        };
        let mut client = Client {
            reader: BufReader::new(stream.try_clone().map_err(|e| io_err("socket", e))?),
            writer: BufWriter::new(stream),
            engine_pid: 0,
        };
        // A connection the engine never serves (it was queued as the engine exited) is
        // reset: no engine answers.
        let hello = match client.request(&Request::Hello {
            version: PROTOCOL_VERSION,
        }) {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        match hello {
            Response::Hello { pid, .. } => {
                client.engine_pid = pid;
                Ok(Some(client))
            }
            Response::Error(e) => Err(Error::Input(format!("engine: {e}"))),
            other => Err(Error::Input(format!("engine: unexpected reply {other:?}"))),
        }
    }

    /// Connects, starting the engine in the background (detached, logging to
    /// `<store>/engine.log`) when none answers.
    pub fn connect(store_dir: &Path) -> Result<Client> {
        Self::connect_with(store_dir, &[])
    }

    /// [`Self::connect`], giving an engine it starts the extra `mifo engine run` arguments
    /// `engine_args` (e.g. `--gpus 0,2`).
    pub fn connect_with(store_dir: &Path, engine_args: &[String]) -> Result<Client> {
        if let Some(c) = Self::try_connect(store_dir)? {
            return Ok(c);
        }
        start_background(store_dir, engine_args)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(c) = Self::try_connect(store_dir)? {
                return Ok(c);
            }
            if Instant::now() > deadline {
                return Err(Error::Input(format!(
                    "the engine did not start; see {}",
                    store_dir.join("engine.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Sends one request and reads its reply.
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        write_frame(&mut self.writer, req).map_err(|e| io_err("send", e))?;
        match read_frame::<Response>(&mut self.reader).map_err(|e| io_err("receive", e))? {
            Some(r) => Ok(r),
            None => Err(Error::Input("engine: connection closed".into())),
        }
    }

    /// A run's record and spec (by id or unique prefix), and the model folder the store knows
    /// for it ([`Request::Detail`] without logs and tags).
    pub fn stored_run(&mut self, run: &str) -> Result<StoredRun> {
        match self.request(&Request::Detail { run: run.into() })? {
            Response::Detail {
                record,
                spec_json,
                model_dir,
                model_config,
                ..
            } => {
                let spec_json = spec_json.map_err(Error::Input)?;
                let spec = serde_json::from_str(&spec_json)
                    .map_err(|e| Error::Input(format!("run {run}: spec unreadable ({e})")))?;
                Ok(StoredRun {
                    record: *record,
                    spec,
                    model_dir,
                    model_config,
                })
            }
            Response::Error(e) => Err(Error::Input(e)),
            other => Err(Error::Input(format!("engine: unexpected reply {other:?}"))),
        }
    }

    /// Stores scores (`eval/*` or `oracle/*`) with finished run `run` in one transaction, with
    /// `note` in its log ([`Request::RecordScores`]).
    pub fn record_scores(
        &mut self,
        run: &str,
        scores: Vec<(String, f64)>,
        note: String,
    ) -> Result<()> {
        match self.request(&Request::RecordScores {
            run: run.to_string(),
            scores,
            note,
        })? {
            Response::Ok => Ok(()),
            Response::Error(e) => Err(Error::Input(e)),
            other => Err(Error::Input(format!("engine: unexpected reply {other:?}"))),
        }
    }

    /// Executes a `runs` operation on the engine's store ([`Request::Runs`]).
    pub fn runs(&mut self, request: RunsRequest) -> Result<RunsReply> {
        match self.request(&Request::Runs(request))? {
            Response::Runs(reply) => Ok(reply),
            Response::Error(e) => Err(Error::Input(e)),
            other => Err(Error::Input(format!("engine: unexpected reply {other:?}"))),
        }
    }

    /// Subscribes to the events of `run` (or all runs) and returns them as an iterator; the
    /// iterator ends when the engine closes the stream.
    pub fn subscribe(mut self, run: Option<&str>) -> Result<Events> {
        match self.request(&Request::Subscribe {
            run: run.map(String::from),
        })? {
            Response::Ok => Ok(Events {
                reader: self.reader,
            }),
            Response::Error(e) => Err(Error::Input(e)),
            other => Err(Error::Input(format!("engine: unexpected reply {other:?}"))),
        }
    }
}

/// A stream of engine events.
pub struct Events {
    reader: BufReader<UnixStream>,
}

impl Iterator for Events {
    type Item = Result<Event>;
    fn next(&mut self) -> Option<Self::Item> {
        match read_frame::<Response>(&mut self.reader) {
            Ok(Some(Response::Event(e))) => Some(Ok(e)),
            Ok(Some(other)) => Some(Err(Error::Input(format!("engine: unexpected {other:?}")))),
            Ok(None) => None,
            Err(e) => Some(Err(io_err("events", e))),
        }
    }
}

/// Starts `mifo engine run` for `store_dir` (with the extra arguments `args`) as a detached
/// background process (own session, so a lost SSH connection or Ctrl-C does not reach it),
/// logging to `<store>/engine.log`.
pub fn start_background(store_dir: &Path, args: &[String]) -> Result<()> {
    std::fs::create_dir_all(store_dir).map_err(|e| Error::io(store_dir, e))?;
    let log_path: PathBuf = store_dir.join("engine.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
    let exe = std::env::current_exe().map_err(|e| io_err("locating the mifo binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store_dir)
        .args(["engine", "run", "--idle-exit"])
        .arg(std::env::var("MIFO_ENGINE_IDLE").unwrap_or_else(|_| "600".into()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: setsid is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| io_err("starting the engine", e))?;
    Ok(())
}
