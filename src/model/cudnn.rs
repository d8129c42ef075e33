//! 2-D convolutions through cuDNN (feature `cudnn`): the forward pass and the gradient of the
//! input, for the convolutions whose weights take no gradient (all of them in inference, in
//! learning phase A, under LoRA and in the latent optimisation of synthesis).
//!
//! candle's own CUDA convolution is an im2col copy followed by one cuBLAS product, and its
//! transposed convolution (the input gradient) is a direct loop. cuDNN is faster on some shapes
//! and slower on others, depending on the GPU and on the math mode, so the path is chosen by
//! measurement, as `torch.backends.cudnn.benchmark` does: the first time a shape is seen, cuDNN's
//! own search (`cudnnFind…Algorithm`) names its fastest algorithm, then that algorithm and
//! candle's path each run on the real tensors and the faster one is kept for the rest of the
//! process. `MIFO_CUDNN=off` keeps candle's path everywhere, `MIFO_CUDNN=on` takes cuDNN's
//! fastest algorithm without the comparison, and `MIFO_CUDNN_LOG=1` prints every choice.
//!
//! The math mode follows the run's precision, as PyTorch does: f32 runs use FMA kernels only
//! (full f32, so `mifo model verify` holds on the device), `tf32` runs and half-precision tensors
//! let cuDNN use tensor cores. Half-precision data is convolved with f32 accumulation.
//!
//! cuDNN handles are neither `Send` nor `Sync`; the handle, the choices and a reusable
//! workspace are kept per thread.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// The most scratch memory one convolution may ask for (and the search's scratch buffer);
/// algorithms that need more are passed over.
const WORKSPACE_LIMIT: usize = 1 << 30;

/// Timed runs of each candidate when a shape is first seen (after one untimed run).
const TIMED_RUNS: usize = 2;

/// What `MIFO_CUDNN` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Measure cuDNN against candle per shape (the default).
    Auto,
    /// cuDNN's fastest algorithm everywhere.
    On,
    /// candle's convolutions everywhere.
    Off,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("MIFO_CUDNN").as_deref() {
        Ok("off") | Ok("0") => Mode::Off,
        Ok("on") | Ok("1") => Mode::On,
        _ => Mode::Auto,
    })
}

fn log_choices() -> bool {
    static LOG: OnceLock<bool> = OnceLock::new();
    *LOG.get_or_init(|| std::env::var_os("MIFO_CUDNN_LOG").is_some_and(|v| v != "0"))
}

/// Which computation a choice is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    /// `y = conv(x, w)`.
    Forward,
    /// `dx` from `dy` (cuDNN's backward-data convolution).
    InputGrad,
}

/// The sizes of one convolution: input [n, c_in, h, w], weight [c_out, c_in, k_h, k_w],
/// symmetric zero padding and equal strides, dilation 1, one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    padding: usize,
    stride: usize,
}

impl Geometry {
    fn new(input: &[usize], weight: &[usize], padding: usize, stride: usize) -> Option<Self> {
        let (&[n, c_in, h, w], &[c_out, w_in, k_h, k_w]) = (input, weight) else {
            return None;
        };
        let fits = w_in == c_in && h + 2 * padding >= k_h && w + 2 * padding >= k_w && stride > 0;
        fits.then_some(Self {
            n,
            c_in,
            h,
            w,
            c_out,
            k_h,
            k_w,
            padding,
            stride,
        })
    }

    fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.k_h) / self.stride + 1,
            (self.w + 2 * self.padding - self.k_w) / self.stride + 1,
        )
    }

    fn input_dims(&self) -> [i32; 4] {
        [self.n, self.c_in, self.h, self.w].map(|d| d as i32)
    }

    fn output_dims(&self) -> [i32; 4] {
        let (oh, ow) = self.out_hw();
        [self.n, self.c_out, oh, ow].map(|d| d as i32)
    }

    fn filter_dims(&self) -> [i32; 4] {
        [self.c_out, self.c_in, self.k_h, self.k_w].map(|d| d as i32)
    }
}

/// A cuDNN algorithm of either direction.
#[derive(Clone, Copy, Debug)]
enum AlgoId {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    InputGrad(sys::cudnnConvolutionBwdDataAlgo_t),
}

/// A cuDNN algorithm and its workspace in bytes.
#[derive(Clone, Copy, Debug)]
struct Algo {
    id: AlgoId,
    workspace: usize,
}

/// The path kept for one shape.
#[derive(Clone, Copy, Debug)]
enum Choice {
    Cudnn(Algo),
    Candle,
}

/// What a choice depends on.
type ChoiceKey = (Direction, Geometry, DType, bool);

/// A cuDNN handle bound to one device's stream.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `cudnnCreate` and destroyed only here.
        unsafe {
            let _ = result::destroy_handle(self.0);
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Handle>> = RefCell::new(HashMap::new());
    static CHOICES: RefCell<HashMap<ChoiceKey, Choice>> = RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

fn dnn_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

fn handle(dev: &CudaDevice) -> candle_core::Result<sys::cudnnHandle_t> {
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.0);
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(dnn_err)?;
        let h = Handle(result::create_handle().map_err(dnn_err)?);
        // SAFETY: a live handle and the device's live stream.
        unsafe { result::set_stream(h.0, stream.cu_stream() as sys::cudaStream_t) }
            .map_err(dnn_err)?;
        let raw = h.0;
        handles.borrow_mut().insert(dev.id(), h);
        Ok(raw)
    })
}

/// Whether f32 convolutions may use TF32 tensor cores (the `tf32` precision).
fn tf32() -> bool {
    super::tf32_enabled()
}

fn math_type(dtype: DType) -> sys::cudnnMathType_t {
    if dtype == DType::F32 && !tf32() {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    }
}

fn data_type(dtype: DType) -> Option<sys::cudnnDataType_t> {
    match dtype {
        DType::F32 => Some(<f32 as CudnnDataType>::DATA_TYPE),
        DType::F16 => Some(<half::f16 as CudnnDataType>::DATA_TYPE),
        DType::BF16 => Some(<half::bf16 as CudnnDataType>::DATA_TYPE),
        _ => None,
    }
}

/// The input, filter, output and convolution descriptors of one [`Geometry`].
struct Descriptors {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Descriptors {
    fn new(g: Geometry, dtype: DType) -> candle_core::Result<Self> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let dt = data_type(dtype)
            .ok_or_else(|| candle_core::Error::Msg(format!("cuDNN conv: no {dtype:?} path")))?;
        let mut d = Self {
            x: result::create_tensor_descriptor().map_err(dnn_err)?,
            w: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        d.w = result::create_filter_descriptor().map_err(dnn_err)?;
        d.y = result::create_tensor_descriptor().map_err(dnn_err)?;
        d.conv = result::create_convolution_descriptor().map_err(dnn_err)?;
        let (p, s) = (g.padding as i32, g.stride as i32);
        // SAFETY: descriptors created above, set once each.
        unsafe {
            result::set_tensor4d_descriptor(d.x, NCHW, dt, g.input_dims()).map_err(dnn_err)?;
            result::set_filter4d_descriptor(d.w, dt, NCHW, g.filter_dims()).map_err(dnn_err)?;
            result::set_tensor4d_descriptor(d.y, NCHW, dt, g.output_dims()).map_err(dnn_err)?;
            result::set_convolution2d_descriptor(
                d.conv,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                <f32 as CudnnDataType>::DATA_TYPE,
            )
            .map_err(dnn_err)?;
            result::set_convolution_math_type(d.conv, math_type(dtype)).map_err(dnn_err)?;
        }
        Ok(d)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each descriptor is live (or null, never set) and destroyed only here.
        unsafe {
            if !self.x.is_null() {
                let _ = result::destroy_tensor_descriptor(self.x);
            }
            if !self.w.is_null() {
                let _ = result::destroy_filter_descriptor(self.w);
            }
            if !self.y.is_null() {
                let _ = result::destroy_tensor_descriptor(self.y);
            }
            if !self.conv.is_null() {
                let _ = result::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

/// Raw device pointers of one call: operand (input or output gradient), weight, result.
struct Pointers {
    operand: *const c_void,
    weight: *const c_void,
    result: *mut c_void,
}

/// cuDNN's own search, timed on the real operands (`cudnnFind…AlgorithmEx`): its fastest
/// algorithm for `direction` that fits `workspace` and the math mode, if any.
fn find_algo(
    dnn: sys::cudnnHandle_t,
    d: &Descriptors,
    direction: Direction,
    dtype: DType,
    ptr: &Pointers,
    (workspace, workspace_len): (*mut c_void, usize),
) -> candle_core::Result<Option<Algo>> {
    let want_fma = math_type(dtype) == sys::cudnnMathType_t::CUDNN_FMA_MATH;
    let usable = |status: sys::cudnnStatus_t, memory: usize, math: sys::cudnnMathType_t| {
        status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            && memory <= workspace_len
            && (!want_fma || math == sys::cudnnMathType_t::CUDNN_FMA_MATH)
    };
    let mut count = 0i32;
    match direction {
        Direction::Forward => {
            // SAFETY: zeroed plain-data structs, filled in by cuDNN.
            let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = unsafe { std::mem::zeroed() };
            // SAFETY: live handle and descriptors that describe the live buffers behind `ptr`;
            // `perf` holds `perf.len()` results; the workspace holds `workspace_len` bytes.
            unsafe {
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    dnn,
                    d.x,
                    ptr.operand,
                    d.w,
                    ptr.weight,
                    d.conv,
                    d.y,
                    ptr.result,
                    perf.len() as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    workspace,
                    workspace_len,
                )
                .result()
                .map_err(dnn_err)?;
            }
            Ok(perf[..count.max(0) as usize]
                .iter()
                .find(|p| usable(p.status, p.memory, p.mathType))
                .map(|p| Algo {
                    id: AlgoId::Forward(p.algo),
                    workspace: p.memory,
                }))
        }
        Direction::InputGrad => {
            // SAFETY: as above.
            let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 8] =
                unsafe { std::mem::zeroed() };
            // SAFETY: as above (the operand is the output gradient, the result the input's).
            unsafe {
                sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                    dnn,
                    d.w,
                    ptr.weight,
                    d.y,
                    ptr.operand,
                    d.conv,
                    d.x,
                    ptr.result,
                    perf.len() as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    workspace,
                    workspace_len,
                )
                .result()
                .map_err(dnn_err)?;
            }
            Ok(perf[..count.max(0) as usize]
                .iter()
                .find(|p| usable(p.status, p.memory, p.mathType))
                .map(|p| Algo {
                    id: AlgoId::InputGrad(p.algo),
                    workspace: p.memory,
                }))
        }
    }
}

/// Whether the cuDNN path can run a convolution of `x` under `weight`: both on a CUDA device,
/// in f32, f16 or bf16, 4-D, and `MIFO_CUDNN` is not `off`.
pub(crate) fn supports(x: &Tensor, weight: &Tensor) -> bool {
    mode() != Mode::Off
        && x.device().is_cuda()
        && data_type(x.dtype()).is_some()
        && x.dtype() == weight.dtype()
        && x.rank() == 4
        && weight.rank() == 4
}

/// `conv2d(x, weight)` (no bias, no gradient recorded) by the path chosen for its shape;
/// `candle_path` computes the same with candle.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    candle_path: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let Some(g) = Geometry::new(x.dims(), weight.dims(), padding, stride) else {
        return candle_path();
    };
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let run = |op: ConvOp| -> candle_core::Result<(Tensor, Option<Algo>)> {
        let y = x.apply_op2_no_bwd(&weight, &op)?;
        Ok((y, op.found()))
    };
    run_chosen(Direction::Forward, g, &x, run, &candle_path)
}

/// The gradient of `conv2d(x, weight)` with respect to `x` [n, c_in, in_h, in_w], given the
/// gradient `grad` of its output, by the path chosen for its shape; `candle_path` computes the
/// same with candle.
pub(crate) fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    (in_h, in_w): (usize, usize),
    candle_path: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let input = [grad.dim(0)?, weight.dim(1)?, in_h, in_w];
    let Some(g) = Geometry::new(&input, weight.dims(), padding, stride) else {
        return candle_path();
    };
    let (oh, ow) = g.out_hw();
    if grad.dims() != [g.n, g.c_out, oh, ow] {
        return candle_path();
    }
    let (grad, weight) = (grad.contiguous()?, weight.contiguous()?);
    let run = |op: ConvOp| -> candle_core::Result<(Tensor, Option<Algo>)> {
        let dx = grad.apply_op2_no_bwd(&weight, &op)?;
        Ok((dx, op.found()))
    };
    run_chosen(Direction::InputGrad, g, &grad, run, &candle_path)
}

/// Runs the path chosen for (`direction`, `g`), choosing it first if this is the shape's first
/// call in this thread.
fn run_chosen(
    direction: Direction,
    g: Geometry,
    operand: &Tensor,
    run_op: impl Fn(ConvOp) -> candle_core::Result<(Tensor, Option<Algo>)>,
    candle_path: &dyn Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let run_cudnn = |algo: Algo| {
        let op = ConvOp {
            direction,
            g,
            task: Task::Run(algo),
        };
        Ok(run_op(op)?.0)
    };
    let dtype = operand.dtype();
    let key = (direction, g, dtype, tf32());
    if let Some(choice) = CHOICES.with(|c| c.borrow().get(&key).copied()) {
        return match choice {
            Choice::Cudnn(algo) => run_cudnn(algo),
            Choice::Candle => candle_path(),
        };
    }
    let candle_core::Device::Cuda(dev) = operand.device() else {
        return candle_path();
    };
    let (_, found) = run_op(ConvOp {
        direction,
        g,
        task: Task::Find(Cell::new(None)),
    })?;
    let (choice, times) = match (found, mode()) {
        (None, _) => (Choice::Candle, None),
        (Some(algo), Mode::On) => (Choice::Cudnn(algo), None),
        (Some(algo), _) => {
            let t_dnn = time_runs(dev, || run_cudnn(algo))?;
            let t_candle = time_runs(dev, candle_path)?;
            let choice = if t_dnn < t_candle {
                Choice::Cudnn(algo)
            } else {
                Choice::Candle
            };
            (choice, Some((t_dnn, t_candle)))
        }
    };
    if log_choices() {
        let times = times.map_or(String::new(), |(a, b)| {
            format!(" (cuDNN {:.3} ms, candle {:.3} ms)", a * 1e3, b * 1e3)
        });
        eprintln!(
            "mifo cudnn: {direction:?} {g:?} {dtype:?} tf32={} → {choice:?}{times}",
            key.3
        );
    }
    CHOICES.with(|c| c.borrow_mut().insert(key, choice));
    match choice {
        Choice::Cudnn(algo) => run_cudnn(algo),
        Choice::Candle => candle_path(),
    }
}

/// The best of [`TIMED_RUNS`] wall times of `f` in seconds, each waited for on the device,
/// after one untimed run.
fn time_runs(
    dev: &CudaDevice,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let stream = dev.cuda_stream();
    f()?;
    stream.synchronize().map_err(dnn_err)?;
    let mut best = f64::INFINITY;
    for _ in 0..TIMED_RUNS {
        let t = Instant::now();
        f()?;
        stream.synchronize().map_err(dnn_err)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// What one [`ConvOp`] does.
enum Task {
    /// Compute with this algorithm.
    Run(Algo),
    /// Search for the fastest algorithm (cuDNN's timed search, which also computes the result)
    /// and keep it here.
    Find(Cell<Option<Algo>>),
}

/// One cuDNN convolution (forward or input gradient) on (operand, weight).
struct ConvOp {
    direction: Direction,
    g: Geometry,
    task: Task,
}

impl ConvOp {
    /// The algorithm a [`Task::Find`] found.
    fn found(&self) -> Option<Algo> {
        match &self.task {
            Task::Find(found) => found.get(),
            Task::Run(_) => None,
        }
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.direction {
            Direction::Forward => "mifo-cudnn-conv2d",
            Direction::InputGrad => "mifo-cudnn-conv2d-input-grad",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cuDNN convolution called on CPU tensors")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        a_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let storage = match a.dtype() {
            DType::F32 => self.launch::<f32>(a, a_l, w, w_l)?,
            DType::F16 => self.launch::<half::f16>(a, a_l, w, w_l)?,
            DType::BF16 => self.launch::<half::bf16>(a, a_l, w, w_l)?,
            other => candle_core::bail!("cuDNN conv: no {other:?} path"),
        };
        let [n, c, h, wd] = self.result_dims().map(|d| d as usize);
        Ok((storage, Shape::from((n, c, h, wd))))
    }
}

impl ConvOp {
    fn result_dims(&self) -> [i32; 4] {
        match self.direction {
            Direction::Forward => self.g.output_dims(),
            Direction::InputGrad => self.g.input_dims(),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        a: &CudaStorage,
        a_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let (a_range, w_range) = match (a_l.contiguous_offsets(), w_l.contiguous_offsets()) {
            (Some(a), Some(w)) => (a.0..a.1, w.0..w.1),
            _ => candle_core::bail!("cuDNN conv: operands must be contiguous"),
        };
        let dev = a.device().clone();
        let stream = dev.cuda_stream();
        let dnn = handle(&dev)?;
        let d = Descriptors::new(self.g, a.dtype())?;
        let out_len: usize = self.result_dims().iter().map(|&v| v as usize).product();
        // SAFETY: cuDNN writes every element of the result (beta = 0).
        let mut out = unsafe { dev.alloc::<T>(out_len)? };
        let a_view = a.as_cuda_slice::<T>()?.slice(a_range);
        let w_view = w.as_cuda_slice::<T>()?.slice(w_range);
        let (a_ptr, _a_guard) = a_view.device_ptr(&stream);
        let (w_ptr, _w_guard) = w_view.device_ptr(&stream);
        let (o_ptr, _o_guard) = out.device_ptr_mut(&stream);
        let ptr = Pointers {
            operand: a_ptr as *const c_void,
            weight: w_ptr as *const c_void,
            result: o_ptr as *mut c_void,
        };
        match &self.task {
            Task::Find(found) => {
                // A scratch buffer of up to WORKSPACE_LIMIT for the search alone, smaller if
                // the device cannot spare it; algorithms that need more are passed over.
                let mut len = WORKSPACE_LIMIT;
                let mut scratch = loop {
                    // SAFETY: scratch memory for cuDNN, never read before cuDNN writes it.
                    match unsafe { stream.alloc::<u8>(len) } {
                        Ok(s) => break Some(s),
                        Err(_) if len > 1 << 20 => len /= 4,
                        Err(_) => break None,
                    }
                };
                let (ws, _ws_guard) = match scratch.as_mut() {
                    Some(s) => {
                        let len = s.len();
                        let (p, guard) = s.device_ptr_mut(&stream);
                        ((p as *mut c_void, len), Some(guard))
                    }
                    None => ((std::ptr::null_mut(), 0), None),
                };
                found.set(find_algo(dnn, &d, self.direction, a.dtype(), &ptr, ws)?);
            }
            Task::Run(algo) => WORKSPACES.with(|spaces| {
                let mut spaces = spaces.borrow_mut();
                if algo.workspace > spaces.get(&dev.id()).map_or(0, |s| s.len()) {
                    spaces.remove(&dev.id());
                    // SAFETY: scratch memory for cuDNN, never read before cuDNN writes it.
                    let fresh = unsafe { stream.alloc::<u8>(algo.workspace) }.map_err(dnn_err)?;
                    spaces.insert(dev.id(), fresh);
                }
                let (ws, _ws_guard) = match spaces.get_mut(&dev.id()) {
                    Some(s) if algo.workspace > 0 => {
                        let len = s.len();
                        let (p, guard) = s.device_ptr_mut(&stream);
                        ((p as *mut c_void, len), Some(guard))
                    }
                    _ => ((std::ptr::null_mut(), 0), None),
                };
                run_algo(dnn, &d, *algo, &ptr, ws)
            })?,
        }
        drop((_a_guard, _w_guard, _o_guard));
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// One convolution with a chosen algorithm.
fn run_algo(
    dnn: sys::cudnnHandle_t,
    d: &Descriptors,
    algo: Algo,
    ptr: &Pointers,
    (workspace, workspace_len): (*mut c_void, usize),
) -> candle_core::Result<()> {
    // Scaling factors are f32 for f32, f16 and bf16 data.
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: the descriptors describe the live, contiguous buffers behind `ptr`; the
    // algorithm was found for these descriptors and its workspace fits `workspace_len`.
    unsafe {
        match algo.id {
            AlgoId::Forward(id) => result::convolution_forward(
                dnn,
                (&alpha as *const f32).cast(),
                d.x,
                ptr.operand,
                d.w,
                ptr.weight,
                d.conv,
                id,
                workspace,
                workspace_len,
                (&beta as *const f32).cast(),
                d.y,
                ptr.result,
            ),
            AlgoId::InputGrad(id) => result::convolution_backward_data(
                dnn,
                (&alpha as *const f32).cast(),
                d.w,
                ptr.weight,
                d.y,
                ptr.operand,
                d.conv,
                id,
                workspace,
                workspace_len,
                (&beta as *const f32).cast(),
                d.x,
                ptr.result,
            ),
        }
    }
    .map_err(dnn_err)
}
