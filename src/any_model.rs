//! A model on whichever backend `--backend` chose, for the commands that only run the forward
//! pass (generate, logprobs, eval): the generic code is instantiated once per backend here.

use crate::backend::cpu::CpuBackend;
use crate::backend::BackendKind;
use crate::config::ModelConfig;
use crate::cuda::CudaBackend;
use crate::generate::{generate, Completion, Detokenize, GenerateConfig, GenerationRequest};
use crate::model::Model;
use crate::score::{completion_logprobs, ScoreItem};
use anyhow::{bail, Result};
use std::path::Path;

pub enum AnyModel {
    Cpu(Model<CpuBackend>),
    Cuda(Model<CudaBackend>),
}

impl AnyModel {
    /// Loads a Hugging Face model folder onto `device` (already resolved: `Cpu` or `Cuda`).
    pub fn load(dir: &Path, device: BackendKind) -> Result<Self> {
        Ok(match device {
            BackendKind::Cpu => AnyModel::Cpu(Model::load(dir, CpuBackend)?),
            BackendKind::Cuda => AnyModel::Cuda(Model::load(dir, CudaBackend::new(0)?)?),
            BackendKind::Auto => bail!("AnyModel::load needs a resolved backend, not auto"),
        })
    }

    pub fn cfg(&self) -> &ModelConfig {
        match self {
            AnyModel::Cpu(m) => &m.cfg,
            AnyModel::Cuda(m) => &m.cfg,
        }
    }

    pub fn generate(
        &self,
        requests: &[GenerationRequest],
        config: &GenerateConfig,
        detokenize: Option<Detokenize>,
    ) -> Result<Vec<Completion>> {
        match self {
            AnyModel::Cpu(m) => generate(m, requests, config, detokenize),
            AnyModel::Cuda(m) => generate(m, requests, config, detokenize),
        }
    }

    pub fn completion_logprobs(
        &self,
        items: &[ScoreItem],
        temperature: f32,
    ) -> Result<Vec<Vec<f32>>> {
        match self {
            AnyModel::Cpu(m) => completion_logprobs(m, items, temperature),
            AnyModel::Cuda(m) => completion_logprobs(m, items, temperature),
        }
    }
}
