//! Checkpoints: a Hugging Face model folder (config.json, model.safetensors, tokenizer files)
//! that transformers can load, plus the trainer's state to resume from: the AdamW moments in
//! optimizer.safetensors (binary f32: 8 bytes per parameter) and the rest in trainer_state.json.
//! A checkpoint is written under a temporary name and renamed, so an interrupted run never
//! leaves a partial one.

use crate::params::ParamLayout;
use crate::safetensors_writer::{write_f32_safetensors, F32Tensor};
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// The weights of a model folder.
const WEIGHTS_FILE: &str = "model.safetensors";
/// The file of a checkpoint that holds the step, curriculum and AdamW settings.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The file of a checkpoint that holds the AdamW moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Its tensors (PyTorch's names for Adam's state): the first and second moments, [N] f32 each.
const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

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
/// renamed into place, replacing an older `dest` only when that is a model folder (config.json
/// beside safetensors weights) or empty: a folder of other files is the user's, never deleted.
/// On any failure the temporary folder goes too.
pub fn write_folder_atomically(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_replaceable(dest)?;
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
    let moved = write(&tmp).and_then(|()| {
        // checked again: the folder may have changed while `write` ran
        check_replaceable(dest)?;
        if dest.exists() {
            std::fs::remove_dir_all(dest)
                .with_context(|| format!("cannot replace {}", dest.display()))?;
        }
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))
    });
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // The rename itself on the disk (the folder's entry), before older checkpoints may go.
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("cannot sync {}", parent.display()))
}

/// Whether `dest` may be replaced by a model folder: absent, or a folder holding only files a
/// model folder or checkpoint of ours holds (so nothing else in it is lost).
pub fn check_replaceable(dest: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dest) else {
        return Ok(());
    };
    if !meta.is_dir() {
        bail!(
            "{} exists and is not a folder: refusing to replace it",
            dest.display()
        );
    }
    let ours = |name: &str| {
        MODEL_FILES.contains(&name)
            || [WEIGHTS_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE].contains(&name)
    };
    for entry in
        std::fs::read_dir(dest).with_context(|| format!("cannot read {}", dest.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", dest.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(ours(&name) && entry.path().is_file()) {
            bail!(
                "{} holds {name}, which a model folder written here would not keep: refusing to \
                 replace it; choose another path or remove it",
                dest.display()
            );
        }
    }
    Ok(())
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
    crate::weights::save_params(&dir.join(WEIGHTS_FILE), layout, params)
}

/// Writes the AdamW moments m and v ([N] f32 each, in `layout`'s storage order) to `path` as
/// safetensors, each one flat tensor in the layout's list (HF) order, as the files written before
/// the storage order changed hold them.
pub fn save_moments(path: &Path, layout: &ParamLayout, m: &[f32], v: &[f32]) -> Result<()> {
    let n = layout.total_len();
    if m.len() != n || v.len() != n {
        bail!(
            "AdamW moments of {} and {} values for a model of {n} parameters",
            m.len(),
            v.len()
        );
    }
    let tensors: Vec<F32Tensor> = MOMENTS
        .iter()
        .zip([m, v])
        .map(|(name, x)| F32Tensor {
            name,
            shape: vec![n],
            data: layout.in_list_order(x),
        })
        .collect();
    write_f32_safetensors(path, &tensors, &[])
}

/// Reads the AdamW moments (m, v) written by [`save_moments`], in `layout`'s storage order;
/// errors name the file and the tensor.
pub fn load_moments(path: &Path, layout: &ParamLayout) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = layout.total_len();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping, copied out before it is dropped; a file changed underneath us
    // would give wrong numbers, not memory unsafety for f32 copies.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    let st = SafeTensors::deserialize(&map).with_context(|| {
        format!(
            "{} is not a valid safetensors file (truncated or corrupt?)",
            path.display()
        )
    })?;
    let read = |name: &str, nonnegative: bool| -> Result<Vec<f32>> {
        let t = st
            .tensor(name)
            .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
        if t.dtype() != Dtype::F32 || t.shape() != [n] {
            bail!(
                "{}: tensor `{name}` is {:?} {:?}, expected F32 [{n}] (one value per parameter)",
                path.display(),
                t.dtype(),
                t.shape()
            );
        }
        // The file holds the tensors one after the other in list order: each is copied to its
        // range (the data may be unaligned inside the mapping: byte-wise, one value at a time).
        if t.data().len() != 4 * n {
            bail!(
                "{}: tensor `{name}` holds {} bytes, expected {} (F32 [{n}])",
                path.display(),
                t.data().len(),
                4 * n
            );
        }
        let mut values = vec![0.0f32; n];
        let mut values_in_file = t.data().chunks_exact(4).enumerate();
        for spec in &layout.specs {
            for (dst, (i, bytes)) in values[spec.range()].iter_mut().zip(&mut values_in_file) {
                *dst = bytemuck::pod_read_unaligned(bytes);
                // a moment that is not finite would make every later step's weights NaN, and
                // so would a negative second moment (its square root)
                if !dst.is_finite() || (nonnegative && *dst < 0.0) {
                    bail!(
                        "{}: tensor `{name}` holds {dst} at index {i}: not a usable optimizer state",
                        path.display()
                    );
                }
            }
        }
        Ok(values)
    };
    Ok((read(MOMENTS[0], false)?, read(MOMENTS[1], true)?))
}
