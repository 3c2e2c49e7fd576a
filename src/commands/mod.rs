//! The `thinkshort` subcommands. Each file holds one command's options and its run function;
//! `main.rs` only parses arguments and reports errors.

pub mod doctor;
pub mod eval;
pub mod generate;
pub mod logprobs;
pub mod sft;
pub mod train;
pub mod verify;

use crate::backend::BackendKind;
use anyhow::{bail, Context, Result};

/// Resolves `--backend` to the device that runs the command, saying on stderr which one `auto`
/// picked. The CUDA forward pass is not in this version: `cuda` fails with one clear line.
pub fn resolve_backend(kind: BackendKind) -> Result<BackendKind> {
    match kind {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        BackendKind::Cuda => {
            crate::cuda::require_cuda().context("--backend cuda")?;
            bail!(
                "--backend cuda: a GPU is present, but this version has only the CUDA kernel build, not \
                 the CUDA forward pass; use --backend cpu or auto"
            )
        }
        BackendKind::Auto => {
            let why = match crate::cuda::require_cuda() {
                Ok(_) => "the CUDA forward pass is not in this version",
                Err(_) => "no usable GPU",
            };
            eprintln!("backend: cpu ({why})");
            Ok(BackendKind::Cpu)
        }
    }
}
