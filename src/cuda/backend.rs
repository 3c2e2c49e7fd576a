//! The CUDA backend: the `Backend` ops on one GPU, bf16 storage, fp32 arithmetic.
//!
//! Buffers hold bf16 (weights, activations, the KV cache) unless made with `zeros_f32` /
//! `upload_f32` (log-probs, entropies, logits, RoPE frequencies), which stay f32. `upload` rounds
//! f32 to bf16 (nearest even) and `download` widens back, so the model code sees f32 on every
//! backend. GEMMs go through cuBLAS (bf16 operands, fp32 accumulation); everything else is our
//! kernels (`kernels/*.cu`, launched by `ops/`). The GPU is reached through a [`Device`]
//! (`device.rs`: [`CudaDevice`], the driver and cuBLAS), which the tests replace with an
//! emulated device on the CPU, so everything here also runs without a GPU. This file holds the
//! buffers and the machinery every op uses (checks, launches, index arrays, timing); the ops
//! themselves are in `inference_ops.rs` (`Backend`) and `train_ops.rs` (`TrainBackend`).
//!
//! Everything runs in order on one stream. Ops cannot return errors (the trait's CPU ops cannot
//! fail), so the first failure (a bad shape or dtype, a launch error) is recorded, later ops are
//! skipped, and the error comes back from `synchronize` and `download`: a failed forward can never
//! be read as a result. Buffers come from the driver's stream-ordered pool (cuMemAllocAsync), so a
//! freed buffer is reused by the next allocation of that size without a device-wide sync. An
//! allocation the pool has no room for is tried once more after the pool gave its cached memory
//! back; failing again, it is an [`OutOfDeviceMemory`] error, which leaves the device usable
//! (`Backend::recover_from_out_of_memory`, in `inference_ops.rs`).
//!
//! Host-side index arrays (token ids, slots, positions, rows, targets) are copied to the device
//! when an op needs them; the last few are kept and reused when the same values come again (the
//! placement of a batch is used by every layer).

mod decode_graph;
mod inference_ops;
mod train_ops;

use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::sys as blas_sys;
use half::bf16;

use super::device::{CudaDevice, Device, DeviceMemory, Gemm, TimingMark};
use super::launch::Launcher;
use super::ops;
use super::ops::flash_attention::{FlashBackward, FlashForward};
use crate::backend::{
    out_of_device_memory, DecodeGraphStats, OutOfDeviceMemory, TokenPlacement, Work,
};
pub use decode_graph::CudaDecodeGraph;
use decode_graph::RecordedInputs;

/// The element type of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
}

/// A device buffer of `len` elements of `dtype`.
pub struct CudaBuf {
    _mem: Arc<dyn DeviceMemory>, // owns the allocation; freed in stream order when dropped
    ptr: u64,
    len: usize,
    dtype: DType,
}

/// A read-only window into a [`CudaBuf`]: raw device address, element count and type.
#[derive(Debug, Clone, Copy)]
pub struct CudaView<'a> {
    pub ptr: u64,
    pub len: usize,
    pub dtype: DType,
    _buf: PhantomData<&'a CudaBuf>,
}

/// A writable window into a [`CudaBuf`].
#[derive(Debug)]
pub struct CudaViewMut<'a> {
    pub ptr: u64,
    pub len: usize,
    pub dtype: DType,
    _buf: PhantomData<&'a mut CudaBuf>,
}

impl CudaView<'_> {
    /// Its size in bytes (the profile's operand sizes).
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

impl CudaViewMut<'_> {
    /// Its size in bytes (the profile's operand sizes).
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// An op's name, its work and the timing marks before and after its launches.
type OpMarks = (&'static str, Work, TimingMark, TimingMark);

/// How many recently uploaded index arrays are kept for reuse.
const INDEX_CACHE_ENTRIES: usize = 8;

/// A host index array and its device copy.
struct DeviceIndices {
    host: Vec<u32>,
    device: Arc<dyn DeviceMemory>, // owns the copy `ptr` points to (with a recording using it)
    ptr: u64,
}

pub struct CudaBackend {
    /// The GPU (or, in the tests, the CPU emulator) that runs everything.
    dev: Arc<dyn Device>,
    device_name: String,
    /// The first error of any op since the backend was made or recovered from (sticky, like a
    /// CUDA context error).
    error: Mutex<Option<OpFailure>>,
    /// Recently uploaded index arrays, most recent last.
    indices: Mutex<Vec<DeviceIndices>>,
    /// f32 scratch for ops that need temporary storage (decode attention's split results, the
    /// attention backward's row sums): kept and grown, so an op does not allocate and free.
    scratch: Mutex<Option<Arc<CudaBuf>>>,
    /// While profiling (`start_op_profile`): each op's name and the events recorded on the
    /// stream before and after its launches.
    profile: Mutex<Option<Vec<OpMarks>>>,
    /// Whether `decode_step` records steps as CUDA graphs (`THINKSHORT_CUDA_GRAPHS=0`: no).
    decode_graphs: AtomicBool,
    /// The fused forward kernel every attention forward takes (benchmarks compare them); None:
    /// chosen per batch by `FlashForward::choose`.
    flash_forward: Mutex<Option<FlashForward>>,
    /// The fused backward every attention backward takes (`THINKSHORT_FLASH_BACKWARD`, default
    /// split).
    flash_backward: Mutex<FlashBackward>,
    /// While a decode step is being recorded: the backend's buffers it reads (ops must not
    /// upload or allocate outside the graph then).
    recording: Mutex<Option<RecordedInputs>>,
    graph_stats: Mutex<DecodeGraphStats>,
    /// `upload_into`'s bf16 copy of the host values, kept and grown (the offloaded optimizer
    /// writes 64 Mi weights a transfer: a fresh allocation would fault its pages every time).
    upload_staging: Mutex<Vec<bf16>>,
}

/// Why an op failed.
enum OpFailure {
    /// An allocation found no room: the device is fine, and `recover_from_out_of_memory`
    /// forgets the failure. `context`: what the op was doing, as the error's context said.
    OutOfMemory {
        context: String,
        error: OutOfDeviceMemory,
    },
    Other(String),
}

impl OpFailure {
    fn new(op: &'static str, e: &anyhow::Error) -> Self {
        match out_of_device_memory(e) {
            Some(error) => {
                let mut context = vec![format!("CUDA {op}")];
                context.extend(
                    e.chain()
                        .filter(|cause| !cause.is::<OutOfDeviceMemory>())
                        .map(|cause| cause.to_string()),
                );
                OpFailure::OutOfMemory {
                    context: context.join(": "),
                    error,
                }
            }
            None => OpFailure::Other(format!("CUDA {op}: {e:#}")),
        }
    }

    /// The error to report (each time the failure is asked about).
    fn error(&self) -> anyhow::Error {
        match self {
            OpFailure::OutOfMemory { context, error } => {
                anyhow::Error::new(*error).context(context.clone())
            }
            OpFailure::Other(message) => anyhow!("{message}"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CudaBackend {
    /// Opens GPU `ordinal`: checks driver, device and embedded kernels (one clear error line
    /// when any is missing), finds cuBLAS, makes the stream and loads every kernel module.
    pub fn new(ordinal: usize) -> Result<Self> {
        let probe = super::require_cuda()?;
        let info = probe.devices.get(ordinal).ok_or_else(|| {
            anyhow!(
                "no CUDA device {ordinal} (this machine has {})",
                probe.devices.len()
            )
        })?;
        // cudarc panics when it cannot load a library: look first.
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { blas_sys::is_culib_present() } {
            bail!(
                "cuBLAS (libcublas.so) could not be loaded: add the CUDA libraries' folder to \
                 LD_LIBRARY_PATH, or use --backend cpu"
            );
        }
        let device = CudaDevice::new(ordinal)?;
        Self::with_device(Arc::new(device), info.name.clone())
    }

    /// The backend on `dev`, named `device_name` (the tests run it on the CPU emulator).
    pub fn with_device(dev: Arc<dyn Device>, device_name: String) -> Result<Self> {
        Ok(CudaBackend {
            dev,
            device_name,
            error: Mutex::new(None),
            indices: Mutex::new(Vec::new()),
            scratch: Mutex::new(None),
            profile: Mutex::new(None),
            decode_graphs: AtomicBool::new(decode_graphs_from_env()?),
            flash_forward: Mutex::new(None),
            flash_backward: Mutex::new(flash_backward_from_env()?),
            recording: Mutex::new(None),
            graph_stats: Mutex::new(DecodeGraphStats::default()),
            upload_staging: Mutex::new(Vec::new()),
        })
    }

    pub fn device_name(&self) -> String {
        self.device_name.clone()
    }

    /// Makes every fused attention forward take `variant` (None: chosen per batch, the
    /// default); returns the previous setting. For benchmarks that compare the kernels.
    pub fn set_flash_forward(&self, variant: Option<FlashForward>) -> Option<FlashForward> {
        std::mem::replace(&mut *lock(&self.flash_forward), variant)
    }

    /// The fused attention backward every attention backward takes now.
    pub fn flash_backward(&self) -> FlashBackward {
        *lock(&self.flash_backward)
    }

    /// Makes every fused attention backward take `variant`; returns the previous setting.
    pub fn set_flash_backward(&self, variant: FlashBackward) -> FlashBackward {
        std::mem::replace(&mut *lock(&self.flash_backward), variant)
    }

    /// (free, total) bytes of device memory.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.dev.memory_info()
    }

    /// Where the launchers' kernels run.
    fn launcher(&self) -> &dyn Launcher {
        &*self.dev
    }

    /// Runs one op unless an earlier one failed; records its error. While profiling, brackets
    /// the op's launches with timing events and records its `work` (the closure runs only then).
    fn run(&self, op: &'static str, work: impl FnOnce() -> Work, f: impl FnOnce() -> Result<()>) {
        let mut error = lock(&self.error);
        if error.is_some() {
            return;
        }
        let mut profile = lock(&self.profile);
        let result = match profile.as_mut() {
            None => f(),
            Some(events) => (|| {
                let start = self.dev.timing_mark()?;
                f()?;
                let end = self.dev.timing_mark()?;
                events.push((op, work(), start, end)); // the host's counting is not timed
                Ok(())
            })(),
        };
        if let Err(e) = result {
            *error = Some(OpFailure::new(op, &e));
        }
    }

    fn check_error(&self) -> Result<()> {
        match &*lock(&self.error) {
            Some(failure) => Err(failure.error()),
            None => Ok(()),
        }
    }

    /// `bytes` of device memory. An allocation that finds no room is tried once more after the
    /// device gave back the memory it keeps cached (freed buffers, in pieces that earlier work
    /// shaped); not while recording, when waiting for the device is not allowed.
    fn device_alloc(&self, bytes: usize) -> Result<Arc<dyn DeviceMemory>> {
        match self.dev.alloc(bytes) {
            Err(e)
                if out_of_device_memory(&e).is_some()
                    && matches!(self.dev.recording(), Ok(false)) =>
            {
                self.dev.release_cached_memory()?;
                self.dev.alloc(bytes)
            }
            allocated => allocated,
        }
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = len
            .checked_mul(dtype.size())
            .context("buffer size overflows")?;
        let mem = self
            .device_alloc(bytes)
            .context("allocating GPU memory (use a smaller batch or model)")?;
        Ok(CudaBuf {
            ptr: mem.ptr(),
            _mem: mem,
            len,
            dtype,
        })
    }

    fn zeros_of(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let buf = self.alloc(len, dtype)?;
        // SAFETY: `buf` holds len * size bytes at `ptr`.
        unsafe { self.dev.fill_zero(buf.ptr, len * dtype.size()) }?;
        Ok(buf)
    }

    fn upload_bytes<T: bytemuck::Pod>(&self, host: &[T], dtype: DType) -> Result<CudaBuf> {
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        let buf = self.alloc(host.len(), dtype)?;
        // SAFETY: `buf` has room for host.len() elements of T (size_of::<T>() == dtype.size()).
        unsafe { self.dev.copy_to_device(buf.ptr, bytemuck::cast_slice(host)) }?;
        Ok(buf)
    }

    /// A device copy of `host`, freed in the order of the device's work when dropped.
    fn device_copy<T: bytemuck::Pod>(&self, host: &[T]) -> Result<Arc<dyn DeviceMemory>> {
        let mem = self.device_alloc(std::mem::size_of_val(host))?;
        // SAFETY: `mem` holds size_of_val(host) bytes.
        unsafe {
            self.dev
                .copy_to_device(mem.ptr(), bytemuck::cast_slice(host))
        }?;
        Ok(mem)
    }

    /// The device copy of an index array, uploaded unless one of the last few had these values.
    fn indices(&self, host: &[u32]) -> Result<u64> {
        let mut cache = lock(&self.indices);
        let mut recording = lock(&self.recording);
        if let Some(i) = cache.iter().position(|e| e.host == host) {
            let entry = cache.remove(i);
            let ptr = entry.ptr;
            if let Some(inputs) = recording.as_mut() {
                inputs.indices.push(entry.device.clone());
            }
            cache.push(entry);
            return Ok(ptr);
        }
        ensure!(
            recording.is_none(),
            "an index array of {} values would be uploaded while recording a decode step",
            host.len()
        );
        let device = self
            .device_copy(host)
            .context("copying indices to the GPU")?;
        let ptr = device.ptr();
        if cache.len() == INDEX_CACHE_ENTRIES {
            // Freed in stream order: kernels queued before still see it.
            cache.remove(0);
        }
        cache.push(DeviceIndices {
            host: host.to_vec(),
            device,
            ptr,
        });
        Ok(ptr)
    }

    /// Checks one layer's cache views (bf16, equal sizes, whole slots of capacity × kv_dim) and
    /// the batch's slots and positions against them; returns the device slots and positions.
    fn cache_placement(
        &self,
        place: &TokenPlacement,
        cache_k: (DType, usize),
        cache_v: (DType, usize),
        capacity: usize,
        kv_dim: usize,
    ) -> Result<(u64, u64)> {
        ensure!(
            place.slots.len() == place.positions.len(),
            "placement has {} slots but {} positions",
            place.slots.len(),
            place.positions.len()
        );
        expect_bf16("cache_k", cache_k.0)?;
        expect("cache_v", cache_v.0, cache_v.1, DType::Bf16, cache_k.1)?;
        let slots = rows_of("cache_k", cache_k.1, capacity * kv_dim)?;
        check_ids("slot", &place.slots, slots)?;
        check_ids("position", &place.positions, capacity)?;
        Ok((
            self.indices(&place.slots)?,
            self.positions(&place.positions)?,
        ))
    }

    /// A device pointer to at least `len` f32 of scratch, valid until the next call. Ops run in
    /// stream order, so the previous user is done with it by the time the next one runs; a grown
    /// buffer replaces the old one, which is freed in stream order after the kernels using it.
    fn scratch_f32(&self, len: usize) -> Result<u64> {
        let mut scratch = lock(&self.scratch);
        let mut recording = lock(&self.recording);
        if scratch.as_ref().is_none_or(|s| s.len < len) {
            ensure!(
                recording.is_none(),
                "the scratch buffer would grow to {len} floats while recording a decode step"
            );
            *scratch = Some(Arc::new(self.alloc(len.next_power_of_two(), DType::F32)?));
        }
        let buf = scratch.as_ref().expect("made above");
        if let Some(inputs) = recording.as_mut() {
            inputs.scratch.push(buf.clone());
        }
        Ok(buf.ptr)
    }

    /// Column-major C[m, n] = op(A)[m, k] · op(B)[k, n] + beta · C on this stream (cuBLAS
    /// GemmEx): A and B bf16 with leading dimensions lda, ldb, transposed where `trans` says;
    /// C bf16 or f32 with ldc; fp32 accumulation. The caller checked the buffers' sizes.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: &str,
        (trans_a, trans_b): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        beta: f32,
        (c, c_dtype, ldc): (u64, DType, usize),
    ) -> Result<()> {
        // k = 0 is allowed: cuBLAS then only scales C by beta (a sum over nothing)
        let g = Gemm {
            trans_a,
            trans_b,
            m,
            n,
            k,
            a,
            lda,
            b,
            ldb,
            beta,
            c,
            c_dtype,
            ldc,
        };
        // SAFETY: the callers checked that A, B and C hold the m, n, k the leading dimensions
        // describe.
        unsafe { self.dev.gemm(&g) }.with_context(|| format!("{op} (m {m}, n {n}, k {k})"))
    }

    /// The device copies (offsets, src_rows, dst_rows) of `RowGroups::new(index)` and the number
    /// of groups, for the deterministic scatter kernels.
    fn row_groups(&self, index: &[u32]) -> Result<((u64, u64, u64), usize)> {
        let g = ops::embedding::RowGroups::new(index);
        let offsets = self.indices(&g.offsets)?;
        let src_rows = self.indices(&g.src_rows)?;
        let dst_rows = self.indices(&g.dst_rows)?;
        Ok(((offsets, src_rows, dst_rows), g.dst_rows.len()))
    }

    fn row_indices(&self, rows: &[usize]) -> Result<u64> {
        let rows: Vec<u32> = rows
            .iter()
            .map(|&r| u32::try_from(r).map_err(|_| anyhow!("row index {r} exceeds u32")))
            .collect::<Result<_>>()?;
        self.indices(&rows)
    }
}

/// `THINKSHORT_CUDA_GRAPHS`: unset or 1 records decode steps as CUDA graphs, 0 runs them op by op.
fn decode_graphs_from_env() -> Result<bool> {
    parse_decode_graphs(std::env::var("THINKSHORT_CUDA_GRAPHS").ok().as_deref())
}

fn parse_decode_graphs(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(v) => bail!("THINKSHORT_CUDA_GRAPHS must be 0 or 1, got {v:?}"),
    }
}

fn flash_backward_from_env() -> Result<FlashBackward> {
    parse_flash_backward(std::env::var("THINKSHORT_FLASH_BACKWARD").ok().as_deref())
}

fn parse_flash_backward(value: Option<&str>) -> Result<FlashBackward> {
    match value {
        None => Ok(FlashBackward::Split),
        Some(v) => FlashBackward::from_name(v).ok_or_else(|| {
            anyhow!("THINKSHORT_FLASH_BACKWARD must be split, fused or fused-wide, got {v:?}")
        }),
    }
}

/// Checks a view's type and size, naming the op and the argument.
fn expect(arg: &str, dtype: DType, len: usize, want_dtype: DType, want_len: usize) -> Result<()> {
    ensure!(
        dtype == want_dtype,
        "{arg} is {dtype:?}, expected {want_dtype:?}"
    );
    ensure!(
        len == want_len,
        "{arg} has {len} elements, expected {want_len}"
    );
    Ok(())
}

/// q, k and v (or their gradients: `names`, then their product's), bf16 [m, n_heads * head_dim]
/// and [m, n_kv_heads * head_dim] twice, and their projections' product (or its gradient) with
/// their rows side by side: bf16 [m, (n_heads + 2 n_kv_heads) * head_dim]. Each operand is
/// (dtype, len).
fn expect_qkv(
    names: [&str; 4],
    parts: [(DType, usize); 3],
    product: (DType, usize),
    m: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
) -> Result<()> {
    let widths = [n_heads, n_kv_heads, n_kv_heads].map(|heads| m * heads * head_dim);
    for ((name, (dtype, len)), want) in names.iter().zip(parts).zip(widths) {
        expect(name, dtype, len, DType::Bf16, want)?;
    }
    let (dtype, len) = product;
    expect(names[3], dtype, len, DType::Bf16, widths.iter().sum())
}

/// RoPE's frequencies: f32 [head_dim / 2].
fn expect_inv_freq(inv_freq: &CudaView<'_>, head_dim: usize) -> Result<()> {
    expect(
        "inv_freq",
        inv_freq.dtype,
        inv_freq.len,
        DType::F32,
        head_dim / 2,
    )
}

fn expect_bf16(arg: &str, dtype: DType) -> Result<()> {
    ensure!(dtype == DType::Bf16, "{arg} is {dtype:?}, expected Bf16");
    Ok(())
}

fn rows_of(arg: &str, len: usize, dim: usize) -> Result<usize> {
    ensure!(dim > 0, "{arg}: row length is 0");
    ensure!(
        len.is_multiple_of(dim),
        "{arg} has {len} elements, not a whole number of rows of {dim}"
    );
    Ok(len / dim)
}

fn check_ids(what: &str, ids: &[u32], limit: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= limit) {
        bail!("{what} {bad} out of range (must be < {limit})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_setting_is_on_unless_set_to_0_and_anything_else_is_an_error() {
        assert!(parse_decode_graphs(None).unwrap());
        assert!(parse_decode_graphs(Some("1")).unwrap());
        assert!(!parse_decode_graphs(Some("0")).unwrap());
        let err = parse_decode_graphs(Some("off")).unwrap_err().to_string();
        assert!(
            err.contains("THINKSHORT_CUDA_GRAPHS") && err.contains("off"),
            "{err}"
        );
    }

    #[test]
    fn the_backward_setting_is_split_unless_named_and_anything_else_is_an_error() {
        assert_eq!(parse_flash_backward(None).unwrap(), FlashBackward::Split);
        assert_eq!(
            parse_flash_backward(Some("split")).unwrap(),
            FlashBackward::Split
        );
        assert_eq!(
            parse_flash_backward(Some("fused")).unwrap(),
            FlashBackward::Fused
        );
        assert_eq!(
            parse_flash_backward(Some("fused-wide")).unwrap(),
            FlashBackward::FusedWide
        );
        let err = parse_flash_backward(Some("1")).unwrap_err().to_string();
        assert!(err.contains("THINKSHORT_FLASH_BACKWARD"), "{err}");
    }
}
