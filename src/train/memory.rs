//! What a training run will hold on its device, estimated before anything is allocated, so a
//! model or batch that does not fit ends in a clear error instead of a failed allocation halfway
//! through the first step.

use crate::config::ModelConfig;
use anyhow::{bail, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// The shapes of a run that decide what it holds at once, besides the model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunShape {
    /// Sequences of a step (P × G): the rollout holds all of them.
    pub sequences: usize,
    /// Distinct prompts among them (P), each prefilled once (0: every sequence its own).
    pub prompts: usize,
    /// Sequences per forward and backward pass of the update (0: all of them).
    pub micro_batch: usize,
    /// The longest prompt, in tokens.
    pub prompt_len: usize,
    /// The generation cap: new tokens per sequence, every one scored by the update.
    pub cap: usize,
    /// Held-out evaluation: sequences decoded at once (0: no evaluation) and their cap.
    pub eval_sequences: usize,
    pub eval_cap: usize,
    /// A reference policy's weights are kept (β > 0).
    pub reference: bool,
    /// The master weights and moments are in host memory (`optim.offload`).
    pub offload: bool,
    /// Activation checkpointing (`Model::checkpoint_layers`): each layer keeps its input only.
    pub checkpoint_layers: bool,
}

/// Bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainMemory {
    /// The weights the model computes with, and the reference policy's copy (β > 0).
    pub weights: usize,
    /// On the device: the f32 gradient buffer, and the f32 master weights and both AdamW
    /// moments unless offloaded.
    pub optimizer: usize,
    /// In host memory: the offloaded master weights and moments (0 without offload).
    pub host: usize,
    /// The rollout of all sequences: KV cache, logits, the prefill's pass over the prompts.
    pub rollout: usize,
    /// One micro-batch's pass of the update: every layer's saved activations, the KV cache,
    /// logits and the backward pass's scratch.
    pub update: usize,
    /// The held-out evaluation's greedy decoding: KV cache, logits, the prefill's pass (0
    /// without evaluation).
    pub eval: usize,
    pub sequences: usize,
    /// Sequences per forward and backward pass of the update.
    pub micro_batch: usize,
    pub seq_len: usize,
}

impl TrainMemory {
    /// For `shape`, with activations stored in `storage_bytes` per value (f32 where the model
    /// keeps f32: log-sum-exp, logits) and the head's logits made `head_chunk_bytes` of f32 at a
    /// time (`Model::head_chunk_bytes`).
    pub fn estimate(
        cfg: &ModelConfig,
        storage_bytes: usize,
        head_chunk_bytes: usize,
        shape: &RunShape,
    ) -> TrainMemory {
        // In u128, so that absurd sizes (a batch of 2^60) come out huge instead of wrapping
        // around to a size that fits; each total is then capped at usize::MAX.
        let wide = |x: usize| x as u128;
        let sequences = wide(shape.sequences);
        let micro_batch = if shape.micro_batch == 0 {
            sequences
        } else {
            wide(shape.micro_batch).min(sequences)
        };
        let (prompt_len, cap) = (wide(shape.prompt_len), wide(shape.cap));
        let seq_len = prompt_len + cap;
        let n = wide(crate::params::ParamLayout::new(cfg).total_len());
        let (h, i, v, layers) = (
            wide(cfg.hidden_size),
            wide(cfg.intermediate_size),
            wide(cfg.vocab_size),
            wide(cfg.num_layers),
        );
        let (q, kv) = (wide(cfg.q_dim()), wide(cfg.kv_dim()));
        let (storage_bytes, head_chunk_bytes) = (wide(storage_bytes), wide(head_chunk_bytes));
        let kv_cache = |tokens: u128| layers * tokens * 2 * kv * storage_bytes;
        // the projections' product, a scratch the layers share; qk_norm keeps q and k before their
        // norms, and has k's gradient there; without it the backward has the product's gradient
        let qkv = q + 2 * kv;
        let (raw_qk, d_projections) = if cfg.qk_norm { (q + kv, kv) } else { (0, qkv) };
        // Decoding (the rollout, the evaluation): the cache and one row of f32 logits per
        // sequence, and the prefill's forward pass over the distinct prompts, whose layers share
        // one set of intermediates (the residual stream, its norms, the projections' product,
        // q, k, v, the attention output and projection, gate and up's product (2 I) and act)
        // besides the normed rows of the head.
        let decode = |seqs: u128, prompts: u128, len: u128| {
            let prefill_tokens = prompts * prompt_len;
            let prefill = prefill_tokens * (4 * h + qkv + 2 * q + 2 * kv + 3 * i) * storage_bytes
                + seqs * 2 * h * storage_bytes;
            kv_cache(seqs * len) + seqs * v * 4 + prefill
        };
        let prompts = match shape.prompts {
            0 => sequences,
            p => wide(p).min(sequences),
        };
        let rollout = decode(sequences, prompts, seq_len);
        let eval = if shape.eval_sequences == 0 {
            0
        } else {
            let eval_seqs = wide(shape.eval_sequences);
            decode(eval_seqs, eval_seqs, prompt_len + wide(shape.eval_cap))
        };
        // Update, per micro-batch: LayerActs per layer (5 of [M, H], q and attention output, k
        // and v, gate and up's product [M, 2 I] and act, f32 lse), the head (one chunk of rows'
        // f32 logits and their gradient; for every scored row the normed and unnormed rows and
        // their gradients) and the backward scratch (the gradients of act and of gate and up's
        // product: 3 of [M, I]; 3 of [M, H], 2 of [M, q], 2 of [M, kv], the cache's
        // gradient, and the gradient of the projections' product or, with qk_norm, of k before
        // its norm), and the projections' product the layers share (the forward's, or the
        // recompute's beside the backward with checkpointed layers: counted once either way).
        // qk_norm keeps q and k before their norms too.
        let tokens = micro_batch * seq_len;
        let scored = micro_batch * cap;
        let per_layer = tokens
            * ((5 * h + 2 * q + 2 * kv + 3 * i + raw_qk) * storage_bytes + wide(cfg.num_heads) * 4);
        let chunk_rows = scored.min((head_chunk_bytes / (4 * v)).max(1));
        let head = chunk_rows * v * (4 + storage_bytes) + scored * 4 * h * storage_bytes;
        let backward = tokens * (3 * i + 3 * h + 2 * q + 2 * kv + d_projections) * storage_bytes
            + tokens * 2 * kv * storage_bytes;
        // Checkpointed: each layer's input, one layer's intermediates at a time (in the forward,
        // and recomputed in the backward) without the two residual streams, and the residual
        // stream the recomputation runs on.
        let layer_acts = if shape.checkpoint_layers {
            layers * tokens * h * storage_bytes + per_layer - tokens * h * storage_bytes
        } else {
            layers * per_layer
        };
        let update = layer_acts + kv_cache(tokens) + head + backward + tokens * qkv * storage_bytes;
        let capped = |x: u128| x.min(usize::MAX as u128) as usize;
        TrainMemory {
            weights: capped(n * storage_bytes * if shape.reference { 2 } else { 1 }),
            optimizer: capped(if shape.offload { n * 4 } else { n * 4 * 4 }),
            host: capped(if shape.offload { n * 4 * 3 } else { 0 }),
            rollout: capped(rollout),
            update: capped(update),
            eval: capped(eval),
            sequences: shape.sequences,
            micro_batch: capped(micro_batch),
            seq_len: capped(seq_len),
        }
    }

    /// The activations: the largest of the rollout, a pass of the update and the evaluation
    /// (one at a time).
    pub fn activations(&self) -> usize {
        self.rollout.max(self.update).max(self.eval)
    }

    pub fn total(&self) -> usize {
        self.weights
            .saturating_add(self.optimizer)
            .saturating_add(self.activations())
    }

    /// Prints the estimate and fails when the device (`device` names it) reports less free
    /// memory than it needs.
    pub fn check(&self, device: &str, free: Option<usize>) -> Result<()> {
        let gib = |b: usize| b as f64 / GIB;
        let host = if self.host > 0 {
            format!(
                "; {:.2} GiB in host memory (the offloaded optimizer)",
                gib(self.host)
            )
        } else {
            String::new()
        };
        eprintln!(
            "memory estimate ({device}): weights {:.2} GiB, optimizer {:.2} GiB, activations \
             {:.2} GiB (rollout {:.2}, update pass {:.2}, evaluation {:.2}) for {} sequences of \
             ≤ {} tokens, updated {} at a time; total {:.2} GiB{}{host}",
            gib(self.weights),
            gib(self.optimizer),
            gib(self.activations()),
            gib(self.rollout),
            gib(self.update),
            gib(self.eval),
            self.sequences,
            self.seq_len,
            self.micro_batch,
            gib(self.total()),
            free.map_or(String::new(), |f| format!(" of {:.2} GiB free", gib(f))),
        );
        if let Some(free) = free {
            if self.total() > free {
                let offload = if self.host == 0 {
                    format!(
                        "the optimizer in host memory (optim.offload = true: {:.2} GiB less), ",
                        gib(self.optimizer * 3 / 4)
                    )
                } else {
                    String::new()
                };
                bail!(
                    "the run needs about {:.2} GiB on the {device} device but {:.2} GiB are \
                     free: use a smaller micro_batch (now {} sequences per pass of the \
                     update), {offload}fewer sequences per step (prompts_per_step × group_size \
                     = {}), a smaller budget or a smaller model",
                    gib(self.total()),
                    gib(free),
                    self.micro_batch,
                    self.sequences
                );
            }
        }
        Ok(())
    }

    /// Fails when the offloaded optimizer state needs more host memory than `available` (bytes;
    /// None: unknown, nothing to check), before anything is loaded.
    pub fn check_host(&self, available: Option<usize>) -> Result<()> {
        if let Some(available) = available.filter(|&a| self.host > a) {
            bail!(
                "the offloaded optimizer needs about {:.2} GiB of host memory (f32 master weights \
                 and both moments) but {:.2} GiB are available: use a host with more memory, or \
                 keep the optimizer on the device (optim.offload = false) with a smaller model",
                self.host as f64 / GIB,
                available as f64 / GIB
            );
        }
        Ok(())
    }
}

impl TrainMemory {
    /// On the CPU backend everything is host memory: the whole estimate must fit what is
    /// available.
    pub fn check_cpu(&self, available: Option<usize>) -> Result<()> {
        if let Some(available) = available.filter(|&a| self.total() > a) {
            bail!(
                "the run needs about {:.2} GiB of memory but the host has {:.2} GiB available: \
                 fewer prompts_per_step or group_size, a smaller micro_batch, shorter \
                 completions or a smaller model",
                self.total() as f64 / GIB,
                available as f64 / GIB
            );
        }
        Ok(())
    }
}

/// The host memory available to a new allocation, in bytes: `MemAvailable` of /proc/meminfo
/// (Linux); None where that cannot be read.
pub fn host_available() -> Option<usize> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable:   N kB` of a /proc/meminfo text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kb: usize = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// The micro-batch of a run of `sequences` sequences per step: `requested` when set (at most
/// `sequences`). With 0: all of them where the device reports no free memory (`room` None: the
/// CPU), else the fewest passes whose micro-batch `estimate` fits in `room` bytes, filled evenly (128
/// sequences of which 101 fit run as 2 × 64, not 101 + 27: the same passes with more room to
/// spare), and 1 when none fits (the check then fails with the smallest need).
pub fn micro_batch(
    requested: usize,
    sequences: usize,
    room: Option<usize>,
    estimate: impl Fn(usize) -> TrainMemory,
) -> usize {
    if requested > 0 {
        return requested.min(sequences.max(1));
    }
    let Some(room) = room else {
        return sequences.max(1);
    };
    // The estimate grows with the micro-batch: the largest that fits, by bisection.
    let (mut fits, mut too_big) = (1, sequences.max(1) + 1);
    if estimate(1).total() > room {
        return 1;
    }
    while too_big - fits > 1 {
        let mid = (fits + too_big) / 2;
        if estimate(mid).total() <= room {
            fits = mid;
        } else {
            too_big = mid;
        }
    }
    let passes = sequences.div_ceil(fits).max(1);
    sequences.div_ceil(passes).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's shape without evaluation.
    fn shape(
        sequences: usize,
        micro_batch: usize,
        prompt_len: usize,
        cap: usize,
        reference: bool,
        offload: bool,
    ) -> RunShape {
        RunShape {
            sequences,
            micro_batch,
            prompt_len,
            cap,
            reference,
            offload,
            ..RunShape::default()
        }
    }

    /// Sizes far past any memory come out far past it, never wrapped around to a small number
    /// (2^62 sequences made every activation term a multiple of 2^64: 0 bytes).
    #[test]
    fn absurd_sizes_saturate_instead_of_wrapping() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1}"#,
        )
        .unwrap();
        for sequences in [1 << 62, 1 << 63, usize::MAX] {
            let m =
                TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(sequences, 0, 2, 3, true, false));
            assert_eq!(m.total(), usize::MAX, "{sequences} sequences");
        }
    }

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
        let m = TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(3, 0, 2, 3, true, false));
        assert_eq!(m.weights, 2 * n * 2);
        assert_eq!(m.optimizer, 16 * n);
        let tokens = 15;
        let kv_cache = 2 * tokens * 2 * 4 * 2; // layers × tokens × (k, v) × kv × bytes
        let per_layer = tokens * ((5 * 8 + 2 * 8 + 2 * 4 + 3 * 16) * 2 + 2 * 4);
        let head = 9 * (10 * (4 + 2) + 4 * 8 * 2); // 9 scored rows
        let backward = tokens * (3 * 16 + 3 * 8 + 2 * 8 + 2 * 4 + 16) * 2 + tokens * 2 * 4 * 2;
        let qkv = tokens * (8 + 2 * 4) * 2; // the projections' product, shared by the layers
        assert_eq!(m.update, 2 * per_layer + kv_cache + head + backward + qkv);
        // the prefill of 3 prompts of 2 tokens: one layer's intermediates (with the projections'
        // product), then 3 head rows
        let prefill = 6 * (4 * 8 + 16 + 2 * 8 + 2 * 4 + 3 * 16) * 2 + 3 * 2 * 8 * 2;
        assert_eq!(m.rollout, kv_cache + 3 * 10 * 4 + prefill);
        assert_eq!(m.total(), m.weights + m.optimizer + m.update);
        // Logits 4 rows at a time (160 bytes): the head holds 4 rows of logits, not 9.
        let chunked = TrainMemory::estimate(&cfg, 2, 160, &shape(3, 3, 2, 3, true, false));
        let head_chunked = 4 * 10 * (4 + 2) + 9 * 4 * 8 * 2;
        assert_eq!(
            chunked.update,
            2 * per_layer + kv_cache + head_chunked + backward + qkv
        );
    }

    fn small_config() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": true}"#,
        )
        .unwrap()
    }

    /// With micro-batches the update holds one micro-batch's activations and the rollout still
    /// holds every sequence's cache: 6 sequences of 2 + 3 tokens (the config above), updated 2 at
    /// a time; the larger of the two is what the run holds.
    #[test]
    fn estimate_counts_one_micro_batch_of_the_update() {
        let cfg = small_config();
        let m = TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 2, 2, 3, false, false));
        let whole_of_two =
            TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(2, 0, 2, 3, false, false));
        // cache of 30 tokens, one logits row each, the prefill of 6 prompts of 2 tokens
        let prefill = 12 * (4 * 8 + 16 + 2 * 8 + 2 * 4 + 3 * 16) * 2 + 6 * 2 * 8 * 2;
        let rollout = 2 * 30 * 2 * 4 * 2 + 6 * 10 * 4 + prefill;
        assert_eq!(m.micro_batch, 2);
        assert_eq!((m.update, m.rollout), (whole_of_two.update, rollout));
        assert_eq!(m.activations(), m.update.max(rollout));
        assert!(
            m.update
                < TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 0, 2, 3, false, false)).update
        );
        // A micro-batch larger than the step is the step.
        assert_eq!(
            TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 9, 2, 3, false, false)).micro_batch,
            6
        );
    }

    /// The chosen micro-batch: the fewest passes that fit the room, filled evenly.
    #[test]
    fn micro_batch_takes_the_fewest_passes_that_fit() {
        let cfg = small_config();
        let estimate = |micro| {
            TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(100, micro, 20, 30, true, false))
        };
        let need = |micro| estimate(micro).total();
        assert!(
            need(33) < need(34),
            "the update, not the rollout, sets the need here"
        );
        // 34 fit: 3 passes of 34, 33 and 33; 33 fit: 4 passes of 25.
        assert_eq!(micro_batch(0, 100, Some(need(34)), estimate), 34);
        assert_eq!(micro_batch(0, 100, Some(need(49)), estimate), 34);
        assert_eq!(micro_batch(0, 100, Some(need(34) - 1), estimate), 25);
        assert_eq!(micro_batch(0, 100, Some(need(50)), estimate), 50);
        assert_eq!(micro_batch(0, 100, Some(need(100) - 1), estimate), 50);
        assert_eq!(micro_batch(0, 100, Some(need(100)), estimate), 100);
        assert_eq!(micro_batch(0, 100, Some(usize::MAX), estimate), 100);
        // None fits: the smallest, for the check to report; no free memory known: all at once.
        assert_eq!(micro_batch(0, 100, Some(need(1) - 1), estimate), 1);
        assert_eq!(micro_batch(0, 100, None, estimate), 100);
        // Asked for: kept, up to the step's sequences.
        assert_eq!(micro_batch(8, 100, Some(0), estimate), 8);
        assert_eq!(micro_batch(500, 100, None, estimate), 100);
    }

    /// Not enough free memory is an error that names the micro-batch and the sequences, and
    /// offloading the optimizer when it is not offloaded yet.
    #[test]
    fn check_fails_when_the_estimate_exceeds_the_free_memory() {
        let m = TrainMemory::estimate(
            &small_config(),
            2,
            1 << 30,
            &shape(6, 2, 2, 3, false, false),
        );
        assert!(m.check("test", Some(m.total())).is_ok());
        assert!(m.check("test", None).is_ok());
        let err = m
            .check("test", Some(m.total() - 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("micro_batch (now 2") && err.contains("= 6)"),
            "{err}"
        );
        assert!(err.contains("optim.offload = true"), "{err}");
        let offloaded =
            TrainMemory::estimate(&small_config(), 2, 1 << 30, &shape(6, 2, 2, 3, false, true));
        let err = offloaded
            .check("test", Some(offloaded.total() - 1))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("offload"), "{err}");
    }

    /// Offloading moves the master weights and both moments (12 bytes per parameter) from the
    /// device to the host; the gradient buffer (4 bytes) stays.
    #[test]
    fn offload_moves_twelve_bytes_per_parameter_to_the_host() {
        let cfg = small_config();
        let n = crate::params::ParamLayout::new(&cfg).total_len();
        let on = TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 2, 2, 3, false, false));
        let off = TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 2, 2, 3, false, true));
        assert_eq!((on.optimizer, on.host), (16 * n, 0));
        assert_eq!((off.optimizer, off.host), (4 * n, 12 * n));
        assert_eq!(on.total() - off.total(), 12 * n);
    }

    /// The held-out evaluation decodes its sequences at once: its cache and logits rows count
    /// when they are the largest activations (more sequences or a longer cap than the rollout).
    #[test]
    fn estimate_counts_the_evaluation_decode() {
        let cfg = small_config();
        let mut s = shape(6, 2, 2, 3, false, false);
        let without = TrainMemory::estimate(&cfg, 2, 1 << 30, &s);
        assert_eq!(without.eval, 0);
        s.eval_sequences = 50;
        s.eval_cap = 40;
        let with = TrainMemory::estimate(&cfg, 2, 1 << 30, &s);
        // cache of 50 × 42 tokens, 50 logit rows, the prefill of 50 prompts of 2 tokens
        let prefill = 100 * (4 * 8 + 16 + 2 * 8 + 2 * 4 + 3 * 16) * 2 + 50 * 2 * 8 * 2;
        let eval = 2 * 50 * 42 * 2 * 4 * 2 + 50 * 10 * 4 + prefill;
        assert_eq!(with.eval, eval);
        assert!(eval > without.activations());
        assert_eq!(with.activations(), eval);
        assert_eq!(with.total() - without.total(), eval - without.activations());
    }

    /// The host check reads /proc/meminfo's MemAvailable and fails an offloaded run that needs
    /// more; a run without offload, or an unknown amount, passes.
    #[test]
    fn host_check_compares_the_offloaded_state_with_available_memory() {
        let meminfo =
            "MemTotal:       32768000 kB\nMemFree:  100 kB\nMemAvailable:   24285620 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(24285620 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        let cfg = small_config();
        let n = crate::params::ParamLayout::new(&cfg).total_len();
        let off = TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 2, 2, 3, false, true));
        assert!(off.check_host(Some(12 * n)).is_ok());
        assert!(off.check_host(None).is_ok());
        let err = off.check_host(Some(12 * n - 1)).unwrap_err().to_string();
        assert!(
            err.contains("host memory") && err.contains("optim.offload"),
            "{err}"
        );
        let on = TrainMemory::estimate(&cfg, 2, 1 << 30, &shape(6, 2, 2, 3, false, false));
        assert!(on.check_host(Some(0)).is_ok());
    }
}
