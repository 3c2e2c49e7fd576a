//! Parity with HF transformers on tiny random models written by tools/make_fixtures.py:
//! log-probs within 1e-4, greedy generation token for token, tokenization and chat templates.

use serde_json::Value;
use std::path::{Path, PathBuf};
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::generate::{generate, GenerateConfig, GenerationRequest};
use thinkshort::model::Model;
use thinkshort::prompt::{render_chat, ChatMessage};
use thinkshort::sampling::SamplingParams;
use thinkshort::score::{completion_logprobs, ScoreItem};
use thinkshort::tokenizer::Tokenizer;

const FIXTURES: [&str; 4] = [
    "qwen2_tied",
    "llama_untied_bf16",
    "qwen2_sharded_f16",
    "qwen3_qknorm",
];
const TOLERANCE: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOLERANCE,
            "{what}: token {i}: ours {g}, transformers {w}"
        );
    }
}

#[test]
fn logprobs_match_transformers() {
    for name in FIXTURES {
        let model = Model::load(&dir(name), CpuBackend).unwrap();
        let exp = expected(name);
        let cases = exp["logprob_cases"].as_array().unwrap();
        assert!(cases.len() >= 4, "{name}: too few cases");
        let items: Vec<ScoreItem> = cases
            .iter()
            .map(|c| ScoreItem {
                prompt: u32s(&c["prompt_ids"]),
                completion: u32s(&c["completion_ids"]),
            })
            .collect();
        // All cases in one ragged batch: also exercises packing of different lengths.
        let got = completion_logprobs(&model, &items, 1.0).unwrap();
        for (i, (g, c)) in got.iter().zip(cases).enumerate() {
            assert_close(g, &f32s(&c["logprobs"]), &format!("{name} case {i}"));
        }
    }
}

#[test]
fn text_is_tokenized_and_scored_like_transformers() {
    for name in FIXTURES {
        let model = Model::load(&dir(name), CpuBackend).unwrap();
        let tok = Tokenizer::from_model_dir(&dir(name)).unwrap();
        let exp = expected(name);
        for (i, c) in exp["text_cases"].as_array().unwrap().iter().enumerate() {
            let prompt = tok.encode(c["prompt"].as_str().unwrap()).unwrap();
            let completion = tok.encode(c["completion"].as_str().unwrap()).unwrap();
            assert_eq!(
                prompt,
                u32s(&c["prompt_ids"]),
                "{name} text case {i}: prompt ids"
            );
            assert_eq!(
                completion,
                u32s(&c["completion_ids"]),
                "{name} text case {i}: completion ids"
            );
            let got =
                completion_logprobs(&model, &[ScoreItem { prompt, completion }], 1.0).unwrap();
            assert_close(
                &got[0],
                &f32s(&c["logprobs"]),
                &format!("{name} text case {i}"),
            );
        }
        for c in exp["encode_cases"].as_array().unwrap() {
            assert_eq!(
                tok.encode(c["text"].as_str().unwrap()).unwrap(),
                u32s(&c["ids"]),
                "{name}: {}",
                c["text"]
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in FIXTURES {
        let model = Model::load(&dir(name), CpuBackend).unwrap();
        let tok = Tokenizer::from_model_dir(&dir(name)).unwrap();
        let exp = expected(name);
        let mut want_eos = u32s(&exp["eos_token_ids"]);
        let mut got_eos = tok.eos_token_ids().to_vec();
        want_eos.sort();
        got_eos.sort();
        assert_eq!(got_eos, want_eos, "{name}: EOS ids");

        let cases = exp["greedy_cases"].as_array().unwrap();
        let requests: Vec<GenerationRequest> = cases
            .iter()
            .map(|c| GenerationRequest {
                prompt: u32s(&c["prompt_ids"]),
                max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
            })
            .collect();
        let config = GenerateConfig {
            sampling: SamplingParams::greedy(),
            seed: 0,
            first_stream: 0,
            eos_ids: tok.eos_token_ids().to_vec(),
            stop_strings: vec![],
            sync_every: None,
            keep_ended_rows: None,
        };
        // All prompts as one batch of different lengths.
        let out = generate(&model, &requests, &config, None).unwrap();
        for (i, (o, c)) in out.iter().zip(cases).enumerate() {
            assert_eq!(o.tokens, u32s(&c["output_ids"]), "{name} greedy case {i}");
            let ended_by_eos = o
                .tokens
                .last()
                .is_some_and(|t| tok.eos_token_ids().contains(t));
            assert_eq!(o.finished, ended_by_eos);
            assert_eq!(
                o.truncated,
                !ended_by_eos && o.tokens.len() == requests[i].max_new_tokens
            );
        }
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    for name in ["qwen2_tied", "llama_untied_bf16", "qwen3_qknorm"] {
        let tok = Tokenizer::from_model_dir(&dir(name)).unwrap();
        let exp = expected(name);
        let template = tok.chat_template().expect("fixture has a chat template");
        // the Qwen3-style template also renders earlier replies with their reasoning
        for (messages, rendered) in [
            ("messages", "rendered"),
            ("messages_with_system", "rendered_with_system"),
            ("messages_with_replies", "rendered_with_replies"),
        ] {
            if exp["chat"].get(messages).is_none() {
                assert_ne!(name, "qwen3_qknorm", "its fixture renders earlier replies");
                continue;
            }
            let msgs: Vec<ChatMessage> = exp["chat"][messages]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| ChatMessage {
                    role: m["role"].as_str().unwrap().to_string(),
                    content: m["content"].as_str().unwrap().to_string(),
                })
                .collect();
            let got = render_chat(template, &msgs, true, tok.bos_token(), tok.eos_token()).unwrap();
            assert_eq!(
                got,
                exp["chat"][rendered].as_str().unwrap(),
                "{name}: {messages}"
            );
        }
    }
}
