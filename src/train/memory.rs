//! What a training run will hold on its device, estimated before anything is allocated, so a
//! model or batch that does not fit ends in a clear error instead of a failed allocation halfway
//! through the first step.

use crate::backend::Backend;
use crate::config::ModelConfig;
use anyhow::{bail, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainMemory {
    /// The weights the model computes with, and the reference policy's copy (β > 0).
    pub weights: usize,
    /// f32 master weights, both AdamW moments and the gradient buffer.
    pub optimizer: usize,
    /// The larger of the rollout (KV cache, logits) and the update (every layer's saved
    /// activations, the KV cache, logits and the backward pass's scratch).
    pub activations: usize,
    pub sequences: usize,
    pub seq_len: usize,
}

impl TrainMemory {
    /// For `sequences` sequences of at most `prompt_len` + `cap` tokens, of which the `cap`
    /// completion tokens are scored (have logits, `head_chunk_bytes` of f32 logits at a time:
    /// `Model::head_chunk_bytes`), activations stored in `storage_bytes` per value; f32 where the
    /// model keeps f32 (log-sum-exp, logits).
    #[allow(clippy::too_many_arguments)]
    pub fn estimate(
        cfg: &ModelConfig,
        storage_bytes: usize,
        sequences: usize,
        prompt_len: usize,
        cap: usize,
        reference: bool,
        head_chunk_bytes: usize,
    ) -> TrainMemory {
        let seq_len = prompt_len + cap;
        let n = crate::params::ParamLayout::new(cfg).total_len();
        let (h, i, v, layers) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.num_layers,
        );
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let tokens = sequences * seq_len;
        let scored = sequences * cap;
        let kv_cache = layers * tokens * 2 * kv * storage_bytes;
        // Rollout: the cache and one row of f32 logits per sequence.
        let rollout = kv_cache + sequences * v * 4;
        // Update: LayerActs per layer (5 of [M, H], q and attention output, k and v, gate, up
        // and act, f32 lse), the head (one chunk of rows' f32 logits and their gradient; for
        // every scored row the normed and unnormed rows and their gradients) and the backward
        // scratch (3 of [M, I], 3 of [M, H], 2 of [M, q], 2 of [M, kv], the cache's gradient).
        let per_layer =
            tokens * ((5 * h + 2 * q + 2 * kv + 3 * i) * storage_bytes + cfg.num_heads * 4);
        let chunk_rows = scored.min((head_chunk_bytes / (4 * v)).max(1));
        let head = chunk_rows * v * (4 + storage_bytes) + scored * 4 * h * storage_bytes;
        let backward = tokens * (3 * i + 3 * h + 2 * q + 2 * kv) * storage_bytes
            + tokens * 2 * kv * storage_bytes;
        let update = layers * per_layer + kv_cache + head + backward;
        TrainMemory {
            weights: n * storage_bytes * if reference { 2 } else { 1 },
            optimizer: n * 4 * 4,
            activations: rollout.max(update),
            sequences,
            seq_len,
        }
    }

    pub fn total(&self) -> usize {
        self.weights + self.optimizer + self.activations
    }

    /// Prints the estimate and fails when the device reports less free memory than it needs.
    pub fn check<B: Backend>(&self, backend: &B) -> Result<()> {
        let free = backend.free_memory()?;
        let gib = |b: usize| b as f64 / GIB;
        eprintln!(
            "memory estimate ({}): weights {:.2} GiB, optimizer {:.2} GiB, activations {:.2} GiB \
             for {} sequences of ≤ {} tokens; total {:.2} GiB{}",
            backend.name(),
            gib(self.weights),
            gib(self.optimizer),
            gib(self.activations),
            self.sequences,
            self.seq_len,
            gib(self.total()),
            free.map_or(String::new(), |f| format!(" of {:.2} GiB free", gib(f))),
        );
        if let Some(free) = free {
            if self.total() > free {
                bail!(
                    "the run needs about {:.2} GiB on the {} device but {:.2} GiB are free: use \
                     fewer sequences per step (prompts_per_step × group_size = {}), a smaller \
                     budget or a smaller model",
                    gib(self.total()),
                    backend.name(),
                    gib(free),
                    self.sequences
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate, counted by hand for a small config: h = 8, I = 16, V = 10, 2 layers,
    /// 2 query heads and 1 KV head of 4 (q = 8, kv = 4), tied head; 3 sequences of 2 prompt and
    /// 3 completion tokens.
    #[test]
    fn estimate_counts_weights_optimizer_and_activations() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let n = crate::params::ParamLayout::new(&cfg).total_len();
        let m = TrainMemory::estimate(&cfg, 2, 3, 2, 3, true, 1 << 30);
        assert_eq!(m.weights, 2 * n * 2);
        assert_eq!(m.optimizer, 16 * n);
        let tokens = 15;
        let kv_cache = 2 * tokens * 2 * 4 * 2; // layers × tokens × (k, v) × kv × bytes
        let per_layer = tokens * ((5 * 8 + 2 * 8 + 2 * 4 + 3 * 16) * 2 + 2 * 4);
        let head = 9 * (10 * (4 + 2) + 4 * 8 * 2); // 9 scored rows
        let backward = tokens * (3 * 16 + 3 * 8 + 2 * 8 + 2 * 4) * 2 + tokens * 2 * 4 * 2;
        assert_eq!(m.activations, 2 * per_layer + kv_cache + head + backward);
        assert_eq!(m.total(), m.weights + m.optimizer + m.activations);
        // Logits 4 rows at a time (160 bytes): the head holds 4 rows of logits, not 9.
        let chunked = TrainMemory::estimate(&cfg, 2, 3, 2, 3, true, 160);
        let head_chunked = 4 * 10 * (4 + 2) + 9 * 4 * 8 * 2;
        assert_eq!(
            chunked.activations,
            2 * per_layer + kv_cache + head_chunked + backward
        );
    }
}
