//! The held-out evaluation of a training run: greedy decoding of its problems at a budget,
//! judged by the answer verifier.

use super::metrics::mean;
use super::{render_prompts, TrainInputs};
use crate::backend::Backend;
use crate::model::Model;
use crate::rollout::{sample_groups, Rollout, RolloutSettings};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Accuracy and mean generated length of greedy decoding on a set of problems.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub accuracy: f64,
    pub mean_len: f64,
    pub truncated_frac: f64,
}

/// A held-out evaluation: the summary, and each problem's response with its verdict.
pub struct Evaluation {
    pub result: EvalResult,
    pub responses: Vec<(Rollout, bool)>,
}

/// Greedy decoding of the held-out problems at `budget` with cap `max_tokens`, ending at EOS or
/// a `stop` string, `batch` problems at a time (so the evaluation needs no more memory than a
/// rollout of that many sequences): accuracy and lengths.
pub fn evaluate<B: Backend>(
    model: &Model<B>,
    tok: &Tokenizer,
    inputs: &TrainInputs,
    budget: usize,
    max_tokens: usize,
    stop: &[String],
    batch: usize,
) -> Result<Evaluation> {
    let examples = &inputs.eval;
    let prompts = render_prompts(tok, &inputs.template, examples, budget)?;
    let settings = RolloutSettings {
        group_size: 1,
        cap: max_tokens,
        sampling: SamplingParams::greedy(),
        stop,
    };
    let batch = batch.max(1);
    let mut rollouts = Vec::with_capacity(prompts.len());
    for (i, chunk) in prompts.chunks(batch).enumerate() {
        let done = sample_groups(model, tok, chunk, &settings, 0, 0)?;
        // groups numbered within the chunk: renumber them within all problems
        rollouts.extend(done.into_iter().map(|r| Rollout {
            group: r.group + i * batch,
            ..r
        }));
    }
    let correct: Vec<bool> = rollouts
        .par_iter()
        .map(|r| (inputs.is_correct)(&r.text, &examples[r.group].gold))
        .collect();
    let result = EvalResult {
        accuracy: mean(&correct.iter().map(|&c| c as u8 as f64).collect::<Vec<_>>()),
        mean_len: mean(&rollouts.iter().map(|r| r.len as f64).collect::<Vec<_>>()),
        truncated_frac: mean(
            &rollouts
                .iter()
                .map(|r| r.truncated as u8 as f64)
                .collect::<Vec<_>>(),
        ),
    };
    Ok(Evaluation {
        result,
        responses: rollouts.into_iter().zip(correct).collect(),
    })
}
