//! config.json parsing: both rope key styles, llama3 scaling, and errors that name the key.

use thinkshort::config::{Arch, ModelConfig, RopeScaling};

const BASE: &str = r#""vocab_size":100,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4"#;

fn parse(extra: &str) -> anyhow::Result<ModelConfig> {
    ModelConfig::from_json_str(&format!("{{{BASE},{extra}}}"))
}

#[test]
fn classic_and_rope_parameters_keys_agree() {
    let classic = parse(r#""model_type":"llama","rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}"#).unwrap();
    let newer = parse(r#""model_type":"llama","rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}"#).unwrap();
    assert_eq!(classic, newer);
    assert_eq!(classic.arch, Arch::Llama);
    assert!(matches!(classic.rope_scaling, RopeScaling::Llama3 { .. }));
    assert_eq!(classic.num_kv_heads, 4);
    assert_eq!(classic.head_dim, 16);
    assert!(!classic.qkv_bias);
}

#[test]
fn llama3_scaling_follows_the_reference_formula() {
    let cfg = parse(r#""model_type":"llama","rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}"#).unwrap();
    let got = cfg.rope_inv_freq();
    // Meta's reference (llama3 `apply_scaling`), in f64.
    for (i, g) in got.iter().enumerate() {
        let f = 1.0 / 500000f64.powf(2.0 * i as f64 / 16.0);
        let wavelen = 2.0 * std::f64::consts::PI / f;
        let want = if wavelen < 32.0 / 4.0 {
            f
        } else if wavelen > 32.0 {
            f / 8.0
        } else {
            let smooth = (32.0 / wavelen - 1.0) / 3.0;
            (1.0 - smooth) * f / 8.0 + smooth * f
        };
        assert!(
            (*g as f64 - want).abs() <= 1e-6 * want,
            "i {i}: {g} vs {want}"
        );
    }
    let plain = parse(r#""model_type":"llama","rope_theta":500000.0"#)
        .unwrap()
        .rope_inv_freq();
    assert!(
        got.iter().zip(&plain).any(|(a, b)| a == b) && got.iter().zip(&plain).any(|(a, b)| a != b)
    );
}

#[test]
fn qwen2_has_qkv_bias_and_gqa() {
    let cfg = parse(r#""model_type":"qwen2","num_key_value_heads":2,"tie_word_embeddings":true"#)
        .unwrap();
    assert!(cfg.qkv_bias && !cfg.o_bias && cfg.tie_word_embeddings);
    assert_eq!(cfg.kv_dim(), 32);
}

#[test]
fn errors_name_the_key() {
    let cases = [
        (r#""model_type":"gpt2""#, "model_type"),
        (
            r#""model_type":"qwen2","num_key_value_heads":3"#,
            "num_key_value_heads",
        ),
        (r#""model_type":"qwen2","rope_theta":"big""#, "rope_theta"),
        (
            r#""model_type":"llama","rope_scaling":{"rope_type":"yarn","factor":2.0}"#,
            "rope_type",
        ),
        (
            r#""model_type":"llama","rope_scaling":{"rope_type":"llama3","factor":8.0}"#,
            "low_freq_factor",
        ),
        (r#""model_type":"llama","hidden_act":"gelu""#, "hidden_act"),
    ];
    for (extra, key) in cases {
        let err = format!("{:#}", parse(extra).unwrap_err());
        assert!(err.contains(key), "{extra}: {err}");
    }
    let err = format!(
        "{:#}",
        ModelConfig::from_json_str(r#"{"model_type":"qwen2"}"#).unwrap_err()
    );
    assert!(
        err.contains("vocab_size") || err.contains("hidden_size"),
        "{err}"
    );
}

/// tools/model_configs/ hold the Qwen2.5 shapes: their parameter counts are the published ones
/// (0.49B, 1.54B, 3.09B, 7.62B; to the 10M), and they parse with the expected heads.
#[test]
fn model_configs_have_the_published_sizes() {
    for (name, billions, kv_heads, head_dim) in [
        ("qwen2.5-0.5b", 0.49, 2, 64),
        ("qwen2.5-1.5b", 1.54, 2, 128),
        ("qwen2.5-3b", 3.09, 2, 128),
        ("qwen2.5-7b", 7.62, 4, 128),
    ] {
        let path = format!(
            "{}/tools/model_configs/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let cfg = ModelConfig::from_json_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let got = cfg.num_params() as f64 / 1e9;
        assert!((got - billions).abs() < 0.01, "{name}: {got}B parameters");
        assert_eq!(
            (cfg.num_kv_heads, cfg.head_dim),
            (kv_heads, head_dim),
            "{name}"
        );
        assert_eq!(cfg.arch, Arch::Qwen2, "{name}");
    }
}

/// Qwen3: per-head q/k norms (`q_norm`, `k_norm` weights of head_dim in every layer), biases on
/// q, k, v and o only with `attention_bias`, a head dimension of its own.
#[test]
fn qwen3_has_qk_norms_and_biases_from_attention_bias() {
    let cfg = parse(r#""model_type":"qwen3","head_dim":32,"num_key_value_heads":2"#).unwrap();
    assert_eq!(cfg.arch, Arch::Qwen3);
    assert!(cfg.qk_norm && !cfg.qkv_bias && !cfg.o_bias && !cfg.mlp_bias);
    assert_eq!((cfg.q_dim(), cfg.kv_dim()), (128, 64));
    let layout = thinkshort::params::ParamLayout::new(&cfg);
    let names: Vec<&str> = layout.specs.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "model.layers.1.self_attn.q_norm.weight",
        "model.layers.1.self_attn.k_norm.weight",
    ] {
        let spec = &layout.specs[names.iter().position(|&n| n == name).unwrap()];
        assert_eq!(spec.shape, vec![32], "{name}");
    }
    let biased = parse(r#""model_type":"qwen3","attention_bias":true"#).unwrap();
    assert!(biased.qkv_bias && biased.o_bias && !biased.mlp_bias);
    // without a head_dim key: transformers' Qwen3Config default, 128 (not hidden / heads = 16)
    assert_eq!(biased.head_dim, 128);
    // Qwen2 and Llama have no q/k norms
    for model_type in ["qwen2", "llama"] {
        let other = parse(&format!(r#""model_type":"{model_type}""#)).unwrap();
        assert!(!other.qk_norm, "{model_type}");
    }
    let err = parse(r#""model_type":"gemma""#).unwrap_err().to_string();
    assert!(err.contains("supported: qwen2, qwen3, llama"), "{err}");
}
