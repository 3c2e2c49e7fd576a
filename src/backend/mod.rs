//! The backend interface: every op the transformer needs, with one implementation per device.
//!
//! The model and (later) the GRPO step are written once against this trait. The CPU backend is
//! the readable specification; a CUDA backend implements the same ops with the same semantics.
//! Buffers are flat arrays of floats; shapes are given by the caller and written next to each
//! argument as `[rows, cols]` (row-major).

pub mod cpu;
mod op_profile;
mod out_of_memory;

pub use op_profile::{
    attention_keys_read, distinct_rows, gradient_bytes, policy_loss_bytes, qkv_rope_bytes,
    summarize_ops, OpSample, OpTime, Work,
};
pub use out_of_memory::{out_of_device_memory, OutOfDeviceMemory};

use crate::grpo::{AdvantageOptions, LossOptions};
use crate::sampling::{SamplingParams, TokenDraws};
use anyhow::Result;
use std::ops::Range;

/// Which device runs a command (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU is present, else CPU.
    Auto,
}

/// Where each token of a batch lives in the KV cache: sequence slot and position.
///
/// A batch is ragged: tokens of several sequences are concatenated (no padding), each carrying
/// its slot and position, so prefill and decode are the same forward call.
#[derive(Debug, Clone, Default)]
pub struct TokenPlacement {
    pub slots: Vec<u32>,     // [M]
    pub positions: Vec<u32>, // [M]
}

impl TokenPlacement {
    /// `batch` sequences in slots 0..batch, each with `len` tokens at positions start..start + len,
    /// concatenated sequence by sequence.
    pub fn contiguous(batch: usize, start: usize, len: usize) -> Self {
        let mut place = TokenPlacement::default();
        for s in 0..batch {
            place.slots.extend(std::iter::repeat_n(s as u32, len));
            place.positions.extend(start as u32..(start + len) as u32);
        }
        place
    }
}

/// How a backward op writes an activation gradient: added to what the buffer holds (several
/// paths meet there), or in place of it (the buffer's old contents are never read, so it needs no
/// clearing first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradWrite {
    Add,
    Overwrite,
}

/// The columns of `policy_loss_backward`'s per-row statistics, [R, POLICY_STATS] f32. Rows of
/// completions left out of the loss (truncated = "mask", filtered groups) hold 0 in every column,
/// so every statistic is a mean over the same tokens as the loss (METHOD.md §2).
pub mod policy_stat {
    /// Entropy of softmax(logits / τ).
    pub const ENTROPY: usize = 0;
    /// w·L_t: the row's share of the loss.
    pub const LOSS: usize = 1;
    /// k3 KL to the reference (0 without reference log-probs).
    pub const KL: usize = 2;
    /// ρ = exp(logπθ − logπold).
    pub const RATIO: usize = 3;
    /// 1 where min() took the clipped branch at the lower bound, else 0.
    pub const CLIP_LOW: usize = 4;
    /// 1 where min() took the clipped branch at the upper bound, else 0.
    pub const CLIP_HIGH: usize = 5;
}
/// Columns of `policy_loss_backward`'s statistics.
pub const POLICY_STATS: usize = 6;

/// Per-head RMSNorms of q and k before their rotation (Qwen3's q_norm and k_norm), for
/// `qkv_rope_forward`.
pub struct HeadNorms<'a, B: Backend + ?Sized + 'a> {
    /// The norms' weights: [head_dim] each.
    pub weights: [B::View<'a>; 2],
    pub eps: f32,
    /// When given, receive q and k before their norms, biases included (the backward pass
    /// reads them): [M, n_heads * head_dim] and [M, n_kv_heads * head_dim].
    pub raw: Option<[B::ViewMut<'a>; 2]>,
}

/// What `policy_loss_backward` needs about its rows besides their logits and targets.
pub struct PolicyTokens<'a, B: Backend + ?Sized + 'a> {
    /// The completion each row belongs to (an index into `advantages` and `weights`): [R].
    pub seqs: &'a [u32],
    /// Each completion's advantage: [N] f32.
    pub advantages: B::View<'a>,
    /// Each completion's aggregation weight per token, 0 when it is left out: [N] f32.
    pub weights: B::View<'a>,
    /// logπold per row, [R] f32; None: logπold = logπθ (ρ = 1, the first epoch when recomputed).
    pub old_logp: Option<B::View<'a>>,
    /// logπref per row, [R] f32; None: no KL term and a KL statistic of 0.
    pub ref_logp: Option<B::View<'a>>,
}

/// The most device memory in use at once, and the most its pool held (in use, or freed and kept
/// for reuse), in bytes: their gap is what the pool's fragmentation costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPeaks {
    pub used: usize,
    pub reserved: usize,
}

/// Counts of `Backend::decode_step` calls by how they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeGraphStats {
    /// Steps run op by op.
    pub eager: u64,
    /// Steps recorded (and run by launching the new recording).
    pub captured: u64,
    /// Steps run by replaying a recording.
    pub replayed: u64,
    /// Why recording was given up, the last time it was (then the steps ran op by op).
    pub fallback: Option<String>,
}

/// The sizes every attention op needs, on either backend: all positive, and the query heads
/// split evenly over the KV heads (`op` names the op in the error).
pub fn check_attention_heads(
    op: &str,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    anyhow::ensure!(
        capacity > 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0,
        "{op}: capacity ({capacity}), n_heads ({n_heads}), n_kv_heads ({n_kv_heads}) and \
         head_dim ({head_dim}) must be positive"
    );
    anyhow::ensure!(
        n_heads.is_multiple_of(n_kv_heads),
        "{op}: n_heads ({n_heads}) is not a multiple of n_kv_heads ({n_kv_heads})"
    );
    Ok(())
}

pub trait Backend: Send + Sync {
    type Buf: Send + Sync;
    type View<'a>: Copy
    where
        Self: 'a;
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str;

    /// A zero-filled buffer of `len` floats.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: Self::View<'_>) -> Result<Vec<f32>>;
    /// dst[:] = the values of `buf`, into host memory the caller keeps (backends that can copy
    /// straight into it allocate nothing); after the ops before it.
    fn download_into(&self, dst: &mut [f32], buf: Self::View<'_>) -> Result<()> {
        let values = self.download(buf)?;
        anyhow::ensure!(
            values.len() == dst.len(),
            "download_into: a view of {} values into {}",
            values.len(),
            dst.len()
        );
        dst.copy_from_slice(&values);
        Ok(())
    }
    /// dst[:] = host, in dst's storage type (CUDA: bf16, rounded to nearest even, or f32), in
    /// order with the ops before it.
    fn upload_into(&self, dst: Self::ViewMut<'_>, host: &[f32]) -> Result<()>;

    /// A zero-filled buffer that stays f32 on every backend (log-probs, statistics, logits that
    /// feed a softmax). Backends that store activations in a narrower type (CUDA: bf16) keep
    /// these in f32; on the CPU every buffer is f32 already.
    fn zeros_f32(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// `upload`, kept in f32 on every backend (see `zeros_f32`): e.g. the RoPE frequencies.
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buf> {
        self.upload(host)
    }
    /// `upload_f32` of a vector the caller gives up. The CPU backend keeps the vector itself as
    /// the buffer, so the values are never in memory twice (the optimizer's master weights and
    /// moments: 12 bytes per parameter); other backends copy it and free it.
    fn upload_f32_owned(&self, host: Vec<f32>) -> Result<Self::Buf> {
        self.upload_f32(&host)
    }
    /// The buffer's values where they are f32 in host memory already (the CPU backend), to be
    /// read in place instead of through `download`'s copy; None elsewhere.
    fn host_values<'a>(&self, _buf: &'a Self::Buf) -> Option<&'a [f32]> {
        None
    }

    /// A buffer of `len` values for ops that overwrite it whole before anything reads it: its
    /// contents are unspecified until written. CUDA leaves the memory as it was (no clearing
    /// pass); the CPU fills it with NaN, so a value read before it is written shows.
    fn empty(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// `empty`, kept in f32 on every backend (see `zeros_f32`).
    fn empty_f32(&self, len: usize) -> Result<Self::Buf> {
        self.zeros_f32(len)
    }

    /// Bytes per value of the buffers made by `zeros` and `upload` (CUDA: bf16).
    fn storage_bytes(&self) -> usize {
        4
    }
    /// Free memory on the device, when the backend can tell (CUDA; the CPU reports none).
    fn free_memory(&self) -> Result<Option<usize>> {
        Ok(None)
    }
    /// The device memory's peaks since the device was opened, when the backend can tell (CUDA:
    /// its pool's high-water marks; the CPU reports none).
    fn memory_peaks(&self) -> Result<Option<MemoryPeaks>> {
        Ok(None)
    }

    /// Starts timing every op (`bench step --profile`): CUDA by events around each op's
    /// launches, the CPU by each call's wall time. False where the backend cannot.
    fn start_op_profile(&self) -> bool {
        false
    }
    /// Waits for the profiled ops, stops timing and returns their time by op.
    fn take_op_profile(&self) -> Result<Vec<OpTime>> {
        Ok(Vec::new())
    }

    /// Waits until every queued op has finished and reports the first error any of them hit.
    /// Ops do not return errors (the CPU ones cannot fail); a device backend records its first
    /// failure and returns it here and from `download`.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// After work failed with [`OutOfDeviceMemory`] and its buffers were dropped: waits for the
    /// queued work, forgets the failure (a device backend skips every op after its first failed
    /// one until then) and gives back the memory the device keeps cached for reuse, so that
    /// smaller work can run. Fails with the kept error when an op failed for another reason.
    fn recover_from_out_of_memory(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>;

    fn full<'a>(&self, buf: &'a Self::Buf) -> Self::View<'a> {
        self.view(buf, 0..self.len(buf))
    }
    fn full_mut<'a>(&self, buf: &'a mut Self::Buf) -> Self::ViewMut<'a> {
        let n = self.len(buf);
        self.view_mut(buf, 0..n)
    }

    /// out[m, :] = table[ids[m], :]. Ids are checked against the table by the caller.
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        table: Self::View<'_>,
        ids: &[u32],
        dim: usize,
    );

    /// Decode steps between host syncs in `generate`: 1 where the host computes anyway (CPU);
    /// more where each sync idles the device.
    fn decode_sync_every(&self) -> usize {
        1
    }

    /// What one decode loop has recorded of its steps (`decode_step`): nothing on the CPU, a CUDA
    /// graph on CUDA. Dropped before the buffers its steps use (declare it after them).
    type DecodeGraph;
    fn decode_graph(&self) -> Self::DecodeGraph;

    /// Runs `step`, one decode step's forward over the batch `place`, which the caller has
    /// checked. A backend that records (CUDA graphs) may record the step and, while later steps
    /// have the same slots with every position one further on, replay the recording instead of
    /// calling `step`; so `step` must read and write only buffers that outlive `graph` (or that
    /// it allocates and frees itself), at the same addresses every time, and every other input
    /// (the index arrays it passes to ops included) must be the same whenever the slots are.
    fn decode_step(
        &self,
        _graph: &mut Self::DecodeGraph,
        _place: &TokenPlacement,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        step()
    }

    /// Whether `decode_step` records steps (and so gains from batches that keep their rows).
    fn records_decode_steps(&self) -> bool {
        false
    }
    /// Turns the recording of decode steps on or off (on by default where it exists); returns
    /// the previous setting.
    fn set_decode_graphs(&self, _on: bool) -> bool {
        false
    }
    /// How the decode steps ran since the backend was made; None where nothing is recorded.
    fn decode_graph_stats(&self) -> Option<DecodeGraphStats> {
        None
    }

    /// out[m, :] = table[sampled[rows[m]], :]: the embedding of ids that `sample_tokens` left on
    /// the device (f32 ids), so a decode step needs no trip through the host. sampled: [R] f32;
    /// rows: [M] indices into it; out: [M, dim]. An id outside the table gives a row of NaN;
    /// callers check the ids when they download them.
    fn embedding_forward_sampled(
        &self,
        out: Self::ViewMut<'_>,
        table: Self::View<'_>,
        sampled: Self::View<'_>,
        rows: &[u32],
        dim: usize,
    );

    /// x += residual, then out = rmsnorm_forward(x): a block's residual add and the next norm in
    /// one op. x, residual, out: [M, dim]; weight: [dim].
    fn add_rmsnorm_forward(
        &self,
        x: Self::ViewMut<'_>,
        residual: Self::View<'_>,
        out: Self::ViewMut<'_>,
        weight: Self::View<'_>,
        dim: usize,
        eps: f32,
    );

    /// out[m, :] = x[m, :] / sqrt(mean(x[m, :]²) + eps) * weight.  x, out: [M, dim]; weight: [dim].
    fn rmsnorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        x: Self::View<'_>,
        weight: Self::View<'_>,
        dim: usize,
        eps: f32,
    );

    /// out = x · wᵀ + bias.  x: [M, K]; w: [N, K] (the HF/PyTorch `Linear` layout); bias: [N]; out: [M, N].
    fn matmul_forward(
        &self,
        out: Self::ViewMut<'_>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        m: usize,
        k: usize,
        n: usize,
    );

    /// The attention inputs from their projections' one product qkv: [M, q_dim + 2 kv_dim]
    /// (each row q, then k, then v) into out = [q, k, v]: q = rope(q' + q_bias), k = rope(k' +
    /// k_bias), v = v' + v_bias for qkv's parts q', k', v', each bias added to every row when
    /// given (HF `rotate_half` convention: pairs (i, i + head_dim/2)). With `norms` (Qwen3),
    /// q = rope(rmsnorm(q' + q_bias) · q_norm), each head normalised on its own, k likewise.
    /// One op so a device launches once. q: [M, n_heads * head_dim]; k, v: [M, n_kv_heads *
    /// head_dim]; biases: [heads * head_dim]; positions: [M]; inv_freq: [head_dim / 2].
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_forward(
        &self,
        out: [Self::ViewMut<'_>; 3],
        qkv: Self::View<'_>,
        biases: [Option<Self::View<'_>>; 3],
        norms: Option<HeadNorms<'_, Self>>,
        positions: &[u32],
        inv_freq: Self::View<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    );

    /// Writes this batch's keys and values into one layer's cache.
    /// k, v: [M, kv_dim]; cache_k, cache_v: [slots, capacity, kv_dim].
    fn kv_cache_write(
        &self,
        cache_k: Self::ViewMut<'_>,
        cache_v: Self::ViewMut<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    );

    /// dx[m] = dcache[slot[m], pos[m]]: the rows of one cache at a placement. The gradient of
    /// `kv_cache_write`; `generate` also copies a shared prompt's keys and values with it.
    /// dx: [M, kv_dim]; dcache: [slots, capacity, kv_dim].
    fn kv_cache_gather(
        &self,
        dx: Self::ViewMut<'_>,
        dcache: Self::View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        kv_dim: usize,
    );

    /// Causal grouped-query attention over the cache: token m attends to positions 0..=pos[m] of
    /// its slot. q, out: [M, n_heads * head_dim]; cache_k, cache_v: [slots, capacity, n_kv_heads * head_dim].
    /// When `lse` is given (an f32 buffer, [M, n_heads]) it receives each row's log Σ_j exp(s_j)
    /// of the scaled scores s_j = q·k_j / sqrt(head_dim): what `attention_backward` needs.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Option<Self::ViewMut<'_>>,
        q: Self::View<'_>,
        cache_k: Self::View<'_>,
        cache_v: Self::View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    );

    /// out = silu(gate) * up, elementwise, from the gate and up projections' one product: each
    /// row of gate_up: [M, 2 I] holds gate's row, then up's. out: [M, I].
    fn swiglu_forward(&self, out: Self::ViewMut<'_>, gate_up: Self::View<'_>, inter: usize);

    /// x += y, elementwise (the residual stream).
    fn residual_add(&self, x: Self::ViewMut<'_>, y: Self::View<'_>);

    /// out[r, :] = x[rows[r], :].  x: [M, dim]; out: [rows.len(), dim].
    fn gather_rows(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, rows: &[usize], dim: usize);

    /// out[:] = 0.
    fn fill_zero(&self, out: Self::ViewMut<'_>);

    /// dst[:] = src[:].
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);

    /// logp[r] = log softmax(logits[r] / τ)[targets[r]]; entropy[r] of the same softmax.
    /// logits: [R, V]; targets, logp, entropy: [R].
    #[allow(clippy::too_many_arguments)]
    fn logprob_forward(
        &self,
        logp: Self::ViewMut<'_>,
        entropy: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    );

    /// Draws one token per row: out[r] = `sampling::sample(logits[r], params, draws.uniform(r))`
    /// (argmax when the temperature is 0), as a float id, and logp[r] = its log-probability
    /// `sampling::token_logprob(logits[r], out[r], temperature)` over the whole vocabulary (0 when
    /// greedy). A row that is not `sampling::drawable` (a NaN, a +∞, or no finite logit) draws
    /// nothing: out[r] = logp[r] = NaN, which the generation loop reports as an error.
    /// logits: [R, V] f32; out, logp: [R] f32; R = draws.rows().
    fn sample_tokens(
        &self,
        out: Self::ViewMut<'_>,
        logp: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        draws: &TokenDraws,
        vocab: usize,
        params: &SamplingParams,
    );
}

/// The backward of every op, for training. Gradients named `d<param>` accumulate (+=) so tied and
/// shared weights just work; the others overwrite unless their doc says otherwise.
pub trait TrainBackend: Backend {
    /// dlogits[r] = dlogp[r] · (onehot(targets[r]) − softmax(logits[r] / τ)) / τ.
    #[allow(clippy::too_many_arguments)]
    fn logprob_backward(
        &self,
        dlogits: Self::ViewMut<'_>,
        dlogp: Self::View<'_>,
        logits: Self::View<'_>,
        targets: &[u32],
        vocab: usize,
        temperature: f32,
    );

    /// The GRPO policy loss fused with `logprob_backward`: for each row, logp[r] = log
    /// softmax(logits[r] / τ)[targets[r]] (as `logprob_forward`), the token's loss
    /// `grpo::token_loss(logp, old, ref, A)` of its completion, and dlogits[r] = w·∂L_t/∂logp ·
    /// (onehot(targets[r]) − softmax(logits[r] / τ)) / τ, overwritten (0 for rows left out). The
    /// per-token arithmetic is f64. stats: [R, POLICY_STATS] (see `policy_stat`); logits,
    /// dlogits: [R, V]; logp: [R] f32; targets: [R].
    #[allow(clippy::too_many_arguments)]
    fn policy_loss_backward(
        &self,
        dlogits: Self::ViewMut<'_>,
        logp: Self::ViewMut<'_>,
        stats: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &[u32],
        tokens: &PolicyTokens<'_, Self>,
        vocab: usize,
        temperature: f32,
        loss: &LossOptions,
    );

    /// out[i] = `grpo::advantages(rewards, group_size, opts)[i]` (f64 arithmetic, written as
    /// f32). rewards: [N] host values (the verifier's); out: [N] f32. The caller checks that
    /// group_size divides N.
    fn group_advantages(
        &self,
        out: Self::ViewMut<'_>,
        rewards: &[f64],
        group_size: usize,
        opts: &AdvantageOptions,
    );

    /// The sum of each column of x in f64, in an order fixed by x's shape, written as
    /// out[2j] = hi, out[2j + 1] = lo (f32, hi + lo = the f64 sum to ~48 bits).
    /// x: [R, cols] f32; out: [cols, 2] f32.
    fn column_sums(&self, out: Self::ViewMut<'_>, x: Self::View<'_>, cols: usize);

    /// dx += dout · w, or dx = dout · w with `GradWrite::Overwrite` (when dx is given);
    /// dw += doutᵀ · x.  dout: [M, N]; x, dx: [M, K]; w, dw: [N, K].
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dx: Option<Self::ViewMut<'_>>,
        dx_write: GradWrite,
        dw: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        m: usize,
        k: usize,
        n: usize,
    );

    /// dbias += Σ_rows dout.  dout: [M, N]; dbias: [N].
    fn bias_backward(&self, dbias: Self::ViewMut<'_>, dout: Self::View<'_>);

    /// dx = RMSNorm backward (`GradWrite::Overwrite`), or dx += it (`Add`: straight into the
    /// residual stream's gradient); dweight += Σ_rows dout ⊙ x / rms.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: Self::ViewMut<'_>,
        dx_write: GradWrite,
        dweight: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        x: Self::View<'_>,
        weight: Self::View<'_>,
        dim: usize,
        eps: f32,
    );

    /// Rotates the gradient back by the negative angle, in place.
    fn rope_backward(
        &self,
        dx: Self::ViewMut<'_>,
        positions: &[u32],
        inv_freq: Self::View<'_>,
        n_heads: usize,
        head_dim: usize,
    );

    /// The gradient of `qkv_rope_forward` without head norms, at its product: each row of
    /// dqkv: [M, q_dim + 2 kv_dim] is dq's row and dk's rotated back by the negative angle and
    /// dv's, side by side. dq: [M, n_heads * head_dim]; dk, dv: [M, n_kv_heads * head_dim].
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_backward(
        &self,
        dqkv: Self::ViewMut<'_>,
        grads: [Self::View<'_>; 3],
        positions: &[u32],
        inv_freq: Self::View<'_>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    );

    /// The gradient of `attention_forward` from its saved outputs: dq overwritten; dcache_k,
    /// dcache_v accumulate. dout, out (the forward's output), dq: [M, n_heads * head_dim];
    /// lse (the forward's, f32): [M, n_heads]; the rest as in `attention_forward`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: Self::ViewMut<'_>,
        dcache_k: Self::ViewMut<'_>,
        dcache_v: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        out: Self::View<'_>,
        lse: Self::View<'_>,
        q: Self::View<'_>,
        cache_k: Self::View<'_>,
        cache_v: Self::View<'_>,
        place: &TokenPlacement,
        capacity: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    );

    /// The kernels `attention_backward` can run with, where there is a choice (CUDA: "split",
    /// "fused", "fused-wide"), the one selfcheck runs with the other ops first; selfcheck checks
    /// each. Empty: one way only.
    fn attention_backward_variants(&self) -> &'static [&'static str] {
        &[]
    }
    /// Makes `attention_backward` run the named variant (one of `attention_backward_variants`);
    /// returns the previous one.
    fn set_attention_backward_variant(&self, name: &str) -> Result<&'static str> {
        anyhow::bail!("this backend has no attention backward variant {name:?}")
    }

    /// The gradient of `swiglu_forward` at its product: d_gate_up (overwritten) and gate_up:
    /// [M, 2 I], each row gate's then up's; dout: [M, I].
    fn swiglu_backward(
        &self,
        d_gate_up: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        gate_up: Self::View<'_>,
        inter: usize,
    );

    /// dtable[ids[m]] += dout[m].  dtable: [V, dim]; dout: [M, dim].
    fn embedding_backward(
        &self,
        dtable: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        ids: &[u32],
        dim: usize,
    );

    /// dx[rows[r]] += dout[r] (the gradient of `gather_rows`).
    fn scatter_add_rows(
        &self,
        dx: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        rows: &[usize],
        dim: usize,
    );

    /// Σ x² over the f32 buffer x, accumulated in f64 in an order fixed by x's length (the same
    /// value run to run), written as out = [hi, lo] (f32, hi + lo = the f64 sum to ~48 bits).
    fn sum_squares(&self, out: Self::ViewMut<'_>, x: Self::View<'_>);

    /// One AdamW update (`AdamWStep::update`) of the f32 master weights from the f32 gradients
    /// times `step.grad_scale`, then params = master in the params' storage type (bf16 on CUDA).
    /// params, master, m, v, grads: [N].
    fn adamw_step(
        &self,
        params: Self::ViewMut<'_>,
        master: Self::ViewMut<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        step: &crate::optim::AdamWStep,
    );
}
