//! The built-in demo: a synthetic, verifiable arithmetic task (`task`) and the word-level
//! tokenizer and tiny Qwen2 config of the model trained on it from scratch (`vocab`).

pub mod task;
pub mod vocab;
