//! Rollouts: G sampled completions for each prompt of a step, under the step's budget cap.

use crate::backend::Backend;
use crate::generate::{generate, GenerateConfig, GenerationRequest};
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use anyhow::Result;

/// One sampled completion of one prompt.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of the prompt within the step's batch (completions of one prompt form a group).
    pub group: usize,
    pub prompt_ids: Vec<u32>,
    /// Sampled tokens, a final EOS included.
    pub completion_ids: Vec<u32>,
    /// The sampler's log-probability of each sampled token (at the sampling temperature).
    pub logprobs: Vec<f32>,
    /// Decoded completion without special tokens.
    pub text: String,
    /// ℓ: generated tokens without the EOS.
    pub len: usize,
    pub truncated: bool,
}

/// How the completions of a step are sampled.
#[derive(Debug, Clone, Copy)]
pub struct RolloutSettings<'a> {
    /// Completions per prompt (G).
    pub group_size: usize,
    /// The most new tokens of a completion (the budget cap).
    pub cap: usize,
    pub sampling: SamplingParams,
    /// Texts that end a completion besides EOS; the completion keeps the tokens that wrote them.
    pub stop: &'a [String],
}

/// Samples `group_size` completions for every prompt; RNG streams are unique per
/// (step, completion) so a resumed run draws the same numbers as an uninterrupted one.
pub fn sample_groups<B: Backend>(
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    settings: &RolloutSettings,
    seed: u64,
    step: u64,
) -> Result<Vec<Rollout>> {
    let group_size = settings.group_size;
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .flat_map(|p| {
            std::iter::repeat_n(
                GenerationRequest {
                    prompt: p.clone(),
                    max_new_tokens: settings.cap,
                },
                group_size,
            )
        })
        .collect();
    let config = GenerateConfig {
        sampling: settings.sampling,
        seed,
        first_stream: step * requests.len() as u64,
        eos_ids: tok.eos_token_ids().to_vec(),
        stop_strings: settings.stop.to_vec(),
        sync_every: None,
        keep_ended_rows: None,
    };
    // the text the rewards read (special tokens left out)
    let detokenize = |ids: &[u32]| tok.decode(ids, true);
    let completions = generate(model, &requests, &config, Some(&detokenize))?;
    completions
        .into_iter()
        .zip(requests)
        .enumerate()
        .map(|(i, (c, r))| {
            Ok(Rollout {
                group: i / group_size,
                text: tok.decode(&c.tokens, true)?,
                prompt_ids: r.prompt,
                len: c.len,
                truncated: c.truncated,
                completion_ids: c.tokens,
                logprobs: c.logprobs,
            })
        })
        .collect()
}
