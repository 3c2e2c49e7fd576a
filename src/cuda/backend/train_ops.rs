//! The training ops of the CUDA backend (`TrainBackend`): the backward of every layer op, the
//! fused policy loss, advantages, gradient norms and AdamW.

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::{
    check_ids, expect, expect_bf16, expect_inv_freq, expect_qkv, lock, rows_of, CudaBackend,
    CudaView, CudaViewMut, DType,
};
use crate::backend::{
    attention_keys_read, distinct_rows, gradient_bytes, policy_loss_bytes, GradWrite, PolicyTokens,
    TokenPlacement, TrainBackend, Work, POLICY_STATS,
};
use crate::cuda::attention_plan::AttentionPlan;
use crate::cuda::ops;
use crate::cuda::ops::flash_attention::{BackwardScratch, FlashBackward, FlashGrads, FlashProblem};
use crate::grpo::{AdvantageOptions, LossOptions};

/// The backward ops. Activation gradients are bf16 like the activations; parameter gradients
/// (dw of a matmul may be either) are f32, summed over rows without atomics (the same result run
/// to run).
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
        let moved = dq.bytes() + dout.bytes() + out.bytes() + lse.bytes() + q.bytes();
        // K and V read, dK and dV added into
        let kv_rows =
            2 * n_kv_heads * head_dim * (cache_k.dtype.size() + 2 * dcache_k.dtype.size());
        let work = || {
            let bytes = moved + attention_keys_read(place) * kv_rows;
            Work::attention(place, n_heads, head_dim, true, bytes)
        };
        self.run("attention_backward", work, || {
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
        let work = || Work::moving(dlogits.bytes() + dlogp.bytes() + logits.bytes());
        self.run("logprob_backward", work, || {
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
        let dx_bytes = dx.as_ref().map(|dx| (dx.bytes(), dx_write));
        let operands = [dw.bytes(), dout.bytes(), x.bytes(), w.bytes()];
        let work = || Work::matmul_backward(m, k, n, dx_bytes, operands);
        self.run("matmul_backward", work, || {
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
        let work = || Work::moving(2 * dbias.bytes() + dout.bytes());
        self.run("bias_backward", work, || {
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
        let bytes = gradient_bytes(dx.bytes(), dx_write)
            + 2 * dweight.bytes()
            + dout.bytes()
            + x.bytes()
            + weight.bytes();
        let work = || Work::moving(bytes);
        self.run("rmsnorm_backward", work, || {
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
        let work = || Work::moving(2 * dx.bytes());
        self.run("rope_backward", work, || {
            let m = positions.len();
            expect("dx", dx.dtype, dx.len, DType::Bf16, m * n_heads * head_dim)?;
            expect_inv_freq(&inv_freq, head_dim)?;
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

    fn qkv_rope_backward(
        &self,
        dqkv: CudaViewMut<'_>,
        [dq, dk, dv]: [CudaView<'_>; 3],
        positions: &[u32],
        inv_freq: CudaView<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let work = || Work::moving(dqkv.bytes() + dq.bytes() + dk.bytes() + dv.bytes());
        self.run("qkv_rope_backward", work, || {
            let m = positions.len();
            expect_qkv(
                ["dq", "dk", "dv", "dqkv"],
                [dq, dk, dv].map(|g| (g.dtype, g.len)),
                (dqkv.dtype, dqkv.len),
                m,
                (n_heads, n_kv_heads, head_dim),
            )?;
            expect_inv_freq(&inv_freq, head_dim)?;
            let pos = self.indices(positions)?;
            ops::rope::qkv_rope_backward(
                self.launcher(),
                dqkv.ptr,
                (dq.ptr, dk.ptr, dv.ptr),
                pos,
                inv_freq.ptr,
                m,
                n_heads,
                n_kv_heads,
                head_dim,
            )
        })
    }

    fn swiglu_backward(
        &self,
        d_gate_up: CudaViewMut<'_>,
        dout: CudaView<'_>,
        gate_up: CudaView<'_>,
        inter: usize,
    ) {
        let work = || Work::moving(d_gate_up.bytes() + dout.bytes() + gate_up.bytes());
        self.run("swiglu_backward", work, || {
            let n = dout.len;
            expect_bf16("dout", dout.dtype)?;
            expect(
                "d_gate_up",
                d_gate_up.dtype,
                d_gate_up.len,
                DType::Bf16,
                2 * n,
            )?;
            expect("gate_up", gate_up.dtype, gate_up.len, DType::Bf16, 2 * n)?;
            ops::elementwise::swiglu_backward(
                self.launcher(),
                d_gate_up.ptr,
                dout.ptr,
                gate_up.ptr,
                n,
                inter,
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
        let row = dtable.dtype.size() * dim;
        let work = || Work::moving(dout.bytes() + 2 * distinct_rows(ids) * row);
        self.run("embedding_backward", work, || {
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
        let work = || Work::moving(3 * dout.bytes());
        self.run("scatter_add_rows", work, || {
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
        let bytes = policy_loss_bytes(
            [logits.bytes(), dlogits.bytes(), logp.bytes(), stats.bytes()],
            targets.len(),
            [tokens.advantages.bytes(), tokens.weights.bytes()],
            [tokens.old_logp, tokens.ref_logp].map(|v| v.map_or(0, |v| v.bytes())),
        );
        let work = || Work::moving(bytes);
        self.run("policy_loss_backward", work, || {
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
        let work = || Work::moving(out.bytes() + 8 * rewards.len());
        self.run("group_advantages", work, || {
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
        let work = || Work::moving(out.bytes() + x.bytes());
        self.run("column_sums", work, || {
            expect("out", out.dtype, out.len, DType::F32, 2 * cols)?;
            let rows = rows_of("x", x.len, cols)?;
            expect("x", x.dtype, x.len, DType::F32, x.len)?;
            ops::optimizer::column_sums(self.launcher(), out.ptr, x.ptr, rows, cols)
        })
    }

    fn sum_squares(&self, out: CudaViewMut<'_>, x: CudaView<'_>) {
        let work = || Work::moving(x.bytes() + out.bytes());
        self.run("sum_squares", work, || {
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
        let bytes = params.bytes() + 2 * (master.bytes() + m.bytes() + v.bytes()) + grads.bytes();
        let work = || Work::moving(bytes);
        self.run("adamw_step", work, || {
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
