//! Batched generation with a per-sequence cap on new tokens (the budget cap).
//!
//! All sequences are prefilled in one ragged forward pass, then each decode step runs the
//! still-active sequences together, one token each. A sequence stops at an EOS id, at a stop
//! string, or at its cap (then it is flagged truncated). The cap truncates; it never inserts a
//! token the policy did not sample.

use crate::backend::{Backend, TokenPlacement};
use crate::model::{KvCache, Model};
use crate::sampling::{SamplingParams, TokenDraws};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::HashMap;

/// One sequence to continue.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// The most new tokens this sequence may generate (EOS included).
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub sampling: SamplingParams,
    pub seed: u64,
    /// RNG stream of request 0; request i draws from stream `first_stream + i`.
    pub first_stream: u64,
    pub eos_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Decode steps between host syncs (None: the backend's `decode_sync_every`).
    pub sync_every: Option<usize>,
    /// Whether sequences that ended stay in the decode batch (their draws dropped) while at
    /// least half of its rows are live, so a backend that records decode steps can replay them
    /// (None: when the backend records them).
    ///
    /// Neither setting changes what a sequence computes, only how many rows the steps after it
    /// ended have: the tokens are the same, and the log-probs too up to the last bits, which
    /// the matrix products' summation may change with the batch's size.
    pub keep_ended_rows: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Every sampled token, a final EOS included.
    pub tokens: Vec<u32>,
    /// log softmax(logits / τ) of each sampled token as the sampler saw it (0 when greedy):
    /// GRPO's old log-probs with `old_logp = "sampler"`.
    pub logprobs: Vec<f32>,
    /// Generated length ℓ: completion tokens without the EOS.
    pub len: usize,
    /// Stopped by EOS or a stop string.
    pub finished: bool,
    /// Stopped by the cap.
    pub truncated: bool,
}

/// Turns token ids into text, for stop strings.
pub type Detokenize<'a> = &'a (dyn Fn(&[u32]) -> Result<String> + Sync);

pub fn generate<B: Backend>(
    model: &Model<B>,
    requests: &[GenerationRequest],
    config: &GenerateConfig,
    detokenize: Option<Detokenize>,
) -> Result<Vec<Completion>> {
    config.sampling.validate()?;
    if !config.stop_strings.is_empty() && detokenize.is_none() {
        bail!("stop strings need a tokenizer to decode completions");
    }
    if config.stop_strings.iter().any(|s| s.is_empty()) {
        bail!("a stop string is empty: it would end every completion at its first token");
    }
    if let Some(i) = requests.iter().position(|r| r.prompt.is_empty()) {
        bail!("prompt {i} is empty: generation needs at least one prompt token");
    }
    let b = &model.backend;
    let vocab = model.cfg.vocab_size;
    let capacity = requests
        .iter()
        .map(|r| r.prompt.len().saturating_add(r.max_new_tokens))
        .max()
        .unwrap_or(0);
    let mut cache = KvCache::new(b, &model.cfg, requests.len(), capacity)?;
    let mut out: Vec<Completion> = requests
        .iter()
        .map(|r| Completion {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            len: 0,
            finished: false,
            truncated: r.max_new_tokens == 0,
        })
        .collect();

    // Prefill: every distinct prompt once, in the slot of the first request that has it (GRPO
    // asks for G samples of each prompt); the others copy its keys and values into their slots
    // and take their first token from the same logits, the logits of the prompt's last token.
    // Requests with no new tokens to make are left out.
    let mut first_with: HashMap<&[u32], usize> = HashMap::new();
    let mut tokens = Vec::new();
    let mut place = TokenPlacement::default();
    let mut logit_rows = Vec::new();
    let mut active: Vec<usize> = Vec::new(); // request index of each logits row
    let mut last_row = vec![0; requests.len()]; // of each prefilled prompt, in `tokens`
    let mut copies = Vec::new(); // (from slot, to slot, positions)
    for (i, r) in requests.iter().enumerate() {
        if r.max_new_tokens == 0 {
            continue;
        }
        let source = *first_with.entry(r.prompt.as_slice()).or_insert(i);
        if source == i {
            tokens.extend_from_slice(&r.prompt);
            place
                .slots
                .extend(std::iter::repeat_n(i as u32, r.prompt.len()));
            place.positions.extend(0..r.prompt.len() as u32);
            last_row[i] = tokens.len() - 1;
        } else {
            copies.push((source, i, r.prompt.len()));
        }
        logit_rows.push(last_row[source]);
        active.push(i);
    }
    if active.is_empty() {
        return Ok(out);
    }
    // [rows, V]: the prefill's logits, then each decode step's in its first rows (steps have
    // no more rows than the prefill), so a recorded step writes to the same place every time.
    let mut logits = model.forward(&tokens, &place, &mut cache, &logit_rows)?;
    cache.copy_prefixes(b, &copies)?;

    // Every active sequence has `step` tokens: all drew their first at the prefill's logits and
    // one more at each decode step since. The ids stay on the device and feed the next step
    // directly; the host learns them (and so EOS and stop strings) only every `sync_every`
    // steps. Caps need no sync: the host drops a sequence at its cap by counting steps. A
    // sequence that ended in between runs on until the sync and its extra tokens are dropped,
    // so the tokens are the same for every interval (draws are per sequence and step).
    let sync_every = config
        .sync_every
        .unwrap_or_else(|| b.decode_sync_every())
        .max(1);
    // The draws of the steps since the last sync, so a sync is two downloads: step k of the
    // window writes its ids and log-probs at k·n (n requests).
    let n = requests.len();
    let mut window: Option<(B::Buf, B::Buf)> = None;
    let mut pending: Vec<Drawn> = Vec::new();
    // The latest step's ids, copied out of the window: [n] f32, where the next step reads them.
    let mut step_ids = b.zeros_f32(n)?;
    let keep_ended = config
        .keep_ended_rows
        .unwrap_or_else(|| b.records_decode_steps());
    let mut graph = b.decode_graph(); // after the buffers its steps use: dropped before them
    let mut step = 0u64;
    while !active.is_empty() {
        // Row r of `logits` continues request active[r]: its draw is uniform number `step` of
        // the request's stream, computed where the logits are.
        let streams: Vec<u32> = active.iter().map(|&i| i as u32).collect();
        let draws = TokenDraws::Philox {
            seed: config.seed,
            first_stream: config.first_stream,
            streams: &streams,
            step,
        };
        if pending.is_empty() {
            // a new window; the old one is freed in stream order, after the copy reading it
            window = Some((b.zeros_f32(sync_every * n)?, b.zeros_f32(sync_every * n)?));
        }
        let (window_ids, window_logp) = window.as_mut().expect("made at the window's first step");
        let rows = pending.len() * n..pending.len() * n + active.len();
        b.sample_tokens(
            b.view_mut(window_ids, rows.clone()),
            b.view_mut(window_logp, rows.clone()),
            b.view(&logits, 0..active.len() * vocab),
            &draws,
            vocab,
            &config.sampling,
        );
        step += 1;
        pending.push(Drawn {
            requests: active.clone(),
            rows,
        });
        let under_cap = |i: usize| step < requests[i].max_new_tokens as u64;
        let mut running: Vec<usize> = (0..active.len())
            .filter(|&r| under_cap(active[r]))
            .collect();
        let sync = running.is_empty() || pending.len() >= sync_every;
        if sync {
            let ids = b.download(b.view(window_ids, 0..pending.len() * n))?;
            let logp = b.download(b.view(window_logp, 0..pending.len() * n))?;
            record(
                &pending, &ids, &logp, &mut out, requests, config, detokenize, vocab,
            )?;
            let live = running
                .iter()
                .filter(|&&r| !out[active[r]].finished)
                .count();
            // A recorded decode step is replayed only while the batch keeps its rows: with
            // keep_ended, it changes a few times instead of at nearly every sync.
            if !(keep_ended && 2 * live >= active.len()) {
                running.retain(|&r| !out[active[r]].finished);
            }
        }
        if running.is_empty() {
            break;
        }
        // Row m of the next step: the token just drawn in row running[m].
        let rows: Vec<u32> = running.iter().map(|&r| r as u32).collect();
        let mut next_place = TokenPlacement::default();
        for &r in &running {
            let i = active[r];
            next_place.slots.push(i as u32);
            next_place
                .positions
                .push((requests[i].prompt.len() as u64 + step - 1) as u32);
        }
        let drawn = pending.last().expect("this step's draws").rows.clone();
        b.copy(
            b.view_mut(&mut step_ids, 0..active.len()),
            b.view(window_ids, drawn),
        );
        active = running.iter().map(|&r| active[r]).collect();
        model.decode_step(
            &mut graph,
            &mut logits,
            b.view(&step_ids, 0..n),
            &rows,
            &next_place,
            &mut cache,
        )?;
        if sync {
            pending.clear(); // recorded; the forward above is queued (buffers free in stream order)
        }
    }
    Ok(out)
}

/// One decode step's draws: row r continues request `requests[r]`; its id and log-prob are at
/// `rows.start + r` of the window buffers.
struct Drawn {
    requests: Vec<usize>,
    rows: std::ops::Range<usize>,
}

/// Appends the pending steps' draws (oldest first; ids and logp are the window buffers,
/// downloaded) to their requests unless a request has already ended: at an EOS id or a stop
/// string it is finished, at its cap truncated.
///
/// A completion ends at the first token after which its text contains a stop string. The text is
/// decoded once per completion and sync, not once per token: only when it holds a stop string
/// are the prefixes ending at this sync's tokens decoded, to find that first token (a prefix's
/// text is the start of the longer one's, so a stop string once present stays present). The
/// completions are decoded in parallel.
#[allow(clippy::too_many_arguments)]
fn record(
    pending: &[Drawn],
    ids: &[f32],
    logp: &[f32],
    out: &mut [Completion],
    requests: &[GenerationRequest],
    config: &GenerateConfig,
    detokenize: Option<Detokenize>,
    vocab: usize,
) -> Result<()> {
    // Where each completion's tokens of this sync start (None: it gained none).
    let mut first_new: Vec<Option<usize>> = vec![None; out.len()];
    for drawn in pending {
        let (ids, logp) = (&ids[drawn.rows.clone()], &logp[drawn.rows.clone()]);
        for ((&i, &id), &lp) in drawn.requests.iter().zip(ids).zip(logp) {
            let c = &mut out[i];
            if c.finished || c.truncated {
                continue;
            }
            if id.is_nan() {
                bail!(
                    "the model's logits are not finite (NaN or infinite) for completion {i} after \
                     {} new tokens: its weights hold non-finite values or its activations overflow",
                    c.tokens.len()
                );
            }
            if !(id >= 0.0 && id < vocab as f32) {
                bail!("the sampler returned token id {id}, outside the vocabulary of {vocab}");
            }
            let tok = id as u32;
            first_new[i].get_or_insert(c.tokens.len());
            c.tokens.push(tok);
            c.logprobs.push(lp);
            if config.eos_ids.contains(&tok) {
                c.finished = true;
                continue;
            }
            c.len += 1;
            if c.tokens.len() >= requests[i].max_new_tokens {
                c.truncated = true;
            }
        }
    }
    let Some(detok) = detokenize.filter(|_| !config.stop_strings.is_empty()) else {
        return Ok(());
    };
    let stops = &config.stop_strings;
    let has_stop = |ids: &[u32]| -> Result<bool> {
        let text = detok(ids)?;
        Ok(stops.iter().any(|s| text.contains(s.as_str())))
    };
    out.par_iter_mut()
        .zip(&first_new)
        .filter_map(|(c, first)| first.map(|first| (c, first)))
        .try_for_each(|(c, first)| -> Result<()> {
            // the tokens a stop string may end at: this sync's, without a closing EOS
            if first >= c.len || !has_stop(&c.tokens[..c.len])? {
                return Ok(());
            }
            let mut end = c.len;
            for shorter in first + 1..c.len {
                if has_stop(&c.tokens[..shorter])? {
                    end = shorter;
                    break;
                }
            }
            c.tokens.truncate(end);
            c.logprobs.truncate(end);
            c.len = end;
            c.finished = true;
            c.truncated = false;
            Ok(())
        })
}
