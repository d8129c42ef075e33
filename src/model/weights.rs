//! Weight files: safetensors loading with errors that name the file and the tensor, optional
//! dtype conversion, and optional "trainable" mode in which every weight handed out is a
//! [`candle_core::Var`] that the caller can optimise.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::error::{Error, Result};

/// All tensors of one safetensors file (or of several shards of one component).
pub struct WeightFile {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    trainable: bool,
    vars: RefCell<Vec<(String, Var)>>,
    synthetic: Option<Synthetic>,
}

/// Seeded random weights made on demand (tests, benchmarks at real SD shapes).
struct Synthetic {
    seed: u64,
    dtype: DType,
    device: Device,
    made: RefCell<HashMap<String, Tensor>>,
}

impl WeightFile {
    /// Loads every tensor of `path`, converted to `dtype`, onto `device`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let parsed = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file ({e})")))?;
        let mut tensors = HashMap::new();
        for (name, view) in parsed.tensors() {
            let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
            let tensor = if tensor.dtype().is_float() {
                tensor.to_dtype(dtype)?
            } else {
                tensor
            };
            tensors.insert(name, tensor.to_device(device)?);
        }
        Ok(Self::from_tensors(path, tensors))
    }

    /// Wraps tensors already in memory (tests, synthetic models); `path` is used in messages.
    pub fn from_tensors(path: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            path: path.into(),
            tensors,
            trainable: false,
            vars: RefCell::new(Vec::new()),
            synthetic: None,
        }
    }

    /// A weight source that invents every tensor it is asked for, with the asked shape, from a
    /// seeded RNG keyed by the tensor's name (so the same name always gets the same values):
    /// weights N(0, 1/fan_in), biases N(0, 0.05²), 1-D norm weights 1 + N(0, 0.1²), embedding
    /// tables N(0, 0.5²). For tests and for timing real model shapes without the weights.
    pub fn synthetic(label: impl Into<PathBuf>, seed: u64, dtype: DType, device: &Device) -> Self {
        let mut w = Self::from_tensors(label, HashMap::new());
        w.synthetic = Some(Synthetic {
            seed,
            dtype,
            device: device.clone(),
            made: RefCell::new(HashMap::new()),
        });
        w
    }

    /// In trainable mode every tensor handed out by [`Scope::get`] is a fresh [`Var`],
    /// recorded so that [`WeightFile::vars`] can give them to an optimiser.
    pub fn set_trainable(&mut self, trainable: bool) {
        self.trainable = trainable;
    }

    /// The variables handed out so far in trainable mode, with their full names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.borrow().clone()
    }

    /// Replaces (or adds) tensors by name, e.g. fine-tuned weights over a base model. Each
    /// must have the dtype/device of the file; shapes are checked when the model asks for them.
    pub fn insert_all(&mut self, tensors: impl IntoIterator<Item = (String, Tensor)>) {
        self.tensors.extend(tensors);
    }

    /// The file the tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let invented;
        let t = match (self.tensors.get(name), &self.synthetic) {
            (Some(t), _) => t,
            (None, Some(syn)) => {
                invented = syn.get(name, &shape)?;
                &invented
            }
            (None, None) => {
                return Err(Error::file(
                    &self.path,
                    format!("missing weight `{name}` (expected shape {shape:?})"),
                ))
            }
        };
        if t.shape() != &shape {
            return Err(Error::file(
                &self.path,
                format!(
                    "weight `{name}` has shape {:?}, the config implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        if self.trainable {
            let var = Var::from_tensor(t)?;
            let out = var.as_tensor().clone();
            self.vars.borrow_mut().push((name.to_string(), var));
            Ok(out)
        } else {
            Ok(t.clone())
        }
    }
}

/// A view of a [`WeightFile`] under a name prefix, like `down_blocks.0.resnets.1`.
#[derive(Clone)]
pub struct Scope {
    file: Rc<WeightFile>,
    prefix: String,
}

impl Scope {
    /// The root scope of a file.
    pub fn root(file: Rc<WeightFile>) -> Self {
        Self {
            file,
            prefix: String::new(),
        }
    }

    /// A child scope: `self.prefix + "." + name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            file: self.file.clone(),
            prefix,
        }
    }

    /// The full dotted path of this scope (the diffusers module path).
    pub fn path(&self) -> &str {
        &self.prefix
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The tensor `name` under this scope, checked against `shape`.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.file.get(&self.full(name), shape)
    }

    /// Whether `name` exists under this scope.
    pub fn contains(&self, name: &str) -> bool {
        self.file.contains(&self.full(name))
    }

    /// The underlying file.
    pub fn file(&self) -> &Rc<WeightFile> {
        &self.file
    }
}

impl Synthetic {
    fn get(&self, name: &str, shape: &Shape) -> Result<Tensor> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        if let Some(t) = self.made.borrow().get(name) {
            return Ok(t.clone());
        }
        let key = blake3::hash(name.as_bytes());
        let mut seed = [0u8; 32];
        for (i, b) in key.as_bytes().iter().enumerate() {
            seed[i] = b ^ self.seed.to_le_bytes()[i % 8];
        }
        let mut rng = rand::rngs::StdRng::from_seed(seed);
        let dims = shape.dims();
        let (mean, std) = if dims.len() >= 2 && name.contains("embedding") {
            (0.0, 0.5)
        } else if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (0.0, 1.0 / (fan_in.max(1) as f64).sqrt())
        } else if name.ends_with("bias") {
            (0.0, 0.05)
        } else {
            (1.0, 0.1)
        };
        let normal = rand_distr::Normal::new(mean, std)
            .map_err(|e| Error::Config(format!("synthetic weights: {e}")))?;
        let data: Vec<f64> = (0..shape.elem_count())
            .map(|_| normal.sample(&mut rng))
            .collect();
        let t = Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        self.made.borrow_mut().insert(name.to_string(), t.clone());
        Ok(t)
    }
}
