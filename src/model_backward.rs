//! The training pass of the transformer: a forward pass that keeps every layer's intermediates
//! (or, with activation checkpointing, only each layer's input, the backward recomputing the rest
//! layer by layer) and the log-probabilities of the target tokens, and the explicit backward pass
//! that turns d(loss)/d(logp) into parameter gradients (llm.c style, no autograd).

use crate::backend::{
    Backend, GradWrite, PolicyTokens, TokenPlacement, TrainBackend, POLICY_STATS,
};
use crate::grpo::LossOptions;
use crate::model::{HeadActs, Keep, KvCache, LayerActs, LayerEdges, Model};
use anyhow::{bail, Result};
use std::ops::Range;

/// Sequences (prompt + completion) packed into one ragged batch, with the rows whose next-token
/// log-probabilities are scored.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    pub tokens: Vec<u32>, // [M]
    pub place: TokenPlacement,
    pub slots: usize,
    pub capacity: usize,
    /// Row predicting each scored token: [R].
    pub rows: Vec<usize>,
    /// The scored tokens (the completions, concatenated): [R].
    pub targets: Vec<u32>,
}

impl TrainBatch {
    /// One slot per (prompt, completion); every completion token is scored.
    pub fn new(seqs: &[(&[u32], &[u32])]) -> Result<Self> {
        let mut b = TrainBatch {
            tokens: Vec::new(),
            place: TokenPlacement::default(),
            slots: seqs.len(),
            capacity: 0,
            rows: Vec::new(),
            targets: Vec::new(),
        };
        for (slot, (prompt, completion)) in seqs.iter().enumerate() {
            if prompt.is_empty() {
                bail!("sequence {slot}: empty prompt; at least one prompt token is needed");
            }
            let first = b.tokens.len();
            let len = prompt.len() + completion.len();
            b.tokens.extend_from_slice(prompt);
            b.tokens.extend_from_slice(completion);
            b.place.slots.extend(std::iter::repeat_n(slot as u32, len));
            b.place.positions.extend(0..len as u32);
            b.rows
                .extend((0..completion.len()).map(|i| first + prompt.len() - 1 + i));
            b.targets.extend_from_slice(completion);
            b.capacity = b.capacity.max(len);
        }
        Ok(b)
    }
}

/// What the training forward pass keeps of the decoder layers.
enum LayerStore<B: Backend> {
    /// Every intermediate of every layer.
    Kept(Vec<LayerActs<B>>),
    /// Each layer's input, [M, H] (`Model::checkpoint_layers`): the backward recomputes the rest.
    Inputs(Vec<B::Buf>),
}

/// Everything the backward pass reads.
pub struct TrainActivations<B: Backend> {
    layers: LayerStore<B>,
    cache: KvCache<B>,
    head: HeadActs<B>,
    temperature: f32,
}

/// What the training forward pass returns to the loss.
pub struct TrainOutput<B: Backend> {
    pub acts: TrainActivations<B>,
    /// log softmax(logits / τ)[target] per scored token: [R].
    pub logp: Vec<f32>,
    /// Entropy of softmax(logits / τ) per scored token: [R].
    pub entropy: Vec<f32>,
}

/// The GRPO loss inputs of [`Model::backward_policy`], on the device.
pub struct PolicyInputs<'a, B: Backend> {
    /// The completion each scored row belongs to: [R].
    pub seqs: &'a [u32],
    /// Each completion's advantage: [N] f32.
    pub advantages: &'a B::Buf,
    /// Each completion's aggregation weight per token, 0 when it is left out: [N] f32.
    pub weights: &'a B::Buf,
    /// logπold per scored row, [R] f32; None: logπold = logπθ (ρ = 1).
    pub old_logp: Option<&'a B::Buf>,
    /// logπref per scored row, [R] f32.
    pub ref_logp: Option<&'a B::Buf>,
}

/// What the fused loss backward leaves on the device.
pub struct PolicyRows<B: Backend> {
    /// logπθ per scored row: [R] f32.
    pub logp: B::Buf,
    /// Per-row statistics (`backend::policy_stat`): [R, POLICY_STATS] f32.
    pub stats: B::Buf,
}

impl<B: TrainBackend> Model<B> {
    /// Forward pass over `batch`, keeping activations; log-probs at temperature τ.
    pub fn forward_train(&self, batch: &TrainBatch, temperature: f32) -> Result<TrainOutput<B>> {
        let acts = self.forward_activations(batch, temperature)?;
        let (b, r, v) = (&self.backend, batch.rows.len(), self.cfg.vocab_size);
        // The head, a chunk of scored rows at a time: its logits are dropped here and made
        // again in the backward (one more matmul of the head instead of [R, V] f32 kept).
        let mut logp = b.zeros_f32(r)?;
        let mut entropy = b.zeros_f32(r)?;
        for chunk in self.head_chunks(r) {
            let logits = self.head_logits(&acts.head.rows_n, chunk.clone())?;
            b.logprob_forward(
                b.view_mut(&mut logp, chunk.clone()),
                b.view_mut(&mut entropy, chunk.clone()),
                b.full(&logits),
                &batch.targets[chunk],
                v,
                temperature,
            );
        }
        let (logp, entropy) = (b.download(b.full(&logp))?, b.download(b.full(&entropy))?);
        Ok(TrainOutput {
            acts,
            logp,
            entropy,
        })
    }

    /// The forward pass over `batch` up to the head's final norm, keeping what the backward
    /// reads; the logits are left to the backward (`backward_policy` computes the loss there).
    pub fn forward_activations(
        &self,
        batch: &TrainBatch,
        temperature: f32,
    ) -> Result<TrainActivations<B>> {
        if !(temperature > 0.0) {
            bail!("training log-probs need a temperature > 0, got {temperature}");
        }
        let (cfg, b) = (&self.cfg, &self.backend);
        let (m, h, v) = (batch.tokens.len(), cfg.hidden_size, cfg.vocab_size);
        let mut cache = KvCache::new(b, cfg, batch.slots, batch.capacity)?;
        self.check_batch(&batch.tokens, &batch.place, &cache, &batch.rows)?;
        if let Some(&bad) = batch.targets.iter().find(|&&t| t as usize >= v) {
            bail!("target token id {bad} is out of range for the model's vocabulary of {v} tokens");
        }

        let mut x = b.empty(m * h)?; // [M, H] residual stream, embedded next
        b.embedding_forward(
            b.full_mut(&mut x),
            self.p(self.layout.embed),
            &batch.tokens,
            h,
        );
        let mut qkv = self.qkv_scratch(m)?;
        let mut run_layer = |l: usize, x: &mut B::Buf, acts: &mut LayerActs<B>| {
            let separate = LayerEdges::separate();
            self.layer_forward(l, x, acts, &mut qkv, &batch.place, &mut cache, separate)
        };
        let layers = if self.checkpoint_layers {
            // one layer's intermediates at a time; each layer's input is kept. The log-sum-exp
            // is not, but asking for it runs the attention kernel the recompute will run.
            let mut acts = LayerActs::new(b, cfg, m, Keep::Lse)?;
            let mut inputs = Vec::with_capacity(cfg.num_layers);
            for l in 0..cfg.num_layers {
                let mut input = b.empty(m * h)?;
                b.copy(b.full_mut(&mut input), b.full(&x));
                inputs.push(input);
                run_layer(l, &mut x, &mut acts);
            }
            LayerStore::Inputs(inputs)
        } else {
            let mut layers = Vec::with_capacity(cfg.num_layers);
            for l in 0..cfg.num_layers {
                let mut acts = LayerActs::new(b, cfg, m, Keep::ResidualsAndLse)?;
                run_layer(l, &mut x, &mut acts);
                layers.push(acts);
            }
            LayerStore::Kept(layers)
        };
        Ok(TrainActivations {
            layers,
            cache,
            head: self.head_norm(&x, &batch.rows)?,
            temperature,
        })
    }

    /// The gradient of parameter tensor `idx` inside the gradient buffer.
    fn grad<'a>(&self, grads: &'a mut B::Buf, idx: usize) -> B::ViewMut<'a> {
        self.backend.view_mut(grads, self.layout.range(idx))
    }

    /// Accumulates d(loss)/d(params) into `grads` (same layout as the parameters), given
    /// dlogp = d(loss)/d(logp) per scored token: [R].
    pub fn backward(
        &self,
        batch: &TrainBatch,
        acts: &TrainActivations<B>,
        dlogp: &[f32],
        grads: &mut B::Buf,
    ) -> Result<()> {
        let (b, r, v) = (&self.backend, batch.rows.len(), self.cfg.vocab_size);
        if dlogp.len() != r {
            bail!(
                "backward: {} log-prob gradients for {r} scored tokens",
                dlogp.len()
            );
        }
        let dlogp = b.upload_f32(dlogp)?;
        let temperature = acts.temperature;
        self.backward_from_head(batch, acts, grads, |chunk, logits, dlogits| {
            b.logprob_backward(
                dlogits,
                b.view(&dlogp, chunk.clone()),
                logits,
                &batch.targets[chunk],
                v,
                temperature,
            )
        })
    }

    /// The backward of the GRPO policy loss (METHOD.md §5): the loss of every scored token is
    /// computed inside the head's backward, from the logits made there (`policy_loss_backward`),
    /// so the forward pass needs no head (`forward_activations`). Accumulates the gradients
    /// into `grads`; returns logπθ and the per-row statistics, left on the device.
    pub fn backward_policy(
        &self,
        batch: &TrainBatch,
        acts: &TrainActivations<B>,
        inputs: &PolicyInputs<B>,
        loss: &LossOptions,
        grads: &mut B::Buf,
    ) -> Result<PolicyRows<B>> {
        let (b, r, v) = (&self.backend, batch.rows.len(), self.cfg.vocab_size);
        let n = b.len(inputs.advantages);
        let per_row = |x: Option<&B::Buf>| x.is_none_or(|x| b.len(x) == r);
        if inputs.seqs.len() != r || !per_row(inputs.old_logp) || !per_row(inputs.ref_logp) {
            bail!("backward_policy: completion indices, old and reference log-probs must have one entry per scored token ({r})");
        }
        if b.len(inputs.weights) != n {
            bail!(
                "backward_policy: {} weights for {n} advantages",
                b.len(inputs.weights)
            );
        }
        if let Some(&bad) = inputs.seqs.iter().find(|&&i| i as usize >= n) {
            bail!("backward_policy: completion {bad} out of range for {n} completions");
        }
        let mut logp = b.zeros_f32(r)?;
        let mut stats = b.zeros_f32(r * POLICY_STATS)?;
        let temperature = acts.temperature;
        self.backward_from_head(batch, acts, grads, |chunk, logits, dlogits| {
            let tokens = PolicyTokens {
                seqs: &inputs.seqs[chunk.clone()],
                advantages: b.full(inputs.advantages),
                weights: b.full(inputs.weights),
                old_logp: inputs.old_logp.map(|x| b.view(x, chunk.clone())),
                ref_logp: inputs.ref_logp.map(|x| b.view(x, chunk.clone())),
            };
            b.policy_loss_backward(
                dlogits,
                b.view_mut(&mut logp, chunk.clone()),
                b.view_mut(
                    &mut stats,
                    chunk.start * POLICY_STATS..chunk.end * POLICY_STATS,
                ),
                logits,
                &batch.targets[chunk],
                &tokens,
                v,
                temperature,
                loss,
            )
        })?;
        Ok(PolicyRows { logp, stats })
    }

    /// The backward from the logits down: `head_grad(rows, logits, dlogits)` writes d(loss)/d(logits)
    /// for each chunk of scored rows (logits recomputed chunk by chunk, as in the forward), then
    /// logits → final norm → residual stream at the scored rows → every layer.
    fn backward_from_head(
        &self,
        batch: &TrainBatch,
        acts: &TrainActivations<B>,
        grads: &mut B::Buf,
        mut head_grad: impl for<'x> FnMut(Range<usize>, B::View<'x>, B::ViewMut<'x>),
    ) -> Result<()> {
        let (cfg, b, lay) = (&self.cfg, &self.backend, &self.layout);
        let (m, r, h, v) = (
            batch.tokens.len(),
            batch.rows.len(),
            cfg.hidden_size,
            cfg.vocab_size,
        );
        let (inter, hd, q_dim, kv_dim) = (
            cfg.intermediate_size,
            cfg.head_dim,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let eps = cfg.rms_norm_eps as f32;
        if b.len(grads) != lay.total_len() {
            bail!(
                "backward: gradient buffer holds {} floats, the model has {}",
                b.len(grads),
                lay.total_len()
            );
        }

        let mut d_rows_n = b.empty(r * h)?; // each chunk writes its rows
        for chunk in self.head_chunks(r) {
            let c = chunk.len();
            let logits = self.head_logits(&acts.head.rows_n, chunk.clone())?;
            let mut dlogits = b.empty(c * v)?; // written whole by head_grad
            head_grad(chunk.clone(), b.full(&logits), b.full_mut(&mut dlogits));
            let rows = chunk.start * h..chunk.end * h;
            b.matmul_backward(
                Some(b.view_mut(&mut d_rows_n, rows.clone())),
                GradWrite::Overwrite,
                self.grad(grads, lay.lm_head),
                b.full(&dlogits),
                b.view(&acts.head.rows_n, rows),
                self.p(lay.lm_head),
                c,
                h,
                v,
            );
        }
        let mut d_rows = b.empty(r * h)?;
        b.rmsnorm_backward(
            b.full_mut(&mut d_rows),
            GradWrite::Overwrite,
            self.grad(grads, lay.final_norm),
            b.full(&d_rows_n),
            b.full(&acts.head.rows_x),
            self.p(lay.final_norm),
            h,
            eps,
        );
        let mut dx = b.zeros(m * h)?; // [M, H] gradient of the residual stream
        b.scatter_add_rows(b.full_mut(&mut dx), b.full(&d_rows), &batch.rows, h);

        // Scratch gradients, reused by every layer; each is overwritten whole where it is made
        // (the first product into it overwrites, later ones add).
        let mut d_act = b.empty(m * inter)?;
        let mut d_gate_up = b.empty(m * 2 * inter)?;
        let mut d_norm_out = b.empty(m * h)?; // gradient at a block's RMSNorm output
        let mut d_att = b.empty(m * q_dim)?;
        let mut dq = b.empty(m * q_dim)?;
        let mut dk = b.empty(m * kv_dim)?;
        let mut dv = b.empty(m * kv_dim)?;
        // gradient at k's projection, before its per-head norm (qk_norm; q's reuses d_att)
        let mut dk_raw = cfg.qk_norm.then(|| b.empty(m * kv_dim)).transpose()?;
        // gradient at the projections' product (without qk_norm: [M, q_dim + 2 kv_dim])
        let mut dqkv = (!cfg.qk_norm)
            .then(|| b.empty(m * (q_dim + 2 * kv_dim)))
            .transpose()?;
        let cache_len = batch.slots * batch.capacity * kv_dim;
        let mut dcache_k = b.zeros(cache_len)?;
        let mut dcache_v = b.zeros(cache_len)?;
        let place = &batch.place;

        // checkpointed layers: one layer's intermediates, recomputed from its input into x
        let mut recomputed = match &acts.layers {
            LayerStore::Kept(_) => None,
            LayerStore::Inputs(_) => Some((
                LayerActs::new(b, cfg, m, Keep::Lse)?,
                b.empty(m * h)?,
                self.qkv_scratch(m)?,
            )),
        };
        for (l, lp) in lay.layers.iter().enumerate().rev() {
            let (a, x_in, x_mid) = match (&acts.layers, &mut recomputed) {
                (LayerStore::Kept(layers), _) => {
                    let (x_in, x_mid) = layers[l].residuals()?;
                    (&layers[l], x_in, x_mid)
                }
                (LayerStore::Inputs(inputs), Some((layer, x, qkv))) => {
                    b.copy(b.full_mut(x), b.full(&inputs[l]));
                    self.layer_recompute(l, x, layer, qkv, place, &acts.cache);
                    (&*layer, &inputs[l], &*x)
                }
                (LayerStore::Inputs(_), None) => unreachable!("made for checkpointed layers"),
            };
            let lse = a.lse()?;
            // MLP block: x_out = x_mid + down(silu(gate(xn2)) · up(xn2)).
            b.matmul_backward(
                Some(b.full_mut(&mut d_act)),
                GradWrite::Overwrite,
                self.grad(grads, lp.down),
                b.full(&dx),
                b.full(&a.act),
                self.p(lp.down),
                m,
                inter,
                h,
            );
            if let Some(i) = lp.down_bias {
                b.bias_backward(self.grad(grads, i), b.full(&dx));
            }
            b.swiglu_backward(
                b.full_mut(&mut d_gate_up),
                b.full(&d_act),
                b.full(&a.gate_up),
                inter,
            );
            // the gate and up projections as one product (their weights lie side by side)
            b.matmul_backward(
                Some(b.full_mut(&mut d_norm_out)),
                GradWrite::Overwrite,
                b.view_mut(grads, lay.gate_up_weights(l)),
                b.full(&d_gate_up),
                b.full(&a.xn2),
                b.view(&self.params, lay.gate_up_weights(l)),
                m,
                h,
                2 * inter,
            );
            if let Some(biases) = lay.gate_up_biases(l) {
                b.bias_backward(b.view_mut(grads, biases), b.full(&d_gate_up));
            }
            // the norm's input is the residual stream: its gradient adds to dx
            b.rmsnorm_backward(
                b.full_mut(&mut dx),
                GradWrite::Add,
                self.grad(grads, lp.post_norm),
                b.full(&d_norm_out),
                b.full(x_mid),
                self.p(lp.post_norm),
                h,
                eps,
            );

            // Attention block: x_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            b.matmul_backward(
                Some(b.full_mut(&mut d_att)),
                GradWrite::Overwrite,
                self.grad(grads, lp.o),
                b.full(&dx),
                b.full(&a.att),
                self.p(lp.o),
                m,
                q_dim,
                h,
            );
            if let Some(i) = lp.o_bias {
                b.bias_backward(self.grad(grads, i), b.full(&dx));
            }
            let range = acts.cache.layer_range(l);
            b.fill_zero(b.full_mut(&mut dcache_k));
            b.fill_zero(b.full_mut(&mut dcache_v));
            b.attention_backward(
                b.full_mut(&mut dq),
                b.full_mut(&mut dcache_k),
                b.full_mut(&mut dcache_v),
                b.full(&d_att),
                b.full(&a.att),
                b.full(lse),
                b.full(&a.q),
                b.view(&acts.cache.k, range.clone()),
                b.view(&acts.cache.v, range),
                place,
                batch.capacity,
                cfg.num_heads,
                cfg.num_kv_heads,
                hd,
            );
            b.kv_cache_gather(
                b.full_mut(&mut dk),
                b.full(&dcache_k),
                place,
                batch.capacity,
                kv_dim,
            );
            b.kv_cache_gather(
                b.full_mut(&mut dv),
                b.full(&dcache_v),
                place,
                batch.capacity,
                kv_dim,
            );
            let (inv_freq, positions) = (b.full(&self.inv_freq), &place.positions);
            let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
            match (
                &a.q_raw,
                &a.k_raw,
                lp.q_norm,
                lp.k_norm,
                &mut dk_raw,
                &mut dqkv,
            ) {
                (None, None, None, None, None, Some(dqkv)) => {
                    // back through the rotation to the projections' one product
                    let grads_in = [b.full(&dq), b.full(&dk), b.full(&dv)];
                    let d = b.full_mut(dqkv);
                    b.qkv_rope_backward(d, grads_in, positions, inv_freq, heads, kv_heads, hd);
                    b.matmul_backward(
                        Some(b.full_mut(&mut d_norm_out)),
                        GradWrite::Overwrite,
                        b.view_mut(grads, lay.qkv_weights(l)),
                        b.full(dqkv),
                        b.full(&a.xn1),
                        b.view(&self.params, lay.qkv_weights(l)),
                        m,
                        h,
                        q_dim + 2 * kv_dim,
                    );
                    if let Some(biases) = lay.qkv_biases(l) {
                        b.bias_backward(b.view_mut(grads, biases), b.full(dqkv));
                    }
                }
                (Some(q_raw), Some(k_raw), Some(q_norm), Some(k_norm), Some(dk_raw), None) => {
                    // qk_norm: back through the rotation and each head's norm (into d_att, free
                    // again, and dk_raw), then the three products apart
                    b.rope_backward(b.full_mut(&mut dq), positions, inv_freq, heads, hd);
                    b.rope_backward(b.full_mut(&mut dk), positions, inv_freq, kv_heads, hd);
                    for (dx, norm, dy, x) in [
                        (&mut d_att, q_norm, &dq, q_raw),
                        (&mut *dk_raw, k_norm, &dk, k_raw),
                    ] {
                        b.rmsnorm_backward(
                            b.full_mut(dx),
                            GradWrite::Overwrite,
                            self.grad(grads, norm),
                            b.full(dy),
                            b.full(x),
                            self.p(norm),
                            hd,
                            eps,
                        );
                    }
                    let products = [
                        (lp.q, lp.q_bias, &d_att, q_dim, GradWrite::Overwrite),
                        (lp.k, lp.k_bias, &*dk_raw, kv_dim, GradWrite::Add),
                        (lp.v, lp.v_bias, &dv, kv_dim, GradWrite::Add),
                    ];
                    for (w, bias, dy, n, write) in products {
                        b.matmul_backward(
                            Some(b.full_mut(&mut d_norm_out)),
                            write,
                            self.grad(grads, w),
                            b.full(dy),
                            b.full(&a.xn1),
                            self.p(w),
                            m,
                            h,
                            n,
                        );
                        if let Some(i) = bias {
                            b.bias_backward(self.grad(grads, i), b.full(dy));
                        }
                    }
                }
                _ => bail!("layer {l}: q/k norm weights and saved pre-norm q and k disagree"),
            }
            b.rmsnorm_backward(
                b.full_mut(&mut dx),
                GradWrite::Add,
                self.grad(grads, lp.input_norm),
                b.full(&d_norm_out),
                b.full(x_in),
                self.p(lp.input_norm),
                h,
                eps,
            );
        }
        // Tied embeddings: the LM head's gradient already sits in the same range and this adds to it.
        b.embedding_backward(self.grad(grads, lay.embed), b.full(&dx), &batch.tokens, h);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::config::ModelConfig;

    /// Log-probs, entropies and the parameter gradient for a random d(loss)/d(logp).
    fn train_pass(model: &Model<CpuBackend>, batch: &TrainBatch) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let out = model.forward_train(batch, 0.8).unwrap();
        let dlogp: Vec<f32> = (0..out.logp.len())
            .map(|i| ((i * 7 % 5) as f32 - 2.0) / 3.0)
            .collect();
        let mut grads = vec![0.0; model.layout.total_len()];
        model
            .backward(batch, &out.acts, &dlogp, &mut grads)
            .unwrap();
        (out.logp, out.entropy, grads)
    }

    /// Every bias's gradient is what central differences of the loss Σ_r c_r logp_r give (the
    /// loss of `train_pass`): a Llama with attention and MLP biases (q, k and v one product, gate
    /// and up another, forward and backward) and a Qwen3 with attention biases (added before its
    /// per-head norms). Weights of std 1/√fan_in and biases of 0.3 keep the gradients well above
    /// the f32 forward's rounding.
    #[test]
    fn bias_gradients_match_central_differences() {
        use crate::params::ParamLayout;
        use crate::rng::Philox;
        for (model_type, mlp_bias) in [("llama", true), ("qwen3", false)] {
            let cfg = ModelConfig::from_json_str(&format!(
                r#"{{"model_type":"{model_type}","vocab_size":40,"hidden_size":16,
                    "intermediate_size":32,"num_hidden_layers":2,"num_attention_heads":2,
                    "num_key_value_heads":1,"head_dim":8,"attention_bias":true,
                    "mlp_bias":{mlp_bias}}}"#
            ))
            .unwrap();
            assert!(cfg.qkv_bias && cfg.o_bias && cfg.mlp_bias == mlp_bias);
            let layout = ParamLayout::new(&cfg);
            let mut rng = Philox::new(3, 0);
            let mut host = vec![0.0f32; layout.total_len()];
            for spec in &layout.specs {
                let scale = if spec.name.ends_with(".bias") {
                    0.3
                } else {
                    1.0 / (spec.shape[spec.shape.len() - 1] as f32).sqrt()
                };
                let norm = spec.name.ends_with("norm.weight");
                for v in &mut host[spec.range()] {
                    *v = if norm { 1.0 } else { scale * rng.next_normal() };
                }
            }
            let seqs: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[4, 5, 6, 7]), (&[8], &[9, 10, 11])];
            let batch = TrainBatch::new(&seqs).unwrap();
            let model = Model::from_host(cfg.clone(), &host, CpuBackend).unwrap();
            let (_, _, grads) = train_pass(&model, &batch);
            let loss = |params: &[f32]| -> f64 {
                let model = Model::from_host(cfg.clone(), params, CpuBackend).unwrap();
                let logp = model.forward_train(&batch, 0.8).unwrap().logp;
                let c = |i: usize| ((i * 7 % 5) as f64 - 2.0) / 3.0; // train_pass's dlogp
                logp.iter().enumerate().map(|(i, &l)| c(i) * l as f64).sum()
            };
            let eps = 1e-2;
            for lp in &layout.layers {
                let biases = [lp.q_bias, lp.k_bias, lp.v_bias, lp.o_bias];
                let mlp = [lp.gate_bias, lp.up_bias, lp.down_bias];
                for idx in biases.into_iter().chain(mlp).flatten() {
                    let range = layout.range(idx);
                    for at in [range.start, range.start + range.len() / 2, range.end - 1] {
                        let mut p = host.clone();
                        p[at] = host[at] + eps;
                        let up = loss(&p);
                        p[at] = host[at] - eps;
                        let fd = (up - loss(&p)) / (2.0 * eps as f64);
                        let g = grads[at] as f64;
                        let name = &layout.specs[idx].name;
                        assert!(
                            (fd - g).abs() <= 2e-3 + 2e-2 * g.abs(),
                            "{model_type} {name}[{}]: backward {g}, central difference {fd}",
                            at - range.start
                        );
                    }
                }
            }
        }
    }

    /// Checkpointed layers (only each layer's input kept, the rest recomputed in the backward)
    /// give the log-probs and the gradient of the kept activations bit for bit: Qwen2 with
    /// biases and Qwen3 with its q/k norms, three layers.
    #[test]
    fn checkpointed_layers_give_the_same_gradient_bit_for_bit() {
        for model_type in ["qwen2", "qwen3"] {
            let cfg = ModelConfig::from_json_str(&format!(
                r#"{{"model_type":"{model_type}","vocab_size":40,"hidden_size":16,
                    "intermediate_size":32,"num_hidden_layers":3,"num_attention_heads":2,
                    "num_key_value_heads":1,"head_dim":8}}"#
            ))
            .unwrap();
            let mut model = Model::random(cfg, 6, CpuBackend).unwrap();
            let seqs: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[4, 5, 6, 7]), (&[8], &[9, 10, 11])];
            let batch = TrainBatch::new(&seqs).unwrap();
            let kept = train_pass(&model, &batch);
            model.checkpoint_layers = true;
            let checkpointed = train_pass(&model, &batch);
            assert!(kept.2.iter().any(|&g| g != 0.0), "{model_type}");
            assert_eq!(checkpointed, kept, "{model_type}");
        }
    }

    /// A head computed three rows of logits at a time (and recomputed so in the backward) gives
    /// the log-probs of the whole head exactly, and its gradient up to the order of the LM
    /// head's gradient sums.
    #[test]
    fn a_chunked_head_gives_the_whole_heads_results() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":40,"hidden_size":16,"intermediate_size":32,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .unwrap();
        let mut model = Model::random(cfg, 4, CpuBackend).unwrap();
        let seqs: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[4, 5, 6, 7]), (&[8], &[9, 10, 11])];
        let batch = TrainBatch::new(&seqs).unwrap();
        let whole = train_pass(&model, &batch);
        model.head_chunk_bytes = 3 * 4 * 40;
        assert_eq!(model.head_chunks(7).count(), 3);
        let chunked = train_pass(&model, &batch);
        assert_eq!(chunked.0, whole.0);
        assert_eq!(chunked.1, whole.1);
        let diff: f32 = chunked
            .2
            .iter()
            .zip(&whole.2)
            .map(|(a, b)| (a - b).abs())
            .sum();
        let norm: f32 = whole.2.iter().map(|g| g.abs()).sum();
        assert!(norm > 0.0 && diff <= 1e-5 * norm, "{diff} vs {norm}");
    }

    /// Sums of the columns of the per-row statistics, as f64.
    fn stat_sums(b: &CpuBackend, stats: &[f32]) -> Vec<f64> {
        let mut out = vec![0.0; 2 * POLICY_STATS];
        b.column_sums(&mut out, stats, POLICY_STATS);
        out.chunks(2).map(|p| p[0] as f64 + p[1] as f64).collect()
    }

    /// The fused loss backward (loss computed inside the head's backward, the head skipped in
    /// the forward) gives what the host loss `grpo::policy_loss` followed by the plain
    /// log-prob backward gives: log-probs exactly, the gradient and the loss up to the f32
    /// rounding of the advantages and weights, the same clip counts. Every aggregation and
    /// truncation mode, old log-probs recomputed and given (far enough to clip both ways), with
    /// and without the KL term, a filtered group, and a head in chunks of three rows.
    #[test]
    fn the_fused_policy_backward_equals_the_host_loss_then_the_logprob_backward() {
        use crate::backend::policy_stat;
        use crate::grpo::{
            advantages, completion_weights, included_completions, policy_loss, AdvantageOptions,
            Aggregation, LossBatch, LossOptions, Truncated,
        };
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":40,"hidden_size":16,"intermediate_size":32,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#,
        )
        .unwrap();
        let mut model = Model::random(cfg, 5, CpuBackend).unwrap();
        model.head_chunk_bytes = 3 * 4 * 40;
        let seqs: [(&[u32], &[u32]); 4] = [
            (&[1, 2, 3], &[4, 5, 6, 7]),
            (&[8], &[9, 10, 11]),
            (&[12, 13], &[14, 15]),
            (&[16], &[17, 18, 19]),
        ];
        let batch = TrainBatch::new(&seqs).unwrap();
        let lens = [4usize, 3, 2, 3];
        let rewards = [1.0, 0.2, 0.7, 0.0];
        let truncated = [false, true, false, false];
        let keep = [true, true, false, false];
        let temperature = 0.8;
        let adv = advantages(&rewards, 2, &AdvantageOptions::default()).unwrap();
        let b = &model.backend;
        let mut adv_buf = vec![0.0; 4];
        b.group_advantages(&mut adv_buf, &rewards, 2, &AdvantageOptions::default());
        let row_seqs: Vec<u32> = (0..4u32)
            .flat_map(|i| std::iter::repeat_n(i, lens[i as usize]))
            .collect();

        let out = model.forward_train(&batch, temperature).unwrap();
        let logp: Vec<f64> = out.logp.iter().map(|&x| x as f64).collect();
        let r = logp.len();
        let shifted = |scale: f32| -> Vec<f32> {
            (0..r)
                .map(|i| out.logp[i] + scale * ((i * 5 % 7) as f32 - 3.0))
                .collect()
        };
        let (old_given, reference) = (shifted(0.2), shifted(0.1));
        let (mut clipped_low, mut clipped_high) = (0.0, 0.0);
        for aggregation in [
            Aggregation::SeqMeanTokenMean,
            Aggregation::TokenMean,
            Aggregation::SeqMeanTokenSumNorm { max_len: 6 },
        ] {
            for truncation in [Truncated::Keep, Truncated::Mask] {
                for (old, beta) in [(false, 0.0), (true, 0.05)] {
                    let case = format!("{aggregation:?} {truncation:?} old {old} beta {beta}");
                    let o = LossOptions {
                        beta,
                        aggregation,
                        truncated: truncation,
                        ..LossOptions::default()
                    };
                    let old64: Vec<f64> = if old {
                        old_given.iter().map(|&x| x as f64).collect()
                    } else {
                        logp.clone()
                    };
                    let ref64: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
                    let host = policy_loss(
                        &LossBatch {
                            logp: &logp,
                            old_logp: &old64,
                            ref_logp: old.then_some(&ref64[..]),
                            lens: &lens,
                            advantages: &adv,
                            truncated: &truncated,
                            keep: Some(&keep),
                        },
                        &o,
                    )
                    .unwrap();
                    let dlogp: Vec<f32> = host.grad.iter().map(|&g| g as f32).collect();
                    let mut want = vec![0.0; model.layout.total_len()];
                    model
                        .backward(&batch, &out.acts, &dlogp, &mut want)
                        .unwrap();

                    let included = included_completions(&truncated, Some(&keep), truncation);
                    let weights: Vec<f32> = completion_weights(&lens, &included, aggregation)
                        .iter()
                        .map(|&w| w as f32)
                        .collect();
                    let acts = model.forward_activations(&batch, temperature).unwrap();
                    let inputs = PolicyInputs {
                        seqs: &row_seqs,
                        advantages: &adv_buf,
                        weights: &weights,
                        old_logp: old.then_some(&old_given),
                        ref_logp: old.then_some(&reference),
                    };
                    let mut got = vec![0.0; model.layout.total_len()];
                    let rows = model
                        .backward_policy(&batch, &acts, &inputs, &o, &mut got)
                        .unwrap();
                    assert_eq!(rows.logp, out.logp, "{case}");
                    let diff: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum();
                    let norm: f32 = want.iter().map(|g| g.abs()).sum();
                    assert!(
                        norm > 0.0 && diff <= 1e-5 * norm,
                        "{case}: {diff} vs {norm}"
                    );
                    let sums = stat_sums(b, &rows.stats);
                    let n_tok = host.stats.tokens as f64;
                    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-2);
                    assert!(close(sums[policy_stat::LOSS], host.loss), "{case}: loss");
                    assert!(
                        close(sums[policy_stat::KL] / n_tok, host.stats.kl),
                        "{case}"
                    );
                    assert!(
                        close(sums[policy_stat::RATIO] / n_tok, host.stats.ratio_mean),
                        "{case}"
                    );
                    assert_eq!(
                        sums[policy_stat::CLIP_LOW] / n_tok,
                        host.stats.clip_frac_low,
                        "{case}"
                    );
                    assert_eq!(
                        sums[policy_stat::CLIP_HIGH] / n_tok,
                        host.stats.clip_frac_high,
                        "{case}"
                    );
                    // the entropy of the rows in the loss only
                    let entropy: f64 = out
                        .entropy
                        .iter()
                        .zip(&row_seqs)
                        .filter(|&(_, &seq)| weights[seq as usize] != 0.0)
                        .map(|(&e, _)| e as f64)
                        .sum();
                    assert!(close(sums[policy_stat::ENTROPY], entropy), "{case}");
                    clipped_low += sums[policy_stat::CLIP_LOW];
                    clipped_high += sums[policy_stat::CLIP_HIGH];
                }
            }
        }
        assert!(clipped_low > 0.0 && clipped_high > 0.0);
    }
}
