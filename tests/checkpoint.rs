//! Checkpoints round-trip: a model written back as a HF folder loads to the same parameters and
//! scores the same; a failed write leaves nothing behind.

use std::path::Path;
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::checkpoint::{write_folder_atomically, write_model_files};
use thinkshort::model::Model;

#[test]
fn saved_model_reloads_bit_for_bit() {
    for name in [
        "qwen2_tied",
        "llama_untied_bf16",
        "qwen2_sharded_f16",
        "qwen3_qknorm",
    ] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let model = Model::load(&src, CpuBackend).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("step-000001");
        write_folder_atomically(&dest, |dir| {
            write_model_files(dir, &src, &model.layout, &model.params)
        })
        .unwrap();
        let back = Model::load(&dest, CpuBackend).unwrap();
        assert_eq!(back.params, model.params, "{name}");
        assert!(dest.join("tokenizer.json").is_file() && dest.join("config.json").is_file());
        let st = std::fs::read(dest.join("model.safetensors")).unwrap();
        let names = safetensors::SafeTensors::deserialize(&st)
            .unwrap()
            .names()
            .len();
        assert_eq!(
            names,
            model.layout.specs.len(),
            "{name}: tied heads are written once"
        );
        // Only the checkpoint itself is left in the parent folder.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}

#[test]
fn a_failed_write_leaves_no_partial_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("ckpt");
    let err = write_folder_atomically(&dest, |dir| {
        std::fs::write(dir.join("half.bin"), b"x").unwrap();
        anyhow::bail!("interrupted")
    });
    assert!(err.is_err());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "partial files left behind"
    );
}

#[test]
fn non_finite_weights_never_reach_a_checkpoint() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_tied");
    let mut model = Model::load(&src, CpuBackend).unwrap();
    model.params[7] = f32::NAN;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("ckpt");
    let err = write_folder_atomically(&dest, |dir| {
        write_model_files(dir, &src, &model.layout, &model.params)
    })
    .unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(!dest.exists());
}

/// The AdamW moments round-trip through optimizer.safetensors bit for bit (two f32 tensors of
/// one value per parameter, the parameters in the layout's list order: HF order, which moves
/// each q, k and v bias back beside its weight); a wrong parameter count, a missing tensor and a
/// truncated file are errors that name the file and the tensor.
#[test]
fn optimizer_moments_round_trip_and_errors_name_the_tensor() {
    use thinkshort::checkpoint::{load_moments, save_moments};
    use thinkshort::config::ModelConfig;
    use thinkshort::params::ParamLayout;
    let fixture = |name: &str| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        ParamLayout::new(&ModelConfig::from_model_dir(&dir).unwrap())
    };
    let layout = fixture("qwen2_tied"); // q, k and v biases
    let other = fixture("llama_untied_bf16");
    let n = layout.total_len();
    assert_ne!(other.total_len(), n);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("optimizer.safetensors");
    let m: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e-3).collect();
    let v: Vec<f32> = m.iter().map(|x| x * x + f32::MIN_POSITIVE).collect();
    save_moments(&path, &layout, &m, &v).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize / 8 / n,
        1,
        "8 bytes a parameter"
    );
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let in_file: Vec<f32> = bytemuck::pod_collect_to_vec(file.tensor("exp_avg").unwrap().data());
    assert_eq!(in_file, layout.in_list_order(&m).concat());
    assert_ne!(
        in_file, m,
        "the fixture's storage order is not its list order"
    );
    let (m2, v2) = load_moments(&path, &layout).unwrap();
    assert!(m2.iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(v2.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));

    let err = format!("{:#}", load_moments(&path, &other).unwrap_err());
    assert!(
        err.contains("optimizer.safetensors")
            && err.contains("exp_avg")
            && err.contains(&format!("[{}]", other.total_len())),
        "{err}"
    );

    // a moment that is not finite is refused at load (it would make every later step NaN)
    let mut bad = v.clone();
    bad[17] = f32::NAN; // in the embedding, first in both orders
    let nan_path = tmp.path().join("nan.safetensors");
    save_moments(&nan_path, &layout, &m, &bad).unwrap();
    let err = format!("{:#}", load_moments(&nan_path, &layout).unwrap_err());
    assert!(
        err.contains("exp_avg_sq") && err.contains("index 17"),
        "{err}"
    );
    // so is a negative second moment (AdamW divides by its square root); a first moment may be
    // negative
    bad[17] = -1.0;
    save_moments(&nan_path, &layout, &m, &bad).unwrap();
    let err = format!("{:#}", load_moments(&nan_path, &layout).unwrap_err());
    assert!(
        err.contains("exp_avg_sq") && err.contains("holds -1 at index 17"),
        "{err}"
    );
    assert!(m.iter().any(|&x| x < 0.0));

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", load_moments(&path, &layout).unwrap_err());
    assert!(
        err.contains("optimizer.safetensors") && err.contains("corrupt"),
        "{err}"
    );

    let zeros = vec![0u8; 4 * n];
    let only_m = safetensors::tensor::serialize(
        [(
            "exp_avg",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], &zeros).unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(&path, only_m).unwrap();
    let err = format!("{:#}", load_moments(&path, &layout).unwrap_err());
    assert!(err.contains("no tensor `exp_avg_sq`"), "{err}");
}
