//! The training pass of the transformer: a forward pass that keeps every layer's intermediates
//! and the log-probabilities of the target tokens, and the explicit backward pass that turns
//! d(loss)/d(logp) into parameter gradients (llm.c style, no autograd).

use crate::backend::{Backend, TokenPlacement, TrainBackend};
use crate::model::{HeadActs, KvCache, LayerActs, LayerEdges, Model};
use anyhow::{bail, Result};

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
            b.place
                .slots
                .extend(std::iter::repeat(slot as u32).take(len));
            b.place.positions.extend(0..len as u32);
            b.rows
                .extend((0..completion.len()).map(|i| first + prompt.len() - 1 + i));
            b.targets.extend_from_slice(completion);
            b.capacity = b.capacity.max(len);
        }
        Ok(b)
    }
}

/// Everything the backward pass reads.
pub struct TrainActivations<B: Backend> {
    layers: Vec<LayerActs<B>>,
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

impl<B: TrainBackend> Model<B> {
    /// Forward pass over `batch`, keeping activations; log-probs at temperature τ.
    pub fn forward_train(&self, batch: &TrainBatch, temperature: f32) -> Result<TrainOutput<B>> {
        if !(temperature > 0.0) {
            bail!("training log-probs need a temperature > 0, got {temperature}");
        }
        let (cfg, b) = (&self.cfg, &self.backend);
        let (m, r, h, v) = (
            batch.tokens.len(),
            batch.rows.len(),
            cfg.hidden_size,
            cfg.vocab_size,
        );
        let mut cache = KvCache::new(b, cfg, batch.slots, batch.capacity)?;
        self.check_batch(&batch.tokens, &batch.place, &cache, &batch.rows)?;
        if let Some(&bad) = batch.targets.iter().find(|&&t| t as usize >= v) {
            bail!("target token id {bad} is out of range for the model's vocabulary of {v} tokens");
        }

        let mut x = b.zeros(m * h)?;
        b.embedding_forward(
            b.full_mut(&mut x),
            self.p(self.layout.embed),
            &batch.tokens,
            h,
        );
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut acts = LayerActs::new(b, cfg, m, true)?;
            self.layer_forward(
                l,
                &mut x,
                &mut acts,
                &batch.place,
                &mut cache,
                LayerEdges::separate(),
            );
            layers.push(acts);
        }
        // The head, a chunk of scored rows at a time: its logits are dropped here and made
        // again in the backward (one more matmul of the head instead of [R, V] f32 kept).
        let head = self.head_norm(&x, &batch.rows)?;
        let mut logp = b.zeros_f32(r)?;
        let mut entropy = b.zeros_f32(r)?;
        for chunk in self.head_chunks(r) {
            let logits = self.head_logits(&head.rows_n, chunk.clone())?;
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
        let acts = TrainActivations {
            layers,
            cache,
            head,
            temperature,
        };
        Ok(TrainOutput {
            acts,
            logp,
            entropy,
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
        if dlogp.len() != r {
            bail!(
                "backward: {} log-prob gradients for {r} scored tokens",
                dlogp.len()
            );
        }
        if b.len(grads) != lay.total_len() {
            bail!(
                "backward: gradient buffer holds {} floats, the model has {}",
                b.len(grads),
                lay.total_len()
            );
        }

        // Head: logp → logits (recomputed chunk by chunk, as in the forward) → final norm →
        // residual stream at the scored rows.
        let dlogp = b.upload_f32(dlogp)?;
        let mut d_rows_n = b.zeros(r * h)?;
        for chunk in self.head_chunks(r) {
            let c = chunk.len();
            let logits = self.head_logits(&acts.head.rows_n, chunk.clone())?;
            let mut dlogits = b.zeros(c * v)?;
            b.logprob_backward(
                b.full_mut(&mut dlogits),
                b.view(&dlogp, chunk.clone()),
                b.full(&logits),
                &batch.targets[chunk.clone()],
                v,
                acts.temperature,
            );
            let rows = chunk.start * h..chunk.end * h;
            b.matmul_backward(
                Some(b.view_mut(&mut d_rows_n, rows.clone())),
                self.grad(grads, lay.lm_head),
                b.full(&dlogits),
                b.view(&acts.head.rows_n, rows),
                self.p(lay.lm_head),
                c,
                h,
                v,
            );
        }
        let mut d_rows = b.zeros(r * h)?;
        b.rmsnorm_backward(
            b.full_mut(&mut d_rows),
            self.grad(grads, lay.final_norm),
            b.full(&d_rows_n),
            b.full(&acts.head.rows_x),
            self.p(lay.final_norm),
            h,
            eps,
        );
        let mut dx = b.zeros(m * h)?; // [M, H] gradient of the residual stream
        b.scatter_add_rows(b.full_mut(&mut dx), b.full(&d_rows), &batch.rows, h);

        // Scratch gradients, reused by every layer.
        let mut d_act = b.zeros(m * inter)?;
        let mut d_gate = b.zeros(m * inter)?;
        let mut d_up = b.zeros(m * inter)?;
        let mut d_norm_out = b.zeros(m * h)?; // gradient at a block's RMSNorm output
        let mut d_norm_in = b.zeros(m * h)?; // gradient at a block's RMSNorm input
        let mut d_att = b.zeros(m * q_dim)?;
        let mut dq = b.zeros(m * q_dim)?;
        let mut dk = b.zeros(m * kv_dim)?;
        let mut dv = b.zeros(m * kv_dim)?;
        let cache_len = batch.slots * batch.capacity * kv_dim;
        let mut dcache_k = b.zeros(cache_len)?;
        let mut dcache_v = b.zeros(cache_len)?;
        let place = &batch.place;

        for (l, (lp, a)) in lay.layers.iter().zip(&acts.layers).enumerate().rev() {
            let (x_in, x_mid) = a.residuals()?;
            // MLP block: x_out = x_mid + down(silu(gate(xn2)) · up(xn2)).
            b.fill_zero(b.full_mut(&mut d_act));
            b.matmul_backward(
                Some(b.full_mut(&mut d_act)),
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
                b.full_mut(&mut d_gate),
                b.full_mut(&mut d_up),
                b.full(&d_act),
                b.full(&a.gate),
                b.full(&a.up),
            );
            b.fill_zero(b.full_mut(&mut d_norm_out));
            for (w, bias, dy) in [(lp.gate, lp.gate_bias, &d_gate), (lp.up, lp.up_bias, &d_up)] {
                b.matmul_backward(
                    Some(b.full_mut(&mut d_norm_out)),
                    self.grad(grads, w),
                    b.full(dy),
                    b.full(&a.xn2),
                    self.p(w),
                    m,
                    h,
                    inter,
                );
                if let Some(i) = bias {
                    b.bias_backward(self.grad(grads, i), b.full(dy));
                }
            }
            b.rmsnorm_backward(
                b.full_mut(&mut d_norm_in),
                self.grad(grads, lp.post_norm),
                b.full(&d_norm_out),
                b.full(x_mid),
                self.p(lp.post_norm),
                h,
                eps,
            );
            b.residual_add(b.full_mut(&mut dx), b.full(&d_norm_in));

            // Attention block: x_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
            b.fill_zero(b.full_mut(&mut d_att));
            b.matmul_backward(
                Some(b.full_mut(&mut d_att)),
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
                b.full(&a.lse),
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
            let inv_freq = b.full(&self.inv_freq);
            b.rope_backward(
                b.full_mut(&mut dq),
                &place.positions,
                inv_freq,
                cfg.num_heads,
                hd,
            );
            b.rope_backward(
                b.full_mut(&mut dk),
                &place.positions,
                inv_freq,
                cfg.num_kv_heads,
                hd,
            );
            b.fill_zero(b.full_mut(&mut d_norm_out));
            for (w, bias, dy, n) in [
                (lp.q, lp.q_bias, &dq, q_dim),
                (lp.k, lp.k_bias, &dk, kv_dim),
                (lp.v, lp.v_bias, &dv, kv_dim),
            ] {
                b.matmul_backward(
                    Some(b.full_mut(&mut d_norm_out)),
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
            b.rmsnorm_backward(
                b.full_mut(&mut d_norm_in),
                self.grad(grads, lp.input_norm),
                b.full(&d_norm_out),
                b.full(x_in),
                self.p(lp.input_norm),
                h,
                eps,
            );
            b.residual_add(b.full_mut(&mut dx), b.full(&d_norm_in));
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
}
