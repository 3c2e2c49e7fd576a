//! The `thinkshort` subcommands. Each file holds one command's options and its run function;
//! `main.rs` only parses arguments and reports errors.

pub mod bench;
pub mod bench_step;
pub mod doctor;
pub mod eval;
pub mod generate;
pub mod logprobs;
pub mod selfcheck;
pub mod sft;
pub mod train;
pub mod verify;

use crate::backend::BackendKind;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Fails unless `path` (given as `option`) can be a file written after the command's long work:
/// not a folder, and in a folder that exists (so a typo fails now, not after the work).
pub fn check_output_file(path: &Path, option: &str) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if path.is_dir() || parent.is_some_and(|p| !p.is_dir()) {
        bail!(
            "{option} {}: not a file in an existing folder",
            path.display()
        );
    }
    Ok(())
}

/// Resolves `--backend` for a command that runs on either device: `cuda` needs a usable GPU
/// (else one clear error line), `auto` takes the GPU when there is one and says which it took.
pub fn resolve_backend(kind: BackendKind) -> Result<BackendKind> {
    match kind {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        BackendKind::Cuda => {
            crate::cuda::require_cuda().context("--backend cuda")?;
            Ok(BackendKind::Cuda)
        }
        BackendKind::Auto => match crate::cuda::require_cuda() {
            Ok(probe) => {
                let name = probe
                    .devices
                    .first()
                    .map(|d| d.name.as_str())
                    .unwrap_or("GPU");
                eprintln!("backend: cuda ({name})");
                Ok(BackendKind::Cuda)
            }
            Err(_) => {
                eprintln!("backend: cpu (no usable GPU)");
                Ok(BackendKind::Cpu)
            }
        },
    }
}
