//! Reading HF safetensors checkpoints (single file or sharded) into the contiguous parameter
//! buffer, converting f32/bf16/f16 to f32. Every tensor is checked against the config's shape.

use crate::config::ModelConfig;
use crate::params::ParamLayout;
use crate::safetensors_writer::{write_f32_safetensors, F32Tensor};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The safetensors files of a model folder: `model.safetensors`, or the shards named in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        bail!(
            "missing weights in {}: neither model.safetensors nor model.safetensors.index.json exists",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing key `weight_map` (an object)", index.display()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: `weight_map.{tensor}` is not a file name",
                index.display()
            )
        })?;
        // a shard is a file of the model folder: not a path leading elsewhere
        if file.is_empty() || file.contains(['/', '\\']) || file == ".." {
            bail!(
                "{}: `weight_map.{tensor}` names {file:?}, not a file of the model folder",
                index.display()
            );
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// Loads every parameter of `layout` from the model folder into one f32 buffer.
pub fn load_params(dir: &Path, cfg: &ModelConfig, layout: &ParamLayout) -> Result<Vec<f32>> {
    let files = weight_files(dir)?;
    let maps: Vec<(PathBuf, Mmap)> = files
        .into_iter()
        .map(|path| {
            let file = File::open(&path)
                .with_context(|| format!("missing weights file {}", path.display()))?;
            // SAFETY: the mapping is read-only and lives only while we copy out of it; a file
            // changed underneath us would give wrong numbers, not memory unsafety for f32 copies.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            Ok((path, map))
        })
        .collect::<Result<_>>()?;
    let parsed: Vec<(&PathBuf, SafeTensors)> = maps
        .iter()
        .map(|(path, map)| {
            let st = SafeTensors::deserialize(map).with_context(|| {
                format!(
                    "{} is not a valid safetensors file (truncated or corrupt?)",
                    path.display()
                )
            })?;
            Ok((path, st))
        })
        .collect::<Result<_>>()?;
    let mut where_is: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (_, st)) in parsed.iter().enumerate() {
        for name in st.names() {
            where_is.insert(name.to_string(), i);
        }
    }

    // Every tensor the config names must be there before the parameters are allocated (a config
    // with far more layers than the weights would otherwise allocate first), and weights of
    // layers the config does not have mean the config is not this model's.
    if let Some(spec) = layout
        .specs
        .iter()
        .find(|s| !where_is.contains_key(&s.name))
    {
        let hint = if spec.name == "lm_head.weight" {
            " (the config says tie_word_embeddings = false)"
        } else {
            ""
        };
        bail!(
            "missing tensor `{}` in the weights of {}{hint}",
            spec.name,
            dir.display()
        );
    }
    if let Some(extra) = where_is
        .keys()
        .find(|name| layer_index(name).is_some_and(|layer| layer >= cfg.num_layers))
    {
        bail!(
            "the weights of {} hold `{extra}`, a layer beyond the {} of config.json \
             (num_hidden_layers): the config is not this model's",
            dir.display(),
            cfg.num_layers
        );
    }

    // A tensor the config leaves unused means the config describes another architecture (Qwen2
    // weights with model_type llama would lose their q/k/v biases and give wrong outputs
    // silently). Two kinds are left out on purpose, as transformers leaves them: a tied model's
    // stored copy of the head, and the rotary frequencies older checkpoints keep.
    let used: std::collections::HashSet<&str> =
        layout.specs.iter().map(|s| s.name.as_str()).collect();
    let ignored = |name: &str| {
        (name == "lm_head.weight" && cfg.tie_word_embeddings)
            || name.ends_with("rotary_emb.inv_freq")
    };
    if let Some(unused) = where_is
        .keys()
        .find(|name| !used.contains(name.as_str()) && !ignored(name))
    {
        let hint = if ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
            .iter()
            .any(|b| unused.ends_with(b))
        {
            " (Qwen2 weights, whose q/k/v projections have biases, need model_type qwen2; \
             Llama and Qwen3 ones, attention_bias true)"
        } else {
            ""
        };
        bail!(
            "the weights of {} hold `{unused}`, which config.json (model_type {:?}) has no use \
             for: the config is not this model's{hint}",
            dir.display(),
            cfg.arch
        );
    }

    let mut params = vec![0.0f32; layout.total_len()];
    for spec in &layout.specs {
        let (path, st) = &parsed[where_is[&spec.name]]; // present: checked above
        let view = st
            .tensor(&spec.name)
            .with_context(|| format!("{}: tensor `{}`", path.display(), spec.name))?;
        if view.shape() != spec.shape.as_slice() {
            bail!(
                "{}: tensor `{}` has shape {:?}, but config.json (vocab {}, hidden {}) implies {:?}",
                path.display(),
                spec.name,
                view.shape(),
                cfg.vocab_size,
                cfg.hidden_size,
                spec.shape
            );
        }
        let dst = &mut params[spec.range()];
        convert_to_f32(view.dtype(), view.data(), dst)
            .with_context(|| format!("{}: tensor `{}`", path.display(), spec.name))?;
        if let Some(bad) = dst.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{}` holds a non-finite value at element {bad}",
                path.display(),
                spec.name
            );
        }
    }
    Ok(params)
}

/// Converts little-endian tensor bytes to f32. Bytes inside a mapping may be unaligned, so
/// they are decoded per element rather than cast.
fn convert_to_f32(dtype: Dtype, bytes: &[u8], dst: &mut [f32]) -> Result<()> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        other => bail!("unsupported dtype {other:?} (supported: F32, BF16, F16)"),
    };
    if bytes.len() != dst.len() * width {
        bail!(
            "holds {} bytes, expected {} for {} elements of {dtype:?}",
            bytes.len(),
            dst.len() * width,
            dst.len()
        );
    }
    match dtype {
        Dtype::F32 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        _ => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
    Ok(())
}

/// Writes every parameter of `layout` as an f32 `model.safetensors` in HF tensor names (a tied
/// LM head is the embedding and is not written twice, as transformers expects).
pub fn save_params(path: &Path, layout: &ParamLayout, params: &[f32]) -> Result<()> {
    let tensors: Vec<F32Tensor> = layout
        .specs
        .iter()
        .map(|s| F32Tensor {
            name: &s.name,
            shape: s.shape.clone(),
            data: vec![&params[s.range()]],
        })
        .collect();
    write_f32_safetensors(path, &tensors, &[("format", "pt")])
}

/// The layer of a tensor named `model.layers.<i>.…`.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}
