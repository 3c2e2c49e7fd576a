//! thinkshort: curriculum GRPO ("Train Long, Think Short") on a bare-metal Rust + CUDA stack.
//!
//! Layout: `config`/`params`/`weights` read HF checkpoints; `backend` holds the ops (CPU
//! reference; CUDA kernels in `cuda`); `model` is the transformer; `sampling`, `generate` and
//! `score` decode and score sequences; `tokenizer` and `prompt` turn text into ids; `commands`
//! are the CLI subcommands.

pub mod any_model;
pub mod backend;
pub mod block_cache;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod cuda;
pub mod curriculum;
pub mod datasets;
pub mod demo;
pub mod exp;
pub mod generate;
pub mod grpo;
pub mod model;
pub mod model_backward;
pub mod optim;
pub mod paired;
pub mod params;
pub mod plot;
pub mod prompt;
pub mod rng;
pub mod rollout;
pub mod safetensors_writer;
pub mod sampling;
pub mod score;
pub mod selfcheck;
pub mod sft;
pub mod tokenizer;
pub mod train;
pub mod train_config;
pub mod verify;
pub mod weights;
