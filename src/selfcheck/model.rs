//! The whole-model check: a random tiny model with the same bf16 weights on both backends, its
//! log-probs compared and its greedy generation reported.

use super::{max_abs_diff, Checker, Rand, TOL_MODEL};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::generate::{generate, GenerateConfig, GenerationRequest};
use crate::model::Model;
use crate::params::ParamLayout;
use crate::rng::Philox;
use crate::sampling::SamplingParams;
use crate::score::{completion_logprobs, ScoreItem};
use anyhow::Result;

/// The tiny model of the whole-model check: Qwen2 with GQA 4:1, qkv bias, an untied LM head.
pub(super) const TINY_MODEL: &str = r#"{"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128,
    "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "tie_word_embeddings": false}"#;

/// Random weights scaled so the model is far from uniform (logits of std ~2.5, as a trained
/// model's), rounded to bf16 so both backends hold exactly the same values: embeddings std 1,
/// each projection std 1/√fan_in, the LM head 2.5/√hidden, biases std 0.1, norms 1 ± 0.1.
pub(super) fn tiny_model_weights(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut rand = Rand(Philox::new(seed, u64::MAX));
    let mut host = vec![0.0f32; layout.total_len()];
    for spec in &layout.specs {
        let n = spec.len();
        let values = if spec.name.ends_with("norm.weight") {
            rand.normal(n, 0.1).iter().map(|d| 1.0 + d).collect()
        } else if spec.name.ends_with(".bias") {
            rand.normal(n, 0.1)
        } else if spec.name == "model.embed_tokens.weight" {
            rand.normal(n, 1.0)
        } else if spec.name == "lm_head.weight" {
            rand.normal(n, 2.5 / (cfg.hidden_size as f32).sqrt())
        } else {
            rand.normal(n, 1.0 / (spec.shape[1] as f32).sqrt())
        };
        host[spec.range()].copy_from_slice(&values);
    }
    host.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// The whole-model check of `cfg` (the tiny model, or its Qwen3 variant): log-probs of
/// prompt+completion pairs (one packed prefill) as a row, greedy generation (decode steps) as
/// information.
pub(super) fn model_check<D: Backend>(c: &mut Checker<D>, cfg: ModelConfig) -> Result<Vec<String>> {
    let host = tiny_model_weights(&cfg, c.seed);
    let cpu_model = Model::from_host(cfg.clone(), &host, CpuBackend)?;
    let dev_model = Model::from_host(cfg.clone(), &host, (c.make_device)()?)?;
    let shape = format!(
        "{} layers h={} heads={}/{} V={}{}",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size,
        if cfg.qk_norm {
            format!(", qwen3 q/k norms, head dim {}", cfg.head_dim)
        } else {
            String::new()
        }
    );

    let mut rand = c.rand("model logprobs");
    let items: Vec<ScoreItem> = [(1, 15), (17, 40), (100, 60), (250, 30)]
        .iter()
        .map(|&(p, q)| ScoreItem {
            prompt: rand.ids(p, cfg.vocab_size),
            completion: rand.ids(q, cfg.vocab_size),
        })
        .collect();
    let scored: usize = items.iter().map(|it| it.completion.len()).sum();
    let reference: Vec<f32> = completion_logprobs(&cpu_model, &items, 1.0)?.concat();
    let name = "model logprobs".to_string();
    let row_shape = format!(
        "{shape}; {} pairs, {scored} tokens, max |Δ log p|",
        items.len()
    );
    match completion_logprobs(&dev_model, &items, 1.0) {
        Ok(out) => {
            let error = max_abs_diff(&out.concat(), &reference);
            c.push(name, row_shape, "max_abs_nats", error, TOL_MODEL, None);
        }
        Err(e) => {
            let message = Some(format!("{e:#}"));
            c.push(
                name,
                row_shape,
                "max_abs_nats",
                f64::NAN,
                TOL_MODEL,
                message,
            );
        }
    }

    const NEW_TOKENS: usize = 16;
    let requests: Vec<GenerationRequest> = [1, 9, 40]
        .iter()
        .map(|&p| GenerationRequest {
            prompt: rand.ids(p, cfg.vocab_size),
            max_new_tokens: NEW_TOKENS,
        })
        .collect();
    let config = GenerateConfig {
        sampling: SamplingParams::greedy(),
        seed: c.seed,
        first_stream: 0,
        eos_ids: Vec::new(),
        stop_strings: Vec::new(),
        sync_every: None,
        keep_ended_rows: None,
    };
    let want = generate(&cpu_model, &requests, &config, None)?;
    let info = match generate(&dev_model, &requests, &config, None) {
        Ok(got) => {
            let total = requests.len() * NEW_TOKENS;
            let same: usize = got
                .iter()
                .zip(&want)
                .map(|(g, w)| {
                    g.tokens
                        .iter()
                        .zip(&w.tokens)
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .sum();
            format!(
                "greedy generation ({shape}), {} prompts × {NEW_TOKENS} tokens: {same} of {total} \
                 tokens agree before the first difference (information only: bf16 may flip near-ties)",
                requests.len()
            )
        }
        Err(e) => format!("greedy generation failed on the device: {e:#}"),
    };
    Ok(vec![info])
}
