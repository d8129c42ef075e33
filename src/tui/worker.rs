//! Carrying out [`Request`]s against a [`Backend`]: the same code runs on the runtime's worker
//! thread and inline in the test driver.

use std::time::Instant;

use ratatui_image::picker::Picker;

use super::action::{Action, Request};
use super::app::short_id;
use super::backend::Backend;
use super::images::{prepare_image, ImageKey};

/// Image bytes fetched from the backend, to decode on the image thread.
pub struct DecodeJob {
    /// The slot it fills.
    pub key: ImageKey,
    /// Image bytes.
    pub image: Vec<u8>,
    /// Mask bytes, in token order.
    pub masks: Vec<Vec<u8>>,
}

impl DecodeJob {
    /// Decodes and tints; returns the action carrying the result.
    pub fn run(self, picker: &Picker) -> Action {
        Action::ImageReady {
            key: self.key,
            result: prepare_image(&self.image, &self.masks, picker).map_err(|e| e.to_string()),
        }
    }
}

/// What a request produced.
pub enum Outcome {
    /// An answer for the app.
    Action(Box<Action>),
    /// Image bytes to decode (off the worker, on the image thread).
    Decode(DecodeJob),
}

fn err(e: anyhow::Error) -> String {
    format!("{e:#}")
}

/// Carries out `request` against `backend`.
pub fn perform(backend: &dyn Backend, request: Request) -> Outcome {
    let action = match request {
        Request::ListRuns => {
            let t = Instant::now();
            let result = backend.list_runs().map_err(err);
            Action::RunsLoaded {
                result,
                elapsed_ms: t.elapsed().as_secs_f64() * 1000.0,
            }
        }
        Request::Detail { id, log_tail } => Action::DetailLoaded {
            result: backend.run_detail(&id, log_tail).map(Box::new).map_err(err),
            id,
        },
        Request::Metrics { id } => Action::MetricsLoaded {
            result: backend.metrics(&id).map_err(err),
            id,
        },
        Request::Jobs => Action::JobsLoaded(backend.jobs().map_err(err)),
        Request::Sweep { name, by } => Action::SweepLoaded {
            result: backend.sweep_table(&name, &by).map_err(err),
            name,
        },
        Request::Image { key, image, masks } => {
            let fetched = backend.blob(&image).and_then(|img| {
                let masks = masks
                    .iter()
                    .map(|m| backend.blob(m))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok((img, masks))
            });
            return match fetched {
                Ok((image, masks)) => Outcome::Decode(DecodeJob { key, image, masks }),
                Err(e) => Outcome::Action(Box::new(Action::ImageReady {
                    key,
                    result: Err(err(e)),
                })),
            };
        }
        Request::LaunchLearn(l) => Action::Launched {
            what: "launch".into(),
            result: backend.launch_learn(*l).map_err(err),
        },
        Request::LaunchSynth(l) => Action::Launched {
            what: "synthesis".into(),
            result: backend.launch_synth(*l).map_err(err),
        },
        Request::Rerun { id, request } => Action::Launched {
            what: format!("re-run {}", short_id(&id)),
            result: backend.rerun(&id, request).map_err(err),
        },
        Request::Resume(id) => Action::Launched {
            what: format!("resume {}", short_id(&id)),
            result: backend.resume(&id).map_err(err),
        },
        Request::Cancel(id) => Action::Done {
            what: format!("cancel {}", short_id(&id)),
            result: backend
                .cancel(&id)
                .map(|()| format!("run {} stops at its next step", short_id(&id)))
                .map_err(err),
        },
        Request::CancelJob(job) => Action::Done {
            what: format!("cancel job {job}"),
            result: backend
                .cancel_job(job)
                .map(|()| format!("job {job} cancelled"))
                .map_err(err),
        },
        Request::Delete(ids) => {
            let mut done = 0;
            let mut errors = Vec::new();
            for id in &ids {
                match backend.delete(id) {
                    Ok(()) => done += 1,
                    Err(e) => errors.push(format!("{}: {}", short_id(id), err(e))),
                }
            }
            Action::Done {
                what: "delete".into(),
                result: if errors.is_empty() {
                    Ok(format!(
                        "deleted {done} run{}",
                        if done == 1 { "" } else { "s" }
                    ))
                } else {
                    Err(errors.join("; "))
                },
            }
        }
        Request::Tag { ids, tag, remove } => {
            let mut errors = Vec::new();
            for id in &ids {
                let r = if remove {
                    backend.untag(id, &tag)
                } else {
                    backend.tag(id, &tag)
                };
                if let Err(e) = r {
                    errors.push(format!("{}: {}", short_id(id), err(e)));
                }
            }
            let verb = if remove { "untagged" } else { "tagged" };
            Action::Done {
                what: format!("tag {tag}"),
                result: if errors.is_empty() {
                    Ok(format!("{verb} {} run(s) {tag}", ids.len()))
                } else {
                    Err(errors.join("; "))
                },
            }
        }
    };
    Outcome::Action(Box::new(action))
}
