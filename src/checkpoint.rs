//! Checkpoints: a Hugging Face model folder (config.json, model.safetensors, tokenizer files)
//! that transformers can load, plus the trainer's state to resume from. A checkpoint is written
//! under a temporary name and renamed, so an interrupted run never leaves a partial one.

use crate::params::ParamLayout;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Files copied verbatim from the source model folder when present.
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Writes `dest` atomically: `write` fills a fresh temporary folder beside it, which is then
/// renamed into place (replacing an older `dest`).
pub fn write_folder_atomically(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dest
        .file_name()
        .context("checkpoint path has no folder name")?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .with_context(|| format!("cannot replace {}", dest.display()))?;
    }
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))
}

/// Writes the model part of a checkpoint into `dir`: config and tokenizer files from
/// `source_dir`, weights from `params`.
pub fn write_model_files(
    dir: &Path,
    source_dir: &Path,
    layout: &ParamLayout,
    params: &[f32],
) -> Result<()> {
    if params.iter().any(|v| !v.is_finite()) {
        bail!("refusing to write a checkpoint with non-finite weights");
    }
    for f in MODEL_FILES {
        let src = source_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    crate::weights::save_params(&dir.join("model.safetensors"), layout, params)
}
