//! Recorded decode steps (CUDA graphs) against the same steps run op by op, on the device, in
//! three batches:
//! - the tiny selfcheck model (head dim 16: the fp32 decode kernel), four sequences whose caps
//!   end at different steps, so the batch changes rows, drops its recording and records again;
//! - a head-dim-64 model (the tensor-core decode kernel) whose 1100-token prompt makes the cache
//!   capacity large enough for split decode attention (its scratch inside the recording), and
//!   whose last sequence is recorded alone in slot 3 at position 3, the same values as its slots
//!   (a recording's positions must not be confused with another index array);
//! - a GRPO group: 8 samples of one prompt (prefilled once, its cache copied) that mostly end at
//!   an EOS on the way, their rows kept in the batch while half of it is live.
//!
//! Both runs launch the same kernels on the same values, so the tokens must be identical and the
//! log-probs equal to within float noise (TOL_F32: only a GEMM picking another algorithm under
//! capture could move them at all). A replay at the wrong positions, or reading a stale input,
//! changes the logits by order 1 and, under sampling at temperature 1, the tokens with them. The
//! check fails outright when the device records nothing or never replays a recording.

use super::{rel_error, tiny_model_weights, Checker, TOL_EXACT, TOL_F32};
use crate::backend::{Backend, DecodeGraphStats};
use crate::config::ModelConfig;
use crate::generate::{generate, Completion, GenerateConfig, GenerationRequest};
use crate::model::Model;
use crate::sampling::SamplingParams;
use anyhow::{bail, Result};

/// The second batch's model: the selfcheck model with 2 query heads of 64 over 1 KV head.
const HEAD_DIM_64_MODEL: &str = r#"{"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128,
    "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "tie_word_embeddings": false}"#;

/// One batch: the model, (prompt length, cap) per sequence, host syncs every `sync_every` steps;
/// with `group`, every sequence has the same prompt (a GRPO group: one prefill, copied), and
/// token ids below `eos` end a sequence (kept in the batch while half of it is live, in both
/// runs, so both have the same rows).
struct Batch {
    name: &'static str,
    model: &'static str,
    requests: &'static [(usize, usize)],
    sync_every: usize,
    group: bool,
    eos: u32,
}

const BATCHES: [Batch; 3] = [
    // the 12-token cap leaves at step 12, the 21-token one at 21; windows end mid-recording
    Batch {
        name: "head dim 16",
        model: super::TINY_MODEL,
        requests: &[(1, 30), (9, 21), (40, 12), (17, 30)],
        sync_every: 4,
        group: false,
        eos: 0,
    },
    // after the first step only slot 3 runs: op by op at position 2, recorded at position 3
    Batch {
        name: "head dim 64, split keys",
        model: HEAD_DIM_64_MODEL,
        requests: &[(1100, 1), (5, 1), (9, 1), (2, 24)],
        sync_every: 8,
        group: false,
        eos: 0,
    },
    // 8 samples of one prompt; 3 % of the vocabulary ends a sequence, so most end on the way
    Batch {
        name: "GRPO group with EOS",
        model: super::TINY_MODEL,
        requests: &[(20, 40); 8],
        sync_every: 4,
        group: true,
        eos: 30,
    },
];

/// Adds the rows (tokens, log-probs) of each batch; returns information lines with the step
/// counts.
pub(super) fn decode_graph_check<D: Backend>(c: &mut Checker<D>) -> Result<Vec<String>> {
    let mut info = Vec::new();
    for batch in &BATCHES {
        info.extend(check_batch(c, batch)?);
    }
    Ok(info)
}

fn check_batch<D: Backend>(c: &mut Checker<D>, batch: &Batch) -> Result<Option<String>> {
    let cfg = ModelConfig::from_json_str(batch.model)?;
    let host = tiny_model_weights(&cfg, c.seed);
    let mut rand = c.rand(&format!("decode graph {}", batch.name));
    let shared = rand.ids(batch.requests[0].0, cfg.vocab_size);
    let requests: Vec<GenerationRequest> = batch
        .requests
        .iter()
        .map(|&(p, cap)| GenerationRequest {
            prompt: if batch.group {
                shared.clone()
            } else {
                rand.ids(p, cfg.vocab_size)
            },
            max_new_tokens: cap,
        })
        .collect();
    let config = GenerateConfig {
        sampling: SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        },
        seed: c.seed,
        first_stream: 0,
        eos_ids: (0..batch.eos).collect(),
        stop_strings: Vec::new(),
        sync_every: Some(batch.sync_every),
        keep_ended_rows: (batch.eos > 0).then_some(true),
    };
    let shape = format!(
        "{}: (prompt, cap) {:?}, sync every {}",
        batch.name, batch.requests, batch.sync_every
    );
    let model = Model::from_host(cfg, &host, (c.make_device)()?)?;
    let (outcome, info) = match both_ways(&model, &requests, &config) {
        Ok((got, want, counts)) => {
            let outcome = [
                rel_error(&token_values(&got), &token_values(&want)),
                rel_error(&logprobs(&got), &logprobs(&want)),
            ];
            let info = counts.map(|c| {
                format!(
                    "decode graph ({shape}): {} steps recorded, {} replayed, {} op by op",
                    c.captured, c.replayed, c.eager
                )
            });
            (Ok(outcome), info)
        }
        Err(e) => (Err(format!("{e:#}")), None),
    };
    let rows = [("tokens", TOL_EXACT), ("logprobs", TOL_F32)];
    for (i, (suffix, tolerance)) in rows.into_iter().enumerate() {
        let op = format!("decode_graph/{suffix}");
        match &outcome {
            Ok(errors) => c.push(op, shape.clone(), "rel", errors[i], tolerance, None),
            Err(message) => c.push(
                op,
                shape.clone(),
                "rel",
                f64::NAN,
                tolerance,
                Some(message.clone()),
            ),
        }
    }
    Ok(info)
}

/// Generates with recording off, then on: (with, without, the steps of the second run where the
/// backend records), leaving the setting as it was. An error when the backend records but never
/// replayed a step.
fn both_ways<D: Backend>(
    model: &Model<D>,
    requests: &[GenerationRequest],
    config: &GenerateConfig,
) -> Result<(Vec<Completion>, Vec<Completion>, Option<DecodeGraphStats>)> {
    let dev = &model.backend;
    let setting = dev.set_decode_graphs(false);
    let without = generate(model, requests, config, None);
    dev.set_decode_graphs(true);
    let before = dev.decode_graph_stats();
    let with = generate(model, requests, config, None);
    let after = dev.decode_graph_stats();
    dev.set_decode_graphs(setting);
    let (without, with) = (without?, with?);
    let counts = match (before, after) {
        (Some(before), Some(after)) => {
            let replayed = after.replayed - before.replayed;
            let captured = after.captured - before.captured;
            if replayed == 0 {
                bail!(
                    "no decode step was replayed ({captured} recorded): {}",
                    after.fallback.as_deref().unwrap_or("no step was recorded")
                );
            }
            Some(DecodeGraphStats {
                eager: after.eager - before.eager,
                captured,
                replayed,
                fallback: after.fallback,
            })
        }
        _ => None,
    };
    Ok((with, without, counts))
}

/// Every sampled id, then each sequence's length and flags, as floats (a different stop shows).
fn token_values(completions: &[Completion]) -> Vec<f32> {
    let mut v: Vec<f32> = completions
        .iter()
        .flat_map(|c| c.tokens.iter().map(|&t| t as f32))
        .collect();
    for c in completions {
        v.extend([
            c.len as f32,
            c.finished as u8 as f32,
            c.truncated as u8 as f32,
        ]);
    }
    v
}

fn logprobs(completions: &[Completion]) -> Vec<f32> {
    completions
        .iter()
        .flat_map(|c| c.logprobs.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_values_show_ids_lengths_and_flags() {
        let c = Completion {
            tokens: vec![5, 7],
            logprobs: vec![-1.0, -2.0],
            len: 1,
            finished: true,
            truncated: false,
        };
        assert_eq!(token_values(&[c]), vec![5.0, 7.0, 1.0, 1.0, 0.0]);
    }
}
