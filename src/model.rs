//! The decoder-only transformer (Qwen2 / Llama) written once against the `Backend` trait.
//!
//! Per layer: x += o_proj(attn(rope(q), rope(k), v)) over RMSNorm(x); x += down(silu(gate) · up)
//! over RMSNorm(x). Then a final RMSNorm and the LM head on the rows whose logits are wanted.

use crate::backend::{Backend, HeadNorms, TokenPlacement};
use crate::config::ModelConfig;
use crate::params::ParamLayout;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::ops::Range;
use std::path::Path;

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub backend: B,
    /// Every parameter, in `layout`'s storage order: [num_params].
    pub params: B::Buf,
    pub(crate) inv_freq: B::Buf, // [head_dim / 2]
    /// The training pass computes the head's f32 logits (and recomputes them in the backward)
    /// for as many scored rows at a time as fit in this many bytes, so the head's memory does
    /// not grow with the batch (default [`HEAD_CHUNK_BYTES`]).
    pub head_chunk_bytes: usize,
    /// Activation checkpointing: the training pass keeps only each layer's input and the
    /// backward pass runs the layer's forward again, up to its MLP's activation, before its
    /// backward (`layer_recompute`: the layers' forward less their down projections once more,
    /// for one layer's activations at a time instead of all of them).
    pub checkpoint_layers: bool,
}

/// Default [`Model::head_chunk_bytes`]: 1 GiB of logits (1766 rows of Qwen2.5's 151936 tokens).
pub const HEAD_CHUNK_BYTES: usize = 1 << 30;

/// Keys and values of every layer for a set of sequence slots.
pub struct KvCache<B: Backend> {
    pub k: B::Buf, // [layers, slots, capacity, kv_dim]
    pub v: B::Buf, // [layers, slots, capacity, kv_dim]
    pub slots: usize,
    pub capacity: usize,
    kv_dim: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache of `slots` sequences of up to `capacity` positions each, which must be within
    /// the model's max_position_embeddings.
    pub fn new(backend: &B, cfg: &ModelConfig, slots: usize, capacity: usize) -> Result<Self> {
        if capacity > cfg.max_position_embeddings {
            bail!(
                "sequences of up to {capacity} tokens (prompt + new tokens) exceed the model's \
                 max_position_embeddings of {}",
                cfg.max_position_embeddings
            );
        }
        let len = [slots, capacity, cfg.kv_dim()]
            .iter()
            .try_fold(cfg.num_layers, |n, &x| n.checked_mul(x))
            .with_context(|| {
                format!("a KV cache of {slots} sequences × {capacity} positions is too large")
            })?;
        Ok(KvCache {
            k: backend.zeros(len)?,
            v: backend.zeros(len)?,
            slots,
            capacity,
            kv_dim: cfg.kv_dim(),
        })
    }

    pub(crate) fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        let per_layer = self.slots * self.capacity * self.kv_dim;
        layer * per_layer..(layer + 1) * per_layer
    }

    /// Copies the keys and values of positions 0..len of slot `from` into slot `to`, in every
    /// layer, for each (from, to, len) of `copies`: a prompt computed once for several slots.
    pub fn copy_prefixes(&mut self, b: &B, copies: &[(usize, usize, usize)]) -> Result<()> {
        let (mut from, mut to) = (TokenPlacement::default(), TokenPlacement::default());
        for &(src, dst, len) in copies {
            if src >= self.slots || dst >= self.slots || len > self.capacity {
                bail!(
                    "copying {len} positions from slot {src} to slot {dst}: outside the KV cache \
                     ({} slots × {} positions)",
                    self.slots,
                    self.capacity
                );
            }
            from.slots.extend(std::iter::repeat_n(src as u32, len));
            to.slots.extend(std::iter::repeat_n(dst as u32, len));
            from.positions.extend(0..len as u32);
            to.positions.extend(0..len as u32);
        }
        let rows = from.slots.len();
        if rows == 0 {
            return Ok(());
        }
        let (cap, kv) = (self.capacity, self.kv_dim);
        let (mut k, mut v) = (b.empty(rows * kv)?, b.empty(rows * kv)?); // [rows, kv_dim]
        let layers = b.len(&self.k) / self.layer_range(0).len();
        for l in 0..layers {
            let range = self.layer_range(l);
            for (out, cache) in [(&mut k, &self.k), (&mut v, &self.v)] {
                b.kv_cache_gather(
                    b.full_mut(out),
                    b.view(cache, range.clone()),
                    &from,
                    cap,
                    kv,
                );
            }
            b.kv_cache_write(
                b.view_mut(&mut self.k, range.clone()),
                b.view_mut(&mut self.v, range),
                b.full(&k),
                b.full(&v),
                &to,
                cap,
                kv,
            );
        }
        Ok(())
    }
}

impl<B: Backend> Model<B> {
    /// Loads a Hugging Face model folder (config.json + safetensors).
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let cfg = ModelConfig::from_model_dir(dir)?;
        let layout = ParamLayout::new(&cfg);
        let host = crate::weights::load_params(dir, &cfg, &layout)?;
        Self::from_host_params(cfg, layout, &host, backend)
    }

    /// A model with random weights (normal, std 0.02; norms at 1), for benchmarks and checks
    /// that need no checkpoint.
    ///
    /// The weights are the draws of one sequential `Philox::new(seed, 0)` stream, in layout order
    /// (norms draw nothing). Draw n depends only on n (Box–Muller on uniforms 2⌊n/2⌋ and
    /// 2⌊n/2⌋ + 1, cosine for even n, sine for odd), so the tensors are filled in parallel with
    /// the same values the sequential stream gives: a 1.5B model takes seconds, not minutes.
    pub fn random(cfg: ModelConfig, seed: u64, backend: B) -> Result<Self> {
        let layout = ParamLayout::new(&cfg);
        let mut host = vec![0.0f32; layout.total_len()];
        let mut first_draw = 0u64; // index of the tensor's first draw in the stream
        for spec in &layout.specs {
            let dst = &mut host[spec.range()];
            if spec.name.ends_with("norm.weight") {
                dst.fill(1.0);
                continue;
            }
            dst.par_chunks_mut(1 << 16)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let start = first_draw + (c << 16) as u64;
                    for (i, v) in chunk.iter_mut().enumerate() {
                        *v = 0.02 * normal_draw(seed, start + i as u64);
                    }
                });
            first_draw += dst.len() as u64;
        }
        Self::from_host_params(cfg, layout, &host, backend)
    }

    /// A model with the given parameters: host: [num_params] in `ParamLayout`'s storage order
    /// (each tensor at its spec's range).
    pub fn from_host(cfg: ModelConfig, host: &[f32], backend: B) -> Result<Self> {
        let layout = ParamLayout::new(&cfg);
        if host.len() != layout.total_len() {
            bail!(
                "{} parameter values given, but the config needs {}",
                host.len(),
                layout.total_len()
            );
        }
        Self::from_host_params(cfg, layout, host, backend)
    }

    fn from_host_params(
        cfg: ModelConfig,
        layout: ParamLayout,
        host: &[f32],
        backend: B,
    ) -> Result<Self> {
        let params = backend.upload(host)?;
        let inv_freq = backend.upload_f32(&cfg.rope_inv_freq())?;
        Ok(Model {
            cfg,
            layout,
            backend,
            params,
            inv_freq,
            head_chunk_bytes: HEAD_CHUNK_BYTES,
            checkpoint_layers: false,
        })
    }

    pub(crate) fn p(&self, idx: usize) -> B::View<'_> {
        self.backend.view(&self.params, self.layout.range(idx))
    }

    pub(crate) fn p_opt(&self, idx: Option<usize>) -> Option<B::View<'_>> {
        idx.map(|i| self.p(i))
    }

    /// Runs the batch `tokens` (placed by `place`) through the model, writing its keys and values
    /// into `cache`, and returns the logits of the token rows listed in `logit_rows`:
    /// [logit_rows.len(), vocab].
    pub fn forward(
        &self,
        tokens: &[u32],
        place: &TokenPlacement,
        cache: &mut KvCache<B>,
        logit_rows: &[usize],
    ) -> Result<B::Buf> {
        self.check_batch(tokens, place, cache, logit_rows)?;
        let b = &self.backend;
        self.forward_embedded(place, cache, logit_rows, |x| {
            b.embedding_forward(x, self.p(self.layout.embed), tokens, self.cfg.hidden_size)
        })
    }

    /// One decode step of `generate`: the tokens that `sample_tokens` left on the device (token m
    /// is the id sampled[rows[m]], f32 ids; an id outside the vocabulary makes NaN logits) through
    /// the model, every token's logits into the first rows of `logits` ([≥ M, V] f32). Runs
    /// through `Backend::decode_step`, which may record it and replay the recording at the next
    /// steps: `sampled`, `logits` and `cache` must outlive `graph` and stay where they are.
    pub fn decode_step(
        &self,
        graph: &mut B::DecodeGraph,
        logits: &mut B::Buf,
        sampled: B::View<'_>,
        rows: &[u32],
        place: &TokenPlacement,
        cache: &mut KvCache<B>,
    ) -> Result<()> {
        let m = rows.len();
        let logit_rows: Vec<usize> = (0..m).collect();
        self.check_placement(m, place, cache, &logit_rows)?;
        let b = &self.backend;
        let v = self.cfg.vocab_size;
        if b.len(logits) < m * v {
            bail!(
                "decode step: the logits buffer holds {} values, {m} rows of {v} need {}",
                b.len(logits),
                m * v
            );
        }
        b.decode_step(graph, place, &mut || {
            let out = b.view_mut(logits, 0..m * v);
            self.forward_embedded_into(out, place, cache, &logit_rows, |x| {
                b.embedding_forward_sampled(
                    x,
                    self.p(self.layout.embed),
                    sampled,
                    rows,
                    self.cfg.hidden_size,
                )
            })
        })
    }

    /// The layers and the head after `embed` has written the batch's embeddings into x: [M, H];
    /// returns the logits of `logit_rows`: [logit_rows.len(), V] f32.
    fn forward_embedded(
        &self,
        place: &TokenPlacement,
        cache: &mut KvCache<B>,
        logit_rows: &[usize],
        embed: impl FnOnce(B::ViewMut<'_>),
    ) -> Result<B::Buf> {
        let b = &self.backend;
        let mut logits = b.empty_f32(logit_rows.len() * self.cfg.vocab_size)?;
        self.forward_embedded_into(b.full_mut(&mut logits), place, cache, logit_rows, embed)?;
        Ok(logits)
    }

    /// `forward_embedded` into logits: [logit_rows.len(), V] f32.
    fn forward_embedded_into(
        &self,
        logits: B::ViewMut<'_>,
        place: &TokenPlacement,
        cache: &mut KvCache<B>,
        logit_rows: &[usize],
        embed: impl FnOnce(B::ViewMut<'_>),
    ) -> Result<()> {
        let cfg = &self.cfg;
        let b = &self.backend;
        let m = place.slots.len();
        let mut x = b.empty(m * cfg.hidden_size)?; // [M, H] residual stream, embedded next
        let mut acts = LayerActs::new(b, cfg, m, Keep::Nothing)?; // reused by every layer
        let mut qkv = self.qkv_scratch(m)?;
        embed(b.full_mut(&mut x));
        // Each layer's last residual add also normalises x for the next layer (into the shared
        // acts.xn1), one launch instead of two.
        for l in 0..cfg.num_layers {
            let edges = LayerEdges {
                input_normed: l > 0,
                next_norm: (l + 1 < cfg.num_layers)
                    .then(|| self.p(self.layout.layers[l + 1].input_norm)),
            };
            self.layer_forward(l, &mut x, &mut acts, &mut qkv, place, cache, edges);
        }
        let head = self.head_norm(&x, logit_rows)?;
        self.head_logits_into(logits, &head.rows_n, 0..logit_rows.len());
        Ok(())
    }

    /// The LM head's first half on the rows of the residual stream x: [M, H] listed in `rows`:
    /// gather and final RMSNorm, kept for the backward pass.
    pub(crate) fn head_norm(&self, x: &B::Buf, rows: &[usize]) -> Result<HeadActs<B>> {
        let (cfg, b) = (&self.cfg, &self.backend);
        let (r, h) = (rows.len(), cfg.hidden_size);
        let mut a = HeadActs {
            rows_x: b.empty(r * h)?,
            rows_n: b.empty(r * h)?,
        };
        b.gather_rows(b.full_mut(&mut a.rows_x), b.full(x), rows, h);
        let norm = self.p(self.layout.final_norm);
        b.rmsnorm_forward(
            b.full_mut(&mut a.rows_n),
            b.full(&a.rows_x),
            norm,
            h,
            cfg.rms_norm_eps as f32,
        );
        Ok(a)
    }

    /// The logits of the normed rows `chunk` of rows_n: [R, H]: [chunk.len(), V] f32.
    pub(crate) fn head_logits(&self, rows_n: &B::Buf, chunk: Range<usize>) -> Result<B::Buf> {
        let b = &self.backend;
        let mut logits = b.empty_f32(chunk.len() * self.cfg.vocab_size)?;
        self.head_logits_into(b.full_mut(&mut logits), rows_n, chunk);
        Ok(logits)
    }

    /// `head_logits` into logits: [chunk.len(), V] f32.
    fn head_logits_into(&self, logits: B::ViewMut<'_>, rows_n: &B::Buf, chunk: Range<usize>) {
        let (cfg, b) = (&self.cfg, &self.backend);
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        b.matmul_forward(
            logits,
            b.view(rows_n, chunk.start * h..chunk.end * h),
            self.p(self.layout.lm_head),
            None,
            chunk.len(),
            h,
            v,
        );
    }

    /// The scored rows 0..r in chunks whose f32 logits fit `head_chunk_bytes`.
    pub(crate) fn head_chunks(&self, r: usize) -> impl Iterator<Item = Range<usize>> {
        let rows = (self.head_chunk_bytes / (4 * self.cfg.vocab_size)).max(1);
        (0..r)
            .step_by(rows)
            .map(move |start| start..(start + rows).min(r))
    }

    /// Rejects tokens outside the vocabulary, placements outside the cache and logit rows
    /// outside the batch, so the ops can index without checks.
    pub(crate) fn check_batch(
        &self,
        tokens: &[u32],
        place: &TokenPlacement,
        cache: &KvCache<B>,
        logit_rows: &[usize],
    ) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {bad} is out of range for the model's vocabulary of {} tokens",
                self.cfg.vocab_size
            );
        }
        self.check_placement(tokens.len(), place, cache, logit_rows)
    }

    /// Rejects a placement that does not give each of the m tokens a slot and position inside
    /// the cache, and logit rows outside the batch.
    fn check_placement(
        &self,
        m: usize,
        place: &TokenPlacement,
        cache: &KvCache<B>,
        logit_rows: &[usize],
    ) -> Result<()> {
        if place.slots.len() != m || place.positions.len() != m {
            bail!(
                "forward: {} tokens but {} slots and {} positions",
                m,
                place.slots.len(),
                place.positions.len()
            );
        }
        for (&slot, &pos) in place.slots.iter().zip(&place.positions) {
            if slot as usize >= cache.slots || pos as usize >= cache.capacity {
                bail!(
                    "token at slot {slot}, position {pos} does not fit the KV cache ({} slots × {} positions)",
                    cache.slots,
                    cache.capacity
                );
            }
        }
        if let Some(&bad) = logit_rows.iter().find(|&&r| r >= m) {
            bail!("forward: logit row {bad} is outside the batch of {m} tokens");
        }
        Ok(())
    }

    /// One decoder layer, in place on the residual stream x: [M, H]. Every intermediate lands in
    /// `a`, which the backward pass reads when training.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward(
        &self,
        l: usize,
        x: &mut B::Buf,
        a: &mut LayerActs<B>,
        qkv: &mut B::Buf,
        place: &TokenPlacement,
        cache: &mut KvCache<B>,
        edges: LayerEdges<'_, B>,
    ) {
        let (cfg, b, lp) = (&self.cfg, &self.backend, &self.layout.layers[l]);
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let m = place.slots.len();
        if let Some(x_in) = &mut a.x_in {
            b.copy(b.full_mut(x_in), b.full(x));
        }
        if !edges.input_normed {
            self.input_norm(l, x, a);
        }
        self.qkv_forward(l, a, qkv, place);
        let range = cache.layer_range(l);
        let (ck, cv) = (&mut cache.k, &mut cache.v);
        b.kv_cache_write(
            b.view_mut(ck, range.clone()),
            b.view_mut(cv, range),
            b.full(&a.k),
            b.full(&a.v),
            place,
            cache.capacity,
            cfg.kv_dim(),
        );
        self.attention_block(l, x, a, place, cache);
        if let Some(x_mid) = &mut a.x_mid {
            b.copy(b.full_mut(x_mid), b.full(x));
        }
        self.mlp_act_forward(l, a, m);
        b.matmul_forward(
            b.full_mut(&mut a.proj),
            b.full(&a.act),
            self.p(lp.down),
            self.p_opt(lp.down_bias),
            m,
            inter,
            h,
        );
        let eps = cfg.rms_norm_eps as f32;
        match edges.next_norm {
            Some(weight) => b.add_rmsnorm_forward(
                b.full_mut(x),
                b.full(&a.proj),
                b.full_mut(&mut a.xn1),
                weight,
                h,
                eps,
            ),
            None => b.residual_add(b.full_mut(x), b.full(&a.proj)),
        }
    }

    /// Layer l's intermediates again, for the backward pass of activation checkpointing: the
    /// training forward's ops in its order on its input x: [M, H], so the same values. x becomes
    /// the residual stream after attention (x_mid). The cache already holds the layer's keys and
    /// values, and the MLP's output is not needed by the backward, so neither is made.
    pub(crate) fn layer_recompute(
        &self,
        l: usize,
        x: &mut B::Buf,
        a: &mut LayerActs<B>,
        qkv: &mut B::Buf,
        place: &TokenPlacement,
        cache: &KvCache<B>,
    ) {
        self.input_norm(l, x, a);
        self.qkv_forward(l, a, qkv, place);
        self.attention_block(l, x, a, place, cache);
        self.mlp_act_forward(l, a, place.slots.len());
    }

    /// The scratch that layers' q, k and v projections share for m tokens: [M, q_dim + 2 kv_dim]
    /// (a layer reads it back before the next one writes it).
    pub(crate) fn qkv_scratch(&self, m: usize) -> Result<B::Buf> {
        self.backend
            .empty(m * (self.cfg.q_dim() + 2 * self.cfg.kv_dim()))
    }

    /// a.xn1 = RMSNorm(x) with layer l's input norm.
    fn input_norm(&self, l: usize, x: &B::Buf, a: &mut LayerActs<B>) {
        let (cfg, b) = (&self.cfg, &self.backend);
        let weight = self.p(self.layout.layers[l].input_norm);
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        b.rmsnorm_forward(b.full_mut(&mut a.xn1), b.full(x), weight, h, eps);
    }

    /// Layer l's q, k and v of a.xn1, with their biases; q and k rotated. The three
    /// projections are one product (their weights lie side by side) into the scratch qkv:
    /// [M, q_dim + 2 kv_dim], which qkv_rope_forward splits.
    fn qkv_forward(
        &self,
        l: usize,
        a: &mut LayerActs<B>,
        qkv: &mut B::Buf,
        place: &TokenPlacement,
    ) {
        let (cfg, b, lp) = (&self.cfg, &self.backend, &self.layout.layers[l]);
        let (m, h) = (place.slots.len(), cfg.hidden_size);
        let n = cfg.q_dim() + 2 * cfg.kv_dim();
        let w = b.view(&self.params, self.layout.qkv_weights(l));
        b.matmul_forward(b.full_mut(qkv), b.full(&a.xn1), w, None, m, h, n);
        let norms = match (lp.q_norm, lp.k_norm) {
            (Some(q_norm), Some(k_norm)) => Some(HeadNorms {
                weights: [self.p(q_norm), self.p(k_norm)],
                eps: cfg.rms_norm_eps as f32,
                raw: match (&mut a.q_raw, &mut a.k_raw) {
                    (Some(q_raw), Some(k_raw)) => Some([b.full_mut(q_raw), b.full_mut(k_raw)]),
                    _ => None,
                },
            }),
            _ => None,
        };
        b.qkv_rope_forward(
            [
                b.full_mut(&mut a.q),
                b.full_mut(&mut a.k),
                b.full_mut(&mut a.v),
            ],
            b.full(qkv),
            [
                self.p_opt(lp.q_bias),
                self.p_opt(lp.k_bias),
                self.p_opt(lp.v_bias),
            ],
            norms,
            &place.positions,
            b.full(&self.inv_freq),
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
    }

    /// Attention of a.q over layer l's cached keys and values, its output projection added to
    /// x: [M, H], and x normed into a.xn2 for the MLP.
    fn attention_block(
        &self,
        l: usize,
        x: &mut B::Buf,
        a: &mut LayerActs<B>,
        place: &TokenPlacement,
        cache: &KvCache<B>,
    ) {
        let (cfg, b, lp) = (&self.cfg, &self.backend, &self.layout.layers[l]);
        let (m, h) = (place.slots.len(), cfg.hidden_size);
        let range = cache.layer_range(l);
        b.attention_forward(
            b.full_mut(&mut a.att),
            a.lse.as_mut().map(|lse| b.full_mut(lse)),
            b.full(&a.q),
            b.view(&cache.k, range.clone()),
            b.view(&cache.v, range),
            place,
            cache.capacity,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        b.matmul_forward(
            b.full_mut(&mut a.proj),
            b.full(&a.att),
            self.p(lp.o),
            self.p_opt(lp.o_bias),
            m,
            cfg.q_dim(),
            h,
        );
        b.add_rmsnorm_forward(
            b.full_mut(x),
            b.full(&a.proj),
            b.full_mut(&mut a.xn2),
            self.p(lp.post_norm),
            h,
            cfg.rms_norm_eps as f32,
        );
    }

    /// Layer l's MLP up to its down projection: a.gate_up (the gate and up projections of a.xn2
    /// as one product: their weights lie side by side) and a.act = silu(gate) · up, for m tokens.
    fn mlp_act_forward(&self, l: usize, a: &mut LayerActs<B>, m: usize) {
        let (cfg, b) = (&self.cfg, &self.backend);
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let w = b.view(&self.params, self.layout.gate_up_weights(l));
        let bias = self
            .layout
            .gate_up_biases(l)
            .map(|r| b.view(&self.params, r));
        let xn2 = b.full(&a.xn2);
        b.matmul_forward(b.full_mut(&mut a.gate_up), xn2, w, bias, m, h, 2 * inter);
        b.swiglu_forward(b.full_mut(&mut a.act), b.full(&a.gate_up), inter);
    }
}

/// How a layer meets its neighbours. `input_normed`: a.xn1 already holds the layer's input norm
/// (the previous layer wrote it); `next_norm`: the next layer's input-norm weight, to normalise x
/// into a.xn1 with the closing residual add. Inference shares one `LayerActs` across layers and
/// uses both; training keeps each layer's activations apart and uses neither.
pub(crate) struct LayerEdges<'w, B: Backend + 'w> {
    pub input_normed: bool,
    pub next_norm: Option<B::View<'w>>,
}

impl<B: Backend> LayerEdges<'_, B> {
    pub fn separate() -> Self {
        LayerEdges {
            input_normed: false,
            next_norm: None,
        }
    }
}

/// Draw n of the normal stream `Philox::new(seed, 0).next_normal()`, computed directly.
fn normal_draw(seed: u64, n: u64) -> f32 {
    let pair = n & !1;
    let u1 = 1.0 - crate::rng::uniform(seed, 0, pair); // (0, 1]: ln is finite
    let u2 = crate::rng::uniform(seed, 0, pair + 1);
    let r = (-2.0 * u1.ln()).sqrt();
    let t = 2.0 * std::f64::consts::PI * u2;
    (if n.is_multiple_of(2) {
        r * t.cos()
    } else {
        r * t.sin()
    }) as f32
}

/// The intermediates of the LM head for R scored rows (the logits are made chunk by chunk).
pub struct HeadActs<B: Backend> {
    pub rows_x: B::Buf, // [R, H] residual stream at the scored rows
    pub rows_n: B::Buf, // [R, H] after the final RMSNorm
}

/// The intermediates of one decoder layer for a batch of M tokens.
pub struct LayerActs<B: Backend> {
    pub x_in: Option<B::Buf>, // [M, H] residual stream entering the layer (training, not checkpointed)
    pub xn1: B::Buf,          // [M, H] RMSNorm before attention
    pub q: B::Buf,            // [M, n_heads * hd], after RoPE
    pub k: B::Buf,            // [M, n_kv * hd], after RoPE
    pub q_raw: Option<B::Buf>, // [M, n_heads * hd] projection before the per-head norm (qk_norm, training)
    pub k_raw: Option<B::Buf>, // [M, n_kv * hd] projection before the per-head norm (qk_norm, training)
    pub v: B::Buf,             // [M, n_kv * hd]
    pub att: B::Buf,           // [M, n_heads * hd] attention output
    pub lse: Option<B::Buf>,   // [M, n_heads] f32 log-sum-exp of each attention row (training only)
    pub proj: B::Buf,          // [M, H] a block's output before the residual add
    pub x_mid: Option<B::Buf>, // [M, H] residual stream after attention (training, not checkpointed)
    pub xn2: B::Buf,           // [M, H] RMSNorm before the MLP
    pub gate_up: B::Buf,       // [M, 2 I] each row gate's, then up's
    pub act: B::Buf,           // [M, I] silu(gate) · up
}

/// What a layer's activations keep beyond what inference needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: inference.
    Nothing,
    /// The residual streams entering the layer and after attention, and the attention's
    /// log-sum-exp: the training pass.
    ResidualsAndLse,
    /// The log-sum-exp only: activation checkpointing, whose caller holds the residual streams.
    Lse,
}

impl<B: Backend> LayerActs<B> {
    /// One layer's intermediates for m tokens, with what `keep` asks for the backward pass
    /// besides (work and memory inference does without).
    pub fn new(b: &B, cfg: &ModelConfig, m: usize, keep: Keep) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let kept = |when: bool, make: &dyn Fn() -> Result<B::Buf>| -> Result<Option<B::Buf>> {
            Ok(if when { Some(make()?) } else { None })
        };
        // Every one is written whole by the op that makes it before anything reads it.
        let residual = || kept(keep == Keep::ResidualsAndLse, &|| b.empty(m * h));
        let lse = keep != Keep::Nothing;
        let raw = cfg.qk_norm && keep != Keep::Nothing; // what the backward of the norms reads
        Ok(LayerActs {
            x_in: residual()?,
            xn1: b.empty(m * h)?,
            q: b.empty(m * cfg.q_dim())?,
            k: b.empty(m * cfg.kv_dim())?,
            q_raw: raw.then(|| b.empty(m * cfg.q_dim())).transpose()?,
            k_raw: raw.then(|| b.empty(m * cfg.kv_dim())).transpose()?,
            v: b.empty(m * cfg.kv_dim())?,
            att: b.empty(m * cfg.q_dim())?,
            lse: kept(lse, &|| b.empty_f32(m * cfg.num_heads))?,
            proj: b.empty(m * h)?,
            x_mid: residual()?,
            xn2: b.empty(m * h)?,
            gate_up: b.empty(m * 2 * i)?,
            act: b.empty(m * i)?,
        })
    }

    /// The saved residual streams (x_in, x_mid) for the backward pass.
    pub fn residuals(&self) -> Result<(&B::Buf, &B::Buf)> {
        match (&self.x_in, &self.x_mid) {
            (Some(x_in), Some(x_mid)) => Ok((x_in, x_mid)),
            _ => bail!("backward: the layer activations kept no residual streams"),
        }
    }

    /// The attention's saved log-sum-exp for the backward pass: [M, n_heads] f32.
    pub fn lse(&self) -> Result<&B::Buf> {
        self.lse
            .as_ref()
            .context("backward: the layer activations were made for inference (nothing kept)")
    }
}
