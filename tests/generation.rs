//! Batched generation: the budget cap, reproducible seeded sampling, and independence of each
//! sequence from the rest of its batch.

use thinkshort::backend::cpu::CpuBackend;
use thinkshort::config::ModelConfig;
use thinkshort::generate::{generate, Completion, GenerateConfig, GenerationRequest};
use thinkshort::model::Model;
use thinkshort::sampling::SamplingParams;

fn model() -> Model<CpuBackend> {
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type":"llama","vocab_size":64,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"rope_theta":10000.0}"#,
    )
    .unwrap();
    Model::random(cfg, 5, CpuBackend).unwrap()
}

fn config(temperature: f32, seed: u64, eos: Vec<u32>) -> GenerateConfig {
    GenerateConfig {
        sampling: SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
        },
        seed,
        first_stream: 0,
        eos_ids: eos,
        stop_strings: vec![],
        sync_every: None,
        keep_ended_rows: None,
    }
}

fn requests(caps: &[usize]) -> Vec<GenerationRequest> {
    caps.iter()
        .enumerate()
        .map(|(i, &cap)| GenerationRequest {
            prompt: (1..=(3 + 2 * i as u32)).collect(),
            max_new_tokens: cap,
        })
        .collect()
}

#[test]
fn cap_of_n_yields_at_most_n_tokens_flagged_truncated() {
    let m = model();
    let caps = [0, 1, 5, 17];
    let out = generate(&m, &requests(&caps), &config(1.0, 1, vec![]), None).unwrap();
    for (c, &cap) in out.iter().zip(&caps) {
        // No EOS ids: every sequence runs to its cap.
        assert_eq!(c.tokens.len(), cap);
        assert_eq!(c.len, cap);
        assert!(c.truncated && !c.finished);
    }
    // nothing to generate at all: no forward pass, empty truncated completions
    let out = generate(&m, &requests(&[0, 0]), &config(1.0, 1, vec![]), None).unwrap();
    assert!(out.iter().all(|c| c.tokens.is_empty() && c.truncated));
}

#[test]
fn eos_finishes_a_sequence_and_is_not_counted_in_its_length() {
    let m = model();
    // Make every token an EOS: each sequence stops after one token, finished, not truncated.
    let all: Vec<u32> = (0..64).collect();
    let out = generate(&m, &requests(&[4, 4]), &config(1.0, 2, all), None).unwrap();
    for c in out {
        assert_eq!(c.tokens.len(), 1);
        assert_eq!(c.len, 0);
        assert!(c.finished && !c.truncated);
    }
}

/// An EOS drawn as the cap-th token ends the completion by EOS, not by the cap (METHOD.md §2:
/// only completions stopped by the cap are truncated), and ℓ leaves it out.
#[test]
fn an_eos_drawn_as_the_last_token_the_cap_allows_finishes_the_completion() {
    let m = model();
    let cap = 6;
    // A seed whose 6th sampled token appears nowhere before it: made the EOS, it is first drawn
    // at the cap.
    let (seed, free) = (0..100)
        .map(|seed| {
            let c = generate(&m, &requests(&[cap]), &config(1.0, seed, vec![]), None).unwrap();
            (seed, c[0].tokens.clone())
        })
        .find(|(_, t)| !t[..cap - 1].contains(&t[cap - 1]))
        .unwrap();
    let eos = vec![free[cap - 1]];
    let out = generate(&m, &requests(&[cap]), &config(1.0, seed, eos), None).unwrap();
    assert_eq!(out[0].tokens, free);
    assert_eq!(out[0].len, cap - 1);
    assert!(out[0].finished && !out[0].truncated);
}

#[test]
fn sampling_with_a_fixed_seed_is_reproducible() {
    let m = model();
    let reqs = requests(&[12, 12, 12]);
    let a = generate(&m, &reqs, &config(1.0, 42, vec![]), None).unwrap();
    let b = generate(&m, &reqs, &config(1.0, 42, vec![]), None).unwrap();
    let c = generate(&m, &reqs, &config(1.0, 43, vec![]), None).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c, "a different seed should change the samples");
}

#[test]
fn a_sequence_samples_the_same_alone_or_in_a_batch() {
    let m = model();
    let reqs = requests(&[10, 7, 10]);
    let batch = generate(&m, &reqs, &config(0.8, 7, vec![]), None).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let mut cfg = config(0.8, 7, vec![]);
        cfg.first_stream = i as u64;
        let alone: Vec<Completion> = generate(&m, std::slice::from_ref(r), &cfg, None).unwrap();
        assert_eq!(alone[0], batch[i], "sequence {i}");
    }
}

/// GRPO's batches repeat each prompt: a repeated prompt is prefilled once and its keys and
/// values copied to the other slots; every sequence must still sample what it samples alone.
#[test]
fn a_repeated_prompt_is_computed_once_and_samples_as_alone() {
    let m = model();
    let (a, b) = (
        requests(&[9])[0].prompt.clone(),
        requests(&[0, 9])[1].prompt.clone(),
    );
    let reqs: Vec<GenerationRequest> = [(&a, 9), (&a, 6), (&b, 9), (&a, 0), (&b, 4), (&a, 9)]
        .iter()
        .map(|&(prompt, cap)| GenerationRequest {
            prompt: prompt.clone(),
            max_new_tokens: cap,
        })
        .collect();
    let batch = generate(&m, &reqs, &config(0.8, 3, vec![]), None).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let mut cfg = config(0.8, 3, vec![]);
        cfg.first_stream = i as u64;
        let alone: Vec<Completion> = generate(&m, std::slice::from_ref(r), &cfg, None).unwrap();
        assert_eq!(alone[0], batch[i], "sequence {i}");
    }
    // the samples of one prompt differ (their own streams), so the test is not vacuous
    assert_ne!(batch[0].tokens, batch[5].tokens);
}

/// The logits after `seq`, from one full forward pass over it (no decode steps).
fn last_logits(m: &Model<CpuBackend>, seq: &[u32]) -> Vec<f32> {
    let mut cache = thinkshort::model::KvCache::new(&CpuBackend, &m.cfg, 1, seq.len()).unwrap();
    let place = thinkshort::backend::TokenPlacement {
        slots: vec![0; seq.len()],
        positions: (0..seq.len() as u32).collect(),
    };
    m.forward(seq, &place, &mut cache, &[seq.len() - 1])
        .unwrap()
}

#[test]
fn greedy_is_the_argmax_chain() {
    let m = model();
    let reqs = requests(&[6]);
    let out = generate(&m, &reqs, &config(0.0, 0, vec![]), None).unwrap();
    // Recompute step by step with full forward passes over the growing sequence.
    let mut seq = reqs[0].prompt.clone();
    for &tok in &out[0].tokens {
        let logits = last_logits(&m, &seq);
        assert_eq!(tok, thinkshort::sampling::argmax(&logits));
        seq.push(tok);
    }
    // A greedy draw is certain: log-prob 0.
    assert!(out[0].logprobs.iter().all(|&lp| lp == 0.0));
}

/// Token t of request i is `sample(logits, params, rng::uniform(seed, first_stream + i, t))`:
/// the numbers a GPU draws for itself, with top-k and top-p applied (the device path now); its
/// log-prob is `token_logprob` at the temperature over the whole vocabulary.
#[test]
fn sampled_tokens_use_the_stream_of_their_request_and_step() {
    let m = model();
    let reqs = requests(&[7, 9]);
    let mut cfg = config(0.8, 11, vec![]);
    cfg.sampling.top_k = 5;
    cfg.sampling.top_p = 0.9;
    cfg.first_stream = 3;
    let out = generate(&m, &reqs, &cfg, None).unwrap();
    for (i, (r, c)) in reqs.iter().zip(&out).enumerate() {
        let mut seq = r.prompt.clone();
        for (step, &tok) in c.tokens.iter().enumerate() {
            let logits = last_logits(&m, &seq);
            let u = thinkshort::rng::uniform(11, 3 + i as u64, step as u64);
            let want = thinkshort::sampling::sample(&logits, &cfg.sampling, u);
            assert_eq!(tok, want, "request {i} step {step}");
            let logp = thinkshort::sampling::token_logprob(&logits, tok, 0.8);
            assert!(
                (c.logprobs[step] - logp).abs() < 1e-4,
                "request {i} step {step}"
            );
            seq.push(tok);
        }
    }
}

/// Deferred host syncs: the decode loop learns the sampled ids (and so EOS and stop strings)
/// only every few steps and drops the extra tokens of sequences that ended in between; the
/// completions must be those of a sync after every step, for any interval, and whether or not
/// ended sequences stay in the decode batch (as they do for a backend that records steps).
#[test]
fn the_host_sync_interval_does_not_change_the_completions() {
    let m = model();
    let reqs = requests(&[0, 1, 9, 14, 20, 6]);
    // Text "a<id>b" per token; the stop string "7b" ends a sequence at token 7 (or 17, 27, ...).
    let detok = |ids: &[u32]| -> anyhow::Result<String> {
        Ok(ids.iter().map(|i| format!("a{i}b")).collect())
    };
    for (eos, stops) in [(vec![3, 11], vec![]), (vec![], vec!["7b".to_string()])] {
        let run = |sync_every: usize, keep_ended: bool| {
            let mut cfg = config(1.0, 5, eos.clone());
            cfg.stop_strings = stops.clone();
            cfg.sync_every = Some(sync_every);
            cfg.keep_ended_rows = Some(keep_ended);
            generate(&m, &reqs, &cfg, Some(&detok)).unwrap()
        };
        let every_step = run(1, false);
        // Some sequences end before their cap, so the later syncs have tokens to drop.
        assert!(every_step.iter().any(|c| c.finished), "{every_step:?}");
        for sync_every in [1, 2, 3, 8, 100] {
            for keep_ended in [false, true] {
                assert_eq!(
                    run(sync_every, keep_ended),
                    every_step,
                    "sync every {sync_every}, ended rows kept: {keep_ended}"
                );
            }
        }
    }
}

/// A stop string ends a completion at the first token after which its text holds it, the text
/// included: with the same seed the draws are the same, so the completion is the one without
/// stop strings cut there (found here by decoding every prefix). Stop strings that span two
/// tokens, EOS ids and caps mix in; every host sync interval gives the same cut.
#[test]
fn a_stop_string_cuts_the_completion_at_its_first_occurrence() {
    let m = model();
    let reqs = requests(&[1, 9, 14, 20, 30, 6, 25]);
    let detok = |ids: &[u32]| -> anyhow::Result<String> {
        Ok(ids.iter().map(|i| format!("a{i}b")).collect())
    };
    // "b a1" never occurs (no spaces); "2ba" spans two tokens; "a5" also ends inside "a51b".
    let stops = vec!["2ba".to_string(), "a5".to_string(), "b a1".to_string()];
    let eos = vec![40];
    let free = generate(&m, &reqs, &config(1.0, 9, eos.clone()), None).unwrap();
    let mut cut_somewhere = 0;
    for sync_every in [1, 3, 8] {
        let mut cfg = config(1.0, 9, eos.clone());
        cfg.stop_strings = stops.clone();
        cfg.sync_every = Some(sync_every);
        let stopped = generate(&m, &reqs, &cfg, Some(&detok)).unwrap();
        for (s, f) in stopped.iter().zip(&free) {
            let holds = |n: usize| {
                let text = detok(&f.tokens[..n]).unwrap();
                stops.iter().any(|x| text.contains(x.as_str()))
            };
            let first = (1..=f.len).find(|&n| holds(n));
            match first {
                Some(n) => {
                    cut_somewhere += 1;
                    assert_eq!(s.tokens, f.tokens[..n], "sync every {sync_every}");
                    assert_eq!(s.logprobs, f.logprobs[..n]);
                    assert_eq!(s.len, n);
                    assert!(s.finished && !s.truncated);
                }
                None => assert_eq!(s, f, "no stop string in {:?}", detok(&f.tokens)),
            }
        }
    }
    assert!(
        cut_somewhere >= 3,
        "the stop strings cut {cut_somewhere} completions"
    );
    // an empty stop string would end every completion at once: refused
    let mut cfg = config(1.0, 9, eos);
    cfg.stop_strings = vec![String::new()];
    let err = generate(&m, &reqs, &cfg, Some(&detok)).unwrap_err();
    assert!(err.to_string().contains("stop string is empty"), "{err}");
}

/// A model whose weights hold a NaN (a corrupt checkpoint) makes generation fail with an error
/// that says the logits are not finite, greedy and sampled, instead of emitting token 0 for ever.
#[test]
fn non_finite_logits_are_an_error_not_tokens() {
    let mut m = model();
    let norm = m.layout.specs[m.layout.final_norm].offset;
    m.params[norm] = f32::NAN;
    for temperature in [0.0, 1.0] {
        let err = generate(&m, &requests(&[3]), &config(temperature, 1, vec![]), None)
            .expect_err("a NaN weight must not generate");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("logits are not finite") && msg.contains("after 0 new tokens"),
            "{msg}"
        );
    }
}
