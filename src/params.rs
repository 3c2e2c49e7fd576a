//! Where every parameter tensor lives inside the one contiguous parameter buffer.
//!
//! All weights sit in a single allocation (gradients later in a second one of the same layout):
//! one optimizer launch, one global norm, simple checkpoint I/O. The layout is derived from the
//! config alone, in HF tensor names, so loading and saving are a walk over this list.

use crate::config::ModelConfig;

#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// HF tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset in elements into the parameter buffer.
    pub offset: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Indices into `ParamLayout::specs` for one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerParams {
    pub input_norm: usize,
    pub q: usize,
    pub q_bias: Option<usize>,
    pub k: usize,
    pub k_bias: Option<usize>,
    pub v: usize,
    pub v_bias: Option<usize>,
    /// RMSNorm weights over each head of q and of k, [head_dim] (Qwen3).
    pub q_norm: Option<usize>,
    pub k_norm: Option<usize>,
    pub o: usize,
    pub o_bias: Option<usize>,
    pub post_norm: usize,
    pub gate: usize,
    pub gate_bias: Option<usize>,
    pub up: usize,
    pub up_bias: Option<usize>,
    pub down: usize,
    pub down_bias: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub embed: usize,
    pub layers: Vec<LayerParams>,
    pub final_norm: usize,
    /// The LM head: `lm_head.weight`, or the embedding when tied.
    pub lm_head: usize,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let mut specs: Vec<ParamSpec> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| -> usize {
            let offset = specs.last().map_or(0, |s| s.offset + s.len());
            specs.push(ParamSpec {
                name,
                shape,
                offset,
            });
            specs.len() - 1
        };
        let add_if = |on: bool,
                      name: String,
                      shape: Vec<usize>,
                      add: &mut dyn FnMut(String, Vec<usize>) -> usize| {
            on.then(|| add(name, shape))
        };

        let embed = add("model.embed_tokens.weight".into(), vec![v, h]);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let input_norm = add(format!("{p}.input_layernorm.weight"), vec![h]);
            let q_w = add(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
            let q_bias = add_if(
                cfg.qkv_bias,
                format!("{p}.self_attn.q_proj.bias"),
                vec![q],
                &mut add,
            );
            let k_w = add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
            let k_bias = add_if(
                cfg.qkv_bias,
                format!("{p}.self_attn.k_proj.bias"),
                vec![kv],
                &mut add,
            );
            let v_w = add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
            let v_bias = add_if(
                cfg.qkv_bias,
                format!("{p}.self_attn.v_proj.bias"),
                vec![kv],
                &mut add,
            );
            let q_norm = add_if(
                cfg.qk_norm,
                format!("{p}.self_attn.q_norm.weight"),
                vec![cfg.head_dim],
                &mut add,
            );
            let k_norm = add_if(
                cfg.qk_norm,
                format!("{p}.self_attn.k_norm.weight"),
                vec![cfg.head_dim],
                &mut add,
            );
            let o = add(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
            let o_bias = add_if(
                cfg.o_bias,
                format!("{p}.self_attn.o_proj.bias"),
                vec![h],
                &mut add,
            );
            let post_norm = add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
            let gate = add(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
            let gate_bias = add_if(
                cfg.mlp_bias,
                format!("{p}.mlp.gate_proj.bias"),
                vec![i],
                &mut add,
            );
            let up = add(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
            let up_bias = add_if(
                cfg.mlp_bias,
                format!("{p}.mlp.up_proj.bias"),
                vec![i],
                &mut add,
            );
            let down = add(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
            let down_bias = add_if(
                cfg.mlp_bias,
                format!("{p}.mlp.down_proj.bias"),
                vec![h],
                &mut add,
            );
            layers.push(LayerParams {
                input_norm,
                q: q_w,
                q_bias,
                k: k_w,
                k_bias,
                v: v_w,
                v_bias,
                q_norm,
                k_norm,
                o,
                o_bias,
                post_norm,
                gate,
                gate_bias,
                up,
                up_bias,
                down,
                down_bias,
            });
        }
        let final_norm = add("model.norm.weight".into(), vec![h]);
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else {
            add("lm_head.weight".into(), vec![v, h])
        };
        ParamLayout {
            specs,
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }

    pub fn total_len(&self) -> usize {
        self.specs.last().map_or(0, |s| s.offset + s.len())
    }

    pub fn range(&self, idx: usize) -> std::ops::Range<usize> {
        self.specs[idx].range()
    }
}
