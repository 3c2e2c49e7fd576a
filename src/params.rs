//! Where every parameter tensor lives inside the one contiguous parameter buffer.
//!
//! All weights sit in a single allocation (gradients later in a second one of the same layout):
//! one optimizer launch, one global norm, simple checkpoint I/O. The layout is derived from the
//! config alone, in HF tensor names, so loading and saving are a walk over this list.
//!
//! The list is in HF order (random initialisation draws tensor after tensor in it, and the
//! optimizer file keeps the moments in it); the buffer is in storage order, which is HF order
//! except that a layer's q, k and v weights sit side by side, their biases after them, so the
//! three projections are one [q_dim + 2 kv_dim, hidden] matrix and one product; likewise the
//! MLP's gate and up weights, one [2 intermediate, hidden] matrix.

use crate::config::ModelConfig;
use std::ops::Range;

#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// HF tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset in elements into the parameter buffer (storage order).
    pub offset: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> Range<usize> {
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

impl LayerParams {
    /// The layer's tensors in storage order: HF order with the q, k and v biases moved after
    /// the v weight and the gate bias after the up weight.
    fn storage_order(&self) -> impl Iterator<Item = usize> {
        [
            Some(self.input_norm),
            Some(self.q),
            Some(self.k),
            Some(self.v),
            self.q_bias,
            self.k_bias,
            self.v_bias,
            self.q_norm,
            self.k_norm,
            Some(self.o),
            self.o_bias,
            Some(self.post_norm),
            Some(self.gate),
            Some(self.up),
            self.gate_bias,
            self.up_bias,
            Some(self.down),
            self.down_bias,
        ]
        .into_iter()
        .flatten()
    }
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
        // offsets are given below, in storage order
        let mut add = |name: String, shape: Vec<usize>| -> usize {
            specs.push(ParamSpec {
                name,
                shape,
                offset: 0,
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
        let mut storage = vec![embed];
        storage.extend(layers.iter().flat_map(LayerParams::storage_order));
        storage.push(final_norm);
        if !cfg.tie_word_embeddings {
            storage.push(lm_head);
        }
        debug_assert_eq!(storage.len(), specs.len());
        let mut offset = 0;
        for idx in storage {
            specs[idx].offset = offset;
            offset += specs[idx].len();
        }
        ParamLayout {
            specs,
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }

    pub fn total_len(&self) -> usize {
        self.specs.iter().map(ParamSpec::len).sum()
    }

    /// Layer l's q, k and v weights as one matrix: [q_dim + 2 kv_dim, hidden].
    pub fn qkv_weights(&self, l: usize) -> Range<usize> {
        let lp = &self.layers[l];
        self.span(lp.q, lp.v)
    }

    /// Layer l's q, k and v biases as one vector, when it has all three: [q_dim + 2 kv_dim].
    pub fn qkv_biases(&self, l: usize) -> Option<Range<usize>> {
        let lp = &self.layers[l];
        let (q, _, v) = (lp.q_bias?, lp.k_bias?, lp.v_bias?);
        Some(self.span(q, v))
    }

    /// Layer l's gate and up weights as one matrix: [2 intermediate, hidden].
    pub fn gate_up_weights(&self, l: usize) -> Range<usize> {
        let lp = &self.layers[l];
        self.span(lp.gate, lp.up)
    }

    /// Layer l's gate and up biases as one vector, when it has both: [2 intermediate].
    pub fn gate_up_biases(&self, l: usize) -> Option<Range<usize>> {
        let lp = &self.layers[l];
        Some(self.span(lp.gate_bias?, lp.up_bias?))
    }

    /// Tensors `first` to `last`, which storage order puts side by side, as one range.
    fn span(&self, first: usize, last: usize) -> Range<usize> {
        self.specs[first].offset..self.specs[last].range().end
    }

    /// A buffer of this layout (storage order) as the tensors one after the other in list
    /// (HF) order: the order of the flat moment tensors in a checkpoint's optimizer file.
    pub fn in_list_order<'a>(&self, values: &'a [f32]) -> Vec<&'a [f32]> {
        self.specs.iter().map(|s| &values[s.range()]).collect()
    }

    /// The inverse of [`ParamLayout::in_list_order`]: values in list order, into storage order.
    pub fn from_list_order(&self, values: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; values.len()];
        let mut start = 0;
        for s in &self.specs {
            out[s.range()].copy_from_slice(&values[start..start + s.len()]);
            start += s.len();
        }
        out
    }

    pub fn range(&self, idx: usize) -> Range<usize> {
        self.specs[idx].range()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        let path = format!("{}/tools/model_configs/{json}", env!("CARGO_MANIFEST_DIR"));
        ModelConfig::from_json_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn storage_covers_the_buffer_once_with_each_layers_fused_weights_side_by_side() {
        for json in ["qwen2.5-0.5b.json", "qwen3-0.6b.json"] {
            let cfg = config(json);
            let layout = ParamLayout::new(&cfg);
            let mut ranges: Vec<_> = layout.specs.iter().map(ParamSpec::range).collect();
            ranges.sort_by_key(|r| r.start);
            let mut end = 0;
            for r in &ranges {
                assert_eq!(r.start, end, "{json}: a gap or an overlap at {end}");
                end = r.end;
            }
            assert_eq!(end, layout.total_len());
            assert_eq!(end, cfg.num_params());
            let rows = cfg.q_dim() + 2 * cfg.kv_dim();
            for (l, lp) in layout.layers.iter().enumerate() {
                let qkv = layout.qkv_weights(l);
                assert_eq!(qkv.len(), rows * cfg.hidden_size);
                let parts = [lp.q, lp.k, lp.v].map(|i| layout.range(i));
                assert_eq!(parts[0].start, qkv.start);
                assert_eq!(parts[1].start, parts[0].end);
                assert_eq!(parts[2].start, parts[1].end);
                match layout.qkv_biases(l) {
                    Some(biases) => {
                        assert!(cfg.qkv_bias);
                        assert_eq!(biases.len(), rows);
                        let parts =
                            [lp.q_bias, lp.k_bias, lp.v_bias].map(|i| layout.range(i.unwrap()));
                        assert_eq!(parts[0].start, biases.start);
                        assert_eq!(parts[1].start, parts[0].end);
                        assert_eq!(parts[2].start, parts[1].end);
                    }
                    None => assert!(!cfg.qkv_bias),
                }
                let gate_up = layout.gate_up_weights(l);
                assert_eq!(gate_up.len(), 2 * cfg.intermediate_size * cfg.hidden_size);
                assert_eq!(layout.range(lp.gate).start, gate_up.start);
                assert_eq!(layout.range(lp.up).end, gate_up.end);
                assert_eq!(layout.gate_up_biases(l).is_some(), cfg.mlp_bias);
            }
        }
    }

    #[test]
    fn list_order_is_hf_order_and_round_trips() {
        let cfg = config("qwen2.5-0.5b.json");
        let layout = ParamLayout::new(&cfg);
        // the q bias follows the q weight in HF order but not in storage order
        let lp = &layout.layers[0];
        assert_eq!(lp.q_bias, Some(lp.q + 1));
        assert_ne!(
            layout.range(lp.q_bias.unwrap()).start,
            layout.range(lp.q).end
        );

        // each value names its tensor: list order is tensor index order
        let mut storage = vec![0.0f32; layout.total_len()];
        for (i, s) in layout.specs.iter().enumerate() {
            storage[s.range()].fill(i as f32);
        }
        let listed: Vec<f32> = layout.in_list_order(&storage).concat();
        assert!(listed.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(layout.from_list_order(&listed), storage);
    }
}
