//! The CUDA backend: the `Backend` ops on one GPU, bf16 storage, fp32 arithmetic.
//!
//! Buffers hold bf16 (weights, activations, the KV cache) unless made with `zeros_f32` /
//! `upload_f32` (log-probs, entropies, logits, RoPE frequencies), which stay f32. `upload` rounds
//! f32 to bf16 (nearest even) and `download` widens back, so the model code sees f32 on every
//! backend. GEMMs go through cuBLAS (bf16 operands, fp32 accumulation); everything else is our
//! kernels (`kernels/*.cu`, launched by `ops/`). The GPU is reached through a [`Device`]
//! (`device.rs`: [`CudaDevice`], the driver and cuBLAS), which the tests replace with an
//! emulated device on the CPU, so everything here also runs without a GPU.
//!
//! Everything runs in order on one stream. Ops cannot return errors (the trait's CPU ops cannot
//! fail), so the first failure (a bad shape or dtype, a launch error) is recorded, later ops are
//! skipped, and the error comes back from `synchronize` and `download`: a failed forward can never
//! be read as a result. Buffers come from the driver's stream-ordered pool (cuMemAllocAsync), so a
//! freed buffer is reused by the next allocation of that size without a device-wide sync.
//!
//! Host-side index arrays (token ids, slots, positions, rows, targets) are copied to the device
//! when an op needs them; the last few are kept and reused when the same values come again (the
//! placement of a batch is used by every layer).

mod decode_graph;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::sys as blas_sys;
use half::bf16;
use rayon::prelude::*;

use super::attention_plan::{wide_query_tiles, AttentionKernel, AttentionPlan};
use super::device::{CudaDevice, Device, DeviceMemory, Gemm, TimingMark};
use super::launch::Launcher;
use super::ops;
use super::ops::decode_attention::{plan_splits, scratch_sizes, DecodeProblem};
use super::ops::flash_attention::{
    BackwardScratch, FlashBackward, FlashForward, FlashGrads, FlashProblem,
};
use super::ops::sampling::DeviceDraws;
use crate::backend::{
    summarize_ops, Backend, DecodeGraphStats, GradWrite, OpTime, PolicyTokens, TokenPlacement,
    TrainBackend, POLICY_STATS,
};
use crate::grpo::{AdvantageOptions, LossOptions};
use crate::sampling::{SamplingParams, TokenDraws};
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

/// An op's name and the timing marks before and after its launches.
type OpMarks = (&'static str, TimingMark, TimingMark);

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
    /// The first error of any op since the backend was made (sticky, like a CUDA context error).
    error: Mutex<Option<String>>,
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
    /// the op's launches with timing events.
    fn run(&self, op: &'static str, f: impl FnOnce() -> Result<()>) {
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
                events.push((op, start, self.dev.timing_mark()?));
                Ok(())
            })(),
        };
        if let Err(e) = result {
            *error = Some(format!("CUDA {op}: {e:#}"));
        }
    }

    fn check_error(&self) -> Result<()> {
        match &*lock(&self.error) {
            Some(e) => Err(anyhow!("{e}")),
            None => Ok(()),
        }
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = len
            .checked_mul(dtype.size())
            .context("buffer size overflows")?;
        let mem = self.dev.alloc(bytes).with_context(|| {
            format!(
                "allocating {:.1} MiB on the GPU (out of memory? use a smaller batch or model)",
                bytes as f64 / (1u64 << 20) as f64
            )
        })?;
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
        let mem = self.dev.alloc(std::mem::size_of_val(host))?;
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

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type View<'a> = CudaView<'a>;
    type ViewMut<'a> = CudaViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    /// A sync idles the GPU while the host catches up, and a sequence that ended meanwhile costs
    /// one row of a decode step per step: 8 keeps both small.
    fn decode_sync_every(&self) -> usize {
        8
    }

    type DecodeGraph = CudaDecodeGraph;
    fn decode_graph(&self) -> CudaDecodeGraph {
        CudaDecodeGraph::default()
    }
    fn decode_step(
        &self,
        graph: &mut CudaDecodeGraph,
        place: &TokenPlacement,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        self.run_decode_step(graph, place, step)
    }
    fn records_decode_steps(&self) -> bool {
        self.decode_graphs.load(Ordering::Relaxed)
    }
    fn set_decode_graphs(&self, on: bool) -> bool {
        self.decode_graphs.swap(on, Ordering::Relaxed)
    }
    fn decode_graph_stats(&self) -> Option<DecodeGraphStats> {
        Some(lock(&self.graph_stats).clone())
    }

    fn storage_bytes(&self) -> usize {
        DType::Bf16.size()
    }

    fn free_memory(&self) -> Result<Option<usize>> {
        Ok(Some(self.memory_info()?.0))
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(len, DType::Bf16)
    }

    fn zeros_f32(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(len, DType::F32)
    }

    fn empty(&self, len: usize) -> Result<CudaBuf> {
        self.alloc(len, DType::Bf16)
    }

    fn empty_f32(&self, len: usize) -> Result<CudaBuf> {
        self.alloc(len, DType::F32)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        let narrow: Vec<bf16> = host.par_iter().map(|&v| bf16::from_f32(v)).collect();
        self.upload_bytes(&narrow, DType::Bf16)
    }

    fn upload_f32(&self, host: &[f32]) -> Result<CudaBuf> {
        self.upload_bytes(host, DType::F32)
    }

    fn upload_into(&self, dst: CudaViewMut<'_>, host: &[f32]) -> Result<()> {
        ensure!(
            dst.len == host.len(),
            "upload_into: {} values into a view of {}",
            host.len(),
            dst.len
        );
        // An asynchronous copy from pageable memory may return before the driver has read the
        // memory (CUDA documents staging before the return for the synchronous copy only), so
        // the copy is waited for before the staging buffer or `host` can change. The offloaded
        // optimizer downloads the next chunk next, which waits anyway.
        let mut staging = lock(&self.upload_staging);
        // SAFETY: the view holds dst.len values of its dtype, the size of one element of the
        // slice copied, which is neither dropped nor changed until the device has been
        // synchronised below (the staging lock is held until then).
        let copied = match dst.dtype {
            DType::F32 => unsafe { self.dev.copy_to_device(dst.ptr, bytemuck::cast_slice(host)) },
            DType::Bf16 => {
                if staging.len() < host.len() {
                    staging.resize(host.len(), bf16::ZERO);
                }
                let narrow = &mut staging[..host.len()];
                narrow
                    .par_iter_mut()
                    .zip(host.par_iter())
                    .for_each(|(n, &v)| *n = bf16::from_f32(v));
                unsafe {
                    self.dev
                        .copy_to_device(dst.ptr, bytemuck::cast_slice(&*narrow))
                }
            }
        };
        copied?;
        self.synchronize()
    }

    fn download(&self, buf: CudaView<'_>) -> Result<Vec<f32>> {
        if buf.dtype == DType::F32 {
            let mut host = vec![0f32; buf.len];
            self.download_into(&mut host, buf)?;
            return Ok(host);
        }
        self.synchronize()?;
        let mut host = vec![bf16::ZERO; buf.len];
        // SAFETY: the view covers buf.len bf16 values.
        unsafe {
            self.dev
                .copy_to_host(bytemuck::cast_slice_mut(&mut host), buf.ptr)
        }?;
        Ok(host.par_iter().map(|v| v.to_f32()).collect())
    }

    fn download_into(&self, dst: &mut [f32], buf: CudaView<'_>) -> Result<()> {
        ensure!(
            dst.len() == buf.len,
            "download_into: a view of {} values into {}",
            buf.len,
            dst.len()
        );
        if buf.dtype == DType::Bf16 {
            dst.copy_from_slice(&self.download(buf)?);
            return Ok(());
        }
        self.synchronize()?;
        // SAFETY: the view covers buf.len f32 values, dst as many.
        unsafe {
            self.dev
                .copy_to_host(bytemuck::cast_slice_mut(dst), buf.ptr)
        }
    }

    fn start_op_profile(&self) -> bool {
        *lock(&self.profile) = Some(Vec::new());
        true
    }

    fn take_op_profile(&self) -> Result<Vec<OpTime>> {
        let events = lock(&self.profile).take().unwrap_or_default();
        self.synchronize()?;
        let mut samples = Vec::with_capacity(events.len());
        for (op, start, end) in &events {
            samples.push((*op, self.dev.seconds_between(start, end)?));
        }
        Ok(summarize_ops(&samples))
    }

    fn synchronize(&self) -> Result<()> {
        self.check_error()?;
        self.dev.synchronize()?;
        self.check_error()
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn view<'a>(&self, buf: &'a CudaBuf, range: Range<usize>) -> CudaView<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} out of a buffer of {}",
            buf.len
        );
        CudaView {
            ptr: buf.ptr + (range.start * buf.dtype.size()) as u64,
            len: range.len(),
            dtype: buf.dtype,
            _buf: PhantomData,
        }
    }

    fn view_mut<'a>(&self, buf: &'a mut CudaBuf, range: Range<usize>) -> CudaViewMut<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} out of a buffer of {}",
            buf.len
        );
        CudaViewMut {
            ptr: buf.ptr + (range.start * buf.dtype.size()) as u64,
            len: range.len(),
            dtype: buf.dtype,
            _buf: PhantomData,
        }
    }

    fn embedding_forward(
        &self,
        out: CudaViewMut<'_>,
        table: CudaView<'_>,
        ids: &[u32],
        dim: usize,
    ) {
        self.run("embedding_forward", || {
            expect_bf16("table", table.dtype)?;
            let vocab = rows_of("table", table.len, dim)?;
            expect("out", out.dtype, out.len, DType::Bf16, ids.len() * dim)?;
            check_ids("token id", ids, vocab)?;
            let ids_ptr = self.indices(ids)?;
            ops::embedding::embedding_forward(
                self.launcher(),
                out.ptr,
                table.ptr,
                ids_ptr,
                ids.len(),
                dim,
            )
        })
    }

    fn embedding_forward_sampled(
        &self,
        out: CudaViewMut<'_>,
        table: CudaView<'_>,
        sampled: CudaView<'_>,
        rows: &[u32],
        dim: usize,
    ) {
        self.run("embedding_forward_sampled", || {
            expect_bf16("table", table.dtype)?;
            let vocab = rows_of("table", table.len, dim)?;
            expect("out", out.dtype, out.len, DType::Bf16, rows.len() * dim)?;
            ensure!(
                sampled.dtype == DType::F32,
                "sampled ids must be f32, got {:?}",
                sampled.dtype
            );
            check_ids("sampled row", rows, sampled.len)?;
            let rows_ptr = self.indices(rows)?;
            ops::embedding::embedding_forward_sampled(
                self.launcher(),
                out.ptr,
                table.ptr,
                sampled.ptr,
                rows_ptr,
                rows.len(),
                dim,
                vocab,
            )
        })
    }

    fn add_rmsnorm_forward(
        &self,
        x: CudaViewMut<'_>,
        residual: CudaView<'_>,
        out: CudaViewMut<'_>,
        weight: CudaView<'_>,
        dim: usize,
        eps: f32,
    ) {
        self.run("add_rmsnorm_forward", || {
            expect_bf16("x", x.dtype)?;
            let rows = rows_of("x", x.len, dim)?;
            expect("residual", residual.dtype, residual.len, DType::Bf16, x.len)?;
            expect("out", out.dtype, out.len, DType::Bf16, x.len)?;
            expect("weight", weight.dtype, weight.len, DType::Bf16, dim)?;
            ops::rmsnorm::add_rmsnorm_forward(
                self.launcher(),
                out.ptr,
                x.ptr,
                residual.ptr,
                weight.ptr,
                rows,
                dim,
                eps,
            )
        })
    }

    fn rmsnorm_forward(
        &self,
        out: CudaViewMut<'_>,
        x: CudaView<'_>,
        weight: CudaView<'_>,
        dim: usize,
        eps: f32,
    ) {
        self.run("rmsnorm_forward", || {
            expect_bf16("x", x.dtype)?;
            let rows = rows_of("x", x.len, dim)?;
            expect("out", out.dtype, out.len, DType::Bf16, x.len)?;
            expect("weight", weight.dtype, weight.len, DType::Bf16, dim)?;
            ops::rmsnorm::rmsnorm_forward(
                self.launcher(),
                out.ptr,
                x.ptr,
                weight.ptr,
                rows,
                dim,
                eps,
            )
        })
    }

    fn matmul_forward(
        &self,
        out: CudaViewMut<'_>,
        x: CudaView<'_>,
        w: CudaView<'_>,
        bias: Option<CudaView<'_>>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        self.run("matmul_forward", || {
            expect("x", x.dtype, x.len, DType::Bf16, m * k)?;
            expect("w", w.dtype, w.len, DType::Bf16, n * k)?;
            ensure!(
                out.len == m * n,
                "out has {} elements, expected {m} * {n}",
                out.len
            );
            if m == 0 || n == 0 {
                return Ok(());
            }
            // Row-major out[M, N] = x[M, K] · w[N, K]ᵀ is column-major outᵀ[N, M] = w·xᵀ:
            // A = w read transposed (lda = K), B = x as is (ldb = K), C = out (ldc = N).
            self.gemm(
                "matmul_forward",
                (true, false),
                (n, m, k),
                (w.ptr, k),
                (x.ptr, k),
                0.0,
                (out.ptr, out.dtype, n),
            )?;
            if let Some(bias) = bias {
                expect("bias", bias.dtype, bias.len, DType::Bf16, n)?;
                let out_f32 = out.dtype == DType::F32;
                ops::elementwise::bias_add(self.launcher(), out.ptr, bias.ptr, m, n, out_f32)?;
            }
            Ok(())
        })
    }

    fn qkv_rope_forward(
        &self,
        [q, k, v]: [CudaViewMut<'_>; 3],
        [q_bias, k_bias, v_bias]: [Option<CudaView<'_>>; 3],
        positions: &[u32],
        inv_freq: CudaView<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        self.run("qkv_rope_forward", || {
            let m = positions.len();
            expect("q", q.dtype, q.len, DType::Bf16, m * n_heads * head_dim)?;
            expect("k", k.dtype, k.len, DType::Bf16, m * n_kv_heads * head_dim)?;
            expect("v", v.dtype, v.len, DType::Bf16, m * n_kv_heads * head_dim)?;
            expect(
                "inv_freq",
                inv_freq.dtype,
                inv_freq.len,
                DType::F32,
                head_dim / 2,
            )?;
            let bias_ptr = |name: &str, bias: Option<CudaView<'_>>, heads: usize| -> Result<u64> {
                match bias {
                    Some(b) => {
                        expect(name, b.dtype, b.len, DType::Bf16, heads * head_dim)?;
                        Ok(b.ptr)
                    }
                    None => Ok(0),
                }
            };
            let biases = (
                bias_ptr("q_bias", q_bias, n_heads)?,
                bias_ptr("k_bias", k_bias, n_kv_heads)?,
                bias_ptr("v_bias", v_bias, n_kv_heads)?,
            );
            let pos = self.positions(positions)?;
            ops::rope::qkv_rope_forward(
                self.launcher(),
                (q.ptr, k.ptr, v.ptr),
                biases,
                pos,
                inv_freq.ptr,
                m,
                n_heads,
                n_kv_heads,
                head_dim,
            )
        })
    }

    fn kv_cache_write(
        &self,
        cache_k: CudaViewMut<'_>,
        cache_v: CudaViewMut<'_>,
        k: CudaView<'_>,
        v: CudaView<'_>,
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        self.run("kv_cache_write", || {
            let m = place.slots.len();
            expect("k", k.dtype, k.len, DType::Bf16, m * kv_dim)?;
            expect("v", v.dtype, v.len, DType::Bf16, m * kv_dim)?;
            let (slot_ptr, pos_ptr) = self.cache_placement(
                place,
                (cache_k.dtype, cache_k.len),
                (cache_v.dtype, cache_v.len),
                capacity,
                kv_dim,
            )?;
            ops::kv_cache::kv_cache_write(
                self.launcher(),
                cache_k.ptr,
                cache_v.ptr,
                k.ptr,
                v.ptr,
                slot_ptr,
                pos_ptr,
                m,
                capacity,
                kv_dim,
            )
        })
    }
    fn kv_cache_gather(
        &self,
        dx: CudaViewMut<'_>,
        dcache: CudaView<'_>,
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        self.run("kv_cache_gather", || {
            let m = place.slots.len();
            expect("dx", dx.dtype, dx.len, DType::Bf16, m * kv_dim)?;
            let cache = (dcache.dtype, dcache.len);
            let (slots, positions) = self.cache_placement(place, cache, cache, capacity, kv_dim)?;
            ops::kv_cache::kv_cache_gather(
                self.launcher(),
                dx.ptr,
                dcache.ptr,
                slots,
                positions,
                m,
                capacity,
                kv_dim,
            )
        })
    }

    fn attention_forward(
        &self,
        out: CudaViewMut<'_>,
        lse: Option<CudaViewMut<'_>>,
        q: CudaView<'_>,
        cache_k: CudaView<'_>,
        cache_v: CudaView<'_>,
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        self.run("attention_forward", || {
            let m = place.slots.len();
            let q_dim = n_heads * head_dim;
            expect("q", q.dtype, q.len, DType::Bf16, m * q_dim)?;
            expect("out", out.dtype, out.len, DType::Bf16, m * q_dim)?;
            let lse_ptr = match &lse {
                Some(l) => {
                    expect("lse", l.dtype, l.len, DType::F32, m * n_heads)?;
                    l.ptr
                }
                None => 0,
            };
            let (slot_ptr, pos_ptr) = self.cache_placement(
                place,
                (cache_k.dtype, cache_k.len),
                (cache_v.dtype, cache_v.len),
                capacity,
                n_kv_heads * head_dim,
            )?;
            // the fused kernels' 16-byte loads and stores
            let aligned = [cache_k.ptr, cache_v.ptr, q.ptr, out.ptr]
                .iter()
                .all(|p| p % 16 == 0);
            let plan = AttentionPlan::new(place);
            match AttentionKernel::choose(&plan, m, n_heads, n_kv_heads, head_dim, aligned) {
                AttentionKernel::Flash => {
                    let wide_tiles = wide_query_tiles(place);
                    let variant = lock(&self.flash_forward)
                        .unwrap_or_else(|| FlashForward::choose(wide_tiles.len() / 4, m));
                    let tiles = match variant {
                        FlashForward::Narrow => &plan.query_tiles,
                        FlashForward::Wide => &wide_tiles,
                    };
                    let problem = FlashProblem {
                        q: q.ptr,
                        cache_k: cache_k.ptr,
                        cache_v: cache_v.ptr,
                        tiles: self.indices(tiles)?,
                        num_tiles: tiles.len() / 4,
                        m,
                        capacity,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                    };
                    ops::flash_attention::flash_attention_forward(
                        self.launcher(),
                        &problem,
                        variant,
                        out.ptr,
                        lse_ptr,
                    )
                }
                AttentionKernel::Decode => {
                    // Planned for the cache's capacity, not the longest prefix of this batch:
                    // the plan is then the same at every step of a decode loop, and a recorded
                    // step (decode_graph.rs) replays it unchanged. Splits past a prefix's end
                    // are empty and cost a block each.
                    let split =
                        plan_splits(m, n_kv_heads, capacity, self.dev.multiprocessors().max(1));
                    // the splits' partial outputs, then their (max, sum) pairs
                    let (out_len, stats_len) = scratch_sizes(split.0, m, n_heads, head_dim);
                    let scratch_ptrs = if split.0 > 1 {
                        let base = self.scratch_f32(out_len + stats_len)?;
                        (base, base + 4 * out_len as u64)
                    } else {
                        (0, 0)
                    };
                    let problem = DecodeProblem {
                        q: q.ptr,
                        cache_k: cache_k.ptr,
                        cache_v: cache_v.ptr,
                        slots: slot_ptr,
                        positions: pos_ptr,
                        m,
                        capacity,
                        n_heads,
                        n_kv_heads,
                        head_dim,
                    };
                    ops::decode_attention::decode_attention(
                        self.launcher(),
                        &problem,
                        out.ptr,
                        lse_ptr,
                        split,
                        scratch_ptrs,
                    )
                }
                AttentionKernel::Simple => ops::attention::attention_forward(
                    self.launcher(),
                    out.ptr,
                    lse_ptr,
                    q.ptr,
                    cache_k.ptr,
                    cache_v.ptr,
                    slot_ptr,
                    pos_ptr,
                    m,
                    capacity,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                ),
            }
        })
    }

    fn swiglu_forward(&self, out: CudaViewMut<'_>, gate: CudaView<'_>, up: CudaView<'_>) {
        self.run("swiglu_forward", || {
            expect_bf16("out", out.dtype)?;
            expect("gate", gate.dtype, gate.len, DType::Bf16, out.len)?;
            expect("up", up.dtype, up.len, DType::Bf16, out.len)?;
            ops::elementwise::swiglu_forward(self.launcher(), out.ptr, gate.ptr, up.ptr, out.len)
        })
    }

    fn residual_add(&self, x: CudaViewMut<'_>, y: CudaView<'_>) {
        self.run("residual_add", || {
            expect_bf16("x", x.dtype)?;
            expect("y", y.dtype, y.len, DType::Bf16, x.len)?;
            ops::elementwise::residual_add(self.launcher(), x.ptr, y.ptr, x.len)
        })
    }

    fn gather_rows(&self, out: CudaViewMut<'_>, x: CudaView<'_>, rows: &[usize], dim: usize) {
        self.run("gather_rows", || {
            expect_bf16("x", x.dtype)?;
            let x_rows = rows_of("x", x.len, dim)?;
            expect("out", out.dtype, out.len, DType::Bf16, rows.len() * dim)?;
            if let Some(&bad) = rows.iter().find(|&&r| r >= x_rows) {
                bail!("row {bad} out of range (x has {x_rows} rows)");
            }
            let rows_ptr = self.row_indices(rows)?;
            ops::embedding::gather_rows(self.launcher(), out.ptr, x.ptr, rows_ptr, rows.len(), dim)
        })
    }

    fn fill_zero(&self, out: CudaViewMut<'_>) {
        self.run("fill_zero", || {
            // SAFETY: the view covers len elements of its dtype.
            unsafe { self.dev.fill_zero(out.ptr, out.len * out.dtype.size()) }
        })
    }

    fn copy(&self, dst: CudaViewMut<'_>, src: CudaView<'_>) {
        self.run("copy", || {
            ensure!(
                dst.len == src.len,
                "dst has {} elements, src {}",
                dst.len,
                src.len
            );
            match (dst.dtype, src.dtype) {
                (DType::F32, DType::Bf16) => ops::elementwise::convert_bf16_to_f32(
                    self.launcher(),
                    dst.ptr,
                    src.ptr,
                    src.len,
                ),
                (DType::Bf16, DType::F32) => ops::elementwise::convert_f32_to_bf16(
                    self.launcher(),
                    dst.ptr,
                    src.ptr,
                    src.len,
                ),
                (d, _) => {
                    // SAFETY: both views cover len elements of the same dtype.
                    unsafe {
                        self.dev
                            .copy_on_device(dst.ptr, src.ptr, src.len * d.size())
                    }
                }
            }
        })
    }

    fn logprob_forward(
        &self,
        logp: CudaViewMut<'_>,
        entropy: CudaViewMut<'_>,
        logits: CudaView<'_>,
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) {
        self.run("logprob_forward", || {
            let r = targets.len();
            expect("logp", logp.dtype, logp.len, DType::F32, r)?;
            expect("entropy", entropy.dtype, entropy.len, DType::F32, r)?;
            ensure!(
                logits.len == r * vocab,
                "logits has {} elements, expected {r} * {vocab}",
                logits.len
            );
            ensure!(
                temperature > 0.0,
                "temperature must be > 0, got {temperature}"
            );
            check_ids("target", targets, vocab)?;
            let t = self.indices(targets)?;
            ops::logprob::logprob_forward(
                self.launcher(),
                logp.ptr,
                entropy.ptr,
                logits.ptr,
                logits.dtype == DType::F32,
                t,
                r,
                vocab,
                temperature,
            )
        })
    }

    fn sample_tokens(
        &self,
        out: CudaViewMut<'_>,
        logp: CudaViewMut<'_>,
        logits: CudaView<'_>,
        draws: &TokenDraws,
        vocab: usize,
        params: &SamplingParams,
    ) {
        self.run("sample_tokens", || {
            let rows = draws.rows();
            expect("out", out.dtype, out.len, DType::F32, rows)?;
            expect("logp", logp.dtype, logp.len, DType::F32, rows)?;
            expect("logits", logits.dtype, logits.len, DType::F32, rows * vocab)?;
            params.validate()?;
            // Kept alive until the launch is queued (freed in stream order).
            let mut given = None;
            let device_draws = match *draws {
                TokenDraws::Given(uniforms) => {
                    // Each f64 draw as two floats, hi + lo (the kernel adds them back in f64).
                    let mut split = vec![0.0f32; 2 * rows];
                    for (pair, &u) in split.chunks_exact_mut(2).zip(uniforms) {
                        crate::backend::cpu::split_f64(pair, u);
                    }
                    let buf = given.insert(self.upload_bytes(&split, DType::F32)?);
                    DeviceDraws::Given { uniforms: buf.ptr }
                }
                TokenDraws::Philox {
                    seed,
                    first_stream,
                    streams,
                    step,
                } => DeviceDraws::Philox {
                    seed,
                    first_stream,
                    streams: self.indices(streams)?,
                    step,
                },
            };
            ops::sampling::sample_tokens(
                self.launcher(),
                out.ptr,
                logp.ptr,
                logits.ptr,
                &device_draws,
                rows,
                vocab,
                params,
            )
        })
    }
}

/// The backward ops. Activation gradients are bf16 like the activations; parameter gradients
/// (dw of a matmul may be either) are f32, accumulated with atomics where rows share a parameter.
impl TrainBackend for CudaBackend {
    fn attention_backward_variants(&self) -> &'static [&'static str] {
        const NAMES: [&str; 3] = [
            FlashBackward::Split.name(),
            FlashBackward::Fused.name(),
            FlashBackward::FusedWide.name(),
        ];
        &NAMES
    }

    fn set_attention_backward_variant(&self, name: &str) -> Result<&'static str> {
        let variant = FlashBackward::from_name(name).ok_or_else(|| {
            anyhow!("no attention backward variant {name:?} (split, fused, fused-wide)")
        })?;
        Ok(self.set_flash_backward(variant).name())
    }

    /// The fused backward (kernels/flash_attention.cu) for head dims 32, 64 and 128.
    fn attention_backward(
        &self,
        dq: CudaViewMut<'_>,
        dcache_k: CudaViewMut<'_>,
        dcache_v: CudaViewMut<'_>,
        dout: CudaView<'_>,
        out: CudaView<'_>,
        lse: CudaView<'_>,
        q: CudaView<'_>,
        cache_k: CudaView<'_>,
        cache_v: CudaView<'_>,
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        self.run("attention_backward", || {
            ensure!(
                ops::flash_attention::supports_head_dim(head_dim),
                "head_dim {head_dim} has no fused backward on CUDA (supported: {:?})",
                ops::flash_attention::FLASH_HEAD_DIMS
            );
            let m = place.slots.len();
            let q_dim = n_heads * head_dim;
            for (arg, view) in [("q", &q), ("dout", &dout), ("out", &out)] {
                expect(arg, view.dtype, view.len, DType::Bf16, m * q_dim)?;
            }
            expect("dq", dq.dtype, dq.len, DType::Bf16, m * q_dim)?;
            expect("lse", lse.dtype, lse.len, DType::F32, m * n_heads)?;
            expect(
                "dcache_k",
                dcache_k.dtype,
                dcache_k.len,
                DType::Bf16,
                cache_k.len,
            )?;
            expect(
                "dcache_v",
                dcache_v.dtype,
                dcache_v.len,
                DType::Bf16,
                cache_k.len,
            )?;
            self.cache_placement(
                place,
                (cache_k.dtype, cache_k.len),
                (cache_v.dtype, cache_v.len),
                capacity,
                n_kv_heads * head_dim,
            )?;
            let caches = [cache_k.ptr, cache_v.ptr, dcache_k.ptr, dcache_v.ptr];
            let rows = [q.ptr, dout.ptr, out.ptr, dq.ptr];
            ensure!(
                caches.iter().all(|p| p % 16 == 0) && rows.iter().all(|p| p % 4 == 0),
                "the caches must be 16-byte aligned and q, dout, out, dq 4-byte aligned"
            );
            let plan = AttentionPlan::new(place);
            let problem = FlashProblem {
                q: q.ptr,
                cache_k: cache_k.ptr,
                cache_v: cache_v.ptr,
                tiles: self.indices(&plan.query_tiles)?,
                num_tiles: plan.num_query_tiles(),
                m,
                capacity,
                n_heads,
                n_kv_heads,
                head_dim,
            };
            let variant = *lock(&self.flash_backward);
            let scratch = BackwardScratch::new(&problem, variant);
            let (dsum, dq_acc, turns) = scratch.pointers(self.scratch_f32(scratch.floats)?);
            let wide_key_tiles;
            let key_tiles: &[u32] = if variant == FlashBackward::FusedWide {
                wide_key_tiles = plan.wide_key_tiles();
                &wide_key_tiles
            } else {
                &plan.key_tiles
            };
            let grads = FlashGrads {
                dq: dq.ptr,
                dcache_k: dcache_k.ptr,
                dcache_v: dcache_v.ptr,
                dout: dout.ptr,
                out: out.ptr,
                lse: lse.ptr,
                dsum,
                key_tiles: self.indices(key_tiles)?,
                num_key_tiles: key_tiles.len() / 4,
                dq_acc,
                turns,
            };
            ops::flash_attention::flash_attention_backward(
                self.launcher(),
                &problem,
                &grads,
                variant,
            )
        })
    }

    fn logprob_backward(
        &self,
        dlogits: CudaViewMut<'_>,
        dlogp: CudaView<'_>,
        logits: CudaView<'_>,
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) {
        self.run("logprob_backward", || {
            let r = targets.len();
            expect(
                "dlogits",
                dlogits.dtype,
                dlogits.len,
                DType::Bf16,
                r * vocab,
            )?;
            expect("dlogp", dlogp.dtype, dlogp.len, DType::F32, r)?;
            ensure!(
                logits.len == r * vocab,
                "logits has {} elements, expected {r} * {vocab}",
                logits.len
            );
            check_ids("target", targets, vocab)?;
            let targets_ptr = self.indices(targets)?;
            ops::logprob::logprob_backward(
                self.launcher(),
                dlogits.ptr,
                dlogp.ptr,
                logits.ptr,
                targets_ptr,
                r,
                vocab,
                temperature,
                logits.dtype == DType::F32,
            )
        })
    }

    fn matmul_backward(
        &self,
        dx: Option<CudaViewMut<'_>>,
        dx_write: GradWrite,
        dw: CudaViewMut<'_>,
        dout: CudaView<'_>,
        x: CudaView<'_>,
        w: CudaView<'_>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        self.run("matmul_backward", || {
            expect("dout", dout.dtype, dout.len, DType::Bf16, m * n)?;
            expect("x", x.dtype, x.len, DType::Bf16, m * k)?;
            expect("w", w.dtype, w.len, DType::Bf16, n * k)?;
            ensure!(
                dw.len == n * k,
                "dw has {} elements, expected {n} * {k}",
                dw.len
            );
            if let Some(dx) = &dx {
                expect("dx", dx.dtype, dx.len, DType::Bf16, m * k)?;
                if n == 0 && dx_write == GradWrite::Overwrite {
                    // an empty product: dx = 0 (cuBLAS would not touch it)
                    // SAFETY: dx covers m * k bf16.
                    unsafe { self.dev.fill_zero(dx.ptr, 2 * dx.len) }?;
                }
            }
            if m == 0 || n == 0 || k == 0 {
                return Ok(());
            }
            if let Some(dx) = dx {
                // dx[M, K] (+)= dout[M, N] · w[N, K]: column-major dxᵀ = wᵀ · doutᵀ, with w and
                // dout read as stored (column-major K × N and N × M); beta 0 never reads dx
                let beta = match dx_write {
                    GradWrite::Add => 1.0,
                    GradWrite::Overwrite => 0.0,
                };
                self.gemm(
                    "matmul_backward dx",
                    (false, false),
                    (k, m, n),
                    (w.ptr, k),
                    (dout.ptr, n),
                    beta,
                    (dx.ptr, dx.dtype, k),
                )?;
            }
            // dw[N, K] += dout[M, N]ᵀ · x[M, K]: column-major dwᵀ (K × N) = xᵀ (K × M, as stored)
            // · dout (M × N: the stored N × M transposed)
            self.gemm(
                "matmul_backward dw",
                (false, true),
                (k, n, m),
                (x.ptr, k),
                (dout.ptr, n),
                1.0,
                (dw.ptr, dw.dtype, k),
            )
        })
    }

    fn bias_backward(&self, dbias: CudaViewMut<'_>, dout: CudaView<'_>) {
        self.run("bias_backward", || {
            expect("dbias", dbias.dtype, dbias.len, DType::F32, dbias.len)?;
            expect_bf16("dout", dout.dtype)?;
            let m = rows_of("dout", dout.len, dbias.len)?;
            let partials =
                self.scratch_f32(ops::elementwise::bias_backward_scratch(m, dbias.len))?;
            ops::elementwise::bias_backward(
                self.launcher(),
                dbias.ptr,
                dout.ptr,
                m,
                dbias.len,
                partials,
            )
        })
    }

    fn rmsnorm_backward(
        &self,
        dx: CudaViewMut<'_>,
        dx_write: GradWrite,
        dweight: CudaViewMut<'_>,
        dout: CudaView<'_>,
        x: CudaView<'_>,
        weight: CudaView<'_>,
        dim: usize,
        eps: f32,
    ) {
        self.run("rmsnorm_backward", || {
            expect_bf16("x", x.dtype)?;
            let rows = rows_of("x", x.len, dim)?;
            expect("dx", dx.dtype, dx.len, DType::Bf16, x.len)?;
            expect("dout", dout.dtype, dout.len, DType::Bf16, x.len)?;
            expect("weight", weight.dtype, weight.len, DType::Bf16, dim)?;
            expect("dweight", dweight.dtype, dweight.len, DType::F32, dim)?;
            let partials = self.scratch_f32(ops::rmsnorm::rmsnorm_backward_scratch(rows, dim))?;
            ops::rmsnorm::rmsnorm_backward(
                self.launcher(),
                (dx.ptr, dx_write == GradWrite::Add),
                dweight.ptr,
                dout.ptr,
                x.ptr,
                weight.ptr,
                rows,
                dim,
                eps,
                partials,
            )
        })
    }

    fn rope_backward(
        &self,
        dx: CudaViewMut<'_>,
        positions: &[u32],
        inv_freq: CudaView<'_>,
        n_heads: usize,
        head_dim: usize,
    ) {
        self.run("rope_backward", || {
            let m = positions.len();
            expect("dx", dx.dtype, dx.len, DType::Bf16, m * n_heads * head_dim)?;
            expect(
                "inv_freq",
                inv_freq.dtype,
                inv_freq.len,
                DType::F32,
                head_dim / 2,
            )?;
            let pos = self.indices(positions)?;
            ops::rope::rope_backward(
                self.launcher(),
                dx.ptr,
                pos,
                inv_freq.ptr,
                m,
                n_heads,
                head_dim,
            )
        })
    }

    fn swiglu_backward(
        &self,
        dgate: CudaViewMut<'_>,
        dup: CudaViewMut<'_>,
        dout: CudaView<'_>,
        gate: CudaView<'_>,
        up: CudaView<'_>,
    ) {
        self.run("swiglu_backward", || {
            let n = dout.len;
            expect_bf16("dout", dout.dtype)?;
            for (arg, dtype, len) in [
                ("dgate", dgate.dtype, dgate.len),
                ("dup", dup.dtype, dup.len),
                ("gate", gate.dtype, gate.len),
                ("up", up.dtype, up.len),
            ] {
                expect(arg, dtype, len, DType::Bf16, n)?;
            }
            ops::elementwise::swiglu_backward(
                self.launcher(),
                dgate.ptr,
                dup.ptr,
                dout.ptr,
                gate.ptr,
                up.ptr,
                n,
            )
        })
    }

    fn embedding_backward(
        &self,
        dtable: CudaViewMut<'_>,
        dout: CudaView<'_>,
        ids: &[u32],
        dim: usize,
    ) {
        self.run("embedding_backward", || {
            ensure!(
                dtable.dtype == DType::F32,
                "dtable is {:?}, expected F32",
                dtable.dtype
            );
            let vocab = rows_of("dtable", dtable.len, dim)?;
            expect("dout", dout.dtype, dout.len, DType::Bf16, ids.len() * dim)?;
            check_ids("token id", ids, vocab)?;
            let (groups, count) = self.row_groups(ids)?;
            ops::embedding::embedding_backward(
                self.launcher(),
                dtable.ptr,
                dout.ptr,
                groups,
                count,
                dim,
            )
        })
    }

    fn scatter_add_rows(
        &self,
        dx: CudaViewMut<'_>,
        dout: CudaView<'_>,
        rows: &[usize],
        dim: usize,
    ) {
        self.run("scatter_add_rows", || {
            expect_bf16("dx", dx.dtype)?;
            let m = rows_of("dx", dx.len, dim)?;
            expect("dout", dout.dtype, dout.len, DType::Bf16, rows.len() * dim)?;
            if let Some(&bad) = rows.iter().find(|&&r| r >= m) {
                bail!("row {bad} out of range (must be < {m})");
            }
            let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let (groups, count) = self.row_groups(&index)?;
            ops::embedding::scatter_add_rows(self.launcher(), dx.ptr, dout.ptr, groups, count, dim)
        })
    }

    fn policy_loss_backward(
        &self,
        dlogits: CudaViewMut<'_>,
        logp: CudaViewMut<'_>,
        stats: CudaViewMut<'_>,
        logits: CudaView<'_>,
        targets: &[u32],
        tokens: &PolicyTokens<'_, Self>,
        vocab: usize,
        temperature: f32,
        loss: &LossOptions,
    ) {
        self.run("policy_loss_backward", || {
            let r = targets.len();
            expect(
                "dlogits",
                dlogits.dtype,
                dlogits.len,
                DType::Bf16,
                r * vocab,
            )?;
            expect("logp", logp.dtype, logp.len, DType::F32, r)?;
            expect(
                "stats",
                stats.dtype,
                stats.len,
                DType::F32,
                r * POLICY_STATS,
            )?;
            ensure!(
                logits.len == r * vocab,
                "logits has {} elements, expected {r} * {vocab}",
                logits.len
            );
            let n = tokens.advantages.len;
            expect("advantages", tokens.advantages.dtype, n, DType::F32, n)?;
            expect(
                "weights",
                tokens.weights.dtype,
                tokens.weights.len,
                DType::F32,
                n,
            )?;
            ensure!(
                tokens.seqs.len() == r,
                "seqs has {} entries, expected {r}",
                tokens.seqs.len()
            );
            let per_row = |name: &str, v: Option<CudaView<'_>>| -> Result<u64> {
                match v {
                    Some(v) => expect(name, v.dtype, v.len, DType::F32, r).map(|_| v.ptr),
                    None => Ok(0),
                }
            };
            let old_logp = per_row("old_logp", tokens.old_logp)?;
            let ref_logp = per_row("ref_logp", tokens.ref_logp)?;
            check_ids("target", targets, vocab)?;
            check_ids("completion", tokens.seqs, n)?;
            let args = ops::policy_loss::PolicyLossArgs {
                dlogits: dlogits.ptr,
                logp: logp.ptr,
                stats: stats.ptr,
                logits: logits.ptr,
                logits_f32: logits.dtype == DType::F32,
                targets: self.indices(targets)?,
                seqs: self.indices(tokens.seqs)?,
                advantages: tokens.advantages.ptr,
                weights: tokens.weights.ptr,
                old_logp,
                ref_logp,
            };
            ops::policy_loss::policy_loss_backward(
                self.launcher(),
                &args,
                r,
                vocab,
                temperature,
                loss,
            )
        })
    }

    fn group_advantages(
        &self,
        out: CudaViewMut<'_>,
        rewards: &[f64],
        group_size: usize,
        opts: &AdvantageOptions,
    ) {
        self.run("group_advantages", || {
            let n = rewards.len();
            expect("out", out.dtype, out.len, DType::F32, n)?;
            if n == 0 {
                return Ok(());
            }
            // Freed in stream order when dropped, after the kernel has read it.
            let device = self
                .device_copy(rewards)
                .context("copying rewards to the GPU")?;
            let ptr = device.ptr();
            ops::advantage::group_advantages(self.launcher(), out.ptr, ptr, n, group_size, opts)
        })
    }

    fn column_sums(&self, out: CudaViewMut<'_>, x: CudaView<'_>, cols: usize) {
        self.run("column_sums", || {
            expect("out", out.dtype, out.len, DType::F32, 2 * cols)?;
            let rows = rows_of("x", x.len, cols)?;
            expect("x", x.dtype, x.len, DType::F32, x.len)?;
            ops::optimizer::column_sums(self.launcher(), out.ptr, x.ptr, rows, cols)
        })
    }

    fn sum_squares(&self, out: CudaViewMut<'_>, x: CudaView<'_>) {
        self.run("sum_squares", || {
            expect("out", out.dtype, out.len, DType::F32, 2)?;
            expect("x", x.dtype, x.len, DType::F32, x.len)?;
            // f64 partial sums in the f32 scratch: two floats each (allocations are 256-byte
            // aligned, so the doubles are aligned).
            let partials = self.scratch_f32(2 * ops::optimizer::SUM_SQUARES_BLOCKS)?;
            ops::optimizer::sum_squares(self.launcher(), out.ptr, x.ptr, x.len, partials)
        })
    }

    fn adamw_step(
        &self,
        params: CudaViewMut<'_>,
        master: CudaViewMut<'_>,
        m: CudaViewMut<'_>,
        v: CudaViewMut<'_>,
        grads: CudaView<'_>,
        step: &crate::optim::AdamWStep,
    ) {
        self.run("adamw_step", || {
            let n = master.len;
            expect("params", params.dtype, params.len, DType::Bf16, n)?;
            expect("master", master.dtype, master.len, DType::F32, n)?;
            expect("m", m.dtype, m.len, DType::F32, n)?;
            expect("v", v.dtype, v.len, DType::F32, n)?;
            expect("grads", grads.dtype, grads.len, DType::F32, n)?;
            ops::optimizer::adamw_step(
                self.launcher(),
                params.ptr,
                master.ptr,
                m.ptr,
                v.ptr,
                grads.ptr,
                n,
                step,
            )
        })
    }
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
