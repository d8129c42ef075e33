//! The engine's device pool: which devices its runs may use, and which run holds which.
//!
//! A pool is a list of devices, each with a number of slots (how many runs it holds at once).
//! Its **auto** devices are the GPUs the engine owns (every visible GPU, or those named with
//! `mifo engine start --gpus 0,2,3` / `MIFO_ENGINE_GPUS`), `--per-gpu N` slots each; a run
//! with `--device auto` takes a free slot of the least-loaded auto device. The plain `cpu`
//! device is always there too, with `MIFO_ENGINE_JOBS` slots (default 1), for runs that name
//! it. A run that names a device of the pool waits for a slot of that one; the runner hands
//! slots to queued runs oldest first, so a later run never takes the device a waiting run named.
//!
//! Without GPUs the same code runs over CPU slots: [`PoolOptions::cpu_slots`] (the engine's
//! hidden `--cpu-slots N`, or `MIFO_ENGINE_CPU_SLOTS`, for tests) makes the auto devices
//! `cpu:0` … `cpu:N-1`, all the one CPU under different names, so that tests can see which
//! slot a run held.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::RunId;

/// The device name that lets the pool choose.
pub const AUTO: &str = "auto";

/// The `--device` default of launches: `auto` in a build with CUDA (the engine's pool picks a
/// free GPU, or `cpu` when none answers), `cpu` otherwise.
pub fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        AUTO
    } else {
        "cpu"
    }
}

/// Most GPU ordinals probed when counting the visible GPUs.
const MAX_GPUS: usize = 64;

/// What the engine's pool is made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolOptions {
    /// The GPU ordinals the pool owns; `None`: every visible GPU.
    pub gpus: Option<Vec<usize>>,
    /// Runs one auto device holds at once (`--per-gpu`; 0 is taken as 1).
    pub per_device: usize,
    /// Runs the plain `cpu` device holds at once (`MIFO_ENGINE_JOBS`; 0 is taken as 1).
    pub cpu_jobs: usize,
    /// For tests: auto devices `cpu:0` … `cpu:N-1` instead of GPUs.
    pub cpu_slots: Option<usize>,
}

/// One device of the pool as the engine reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSlots {
    /// `cuda:N`, `cpu:N` (test slots) or `cpu`.
    pub device: String,
    /// Runs it holds at once.
    pub capacity: usize,
    /// The runs holding it now, in the order they took it.
    pub runs: Vec<String>,
    /// Whether `--device auto` may use it.
    pub auto: bool,
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    capacity: usize,
    holders: Vec<RunId>,
    auto: bool,
}

impl Entry {
    fn free(&self) -> bool {
        self.holders.len() < self.capacity
    }
}

/// The devices of one engine and the runs holding them.
#[derive(Clone, Debug)]
pub struct DevicePool {
    devices: Vec<Entry>,
}

/// Parses `--gpus 0,2,3` (ordinals, no repeats).
pub fn parse_gpus(text: &str) -> Result<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for part in text.split(',').map(str::trim) {
        let n = part.parse::<usize>().map_err(|_| {
            Error::Input(format!(
                "--gpus {text}: `{part}` is not a GPU number (expected e.g. 0,2,3)"
            ))
        })?;
        if out.contains(&n) {
            return Err(Error::Input(format!(
                "--gpus {text}: GPU {n} is named twice"
            )));
        }
        out.push(n);
    }
    Ok(out)
}

/// How many CUDA GPUs answer in this process (0 in a build without the `cuda` feature): the
/// ordinals from 0 up for which a CUDA device can be created (`CUDA_VISIBLE_DEVICES` applies).
pub fn visible_gpus() -> usize {
    if !cfg!(feature = "cuda") {
        return 0;
    }
    (0..MAX_GPUS)
        .take_while(|&i| candle_core::Device::new_cuda(i).is_ok())
        .count()
}

impl DevicePool {
    /// The pool of `opts` on this machine's GPUs ([`visible_gpus`]; not probed with
    /// `cpu_slots`). `--gpus` naming a GPU that does not answer is refused.
    pub fn new(opts: &PoolOptions) -> Result<DevicePool> {
        let count = if opts.cpu_slots.is_some() {
            0
        } else {
            visible_gpus()
        };
        Self::with_gpu_count(opts, count)
    }

    /// The pool of `opts` on a machine with `gpus` visible GPUs.
    pub fn with_gpu_count(opts: &PoolOptions, gpus: usize) -> Result<DevicePool> {
        let per = opts.per_device.max(1);
        let mut devices = Vec::new();
        let auto = |name: String| Entry {
            name,
            capacity: per,
            holders: Vec::new(),
            auto: true,
        };
        if let Some(n) = opts.cpu_slots {
            if opts.gpus.is_some() {
                return Err(Error::Input(
                    "--gpus: not with --cpu-slots (the CPU test pool has no GPUs)".into(),
                ));
            }
            if n == 0 {
                return Err(Error::Input("--cpu-slots: give at least 1".into()));
            }
            devices.extend((0..n).map(|i| auto(format!("cpu:{i}"))));
        } else {
            let ordinals: Vec<usize> = match &opts.gpus {
                Some(list) => {
                    if let Some(bad) = list.iter().find(|&&g| g >= gpus) {
                        let have = match gpus {
                            0 if !cfg!(feature = "cuda") => {
                                "this build has no CUDA (build with --features cuda)".to_string()
                            }
                            0 => "no GPU answers on this machine".to_string(),
                            1 => "this machine has 1 GPU (0)".to_string(),
                            n => format!("this machine has {n} GPUs (0 to {})", n - 1),
                        };
                        let list: Vec<String> = list.iter().map(|g| g.to_string()).collect();
                        return Err(Error::Input(format!(
                            "--gpus {}: there is no GPU {bad}; {have}",
                            list.join(",")
                        )));
                    }
                    list.clone()
                }
                None => (0..gpus).collect(),
            };
            devices.extend(ordinals.into_iter().map(|g| auto(format!("cuda:{g}"))));
        }
        devices.push(Entry {
            name: "cpu".into(),
            capacity: opts.cpu_jobs.max(1),
            holders: Vec::new(),
            auto: false,
        });
        Ok(DevicePool { devices })
    }

    /// Runs the whole pool holds at once (the runner's worker count).
    pub fn capacity(&self) -> usize {
        self.devices.iter().map(|d| d.capacity).sum()
    }

    /// The auto devices (empty on a CPU-only engine: `auto` then means `cpu`).
    pub fn auto_devices(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter(|d| d.auto)
            .map(|d| d.name.clone())
            .collect()
    }

    /// What a run asking for `device` waits for: `auto`, or the name of a device of the pool
    /// (`cuda` is `cuda:0`). A device outside the pool is refused in one line.
    pub fn resolve(&self, device: &str) -> Result<String> {
        let name = match device.trim() {
            "cuda" => "cuda:0",
            d => d,
        };
        if name == AUTO || self.devices.iter().any(|d| d.name == name) {
            return Ok(name.to_string());
        }
        let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
        if name.starts_with("cuda") && !cfg!(feature = "cuda") {
            return Err(Error::Input(format!(
                "--device {device}: this build has no CUDA (build with --features cuda); use cpu or auto"
            )));
        }
        if !name.starts_with("cuda") && !name.starts_with("cpu") {
            return Err(Error::Input(format!(
                "--device {device}: expected auto, cpu, cuda or cuda:N"
            )));
        }
        Err(Error::Input(format!(
            "--device {device}: not a device of this engine's pool ({}); use one of them or auto (the engine's GPUs are set at `mifo engine start --gpus`)",
            names.join(", ")
        )))
    }

    /// A device to check a job against before it is queued (dtype, model load): the device
    /// itself, or for `auto` the first auto device (`cpu` when there is none).
    pub fn validation_device(&self, want: &str) -> String {
        if want == AUTO {
            self.devices
                .iter()
                .find(|d| d.auto)
                .map_or_else(|| "cpu".to_string(), |d| d.name.clone())
        } else {
            want.to_string()
        }
    }

    /// Gives `run` a slot of what `want` ([`Self::resolve`]d) names, if one is free now: for
    /// `auto`, the free auto device holding fewest runs (the first of equals); returns the
    /// device's name.
    pub fn try_acquire(&mut self, want: &str, run: &RunId) -> Option<String> {
        let has_auto = self.devices.iter().any(|d| d.auto);
        let entry = if want == AUTO && has_auto {
            self.devices
                .iter_mut()
                .filter(|d| d.auto && d.free())
                .min_by_key(|d| d.holders.len())
        } else {
            let name = if want == AUTO { "cpu" } else { want };
            self.devices
                .iter_mut()
                .find(|d| d.name == name)
                .filter(|d| d.free())
        }?;
        entry.holders.push(run.clone());
        Some(entry.name.clone())
    }

    /// Frees the slot `run` holds on `device`.
    pub fn release(&mut self, device: &str, run: &RunId) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.name == device) {
            if let Some(i) = d.holders.iter().position(|h| h == run) {
                d.holders.remove(i);
            }
        }
    }

    /// Every device, its slots and the runs holding them.
    pub fn slots(&self) -> Vec<DeviceSlots> {
        self.devices
            .iter()
            .map(|d| DeviceSlots {
                device: d.name.clone(),
                capacity: d.capacity,
                runs: d.holders.iter().map(ToString::to_string).collect(),
                auto: d.auto,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u32) -> RunId {
        RunId::from_parts(1_750_000_000_000 + u64::from(n), n)
    }

    fn gpus(list: Option<Vec<usize>>, per: usize) -> PoolOptions {
        PoolOptions {
            gpus: list,
            per_device: per,
            cpu_jobs: 1,
            cpu_slots: None,
        }
    }

    #[test]
    fn auto_spreads_over_the_least_loaded_devices_up_to_their_slots() {
        let mut pool = DevicePool::with_gpu_count(&gpus(Some(vec![0, 2, 3]), 2), 4).unwrap();
        assert_eq!(pool.auto_devices(), ["cuda:0", "cuda:2", "cuda:3"]);
        assert_eq!(pool.capacity(), 7, "3 GPUs × 2 + cpu");
        let got: Vec<String> = (0..6)
            .map(|i| pool.try_acquire(AUTO, &run(i)).unwrap())
            .collect();
        assert_eq!(
            got,
            ["cuda:0", "cuda:2", "cuda:3", "cuda:0", "cuda:2", "cuda:3"]
        );
        assert_eq!(
            pool.try_acquire(AUTO, &run(6)),
            None,
            "every GPU slot is taken"
        );
        assert_eq!(pool.try_acquire("cpu", &run(6)).as_deref(), Some("cpu"));
        pool.release("cuda:2", &run(1));
        assert_eq!(pool.try_acquire("cuda:0", &run(7)), None);
        assert_eq!(
            pool.try_acquire("cuda:2", &run(7)).as_deref(),
            Some("cuda:2")
        );
        let slots = pool.slots();
        assert_eq!(slots[1].runs, [run(4).to_string(), run(7).to_string()]);
    }

    #[test]
    fn devices_outside_the_pool_and_missing_gpus_are_refused() {
        let e = DevicePool::with_gpu_count(&gpus(Some(vec![0, 7]), 1), 2)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--gpus 0,7: there is no GPU 7"), "{e}");
        assert!(e.contains("2 GPUs"), "{e}");
        let pool = DevicePool::with_gpu_count(&gpus(Some(vec![1]), 1), 2).unwrap();
        assert_eq!(pool.resolve("cuda:1").unwrap(), "cuda:1");
        assert_eq!(pool.resolve(AUTO).unwrap(), AUTO);
        assert_eq!(pool.resolve("cpu").unwrap(), "cpu");
        let e = pool.resolve("cuda").unwrap_err().to_string();
        assert!(e.starts_with("--device cuda:"), "{e}");
        assert!(pool.resolve("tpu").is_err());
        assert_eq!(parse_gpus("0, 2,3").unwrap(), [0, 2, 3]);
        assert!(parse_gpus("0,x")
            .unwrap_err()
            .to_string()
            .starts_with("--gpus 0,x"));
        assert!(parse_gpus("1,1").is_err());
    }

    #[test]
    fn cpu_slots_stand_in_for_gpus_and_auto_falls_back_to_cpu() {
        let opts = PoolOptions {
            cpu_slots: Some(2),
            ..gpus(None, 1)
        };
        let mut pool = DevicePool::with_gpu_count(&opts, 0).unwrap();
        assert_eq!(pool.auto_devices(), ["cpu:0", "cpu:1"]);
        assert_eq!(pool.validation_device(AUTO), "cpu:0");
        assert_eq!(pool.try_acquire(AUTO, &run(0)).as_deref(), Some("cpu:0"));
        assert_eq!(pool.try_acquire(AUTO, &run(1)).as_deref(), Some("cpu:1"));
        assert_eq!(pool.try_acquire(AUTO, &run(2)), None);
        let mut plain = DevicePool::with_gpu_count(&gpus(None, 1), 0).unwrap();
        assert!(plain.auto_devices().is_empty());
        assert_eq!(plain.validation_device(AUTO), "cpu");
        assert_eq!(plain.try_acquire(AUTO, &run(0)).as_deref(), Some("cpu"));
        assert_eq!(plain.try_acquire(AUTO, &run(1)), None, "cpu holds one run");
    }
}
