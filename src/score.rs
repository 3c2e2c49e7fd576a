//! Log-probabilities of given completions under the model (the `logprobs` command, and later the
//! old/reference log-probs of GRPO).

use crate::backend::{Backend, TokenPlacement};
use crate::model::{KvCache, Model};
use crate::sampling::token_logprob;
use anyhow::{bail, Result};

/// A prompt and the completion to score after it.
#[derive(Debug, Clone)]
pub struct ScoreItem {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// At most this many tokens go through one forward pass (bounds the logits buffer).
const TOKENS_PER_FORWARD: usize = 4096;

/// For each item: log p(completion[i] | prompt, completion[..i]) of softmax(logits / τ).
pub fn completion_logprobs<B: Backend>(
    model: &Model<B>,
    items: &[ScoreItem],
    temperature: f32,
) -> Result<Vec<Vec<f32>>> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("log-probs need a finite temperature > 0, got {temperature}");
    }
    for (i, it) in items.iter().enumerate() {
        if it.prompt.is_empty() {
            bail!("item {i}: the prompt is empty; at least one prompt token is needed to score a completion");
        }
    }
    let mut out = Vec::with_capacity(items.len());
    let mut start = 0;
    while start < items.len() {
        // Greedily pack items into one ragged batch.
        let mut end = start;
        let mut total = 0;
        while end < items.len()
            && (end == start || total + seq_len(&items[end]) <= TOKENS_PER_FORWARD)
        {
            total += seq_len(&items[end]);
            end += 1;
        }
        out.extend(score_batch(model, &items[start..end], temperature)?);
        start = end;
    }
    Ok(out)
}

fn seq_len(it: &ScoreItem) -> usize {
    it.prompt.len() + it.completion.len()
}

fn score_batch<B: Backend>(
    model: &Model<B>,
    items: &[ScoreItem],
    temperature: f32,
) -> Result<Vec<Vec<f32>>> {
    let b = &model.backend;
    let capacity = items.iter().map(seq_len).max().unwrap_or(0);
    let mut cache = KvCache::new(b, &model.cfg, items.len(), capacity)?;
    let mut tokens = Vec::new();
    let mut place = TokenPlacement::default();
    let mut rows = Vec::new();
    for (slot, it) in items.iter().enumerate() {
        let first = tokens.len();
        tokens.extend_from_slice(&it.prompt);
        tokens.extend_from_slice(&it.completion);
        place
            .slots
            .extend(std::iter::repeat_n(slot as u32, seq_len(it)));
        place.positions.extend(0..seq_len(it) as u32);
        // The row before each completion token predicts it.
        rows.extend((0..it.completion.len()).map(|i| first + it.prompt.len() - 1 + i));
    }
    let logits = b.download(b.full(&model.forward(&tokens, &place, &mut cache, &rows)?))?;
    let vocab = model.cfg.vocab_size;
    let mut row = 0;
    Ok(items
        .iter()
        .map(|it| {
            it.completion
                .iter()
                .map(|&tok| {
                    let lp =
                        token_logprob(&logits[row * vocab..(row + 1) * vocab], tok, temperature);
                    row += 1;
                    lp
                })
                .collect()
        })
        .collect())
}
