//! The demo's tokenizer and model config: a word-level vocabulary that covers every demo text,
//! written as an HF model folder's tokenizer files so the project's loader (and transformers)
//! read it like any other model's.
//!
//! Ids: `<|endoftext|>` = 0 (EOS and pad), `[UNK]` = 1, the numbers "0".."=MAX_NUMBER" as whole
//! tokens, then the operators, punctuation, tags and words of `task.rs`. Texts are split on
//! whitespace only, so "<think>" stays one token; with no decoder, `tokenizers` joins tokens
//! with single spaces, so decode(encode(text)) == text for texts in the spaced style.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const EOS_ID: u32 = 0;
pub const UNK_TOKEN: &str = "[UNK]";
/// The largest number with its own token: partial results, answers and prompt budgets.
pub const MAX_NUMBER: u32 = 199;

/// Every non-number word of the demo texts (prompt template and completions).
const WORDS: &[&str] = &[
    "+",
    "-",
    "=",
    ".",
    ":",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "compute",
    "budget",
    "tokens",
    "check",
];

/// The vocabulary in id order.
fn vocab() -> Vec<String> {
    let mut v = vec![EOS_TOKEN.to_string(), UNK_TOKEN.to_string()];
    v.extend((0..=MAX_NUMBER).map(|n| n.to_string()));
    v.extend(WORDS.iter().map(|w| w.to_string()));
    v
}

/// The demo tokenizer: WordLevel over `vocab()`, whitespace split, `<|endoftext|>` special (so
/// `decode(ids, skip_special = true)` drops it).
pub fn build_tokenizer() -> Tokenizer {
    let model = WordLevel::builder()
        .vocab(
            vocab()
                .into_iter()
                .enumerate()
                .map(|(id, w)| (w, id as u32))
                .collect(),
        )
        .unk_token(UNK_TOKEN.to_string())
        .build()
        .expect("the demo vocabulary is a valid WordLevel vocabulary");
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    // Already in the vocabulary, so it keeps id 0; this only marks it special.
    tok.add_special_tokens([AddedToken::from(EOS_TOKEN, true)])
        .expect("adding the EOS token");
    tok
}

/// Writes tokenizer.json, tokenizer_config.json and generation_config.json into `dir`.
pub fn write_tokenizer_files(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("tokenizer.json");
    build_tokenizer()
        .save(&path, true)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    // No chat template: the demo prompt is plain text. Spaces before "." are part of the
    // format, so transformers must not "clean them up" on decode.
    let tok_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "bos_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 512,
    });
    let gen_config = serde_json::json!({
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
    });
    for (name, value) in [
        ("tokenizer_config.json", tok_config),
        ("generation_config.json", gen_config),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&value)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// config.json of the demo model: a Qwen2 of ~0.8M parameters (hidden 128, 4 layers, 4 heads
/// of 32 with 2 KV heads, SwiGLU 384, tied embeddings) for `vocab_size` tokens.
pub fn demo_model_config(vocab_size: usize) -> String {
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "torch_dtype": "float32",
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serialises") + "\n"
}
