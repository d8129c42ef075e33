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
        }
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
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::file(&self.path, format!("missing weight `{name}` (expected shape {shape:?})"))
        })?;
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
