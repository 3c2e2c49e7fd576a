//! The CPU backend: f32 everywhere, rayon for parallelism, matrix products by our AVX-512
//! kernel or the `gemm` crate (`product.rs`).
//! Each op lives in its own file as a plain function; this file only wires them to the trait.

mod attention;
mod embedding;
#[cfg(target_arch = "x86_64")]
mod gemm_avx512;
mod logprob;
mod matmul;
#[cfg(target_arch = "x86_64")]
mod matmul_few_rows;
mod optimizer;
mod policy_loss;
mod product;
mod profile;
mod rmsnorm;
mod rope;
mod sampling;
mod swiglu;

pub use attention::{attention_backward, attention_forward, kv_cache_gather, kv_cache_write};
pub use embedding::{
    embedding_backward, embedding_forward, embedding_forward_sampled, gather_rows, residual_add,
    scatter_add_rows,
};
pub use logprob::{logprob_backward, logprob_forward};
pub use matmul::{add_bias_rows, bias_backward, matmul_backward, matmul_forward};
pub use optimizer::{adamw_step, column_sums, split_f64, sum_squares};
pub use policy_loss::{group_advantages, policy_loss_backward};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{join_qkv, rope_backward, rope_forward, split_qkv};
pub use sampling::sample_tokens;
pub use swiglu::{swiglu_backward, swiglu_forward};

use super::{
    attention_keys_read, distinct_rows, gradient_bytes, policy_loss_bytes, qkv_rope_bytes, Backend,
    GradWrite, HeadNorms, OpTime, PolicyTokens, TokenPlacement, TrainBackend, Work,
};
use crate::grpo::{AdvantageOptions, LossOptions};
use crate::sampling::{SamplingParams, TokenDraws};
use anyhow::{bail, Result};
use std::ops::Range;

/// Elements per rayon task in the elementwise ops: per-element tasks cost more than the math.
const ELEMENTS_PER_TASK: usize = 4096;

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Bytes of `values` f32 values (the profile's operand sizes).
fn f32_bytes(values: usize) -> usize {
    4 * values
}

/// The work of an op that moves `bytes` (no products), for `profile::timed`.
fn moving(bytes: usize) -> impl FnOnce() -> Work {
    move || Work::moving(bytes)
}

/// dst[:] = src, for a transfer between the host and this backend's (host) buffers.
fn copy_same_len(op: &str, dst: &mut [f32], src: &[f32]) -> Result<()> {
    if dst.len() != src.len() {
        bail!("{op}: {} values into {}", src.len(), dst.len());
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// `len` copies of `value`, or an error when the memory cannot be had (a plain `vec!` aborts
/// the process).
fn filled(len: usize, value: f32) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    if v.try_reserve_exact(len).is_err() {
        bail!(
            "cannot allocate {:.1} GiB of host memory for a buffer of {len} floats",
            len as f64 * 4.0 / (1u64 << 30) as f64
        );
    }
    v.resize(len, value);
    Ok(v)
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        filled(len, 0.0)
    }
    fn empty(&self, len: usize) -> Result<Vec<f32>> {
        filled(len, f32::NAN)
    }
    fn empty_f32(&self, len: usize) -> Result<Vec<f32>> {
        self.empty(len)
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn upload_f32_owned(&self, host: Vec<f32>) -> Result<Vec<f32>> {
        Ok(host)
    }
    fn host_values<'a>(&self, buf: &'a Vec<f32>) -> Option<&'a [f32]> {
        Some(buf)
    }
    fn download(&self, buf: &[f32]) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn download_into(&self, dst: &mut [f32], buf: &[f32]) -> Result<()> {
        copy_same_len("download_into", dst, buf)
    }
    fn upload_into(&self, dst: &mut [f32], host: &[f32]) -> Result<()> {
        copy_same_len("upload_into", dst, host)
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }

    fn start_op_profile(&self) -> bool {
        profile::start();
        true
    }
    fn take_op_profile(&self) -> Result<Vec<OpTime>> {
        Ok(profile::take())
    }

    /// Ops are plain calls here: nothing to record.
    type DecodeGraph = ();
    fn decode_graph(&self) {}

    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) {
        profile::timed(
            "embedding_forward",
            moving(f32_bytes(2 * out.len())),
            || embedding_forward(out, table, ids, dim),
        )
    }
    fn embedding_forward_sampled(
        &self,
        out: &mut [f32],
        table: &[f32],
        sampled: &[f32],
        rows: &[u32],
        dim: usize,
    ) {
        profile::timed(
            "embedding_forward_sampled",
            moving(f32_bytes(2 * out.len() + sampled.len())),
            || embedding_forward_sampled(out, table, sampled, rows, dim),
        )
    }
    fn add_rmsnorm_forward(
        &self,
        x: &mut [f32],
        residual: &[f32],
        out: &mut [f32],
        weight: &[f32],
        dim: usize,
        eps: f32,
    ) {
        let bytes = f32_bytes(2 * x.len() + residual.len() + out.len() + weight.len());
        profile::timed("add_rmsnorm_forward", moving(bytes), || {
            residual_add(x, residual);
            rmsnorm_forward(out, x, weight, dim, eps)
        })
    }
    fn rmsnorm_forward(&self, out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
        profile::timed(
            "rmsnorm_forward",
            moving(f32_bytes(out.len() + x.len() + weight.len())),
            || rmsnorm_forward(out, x, weight, dim, eps),
        )
    }
    fn matmul_forward(
        &self,
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let bytes = f32_bytes(out.len() + x.len() + w.len() + bias.map_or(0, <[f32]>::len));
        let work = move || Work::matmul_forward(m, k, n, bytes);
        profile::timed("matmul_forward", work, || {
            matmul_forward(out, x, w, bias, m, k, n)
        })
    }
    fn qkv_rope_forward(
        &self,
        [q, k, v]: [&mut [f32]; 3],
        qkv: &[f32],
        [q_bias, k_bias, v_bias]: [Option<&[f32]>; 3],
        norms: Option<HeadNorms<'_, Self>>,
        positions: &[u32],
        inv_freq: &[f32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let raw = norms
            .as_ref()
            .and_then(|n| n.raw.as_ref())
            .map(|r| r.each_ref().map(|r| f32_bytes(r.len())));
        let biases = [q_bias, k_bias, v_bias].map(|b| b.map(|b| f32_bytes(b.len())));
        let out = [f32_bytes(q.len()), f32_bytes(k.len()), f32_bytes(v.len())];
        let bytes = qkv_rope_bytes(out, raw, biases);
        profile::timed("qkv_rope_forward", moving(bytes), || {
            split_qkv([&mut *q, &mut *k, &mut *v], qkv, positions.len());
            for (x, bias) in [(&mut *q, q_bias), (&mut *k, k_bias), (&mut *v, v_bias)] {
                if let Some(bias) = bias {
                    add_bias_rows(x, bias);
                }
            }
            if let Some(HeadNorms {
                weights: [q_norm, k_norm],
                eps,
                raw,
            }) = norms
            {
                let (q_raw, k_raw) = (q.to_vec(), k.to_vec());
                rmsnorm_forward(q, &q_raw, q_norm, head_dim, eps);
                rmsnorm_forward(k, &k_raw, k_norm, head_dim, eps);
                if let Some([q_out, k_out]) = raw {
                    q_out.copy_from_slice(&q_raw);
                    k_out.copy_from_slice(&k_raw);
                }
            }
            rope_forward(q, positions, inv_freq, n_heads, head_dim);
            rope_forward(k, positions, inv_freq, n_kv_heads, head_dim);
        })
    }
    fn kv_cache_write(
        &self,
        cache_k: &mut [f32],
        cache_v: &mut [f32],
        k: &[f32],
        v: &[f32],
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        profile::timed(
            "kv_cache_write",
            moving(f32_bytes(2 * (k.len() + v.len()))),
            || {
                kv_cache_write(cache_k, k, place, capacity, kv_dim);
                kv_cache_write(cache_v, v, place, capacity, kv_dim);
            },
        )
    }
    fn kv_cache_gather(
        &self,
        dx: &mut [f32],
        dcache: &[f32],
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    ) {
        profile::timed("kv_cache_gather", moving(f32_bytes(2 * dx.len())), || {
            kv_cache_gather(dx, dcache, place, capacity, kv_dim)
        })
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
        q: &[f32],
        cache_k: &[f32],
        cache_v: &[f32],
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let moved = q.len() + out.len() + lse.as_ref().map_or(0, |l| l.len());
        let work = || {
            let keys = attention_keys_read(place) * n_kv_heads * head_dim; // K and V read
            Work::attention(place, n_heads, head_dim, false, f32_bytes(moved + 2 * keys))
        };
        profile::timed("attention_forward", work, || {
            attention_forward(
                out, lse, q, cache_k, cache_v, place, capacity, n_heads, n_kv_heads, head_dim,
            )
        })
    }
    fn swiglu_forward(&self, out: &mut [f32], gate_up: &[f32], inter: usize) {
        profile::timed(
            "swiglu_forward",
            moving(f32_bytes(out.len() + gate_up.len())),
            || swiglu_forward(out, gate_up, inter),
        )
    }
    fn residual_add(&self, x: &mut [f32], y: &[f32]) {
        profile::timed(
            "residual_add",
            moving(f32_bytes(2 * x.len() + y.len())),
            || residual_add(x, y),
        )
    }
    fn gather_rows(&self, out: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
        profile::timed("gather_rows", moving(f32_bytes(2 * out.len())), || {
            gather_rows(out, x, rows, dim)
        })
    }
    fn fill_zero(&self, out: &mut [f32]) {
        profile::timed("fill_zero", moving(f32_bytes(out.len())), || out.fill(0.0))
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        profile::timed("copy", moving(f32_bytes(2 * dst.len())), || {
            dst.copy_from_slice(src)
        })
    }

    fn logprob_forward(
        &self,
        logp: &mut [f32],
        entropy: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) {
        profile::timed(
            "logprob_forward",
            moving(f32_bytes(logits.len() + logp.len() + entropy.len())),
            || logprob_forward(logp, entropy, logits, targets, vocab, temperature),
        )
    }

    fn sample_tokens(
        &self,
        out: &mut [f32],
        logp: &mut [f32],
        logits: &[f32],
        draws: &TokenDraws,
        vocab: usize,
        params: &SamplingParams,
    ) {
        profile::timed(
            "sample_tokens",
            moving(f32_bytes(logits.len() + out.len() + logp.len())),
            || sample_tokens(out, logp, logits, draws, vocab, params),
        )
    }
}

impl TrainBackend for CpuBackend {
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dcache_k: &mut [f32],
        dcache_v: &mut [f32],
        dout: &[f32],
        out: &[f32],
        lse: &[f32],
        q: &[f32],
        cache_k: &[f32],
        cache_v: &[f32],
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let moved = dq.len() + dout.len() + out.len() + lse.len() + q.len();
        let work = || {
            // K and V read, dK and dV added into
            let keys = attention_keys_read(place) * n_kv_heads * head_dim;
            Work::attention(place, n_heads, head_dim, true, f32_bytes(moved + 6 * keys))
        };
        profile::timed("attention_backward", work, || {
            attention_backward(
                dq, dcache_k, dcache_v, dout, out, lse, q, cache_k, cache_v, place, capacity,
                n_heads, n_kv_heads, head_dim,
            )
        })
    }

    fn logprob_backward(
        &self,
        dlogits: &mut [f32],
        dlogp: &[f32],
        logits: &[f32],
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    ) {
        profile::timed(
            "logprob_backward",
            moving(f32_bytes(dlogits.len() + dlogp.len() + logits.len())),
            || logprob_backward(dlogits, dlogp, logits, targets, vocab, temperature),
        )
    }
    fn matmul_backward(
        &self,
        dx: Option<&mut [f32]>,
        dx_write: GradWrite,
        dw: &mut [f32],
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) {
        let dx_bytes = dx.as_ref().map(|dx| (f32_bytes(dx.len()), dx_write));
        let operands = [dw.len(), dout.len(), x.len(), w.len()].map(f32_bytes);
        let work = move || Work::matmul_backward(m, k, n, dx_bytes, operands);
        profile::timed("matmul_backward", work, || {
            matmul_backward(dx, dx_write, dw, dout, x, w, m, k, n)
        })
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32]) {
        profile::timed(
            "bias_backward",
            moving(f32_bytes(2 * dbias.len() + dout.len())),
            || bias_backward(dbias, dout),
        )
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        dx_write: GradWrite,
        dweight: &mut [f32],
        dout: &[f32],
        x: &[f32],
        weight: &[f32],
        dim: usize,
        eps: f32,
    ) {
        let dx_bytes = gradient_bytes(f32_bytes(dx.len()), dx_write);
        let bytes = dx_bytes + f32_bytes(2 * dweight.len() + dout.len() + x.len() + weight.len());
        profile::timed("rmsnorm_backward", moving(bytes), || {
            rmsnorm_backward(dx, dx_write, dweight, dout, x, weight, dim, eps)
        })
    }
    fn rope_backward(
        &self,
        dx: &mut [f32],
        positions: &[u32],
        inv_freq: &[f32],
        n_heads: usize,
        head_dim: usize,
    ) {
        profile::timed("rope_backward", moving(f32_bytes(2 * dx.len())), || {
            rope_backward(dx, positions, inv_freq, n_heads, head_dim)
        })
    }
    fn qkv_rope_backward(
        &self,
        dqkv: &mut [f32],
        [dq, dk, dv]: [&[f32]; 3],
        positions: &[u32],
        inv_freq: &[f32],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) {
        let bytes = f32_bytes(dqkv.len() + dq.len() + dk.len() + dv.len());
        profile::timed("qkv_rope_backward", moving(bytes), || {
            let (mut dq, mut dk) = (dq.to_vec(), dk.to_vec());
            rope_backward(&mut dq, positions, inv_freq, n_heads, head_dim);
            rope_backward(&mut dk, positions, inv_freq, n_kv_heads, head_dim);
            join_qkv(dqkv, [&dq, &dk, dv], positions.len());
        })
    }
    fn swiglu_backward(&self, d_gate_up: &mut [f32], dout: &[f32], gate_up: &[f32], inter: usize) {
        let bytes = f32_bytes(d_gate_up.len() + dout.len() + gate_up.len());
        profile::timed("swiglu_backward", moving(bytes), || {
            swiglu_backward(d_gate_up, dout, gate_up, inter)
        })
    }
    fn embedding_backward(&self, dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) {
        // dout read, each row of the table it names added into
        let work = || Work::moving(f32_bytes(dout.len() + 2 * distinct_rows(ids) * dim));
        profile::timed("embedding_backward", work, || {
            embedding_backward(dtable, dout, ids, dim)
        })
    }
    fn scatter_add_rows(&self, dx: &mut [f32], dout: &[f32], rows: &[usize], dim: usize) {
        profile::timed(
            "scatter_add_rows",
            moving(f32_bytes(3 * dout.len())),
            || scatter_add_rows(dx, dout, rows, dim),
        )
    }
    fn policy_loss_backward(
        &self,
        dlogits: &mut [f32],
        logp: &mut [f32],
        stats: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        tokens: &PolicyTokens<'_, Self>,
        vocab: usize,
        temperature: f32,
        loss: &LossOptions,
    ) {
        let bytes = policy_loss_bytes(
            [logits.len(), dlogits.len(), logp.len(), stats.len()].map(f32_bytes),
            targets.len(),
            [tokens.advantages, tokens.weights].map(|v| f32_bytes(v.len())),
            [tokens.old_logp, tokens.ref_logp].map(|v| v.map_or(0, |v| f32_bytes(v.len()))),
        );
        profile::timed("policy_loss_backward", moving(bytes), || {
            policy_loss_backward(
                dlogits,
                logp,
                stats,
                logits,
                targets,
                tokens,
                vocab,
                temperature,
                loss,
            )
        })
    }
    fn group_advantages(
        &self,
        out: &mut [f32],
        rewards: &[f64],
        group_size: usize,
        opts: &AdvantageOptions,
    ) {
        profile::timed(
            "group_advantages",
            moving(f32_bytes(out.len()) + 8 * rewards.len()),
            || group_advantages(out, rewards, group_size, opts),
        )
    }
    fn column_sums(&self, out: &mut [f32], x: &[f32], cols: usize) {
        profile::timed(
            "column_sums",
            moving(f32_bytes(out.len() + x.len())),
            || column_sums(out, x, cols),
        )
    }
    fn sum_squares(&self, out: &mut [f32], x: &[f32]) {
        profile::timed(
            "sum_squares",
            moving(f32_bytes(x.len() + out.len())),
            || sum_squares(out, x),
        )
    }
    fn adamw_step(
        &self,
        params: &mut [f32],
        master: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        grads: &[f32],
        step: &crate::optim::AdamWStep,
    ) {
        let bytes = f32_bytes(params.len() + 2 * (master.len() + m.len() + v.len()) + grads.len());
        profile::timed("adamw_step", moving(bytes), || {
            adamw_step(params, master, m, v, grads, step)
        })
    }
}
