//! thinkshort: curriculum GRPO ("Train Long, Think Short") on a bare-metal Rust + CUDA stack.
//!
//! Layout: `config`/`params`/`weights` read HF checkpoints; `backend` holds the ops (CPU
//! reference, CUDA); `model` is the transformer; `sampling`, `generate` and `score` decode and
//! score sequences; `tokenizer` and `prompt` turn text into ids.

pub mod backend;
pub mod config;
pub mod generate;
pub mod model;
pub mod params;
pub mod rng;
pub mod sampling;
pub mod score;
pub mod weights;
