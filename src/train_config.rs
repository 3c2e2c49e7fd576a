//! Every training knob in one TOML file (`thinkshort train --config FILE --set key=value`), with
//! the paper's and METHOD.md's defaults. Loading validates: unknown keys, wrong types and
//! out-of-range values are errors that name the key (dotted for tables, e.g. `loss.beta`).
//! A run folder stores the resolved config with [`TrainConfig::to_toml_string`].

use crate::curriculum::{generation_cap, Curriculum, Schedule};
use crate::grpo::{
    AdvantageOptions, Aggregation, LengthShape, LossOptions, RewardWeights, Truncated,
};
use crate::optim::{LrDecay, LrSchedule};
use crate::prompt::PromptTemplate;
use crate::sampling::SamplingParams;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a training JSONL line holds its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `{question, answer}` with the gold answer after `####` (commas removed).
    #[default]
    Gsm8k,
    /// `{question, answer}` with the gold answer as the whole `answer` field.
    Generic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Also the temperature of the training log-probs (logits / τ).
    pub temperature: f64,
    /// 1 = off.
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    /// κ: generation cap = κ·B(t), rounded up.
    pub cap_factor: f64,
    /// Extra stop strings besides EOS.
    pub stop: Vec<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            cap_factor: 2.0,
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    pub shape: LengthShape,
    pub weights: RewardWeights,
}

/// The aggregation mode as written in the file; `loss.norm_len` completes
/// `seq-mean-token-sum-norm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationKind {
    #[default]
    SeqMeanTokenMean,
    TokenMean,
    SeqMeanTokenSumNorm,
}

/// Where logπold comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OldLogp {
    /// The training forward pass, before the first update (default).
    #[default]
    Recompute,
    /// The sampler's log-probs (the gap to the trainer's is logged).
    Sampler,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub eps_low: f64,
    pub eps_high: f64,
    /// k3 KL weight; 0 keeps no reference model.
    pub beta: f64,
    /// μ: gradient steps per rollout batch.
    pub epochs: usize,
    pub aggregation: AggregationKind,
    /// The constant of `seq-mean-token-sum-norm`; unset = the run's largest generation cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_len: Option<usize>,
    pub truncated: Truncated,
    pub old_logp: OldLogp,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            eps_low: 0.2,
            eps_high: 0.2,
            beta: 0.01,
            epochs: 1,
            aggregation: AggregationKind::SeqMeanTokenMean,
            norm_len: None,
            truncated: Truncated::Keep,
            old_logp: OldLogp::Recompute,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub decay: LrDecay,
    /// Cosine floor as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Global grad-norm clip; 0 = off.
    pub grad_clip: f64,
    /// Keep the f32 master weights and AdamW moments in host memory and update them on the
    /// CPU (`train::optimizer`): 12 bytes per parameter off the device.
    pub offload: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup: 50,
            decay: LrDecay::Cosine,
            min_lr_ratio: 0.0,
            grad_clip: 1.0,
            offload: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// HF model folder; unset = the caller's built-in default (the demo model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Training JSONL; unset = the caller's built-in default (the synthetic task).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    pub data_format: DataFormat,
    /// `paper`, `chat` (the model's chat template), an inline template holding `{question}`
    /// (and usually `{budget}`), or the path of a template file.
    pub prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub prompts_per_step: usize,
    /// G: completions per prompt.
    pub group_size: usize,
    /// Completions per forward and backward pass of the update (their gradients add up to the
    /// step's); 0 = the fewest passes that fit the device's free memory, filled evenly (one pass
    /// on the CPU): `train::memory::micro_batch`.
    pub micro_batch: usize,
    /// Activation checkpointing: the update keeps only each layer's input and recomputes the
    /// layer's forward in the backward pass (the layers' forward less their down projections
    /// once more; far less memory per sequence, so fewer, larger micro-batches fit).
    pub activation_checkpointing: bool,
    /// Evaluate every this many steps on the held-out split; 0 = off.
    pub eval_every: usize,
    /// Questions held out of the training data for evaluation (the data file's last ones, when
    /// eval_every > 0; the demo draws its own).
    pub eval_size: usize,
    /// Evaluation cap (greedy decoding, prompt budget = the final training budget).
    pub eval_max_tokens: usize,
    /// Write a checkpoint every this many steps; 0 = only at the end.
    pub checkpoint_every: usize,
    /// Keep only the newest this many step-NNNNNN checkpoint folders of the run; 0 = keep all.
    pub keep_checkpoints: usize,
    /// Log every completion of every this many steps (and every held-out response) to
    /// completions.jsonl; 0 = none.
    pub completions_every: usize,
    pub sampling: SamplingConfig,
    pub reward: RewardConfig,
    pub advantage: AdvantageOptions,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            data: None,
            data_format: DataFormat::Gsm8k,
            prompt: "paper".to_string(),
            seed: 0,
            steps: 600,
            prompts_per_step: 16,
            group_size: 8,
            micro_batch: 0,
            activation_checkpointing: false,
            eval_every: 0,
            eval_size: 200,
            eval_max_tokens: 512,
            checkpoint_every: 100,
            keep_checkpoints: 0,
            completions_every: 10,
            sampling: SamplingConfig::default(),
            reward: RewardConfig::default(),
            advantage: AdvantageOptions::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            schedule: Schedule::default(),
        }
    }
}

/// "`key` must be …" errors.
fn range(ok: bool, key: &str, want: &str, got: impl std::fmt::Display) -> Result<()> {
    if !ok {
        bail!("{key} must be {want}, got {got}");
    }
    Ok(())
}

/// Parses `text` into a config, naming the key of any type or unknown-key error.
fn parse(text: &str) -> Result<TrainConfig> {
    let de = toml::Deserializer::parse(text).map_err(|e| anyhow!("{}", e.to_string().trim()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut key = e.path().to_string();
        let msg = e.inner().message().to_string();
        // Errors raised while assembling `[schedule]` from its table stop at the table; the
        // field is in the message.
        if let Some(field) = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| msg.strip_prefix(p))
            .and_then(|m| m.split('`').next())
        {
            if !key.ends_with(field) {
                key = format!("{key}.{field}");
            }
        }
        anyhow!("{key}: {msg}")
    })
}

impl TrainConfig {
    /// A config from TOML text (keys not given keep their defaults), validated.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg = parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("config {}", path.display()))
    }

    /// The resolved config as TOML (it parses back to the same config).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a TrainConfig always serialises to TOML")
    }

    /// Applies one `--set key=value`: `key` is dotted for tables (`loss.beta`), `value` is a
    /// TOML value, and anything that does not parse as one is taken as a string (so
    /// `--set model=runs/x` needs no quotes). Setting `schedule.kind` starts that schedule
    /// from its defaults; set its parameters after it. The result is validated.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_all(&[(key, value)])
    }

    /// Applies several `--set key=value`s in order, then validates the result once, so the
    /// order of keys that constrain each other does not matter (`schedule.b0` then
    /// `schedule.bf`, or the other way round).
    pub fn set_all(&mut self, sets: &[(&str, &str)]) -> Result<()> {
        let mut root = toml::Table::try_from(&*self).expect("a TrainConfig is a TOML table");
        for (key, value) in sets {
            set_in_table(&mut root, key, value)?;
        }
        let text = toml::to_string(&root).expect("a TOML table serialises");
        *self = Self::from_toml_str(&text)?;
        Ok(())
    }

    /// Checks every range; errors name the key.
    pub fn validate(&self) -> Result<()> {
        // TOML integers are i64; a larger seed could not be written into the run folder.
        range(
            self.seed <= i64::MAX as u64,
            "seed",
            "≤ 2^63 − 1",
            self.seed,
        )?;
        range(self.steps >= 1, "steps", "≥ 1", self.steps)?;
        range(
            self.prompts_per_step >= 1,
            "prompts_per_step",
            "≥ 1",
            self.prompts_per_step,
        )?;
        range(self.group_size >= 2, "group_size", "≥ 2", self.group_size)?;
        if self.eval_every > 0 {
            range(
                self.eval_size >= 1,
                "eval_size",
                "≥ 1 when eval_every > 0",
                self.eval_size,
            )?;
        }
        range(
            self.eval_max_tokens >= 1,
            "eval_max_tokens",
            "≥ 1",
            self.eval_max_tokens,
        )?;
        if self.prompt.trim().is_empty() {
            bail!("prompt must be `paper`, `chat`, a template holding {{question}} or a file path, got an empty string");
        }

        let s = &self.sampling;
        range(
            s.temperature > 0.0 && s.temperature.is_finite(),
            "sampling.temperature",
            "a finite number > 0",
            s.temperature,
        )?;
        range(
            s.top_p > 0.0 && s.top_p <= 1.0,
            "sampling.top_p",
            "in (0, 1]",
            s.top_p,
        )?;
        range(
            s.cap_factor >= 1.0 && s.cap_factor.is_finite(),
            "sampling.cap_factor",
            "a finite number ≥ 1",
            s.cap_factor,
        )?;
        if let Some(i) = s.stop.iter().position(|x| x.is_empty()) {
            bail!("sampling.stop[{i}] must not be empty");
        }

        let w = &self.reward.weights;
        for (name, v) in [
            ("correct", w.correct),
            ("length", w.length),
            ("format", w.format),
            ("think", w.think),
            ("answer", w.answer),
        ] {
            range(
                v >= 0.0 && v.is_finite(),
                &format!("reward.weights.{name}"),
                "a finite number ≥ 0",
                v,
            )?;
        }

        let a = &self.advantage;
        range(
            a.eps >= 0.0 && a.eps.is_finite(),
            "advantage.eps",
            "a finite number ≥ 0",
            a.eps,
        )?;

        let l = &self.loss;
        range(
            l.eps_low >= 0.0 && l.eps_low < 1.0,
            "loss.eps_low",
            "in [0, 1)",
            l.eps_low,
        )?;
        range(
            l.eps_high >= 0.0 && l.eps_high.is_finite(),
            "loss.eps_high",
            "a finite number ≥ 0",
            l.eps_high,
        )?;
        range(
            l.beta >= 0.0 && l.beta.is_finite(),
            "loss.beta",
            "a finite number ≥ 0",
            l.beta,
        )?;
        range(l.epochs >= 1, "loss.epochs", "≥ 1", l.epochs)?;
        if let Some(n) = l.norm_len {
            range(n >= 1, "loss.norm_len", "≥ 1", n)?;
        }

        let o = &self.optim;
        range(
            o.lr > 0.0 && o.lr.is_finite(),
            "optim.lr",
            "a finite number > 0",
            o.lr,
        )?;
        range(
            (0.0..1.0).contains(&o.beta1),
            "optim.beta1",
            "in [0, 1)",
            o.beta1,
        )?;
        range(
            (0.0..1.0).contains(&o.beta2),
            "optim.beta2",
            "in [0, 1)",
            o.beta2,
        )?;
        range(
            o.eps > 0.0 && o.eps.is_finite(),
            "optim.eps",
            "a finite number > 0",
            o.eps,
        )?;
        range(
            o.weight_decay >= 0.0 && o.weight_decay.is_finite(),
            "optim.weight_decay",
            "a finite number ≥ 0",
            o.weight_decay,
        )?;
        range(
            (0.0..=1.0).contains(&o.min_lr_ratio),
            "optim.min_lr_ratio",
            "in [0, 1]",
            o.min_lr_ratio,
        )?;
        range(
            o.grad_clip >= 0.0 && o.grad_clip.is_finite(),
            "optim.grad_clip",
            "a finite number ≥ 0 (0 = off)",
            o.grad_clip,
        )?;

        self.schedule.validate(self.steps)
    }

    /// The prompt template `prompt` names (a file path is read now).
    pub fn prompt_template(&self) -> Result<PromptTemplate> {
        match self.prompt.as_str() {
            "paper" => Ok(PromptTemplate::paper()),
            "chat" => Ok(PromptTemplate::default_chat()),
            p if p.contains("{question}") => PromptTemplate::plain(p),
            p => PromptTemplate::from_file(Path::new(p))
                .context("config key prompt (a template written out must contain {question})"),
        }
    }

    /// The run's budget curriculum.
    pub fn curriculum(&self) -> Result<Curriculum> {
        Curriculum::new(self.schedule.clone(), self.steps)
    }

    /// The generation cap at `step` of `curriculum`.
    pub fn cap_at(&self, curriculum: &Curriculum, step: usize) -> usize {
        generation_cap(curriculum.budget_at(step), self.sampling.cap_factor)
    }

    /// Loss options; `seq-mean-token-sum-norm` without `loss.norm_len` divides by the largest
    /// generation cap of the run (the longest a completion can be: step 0's in a shrinking
    /// curriculum, a later one where a `list` schedule raises the budget; the adaptive schedule
    /// never rises above b0).
    pub fn loss_options(&self) -> Result<LossOptions> {
        let aggregation = match self.loss.aggregation {
            AggregationKind::SeqMeanTokenMean => Aggregation::SeqMeanTokenMean,
            AggregationKind::TokenMean => Aggregation::TokenMean,
            AggregationKind::SeqMeanTokenSumNorm => {
                let max_len = match self.loss.norm_len {
                    Some(n) => n,
                    None => {
                        let curriculum = self.curriculum()?;
                        let steps = 0..self.steps.max(1);
                        steps
                            .map(|s| self.cap_at(&curriculum, s))
                            .max()
                            .unwrap_or(1)
                    }
                };
                Aggregation::SeqMeanTokenSumNorm { max_len }
            }
        };
        Ok(LossOptions {
            eps_low: self.loss.eps_low,
            eps_high: self.loss.eps_high,
            beta: self.loss.beta,
            aggregation,
            truncated: self.loss.truncated,
        })
    }

    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            peak: self.optim.lr,
            warmup: self.optim.warmup,
            total: self.steps,
            decay: self.optim.decay,
            min_ratio: self.optim.min_lr_ratio,
        }
    }

    /// Rollout sampling settings.
    pub fn sampling_params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.sampling.temperature as f32,
            top_k: self.sampling.top_k,
            top_p: self.sampling.top_p as f32,
        }
    }
}

/// One `--set key=value` on the config's TOML table (checked when the table is parsed).
fn set_in_table(root: &mut toml::Table, key: &str, value: &str) -> Result<()> {
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) if t.len() == 1 => t.remove("v").expect("one key"),
        _ => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("malformed key `{key}`");
    }
    let (leaf, tables) = parts.split_last().expect("split gives one part at least");
    let mut table = root;
    for (i, part) in tables.iter().enumerate() {
        table = match table.get_mut(*part) {
            Some(toml::Value::Table(t)) => t,
            _ => bail!(
                "{key}: unknown key ({} is not a table)",
                parts[..=i].join(".")
            ),
        };
    }
    if key == "schedule.kind" {
        table.clear();
    }
    table.insert(leaf.to_string(), value);
    Ok(())
}
