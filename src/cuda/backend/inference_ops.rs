//! The inference ops of the CUDA backend (`Backend`): buffers and copies, the layers' forward
//! ops, attention, decode, sampling and the log-probs, each checked and launched in order.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::Ordering;

use anyhow::{bail, ensure, Result};
use half::bf16;
use rayon::prelude::*;

use super::{
    check_ids, expect, expect_bf16, expect_inv_freq, expect_qkv, lock, rows_of, CudaBackend,
    CudaBuf, CudaDecodeGraph, CudaView, CudaViewMut, DType, OpFailure,
};
use crate::backend::{
    attention_keys_read, qkv_rope_bytes, summarize_ops, Backend, DecodeGraphStats, HeadNorms,
    MemoryPeaks, OpTime, TokenPlacement, Work,
};
use crate::cuda::attention_plan::{wide_query_tiles, AttentionKernel, AttentionPlan};
use crate::cuda::ops;
use crate::cuda::ops::decode_attention::{plan_splits, scratch_sizes, DecodeProblem};
use crate::cuda::ops::flash_attention::{FlashForward, FlashProblem};
use crate::cuda::ops::sampling::DeviceDraws;
use crate::sampling::{SamplingParams, TokenDraws};

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

    fn memory_peaks(&self) -> Result<Option<MemoryPeaks>> {
        self.dev.memory_peaks().map(Some)
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
        for (op, work, start, end) in &events {
            samples.push((*op, *work, self.dev.seconds_between(start, end)?));
        }
        Ok(summarize_ops(&samples))
    }

    fn synchronize(&self) -> Result<()> {
        self.check_error()?;
        self.dev.synchronize()?;
        self.check_error()
    }

    /// Also drops the scratch buffer (as large as the failed work made it) and the cached index
    /// arrays, which the next ops make again as they need them (a recording keeps its own
    /// references to those it uses).
    fn recover_from_out_of_memory(&self) -> Result<()> {
        {
            let mut error = lock(&self.error);
            if let Some(other @ OpFailure::Other(_)) = &*error {
                return Err(other.error());
            }
            *error = None;
        }
        *lock(&self.scratch) = None;
        lock(&self.indices).clear();
        self.dev.release_cached_memory()
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
        let work = || Work::moving(2 * out.bytes());
        self.run("embedding_forward", work, || {
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
        let work = || Work::moving(2 * out.bytes() + sampled.bytes());
        self.run("embedding_forward_sampled", work, || {
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
        let work = || Work::moving(2 * x.bytes() + residual.bytes() + out.bytes() + weight.bytes());
        self.run("add_rmsnorm_forward", work, || {
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
        let work = || Work::moving(out.bytes() + x.bytes() + weight.bytes());
        self.run("rmsnorm_forward", work, || {
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
        let bytes = out.bytes() + x.bytes() + w.bytes() + bias.map_or(0, |b| b.bytes());
        let work = || Work::matmul_forward(m, k, n, bytes);
        self.run("matmul_forward", work, || {
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
        qkv: CudaView<'_>,
        [q_bias, k_bias, v_bias]: [Option<CudaView<'_>>; 3],
        norms: Option<HeadNorms<'_, Self>>,
        positions: &[u32],
        inv_freq: CudaView<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let raw = norms
            .as_ref()
            .and_then(|n| n.raw.as_ref())
            .map(|r| r.each_ref().map(|r| r.bytes()));
        let biases = [q_bias, k_bias, v_bias].map(|b| b.map(|b| b.bytes()));
        let bytes = qkv_rope_bytes([q.bytes(), k.bytes(), v.bytes()], raw, biases);
        let work = || Work::moving(bytes);
        self.run("qkv_rope_forward", work, || {
            let m = positions.len();
            expect_qkv(
                ["q", "k", "v", "qkv"],
                [(q.dtype, q.len), (k.dtype, k.len), (v.dtype, v.len)],
                (qkv.dtype, qkv.len),
                m,
                (n_heads, n_kv_heads, head_dim),
            )?;
            expect_inv_freq(&inv_freq, head_dim)?;
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
            let Some(norms) = norms else {
                return ops::rope::qkv_rope_forward(
                    self.launcher(),
                    (q.ptr, k.ptr, v.ptr),
                    qkv.ptr,
                    biases,
                    pos,
                    inv_freq.ptr,
                    m,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                );
            };
            let [q_norm, k_norm] = norms.weights;
            expect("q_norm", q_norm.dtype, q_norm.len, DType::Bf16, head_dim)?;
            expect("k_norm", k_norm.dtype, k_norm.len, DType::Bf16, head_dim)?;
            let raw = match norms.raw {
                Some([q_raw, k_raw]) => {
                    expect("q_raw", q_raw.dtype, q_raw.len, DType::Bf16, q.len)?;
                    expect("k_raw", k_raw.dtype, k_raw.len, DType::Bf16, k.len)?;
                    (q_raw.ptr, k_raw.ptr)
                }
                None => (0, 0),
            };
            ops::rope::qkv_norm_rope_forward(
                self.launcher(),
                (q.ptr, k.ptr, v.ptr),
                raw,
                qkv.ptr,
                biases,
                (q_norm.ptr, k_norm.ptr),
                pos,
                inv_freq.ptr,
                m,
                (n_heads, n_kv_heads, head_dim),
                norms.eps,
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
        let work = || Work::moving(2 * (k.bytes() + v.bytes()));
        self.run("kv_cache_write", work, || {
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
        let work = || Work::moving(2 * dx.bytes());
        self.run("kv_cache_gather", work, || {
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
        let moved = q.bytes() + out.bytes() + lse.as_ref().map_or(0, |l| l.bytes());
        let kv_row = 2 * n_kv_heads * head_dim * cache_k.dtype.size(); // K and V
        let work = || {
            let bytes = moved + attention_keys_read(place) * kv_row;
            Work::attention(place, n_heads, head_dim, false, bytes)
        };
        self.run("attention_forward", work, || {
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

    fn swiglu_forward(&self, out: CudaViewMut<'_>, gate_up: CudaView<'_>, inter: usize) {
        let work = || Work::moving(out.bytes() + gate_up.bytes());
        self.run("swiglu_forward", work, || {
            expect_bf16("out", out.dtype)?;
            expect(
                "gate_up",
                gate_up.dtype,
                gate_up.len,
                DType::Bf16,
                2 * out.len,
            )?;
            ops::elementwise::swiglu_forward(self.launcher(), out.ptr, gate_up.ptr, out.len, inter)
        })
    }

    fn residual_add(&self, x: CudaViewMut<'_>, y: CudaView<'_>) {
        let work = || Work::moving(2 * x.bytes() + y.bytes());
        self.run("residual_add", work, || {
            expect_bf16("x", x.dtype)?;
            expect("y", y.dtype, y.len, DType::Bf16, x.len)?;
            ops::elementwise::residual_add(self.launcher(), x.ptr, y.ptr, x.len)
        })
    }

    fn gather_rows(&self, out: CudaViewMut<'_>, x: CudaView<'_>, rows: &[usize], dim: usize) {
        let work = || Work::moving(2 * out.bytes());
        self.run("gather_rows", work, || {
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
        let work = || Work::moving(out.bytes());
        self.run("fill_zero", work, || {
            // SAFETY: the view covers len elements of its dtype.
            unsafe { self.dev.fill_zero(out.ptr, out.len * out.dtype.size()) }
        })
    }

    fn copy(&self, dst: CudaViewMut<'_>, src: CudaView<'_>) {
        let work = || Work::moving(2 * dst.bytes());
        self.run("copy", work, || {
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
        let work = || Work::moving(logits.bytes() + logp.bytes() + entropy.bytes());
        self.run("logprob_forward", work, || {
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
        let work = || Work::moving(logits.bytes() + out.bytes() + logp.bytes());
        self.run("sample_tokens", work, || {
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
