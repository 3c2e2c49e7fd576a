//! Properties of the CPU transformer that need no external reference: a ragged batch equals its
//! sequences run alone, incremental decoding with the KV cache equals a full forward pass, and the
//! attention op equals a float64 textbook computation.

use thinkshort::backend::cpu::{attention_forward, CpuBackend};
use thinkshort::backend::TokenPlacement;
use thinkshort::config::ModelConfig;
use thinkshort::model::{KvCache, Model};
use thinkshort::rng::Philox;

fn tiny_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"model_type":"qwen2","vocab_size":97,"hidden_size":32,"intermediate_size":48,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":10000.0,"tie_word_embeddings":true}"#,
    )
    .unwrap()
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Philox::new(seed, 1);
    (0..n).map(|_| (rng.next_uniform() * 97.0) as u32).collect()
}

/// Logits of every position of one sequence run alone: [T, V].
fn full_logits(model: &Model<CpuBackend>, toks: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(&CpuBackend, &model.cfg, 1, toks.len()).unwrap();
    let place = TokenPlacement {
        slots: vec![0; toks.len()],
        positions: (0..toks.len() as u32).collect(),
    };
    let rows: Vec<usize> = (0..toks.len()).collect();
    model.forward(toks, &place, &mut cache, &rows).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn ragged_batch_equals_sequences_alone() {
    let model = Model::random(tiny_config(), 1, CpuBackend).unwrap();
    let seqs = [tokens(5, 1), tokens(11, 2), tokens(1, 3)];
    let mut cache = KvCache::new(&CpuBackend, &model.cfg, 3, 11).unwrap();
    let mut all = Vec::new();
    let mut place = TokenPlacement::default();
    for (s, t) in seqs.iter().enumerate() {
        all.extend_from_slice(t);
        place.slots.extend(std::iter::repeat_n(s as u32, t.len()));
        place.positions.extend(0..t.len() as u32);
    }
    let rows: Vec<usize> = (0..all.len()).collect();
    let batched = model.forward(&all, &place, &mut cache, &rows).unwrap();
    let alone: Vec<f32> = seqs.iter().flat_map(|t| full_logits(&model, t)).collect();
    assert!(max_abs_diff(&batched, &alone) < 1e-5);
}

#[test]
fn incremental_decoding_equals_full_forward() {
    let model = Model::random(tiny_config(), 2, CpuBackend).unwrap();
    let toks = tokens(9, 4);
    let full = full_logits(&model, &toks);
    let v = model.cfg.vocab_size;

    // Prefill 4 tokens, then feed the rest one at a time through the cache.
    let mut cache = KvCache::new(&CpuBackend, &model.cfg, 1, toks.len()).unwrap();
    let place = TokenPlacement {
        slots: vec![0; 4],
        positions: (0..4).collect(),
    };
    let mut got = model
        .forward(&toks[..4], &place, &mut cache, &[0, 1, 2, 3])
        .unwrap();
    for p in 4..toks.len() {
        let place = TokenPlacement {
            slots: vec![0],
            positions: vec![p as u32],
        };
        got.extend(
            model
                .forward(&toks[p..p + 1], &place, &mut cache, &[0])
                .unwrap(),
        );
    }
    assert_eq!(got.len(), toks.len() * v);
    assert!(max_abs_diff(&got, &full) < 1e-5);
}

#[test]
fn out_of_range_token_is_an_error() {
    let model = Model::random(tiny_config(), 3, CpuBackend).unwrap();
    let mut cache = KvCache::new(&CpuBackend, &model.cfg, 1, 2).unwrap();
    let place = TokenPlacement {
        slots: vec![0, 0],
        positions: vec![0, 1],
    };
    let err = model
        .forward(&[3, 97], &place, &mut cache, &[1])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id 97") && err.contains("97 tokens"),
        "{err}"
    );
}

/// Decode-like batches (a few tokens per slot: token by token, a KV head's query heads together) and prefill-like ones
/// (many tokens per slot, interleaved across slots: the GEMM path) against float64.
#[test]
fn attention_matches_float64_reference() {
    // Two slots; queries at assorted positions.
    check_attention_against_f64(TokenPlacement {
        slots: vec![0, 1, 1, 0],
        positions: vec![0, 6, 3, 4],
    });
    // Head dims with a part past the last whole vector of 8 (12: one vector and 4; 44: five
    // vectors, four kept in registers, then 4), in the decode path's products.
    for hd in [12, 44] {
        check_attention_with_head_dim(
            TokenPlacement {
                slots: vec![1, 0, 1],
                positions: vec![40, 17, 41],
            },
            hd,
        );
    }
    // Slot 0 prefills 0..13 and slot 1 0..9, tokens interleaved and out of order.
    let mut slots = Vec::new();
    let mut positions = Vec::new();
    for i in 0..13u32 {
        slots.push(0);
        positions.push((i * 5) % 13);
        if i < 9 {
            slots.push(1);
            positions.push(8 - i);
        }
    }
    check_attention_against_f64(TokenPlacement { slots, positions });
    // A prefilling slot (10 tokens: a task per query head) beside a decoding one (2 tokens: a
    // task per KV head) in the same call.
    check_attention_against_f64(TokenPlacement {
        slots: vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        positions: vec![0, 1, 2, 3, 4, 30, 5, 6, 7, 8, 9, 31],
    });
    // One long prefill: several blocks of query rows, each with its own key range.
    check_attention_against_f64(TokenPlacement {
        slots: vec![1; 150],
        positions: (0..150).collect(),
    });
}

/// Query heads that do not split evenly over the KV heads are refused with the op's name and
/// both counts (as the CUDA launchers refuse them), not left to an index out of range.
#[test]
#[should_panic(expected = "attention_forward: n_heads (6) is not a multiple of n_kv_heads (4)")]
fn attention_refuses_query_heads_that_do_not_split_over_the_kv_heads() {
    let place = TokenPlacement {
        slots: vec![0],
        positions: vec![0],
    };
    let (q, cache) = (vec![0.0; 6 * 8], vec![0.0; 4 * 8]);
    let mut out = vec![0.0; q.len()];
    attention_forward(&mut out, None, &q, &cache, &cache, &place, 1, 6, 4, 8);
}

/// A decode step of 9 sequences, 33 to 97 keys each, against float64.
#[test]
fn decode_attention_over_many_slots_matches_float64_reference() {
    let place = TokenPlacement {
        slots: (0..9).collect(),
        positions: (0..9).map(|s| 32 + 8 * s).collect(),
    };
    for hd in [8, 44] {
        check_attention_with_head_dim(place.clone(), hd);
    }
}

fn check_attention_against_f64(place: TokenPlacement) {
    check_attention_with_head_dim(place, 8);
}

fn check_attention_with_head_dim(place: TokenPlacement, hd: usize) {
    let (n_heads, n_kv) = (6, 2);
    let cap = *place.positions.iter().max().unwrap() as usize + 1;
    let mut rng = Philox::new(9, 0);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_normal()).collect() };
    let q = rand(place.slots.len() * n_heads * hd);
    let slots = *place.slots.iter().max().unwrap() as usize + 1;
    let ck = rand(slots * cap * n_kv * hd);
    let cv = rand(slots * cap * n_kv * hd);
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; place.slots.len() * n_heads];
    attention_forward(
        &mut out,
        Some(&mut lse),
        &q,
        &ck,
        &cv,
        &place,
        cap,
        n_heads,
        n_kv,
        hd,
    );

    for m in 0..place.slots.len() {
        let (s, p) = (place.slots[m] as usize, place.positions[m] as usize);
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv);
            let kv =
                |c: &[f32], j: usize, d: usize| c[((s * cap + j) * n_kv + kvh) * hd + d] as f64;
            let scores: Vec<f64> = (0..=p)
                .map(|j| {
                    (0..hd)
                        .map(|d| q[(m * n_heads + h) * hd + d] as f64 * kv(&ck, j, d))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
            let (got_lse, want_lse) = (lse[m * n_heads + h] as f64, mx + z.ln());
            assert!(
                (got_lse - want_lse).abs() < 1e-5,
                "m {m} h {h} lse: {got_lse} vs {want_lse}"
            );
            for d in 0..hd {
                let want: f64 = (0..=p)
                    .map(|j| (scores[j] - mx).exp() / z * kv(&cv, j, d))
                    .sum();
                let got = out[(m * n_heads + h) * hd + d] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "m {m} h {h} d {d}: {got} vs {want}"
                );
            }
        }
    }
}
