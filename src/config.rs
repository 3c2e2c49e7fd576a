//! The model's `config.json` (Qwen2, Qwen3 and Llama families), parsed and validated.
//!
//! Every error names the file and the key, so a user can fix a broken config without reading code.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    /// Qwen2 with an RMSNorm on each head of q and k before the rotation, and `attention_bias`.
    Qwen3,
    Llama,
}

/// How rotary frequencies are derived from `theta` (HF `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF "linear").
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling (HF "llama3").
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (always on in Qwen2, `attention_bias` in Qwen3 and Llama).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` in Qwen3 and Llama; never in Qwen2).
    pub o_bias: bool,
    /// Bias on gate/up/down (`mlp_bias` in Llama).
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and of k (weights [head_dim], shared by the heads) between
    /// the projection and the rotation (Qwen3's `q_norm`, `k_norm`).
    pub qk_norm: bool,
}

/// Fails unless `dir` is a folder: a model folder that is missing, or a file named instead of
/// its folder, gets that said rather than a missing file inside it.
pub fn check_model_folder(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        bail!(
            "the model folder {} is a file: name the folder that holds config.json",
            dir.display()
        );
    }
    bail!("the model folder {} does not exist", dir.display())
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        check_model_folder(dir)?;
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("missing or unreadable model config {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).context("not valid JSON")?;
        let obj = root.as_object().context("top level is not a JSON object")?;
        let j = Keys(obj);

        let model_type = j.str("model_type")?;
        let arch = match model_type.as_str() {
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "llama" => Arch::Llama,
            other => bail!(
                "key `model_type`: unsupported architecture {other:?} (supported: qwen2, qwen3, llama)"
            ),
        };
        if let Some(act) = j.opt_str("hidden_act")? {
            if act != "silu" {
                bail!("key `hidden_act`: only \"silu\" (SwiGLU) is supported, got {act:?}");
            }
        }

        if j.opt_bool("use_sliding_window")? == Some(true) {
            bail!("key `use_sliding_window`: sliding-window attention is not supported");
        }
        if let Some(types) = j.present("layer_types") {
            let all_full = types
                .as_array()
                .is_some_and(|a| a.iter().all(|t| t == "full_attention"));
            if !all_full {
                bail!(
                    "key `layer_types`: only \"full_attention\" layers are supported, got {types}"
                );
            }
        }

        let hidden_size = j.usize("hidden_size")?;
        let num_heads = j.usize("num_attention_heads")?;
        let num_kv_heads = j.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match j.opt_usize("head_dim")? {
            Some(d) => d,
            // transformers' Qwen3Config defaults to 128, not hidden / heads
            None if arch == Arch::Qwen3 => 128,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("key `num_attention_heads`: hidden_size {hidden_size} is not divisible by {num_heads} heads");
                }
                hidden_size / num_heads
            }
        };
        if num_heads % num_kv_heads != 0 {
            bail!("key `num_key_value_heads`: {num_heads} attention heads are not a multiple of {num_kv_heads} KV heads");
        }
        if head_dim % 2 != 0 {
            bail!("key `head_dim`: rotary embeddings need an even head dimension, got {head_dim}");
        }

        let (rope_theta, rope_scaling) = parse_rope(&j)?;
        let attention_bias = j.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Qwen2 => (true, false, false),
            Arch::Qwen3 => (attention_bias, attention_bias, false),
            Arch::Llama => (
                attention_bias,
                attention_bias,
                j.opt_bool("mlp_bias")?.unwrap_or(false),
            ),
        };
        let rms_norm_eps = j.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0) {
            bail!("key `rms_norm_eps`: must be > 0, got {rms_norm_eps}");
        }

        Ok(ModelConfig {
            arch,
            vocab_size: j.usize("vocab_size")?,
            hidden_size,
            intermediate_size: j.usize("intermediate_size")?,
            num_layers: j.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: j.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: j.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: arch == Arch::Qwen3,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Rotary inverse frequencies, [head_dim/2], with the configured scaling applied (HF semantics).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                // HF computes base^(-2i/d) in float32 after an int64 arange; f64 here then rounding
                // to f32 matches it to the last bit for the sizes we use.
                let inv = 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64);
                let inv = inv as f32 as f64;
                (match &self.rope_scaling {
                    RopeScaling::None => inv,
                    RopeScaling::Linear { factor } => inv / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: old_ctx,
                    } => {
                        let low_freq_wavelen = old_ctx / low_freq_factor;
                        let high_freq_wavelen = old_ctx / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / inv;
                        if wavelen < high_freq_wavelen {
                            inv
                        } else if wavelen > low_freq_wavelen {
                            inv / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    }
                }) as f32
            })
            .collect()
    }

    /// Number of parameters, counting a tied LM head once.
    pub fn num_params(&self) -> usize {
        crate::params::ParamLayout::new(self).total_len()
    }
}

/// `rope_theta` + `rope_scaling` (classic keys) or `rope_parameters` (newer transformers).
fn parse_rope(j: &Keys) -> Result<(f64, RopeScaling)> {
    let (theta, scaling_obj, key) = match j.0.get("rope_parameters") {
        Some(Value::Object(p)) => {
            let p = Keys(p);
            let theta = p
                .opt_f64("rope_theta")
                .context("key `rope_parameters`")?
                .or(j.opt_f64("rope_theta")?)
                .unwrap_or(10000.0);
            (theta, Some(p.0.clone()), "rope_parameters")
        }
        Some(Value::Null) | None => {
            let theta = j.opt_f64("rope_theta")?.unwrap_or(10000.0);
            let scaling = match j.0.get("rope_scaling") {
                Some(Value::Object(s)) => Some(s.clone()),
                Some(Value::Null) | None => None,
                Some(_) => bail!("key `rope_scaling`: expected an object or null"),
            };
            (theta, scaling, "rope_scaling")
        }
        Some(_) => bail!("key `rope_parameters`: expected an object"),
    };
    if !(theta > 0.0) {
        bail!("key `rope_theta`: must be > 0, got {theta}");
    }
    let Some(s) = scaling_obj else {
        return Ok((theta, RopeScaling::None));
    };
    let s = Keys(&s);
    let rope_type = match s.opt_str("rope_type")? {
        Some(t) => t,
        None => s.opt_str("type")?.unwrap_or_else(|| "default".to_string()),
    };
    let ctx = |sub: &str| format!("key `{key}.{sub}`");
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: s.f64("factor").with_context(|| ctx("factor"))? },
        "llama3" => RopeScaling::Llama3 {
            factor: s.f64("factor").with_context(|| ctx("factor"))?,
            low_freq_factor: s.f64("low_freq_factor").with_context(|| ctx("low_freq_factor"))?,
            high_freq_factor: s.f64("high_freq_factor").with_context(|| ctx("high_freq_factor"))?,
            original_max_position_embeddings: s
                .f64("original_max_position_embeddings")
                .with_context(|| ctx("original_max_position_embeddings"))?,
        },
        other => bail!("key `{key}.rope_type`: unsupported rope type {other:?} (supported: default, linear, llama3)"),
    };
    if let RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } = scaling {
        // the frequencies are divided by it
        if !(factor > 0.0 && factor.is_finite()) {
            bail!("key `{key}.factor` must be a finite number > 0, got {factor}");
        }
    }
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
        ..
    } = scaling
    {
        if !(high_freq_factor > low_freq_factor) {
            bail!("key `{key}`: high_freq_factor must exceed low_freq_factor");
        }
        if !(low_freq_factor > 0.0 && original_max_position_embeddings > 0.0) {
            bail!("key `{key}`: low_freq_factor and original_max_position_embeddings must be > 0");
        }
    }
    Ok((theta, scaling))
}

/// Typed access to a JSON object with errors that name the key.
struct Keys<'a>(&'a Map<String, Value>);

impl Keys<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .with_context(|| format!("missing key `{key}`"))
    }
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        match v.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => bail!("key `{key}`: expected a positive integer, got {v}"),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key).map(|_| self.usize(key)).transpose()
    }
    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64()
            .with_context(|| format!("key `{key}`: expected a number, got {v}"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key).map(|_| self.f64(key)).transpose()
    }
    fn str(&self, key: &str) -> Result<String> {
        let v = self.get(key)?;
        v.as_str()
            .map(str::to_string)
            .with_context(|| format!("key `{key}`: expected a string, got {v}"))
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        self.present(key).map(|_| self.str(key)).transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .with_context(|| format!("key `{key}`: expected true or false, got {v}")),
        }
    }
}
