//! Weight files: safetensors loading with errors that name the file and the tensor, optional
//! dtype conversion, and optional "trainable" mode in which every weight handed out is a
//! [`candle_core::Var`] that the caller can optimise.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::error::{Error, Result};

/// LoRA adapters on the attention projections: `W x + B A x` (alpha = rank, so the scale is
/// 1 and stored adapters need no extra metadata), with A [rank, in] drawn N(0, 1/in) from a
/// seed keyed by the layer name and B [out, rank] zero, so a fresh adapter changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Adapter rank.
    pub rank: usize,
    /// Seed of A's initialisation.
    pub seed: u64,
}

/// Module-name endings that receive LoRA adapters: UNet attention (`to_q`, `to_k`, `to_v`,
/// `to_out.0`) and CLIP self-attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
pub const LORA_TARGETS: [&str; 8] = [
    "to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj",
];

/// Checks the header of every `.safetensors` file in the component folders of the model folder
/// `dir` (`unet/`, `vae/`, `text_encoder/`, …): a header length and a JSON header that fit in the
/// file, and tensor data that ends exactly where the file does. Only the headers are read, so a
/// corrupt or truncated download is refused in milliseconds, before a run is created; the error
/// names the file.
pub fn check_weight_headers(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut folders: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    for folder in folders {
        let entries = std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        for file in files {
            check_header(&file)?;
        }
    }
    Ok(())
}

/// One file of [`check_weight_headers`].
fn check_header(path: &Path) -> Result<()> {
    read_header(path).map(|_| ())
}

/// The JSON header of the safetensors file `path` (tensor name → dtype, shape, data offsets),
/// after the checks of [`check_weight_headers`]: refused in one line naming the file when it is
/// truncated or malformed. Only the header is read.
pub(crate) fn read_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let bad = |why: String| Error::file(path, format!("not a valid safetensors file: {why}"));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    if len < 8 {
        return Err(bad(format!(
            "{len} bytes, shorter than the 8-byte header length"
        )));
    }
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > len - 8 {
        return Err(bad(format!(
            "the header says it is {header_len} bytes long but the file has {len} (truncated?)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("its header is not a JSON table ({e})")))?;
    let mut data_end = 0u64;
    for (name, entry) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let end = entry["data_offsets"][1]
            .as_u64()
            .ok_or_else(|| bad(format!("tensor `{name}` has no data_offsets")))?;
        data_end = data_end.max(end);
    }
    let data_len = len - 8 - header_len;
    if data_end != data_len {
        return Err(bad(format!(
            "its tensors need {data_end} bytes of data and the file holds {data_len}{}",
            if data_end > data_len {
                " (truncated)"
            } else {
                ""
            }
        )));
    }
    Ok(header)
}

/// One LoRA adapter of a linear layer.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Down projection [rank, in].
    pub a: Tensor,
    /// Up projection [out, rank].
    pub b: Tensor,
    /// Output scale (1: alpha = rank).
    pub scale: f64,
}

/// All tensors of one safetensors file (or of several shards of one component).
pub struct WeightFile {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    trainable: bool,
    lora: Option<LoraConfig>,
    vars: RefCell<Vec<(String, Var)>>,
    synthetic: Option<Rc<Synthetic>>,
    frozen: Vec<String>,
}

/// Tensor `name` of the safetensors file `path` from its `view`, on the CPU, floating-point
/// tensors converted to `dtype` (integer ones kept as they are).
pub(crate) fn load_view(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    dtype: DType,
) -> Result<Tensor> {
    let tensor = candle_core::safetensors::Load::load(view, &Device::Cpu)
        .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
    Ok(if tensor.dtype().is_float() {
        tensor.to_dtype(dtype)?
    } else {
        tensor
    })
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
            let tensor = load_view(path, &name, &view, dtype)?;
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
            lora: None,
            vars: RefCell::new(Vec::new()),
            synthetic: None,
            frozen: Vec::new(),
        }
    }

    /// Adds fresh, trainable LoRA adapters to every target layer that has none in the file
    /// (adapters already in the file, e.g. from a checkpoint, are trained from their values).
    /// The base weights stay plain tensors unless [`WeightFile::set_trainable`] is also on.
    pub fn set_lora(&mut self, lora: Option<LoraConfig>) {
        self.lora = lora;
    }

    /// The adapter for the linear layer `module` ([out, in]): the file's `module.lora_A.weight`
    /// / `lora_B.weight` when present (plain tensors, or Vars in LoRA training mode), a fresh
    /// pair in LoRA training mode, else none.
    pub fn lora_adapter(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Option<LoraAdapter>> {
        let targeted = LORA_TARGETS
            .iter()
            .any(|t| module.ends_with(&format!(".{t}")) || module == *t);
        if !targeted {
            return Ok(None);
        }
        let (ka, kb) = (
            format!("{module}.lora_A.weight"),
            format!("{module}.lora_B.weight"),
        );
        let stored = match (self.tensors.get(&ka), self.tensors.get(&kb)) {
            (Some(a), Some(b)) => Some((a.clone(), b.clone())),
            _ => None,
        };
        let (a, b) = match (stored, &self.lora) {
            (None, None) => return Ok(None),
            (Some((a, b)), _) => {
                let rank = a.dim(0)?;
                if a.dims() != [rank, in_dim] || b.dims() != [out_dim, rank] {
                    return Err(Error::file(
                        &self.path,
                        format!("LoRA adapter `{module}` has shapes {:?}/{:?}, expected [r, {in_dim}]/[{out_dim}, r]", a.dims(), b.dims()),
                    ));
                }
                (a, b)
            }
            (None, Some(cfg)) => {
                use rand::SeedableRng;
                use rand_distr::Distribution;
                let key = blake3::hash(format!("{}:{module}", cfg.seed).as_bytes());
                let mut rng = rand::rngs::StdRng::from_seed(*key.as_bytes());
                let normal = rand_distr::Normal::new(0.0, 1.0 / (in_dim as f64).sqrt())
                    .map_err(|e| Error::Config(format!("lora init: {e}")))?;
                let data: Vec<f64> = (0..cfg.rank * in_dim)
                    .map(|_| normal.sample(&mut rng))
                    .collect();
                // Trained adapters are f32 master copies (cast to the activations' dtype in
                // `Linear::forward`); f64 models keep f64.
                let proto = self.tensors.values().next();
                let (dtype, device) = match (proto, &self.synthetic) {
                    (Some(t), _) => (t.dtype(), t.device().clone()),
                    (None, Some(syn)) => (syn.dtype, syn.device.clone()),
                    (None, None) => (DType::F32, Device::Cpu),
                };
                let dtype = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let a = Tensor::from_vec(data, (cfg.rank, in_dim), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(&device)?;
                let b = Tensor::zeros((out_dim, cfg.rank), dtype, &device)?;
                (a, b)
            }
        };
        let scale = 1.0;
        if self.lora.is_some() {
            let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            let out = LoraAdapter {
                a: va.as_tensor().clone(),
                b: vb.as_tensor().clone(),
                scale,
            };
            let mut vars = self.vars.borrow_mut();
            vars.push((ka, va));
            vars.push((kb, vb));
            Ok(Some(out))
        } else {
            Ok(Some(LoraAdapter { a, b, scale }))
        }
    }

    /// A weight source that invents every tensor it is asked for, with the asked shape, from a
    /// seeded RNG keyed by the tensor's name (so the same name always gets the same values):
    /// weights N(0, 1/fan_in), biases N(0, 0.05²), 1-D norm weights 1 + N(0, 0.1²), embedding
    /// tables N(0, 0.5²). For tests and for timing real model shapes without the weights.
    pub fn synthetic(label: impl Into<PathBuf>, seed: u64, dtype: DType, device: &Device) -> Self {
        let mut w = Self::from_tensors(label, HashMap::new());
        w.synthetic = Some(Rc::new(Synthetic {
            seed,
            dtype,
            device: device.clone(),
            made: RefCell::new(HashMap::new()),
        }));
        w
    }

    /// A new file over the same tensors (shared storage, nothing copied; a synthetic file
    /// shares its invented tensors too), with training and LoRA off and no variables: the
    /// base for phase B's trainable copies, so LoRA training reuses the frozen weights in
    /// memory instead of reading the folder again.
    pub fn derive(&self) -> Self {
        Self {
            path: self.path.clone(),
            tensors: self.tensors.clone(),
            trainable: false,
            lora: None,
            vars: RefCell::new(Vec::new()),
            synthetic: self.synthetic.clone(),
            frozen: Vec::new(),
        }
    }

    /// In trainable mode, tensors whose name ends with one of `suffixes` stay plain tensors
    /// (no variable, so backward computes no gradient for them): e.g. the 49408-row token
    /// embedding table, whose gradient would be a full-size tensor every step.
    pub fn freeze(&mut self, suffixes: &[&str]) {
        self.frozen.extend(suffixes.iter().map(|s| s.to_string()));
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

    /// Bytes held by the tensors loaded so far (for seeded random weights: those made so far).
    pub fn bytes(&self) -> u64 {
        let made = self.synthetic.as_ref().map(|s| s.made.borrow());
        self.tensors
            .values()
            .chain(made.iter().flat_map(|m| m.values()))
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
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
        if self.trainable && !self.frozen.iter().any(|f| name.ends_with(f.as_str())) {
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

    /// The LoRA adapter of the linear layer at this scope, if any (see
    /// [`WeightFile::lora_adapter`]).
    pub fn lora_adapter(&self, in_dim: usize, out_dim: usize) -> Result<Option<LoraAdapter>> {
        self.file.lora_adapter(&self.prefix, in_dim, out_dim)
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
